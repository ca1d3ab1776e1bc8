"""`pg2-server`: the command line of the runtime.

    pg2-server presets [--json]
    pg2-server generate --local [--checkpoint CKPT | --preset NAME --random-weights] \\
        --source IMG --pose POSE.json --out OUT.png [--grid]

Each subcommand lives in a function `cmd_NAME(args)`; `build_parser` wires them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .keypoints import KeypointError, PoseFileError, load_pose_file

log = logging.getLogger("pg2_server")


def cmd_presets(args: argparse.Namespace) -> int:
    from .model import Generator1, Generator2, PRESETS, count_flops, parameter_count
    import torch

    rows = []
    for name, config in PRESETS.items():
        with torch.device("meta"):
            g1, g2 = Generator1(config), Generator2(config)
        flops = count_flops(config)
        rows.append({"name": name, "canvas": list(config.canvas),
                     "g1_params": parameter_count(g1), "g2_params": parameter_count(g2),
                     "gflops": round((flops["g1"] + flops["g2"]) / 1e9, 3),
                     "g1_gflops": round(flops["g1"] / 1e9, 3), "g2_gflops": round(flops["g2"] / 1e9, 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<12} {'canvas H×W':>11} {'G1 params':>11} {'G2 params':>11} {'GFLOP/image':>12}")
    for r in rows:
        canvas = f"{r['canvas'][0]}×{r['canvas'][1]}"
        print(f"{r['name']:<12} {canvas:>11} {r['g1_params'] / 1e6:>10.2f}M {r['g2_params'] / 1e6:>10.2f}M "
              f"{r['gflops']:>12.2f}")
    print("GFLOP = forward G1 + G2 for one image, 2 FLOP per multiply-add (torch.utils.flop_counter)")
    return 0


def default_checkpoint() -> Path | None:
    """The bundled default model, if this installation has one."""
    path = Path(__file__).parent / "default" / "pg2_default.json"
    return path if path.is_file() else None


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by --checkpoint / --preset --random-weights (default: bundled model)."""
    from .pipeline import Pipeline

    if getattr(args, "random_weights", False):
        if args.checkpoint:
            raise SystemExit("error: give either --checkpoint or --preset with --random-weights, not both")
        return Pipeline.random(args.preset, seed=args.seed, device=args.device, dtype=args.dtype)
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise SystemExit("error: no --checkpoint given and no bundled default model is installed; "
                         "pass --checkpoint PATH or --preset tiny --random-weights")
    return Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=args.dtype)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --preset / --random-weights / --device / --dtype, shared by subcommands."""
    parser.add_argument("--checkpoint", help="NAME.json or NAME.safetensors (default: the bundled model)")
    parser.add_argument("--preset", default="tiny", help="preset for --random-weights (default tiny)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of --preset (testing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def write_grid(path: Path, source: np.ndarray, size, keypoints, generation) -> None:
    """source | target pose | G1 | G2, side by side."""
    from .drawing import draw_pose, image_grid, write_rgb

    pose = draw_pose(keypoints, size)
    cells = [source, pose] + ([generation.g1] if generation.g1 is not None else []) + [generation.image]
    header = ["source", "target pose"] + (["G1"] if generation.g1 is not None else []) + ["G2"]
    write_rgb(path, image_grid([cells], header))


def cmd_generate_local(args: argparse.Namespace) -> int:
    from .drawing import read_rgb, write_rgb

    source = read_rgb(args.source)
    size, keypoints = load_pose_file(args.pose)
    pipeline = load_pipeline(args)
    [generation] = pipeline.generate([source], [keypoints], [size], with_g1=args.grid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        write_grid(out, source, size, keypoints, generation)
    else:
        write_rgb(out, generation.image)
    print(f"wrote {out} ({size[0]}×{size[1]}, model {pipeline.name})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.local:
        return cmd_generate_local(args)
    raise SystemExit("error: pass --local to run the model in this process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg2-server", description="PG2 pose-guided person generation: runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with parameter counts and GFLOP per image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("generate", help="generate one image of the source person in the given pose")
    p.add_argument("--local", action="store_true", help="run the model in this process")
    add_model_arguments(p)
    p.add_argument("--source", required=True, help="photo of the person (PNG/JPEG)")
    p.add_argument("--pose", required=True, help="pose JSON: {size, keypoints} or OpenPose JSON")
    p.add_argument("--out", required=True, help="output image (PNG/JPEG)")
    p.add_argument("--grid", action="store_true", help="write source | target pose | G1 | G2 instead")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (KeypointError, PoseFileError, ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
