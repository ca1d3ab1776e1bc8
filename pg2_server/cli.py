"""`pg2-server`: the command line of the runtime.

    pg2-server presets [--json]
    pg2-server generate --local [--checkpoint CKPT | --preset NAME --random-weights] \\
        --source IMG --pose POSE.json --out OUT.png [--grid]
    pg2-server generate --server tcp://HOST:5557 --source IMG --pose POSE.json|POSE_DIR --out OUT.png|OUT_DIR
    pg2-server generate --local|--server ... --source IMG --pose-from REFERENCE_PHOTO [--frame-target] --out OUT.png
    pg2-server pose PHOTO... --out POSE.json|DIR [--openpose] [--overlay]     # needs the pose extra
    pg2-server serve [--checkpoint CKPT | --preset NAME --random-weights] [--bind tcp://127.0.0.1:5557]
    pg2-server broker --frontend tcp://*:5557 --backend tcp://*:5558 [--curve-secret K --curve-workers DIR]
    pg2-server worker --connect tcp://BROKER:5558 [--checkpoint CKPT] [--device cuda:0] [--curve-secret K --server-key B]
    pg2-server keys DIR NAME
    pg2-server info|ping --server tcp://HOST:5557
    pg2-server bench [--server ENDPOINT | --preset demo --random-weights] --clients 16 --max-batch 16

Each subcommand lives in a function `cmd_NAME(args)`; `build_parser` wires them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from .errors import SetupError
from .keypoints import KeypointError, NoPersonError, PoseFileError, load_pose_file
from .worker_protocol import DRAIN_S, HEARTBEAT_S, SUMMARY_S

log = logging.getLogger("pg2_server")


def cmd_presets(args: argparse.Namespace) -> int:
    from .model import Generator1, Generator2, PRESETS, count_flops, parameter_count
    import torch

    rows = []
    for name, config in PRESETS.items():
        with torch.device("meta"):
            g1, g2 = Generator1(config), Generator2(config)
        flops = count_flops(config)
        rows.append({"name": name, "canvas": [config.canvas.height, config.canvas.width],  # as info's: [H, W]
                     "g1_params": parameter_count(g1), "g2_params": parameter_count(g2),
                     "gflops": round((flops["g1"] + flops["g2"]) / 1e9, 3),
                     "g1_gflops": round(flops["g1"] / 1e9, 3), "g2_gflops": round(flops["g2"] / 1e9, 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<12} {'canvas W×H':>11} {'G1 params':>11} {'G2 params':>11} {'GFLOP/image':>12}")
    for r, config in zip(rows, PRESETS.values()):
        print(f"{r['name']:<12} {str(config.canvas):>11} {r['g1_params'] / 1e6:>10.2f}M {r['g2_params'] / 1e6:>10.2f}M "
              f"{r['gflops']:>12.2f}")
    print("GFLOP = forward G1 + G2 for one image, 2 FLOP per multiply-add (torch.utils.flop_counter)")
    return 0


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by --checkpoint / --preset --random-weights (default: bundled model)."""
    from .pipeline import Pipeline, default_checkpoint

    threads = getattr(args, "model_threads", 0)
    if threads < 0:
        raise SystemExit("error: --model-threads must be at least 1 (or 0 for every core)")
    if threads:
        import torch

        torch.set_num_threads(threads)  # OpenVINO takes torch's count
    if getattr(args, "random_weights", False):
        if args.checkpoint:
            raise SystemExit("error: give either --checkpoint or --preset with --random-weights, not both")
        return Pipeline.random(args.preset, seed=args.seed, device=args.device, dtype=args.dtype,
                               fast=fast_path(args), backend=args.backend)
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise SystemExit("error: no --checkpoint given and no bundled default model is installed; "
                         "pass --checkpoint PATH or --preset tiny --random-weights")
    return Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=args.dtype, fast=fast_path(args),
                                    backend=args.backend)


def fast_path(args: argparse.Namespace):
    """The FastPath named by --fast / --compile, or None for plain eager execution."""
    compile_mode = getattr(args, "compile", "none")
    if not getattr(args, "fast", False):
        if compile_mode != "none":
            raise SystemExit("error: --compile needs --fast")
        return None
    return fast_path_for(compile_mode)


def fast_path_for(compile_mode: str):
    """A FastPath for a --compile choice: none, default, max-autotune or reduce-overhead."""
    from .pipeline import FastPath

    return FastPath(compile=compile_mode != "none",
                    compile_mode=None if compile_mode in ("none", "default") else compile_mode)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --preset / --random-weights / --device / --dtype, shared by subcommands."""
    parser.add_argument("--checkpoint", help="NAME.json or NAME.safetensors (default: the bundled model)")
    parser.add_argument("--preset", default="tiny", help="preset for --random-weights (default tiny)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of --preset (testing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto (default): bfloat16 where the device has bf16 units (CUDA, AMX or "
                             "AVX-512-BF16 CPUs), else float32")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                        help="auto (default): on the CPU with the openvino extra, OpenVINO or torch, "
                             "whichever is faster when timed at load; else torch")
    parser.add_argument("--model-threads", type=int, default=0, metavar="N",
                        help="the model's CPU threads (default 0: every core); fewer leave cores to decoding, "
                             "encoding and other programs, which pays on a machine busy with other work")
    parser.add_argument("--fast", action="store_true",
                        help="fast path: channels_last, cuDNN autotuning, batch-size buckets, pinned buffers")
    parser.add_argument("--compile", default="none", choices=["none", "default", "max-autotune", "reduce-overhead"],
                        help="with --fast: torch.compile G1+G2 per bucket (reduce-overhead adds CUDA graphs; "
                             "inductor freezes the weights on the CPU); implies --backend torch")


def write_grid(path: Path, source: np.ndarray, size, keypoints, generation) -> None:
    """source | target pose | G1 | G2, side by side."""
    from .drawing import draw_pose, image_grid, write_rgb

    pose = draw_pose(keypoints, size)
    cells = [source, pose] + ([generation.g1] if generation.g1 is not None else []) + [generation.image]
    header = ["source", "target pose"] + (["G1"] if generation.g1 is not None else []) + ["G2"]
    write_rgb(path, image_grid([cells], header))


def framed_source(args: argparse.Namespace, source: np.ndarray, canvas) -> np.ndarray:
    """The source photo, cropped to its person with --frame-source (detection.frame_person)."""
    if not args.frame_source:
        return source
    from .detection import PoseDetector, frame_person

    with PoseDetector() as detector:
        framed, framing = frame_person(source, detector, canvas[0] / canvas[1])
    print(f"source photo {args.source}: {framing.note}", file=sys.stderr)
    return framed


def framed_target(args: argparse.Namespace, size, keypoints, canvas):
    """The target pose in a frame around its person with --frame-target (pose.person_framed_pose)."""
    if not args.frame_target:
        return size, keypoints
    from .pose import person_framed_pose

    framed_size, framed, box = person_framed_pose(keypoints, size, canvas[0] / canvas[1])
    where = args.pose or args.pose_from
    print(f"target pose {where}: " + (f"framed to the person: {box[2]}×{box[3]} at ({box[0]}, {box[1]}) of its "
                                      f"{size[0]}×{size[1]} frame" if box else
                                      "left in its frame: the person fills it as in the datasets"), file=sys.stderr)
    return framed_size, framed


def check_frame(size: tuple[int, int], where) -> None:
    """The server's own limit on a target frame's side, kept by the local runs too."""
    from .wire.protocol import Limits

    side = Limits().max_image_side
    if max(size) > side:
        raise ValueError(f"{where}: the target frame {size[0]}×{size[1]} is over {side} px a side (the server's "
                         "limit); scale the pose down")


def with_alpha(generation) -> np.ndarray:
    """The generated RGB image, RGBA when the generation carries the person mask as alpha."""
    if generation.alpha is None:
        return generation.image
    return np.dstack([generation.image, generation.alpha])


def cmd_generate_local(args: argparse.Namespace) -> int:
    from .drawing import read_rgb, write_rgb

    source = read_rgb(args.source)
    size, keypoints = target_pose(args)
    check_frame(size, args.pose or args.pose_from)
    pipeline = load_pipeline(args)
    source = framed_source(args, source, pipeline.config.canvas)
    size, keypoints = framed_target(args, size, keypoints, pipeline.config.canvas)
    [generation] = pipeline.generate([source], [keypoints], [size], with_g1=args.grid, with_alpha=args.alpha)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        write_grid(out, source, size, keypoints, generation)
    else:
        write_rgb(out, with_alpha(generation))
    print(f"wrote {out} ({size[0]}×{size[1]}, model {pipeline.name})")
    return 0


def pose_files(folder: Path) -> list[Path]:
    """The pose JSON files of a batch folder, sorted by name: hidden files (macOS's `._NAME`)
    left out, and `NAME_keypoints.json` too where `NAME.json` is there (`pose --openpose`
    writes the same pose in both formats)."""
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() == ".json" and p.is_file() and not p.name.startswith("."))
    names = {p.name for p in files}
    files = [p for p in files if not (p.stem.endswith("_keypoints")
                                      and p.stem.removesuffix("_keypoints") + p.suffix in names)]
    if not files:
        raise PoseFileError(f"{folder} holds no pose .json files")
    return files


def read_batch_poses(args: argparse.Namespace,
                     files: list[Path]) -> list[tuple[Path, tuple[int, int], np.ndarray]]:
    """(file, size, keypoints) of every pose file, all read before any work: a bad file stops the
    batch; a frame in which nobody was found (an add-on export's blank frame) is left out, and said."""
    poses, empty = [], []
    for path in files:
        try:
            poses.append((path, *load_pose_file(path, args.size)))
        except NoPersonError:
            empty.append(path.name)
    if empty:
        print(f"{len(empty)} pose file(s) with no person left out: {', '.join(empty[:5])}"
              f"{' …' if len(empty) > 5 else ''}", file=sys.stderr)
    if not poses:
        raise PoseFileError(f"{args.pose}: no pose file has a person in it")
    return poses


def cmd_generate_batch_local(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .drawing import read_rgb, write_rgb

    source = read_rgb(args.source)
    poses = read_batch_poses(args, pose_files(Path(args.pose)))   # every file checked before the model loads
    for path, size, _ in poses:
        check_frame(size, path)
    files = [path for path, _, _ in poses]
    poses = [(size, keypoints) for _, size, keypoints in poses]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(args)
    source = framed_source(args, source, pipeline.config.canvas)
    chunk = max(1, args.in_flight)
    with tqdm(total=len(files), unit="image", desc="generating") as progress:
        for start in range(0, len(files), chunk):
            batch, batch_poses = files[start:start + chunk], poses[start:start + chunk]
            results = pipeline.generate([source] * len(batch), [k for _, k in batch_poses],
                                        [z for z, _ in batch_poses], with_alpha=args.alpha)
            for path, generation in zip(batch, results):
                write_rgb(out_dir / (path.stem + "." + args.format.replace("jpeg", "jpg")), with_alpha(generation))
            progress.update(len(batch))
    print(f"wrote {len(files)} images to {out_dir} (model {pipeline.name})")
    return 0


def client_keys(args: argparse.Namespace):
    """The ClientKeys of --curve-server-key / --curve-client-key, or None without them."""
    from .wire.curve import ClientKeys

    if not (args.curve_server_key or args.curve_client_key):
        return None
    if not (args.curve_server_key and args.curve_client_key):
        raise ValueError("CURVE needs both --curve-server-key SERVER.key and --curve-client-key NAME.key_secret")
    return ClientKeys.from_files(args.curve_server_key, args.curve_client_key)


def client_from_args(args: argparse.Namespace):
    """A Client for --server with --timeout, --retries and the optional CURVE key files."""
    from .wire.client import Client

    return Client(args.server, timeout=args.timeout, retries=args.retries, curve=client_keys(args))


def add_client_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--server / --timeout / --retries / CURVE key files, shared by the client subcommands."""
    parser.add_argument("--server", required=required, metavar="ENDPOINT",
                        help="server or broker endpoint, e.g. tcp://127.0.0.1:5557")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (default 60)")
    parser.add_argument("--retries", type=int, default=3, help="attempts before giving up (default 3)")
    parser.add_argument("--curve-server-key", metavar="FILE", help="the server's public key file (server.key)")
    parser.add_argument("--curve-client-key", metavar="FILE", help="this client's secret key file (NAME.key_secret)")


def write_result(path: Path, image) -> Path:
    """Write a result Image: encoded bytes as they are when the extension matches, else re-encode."""
    from .codec import read_image_file
    from .drawing import write_rgb

    suffix = path.suffix.lower()
    matches = {"png": (".png",), "jpeg": (".jpg", ".jpeg")}.get(image.format, ())
    if suffix in matches:
        path.write_bytes(image.data)
        return path
    if image.format == "raw":
        pixels = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, image.channels)
    else:
        pixels = read_image_file(image.data)
    write_rgb(path, pixels)
    return path


def server_canvas(client, args: argparse.Namespace) -> tuple[int, int]:
    """(W, H) of the canvas of the model the server runs, for framing on the client."""
    from .wire.protocol import info_canvas

    models = client.info().get("models") or []
    if not models:
        flag = "--frame-source" if args.frame_source else "--frame-target"
        raise SystemExit(f"error: {args.server} has no model loaded yet; {flag} needs its canvas, "
                         "try again once `pg2-server ping` says ready")
    canvas = info_canvas(models[0])
    return canvas.width, canvas.height


def cmd_generate_server(args: argparse.Namespace) -> int:
    from .keypoints import as_list
    from .wire.client import GenerateRequest
    from .wire.images import sniff_format

    source = Path(args.source).read_bytes()
    if not args.frame_source and sniff_format(source) is None:   # BMP, WebP, TIFF: sent as PNG
        from .codec import encode_image
        from .drawing import read_rgb
        from .wire.protocol import OutputSpec

        source, _ = encode_image(read_rgb(args.source), None, OutputSpec("png"), "source")
    output_format = "jpeg" if args.format == "jpeg" else "png"
    pose = Path(args.pose or args.pose_from)
    with client_from_args(args) as client:
        canvas = server_canvas(client, args) if args.frame_source or args.frame_target else None
        if args.frame_source:   # framed here, for the canvas of the model the server runs
            from .codec import encode_image
            from .drawing import read_rgb
            from .wire.protocol import OutputSpec

            framed = framed_source(args, read_rgb(args.source), canvas)
            source, _ = encode_image(framed, None, OutputSpec("png"), "source")
        if not pose.is_dir():
            size, keypoints = target_pose(args)
            size, keypoints = framed_target(args, size, keypoints, canvas)
            # The server encodes in the format --out asks for, so the bytes are written as they come.
            suffix = Path(args.out).suffix.lower()
            output_format = "jpeg" if suffix in (".jpg", ".jpeg") else "png"
            result = client.generate(source, as_list(keypoints), size, output_format=output_format,
                                     alpha=args.alpha)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_result(out, result.image)
            timing = result.timing
            print(f"wrote {out} ({size[0]}×{size[1]}, model {result.model}, "
                  f"{timing.get('total_ms', 0):.0f} ms on the server)")
            return 0
        from tqdm import tqdm

        # Read every pose first: a bad file is reported before any work is sent.
        poses = read_batch_poses(args, pose_files(pose))
        files = [path for path, _, _ in poses]
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        extension = ".jpg" if output_format == "jpeg" else ".png"
        requests = (GenerateRequest(source, as_list(keypoints), size, output_format=output_format,
                                    alpha=args.alpha, tag=path) for path, size, keypoints in poses)

        failures = 0
        with tqdm(total=len(files), unit="image", desc="generating") as progress:
            for result in client.generate_many(requests, in_flight=args.in_flight, raise_errors=False):
                path = result.request.tag
                if result.ok:
                    (out_dir / (path.stem + extension)).write_bytes(result.image.data)
                else:
                    failures += 1
                    tqdm.write(f"{path.name}: {result.error}", file=sys.stderr)
                progress.update(1)
    print(f"wrote {len(files) - failures} images to {out_dir}" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0


def pose_outputs(photos: list[Path], out: Path) -> list[Path]:
    """Where each photo's pose JSON goes: --out itself for one photo and a .json --out, else OUT/STEM.json."""
    if out.suffix.lower() == ".json":
        if len(photos) != 1:
            raise SystemExit(f"error: --out {out} is one file but {len(photos)} photos were given; "
                             "give a folder instead")
        return [out]
    stems = [p.stem for p in photos]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise SystemExit(f"error: photos with the same name would write the same file: {', '.join(clash)}")
    return [out / f"{stem}.json" for stem in stems]


def cmd_pose(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .detection import DetectionError, PoseDetector, image_files, read_photo
    from .drawing import draw_pose, write_rgb

    photos = image_files(args.photos)
    if not photos:
        raise SystemExit("error: no photos given (folders are searched for PNG/JPEG/BMP/WebP files)")
    outputs = pose_outputs(photos, Path(args.out))
    failures = 0
    with PoseDetector(visibility=args.visibility, several_people=not args.one_person) as detector:
        for photo, out in tqdm(list(zip(photos, outputs)), unit="photo", desc="pose", disable=len(photos) < 2):
            try:
                image = read_photo(photo)
                detection = detector.detect(image, str(photo))
            except DetectionError as e:
                failures += 1
                tqdm.write(f"error: {e}", file=sys.stderr)
                continue
            for note in detection.notes:
                tqdm.write(note, file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(detection.to_json()) + "\n")
            written = [out]
            if args.openpose:
                written.append(out.with_name(out.stem + "_keypoints.json"))
                written[-1].write_text(json.dumps(detection.to_openpose()) + "\n")
            if args.overlay:
                written.append(out.with_name(out.stem + "_overlay.png"))
                write_rgb(written[-1], draw_pose(detection.keypoints, detection.size, background=image))
            tqdm.write(f"{photo}: {detection.found} of 18 keypoints → {', '.join(map(str, written))}")
    if failures:
        print(f"{len(photos) - failures} of {len(photos)} photos done; {failures} failed", file=sys.stderr)
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .samples import BUNDLED, write_sample_grid

    pipeline = load_pipeline(args)
    out = write_sample_grid(pipeline, args.out, args.samples or BUNDLED)
    print(f"wrote {out}: source | target pose | G1 | G2 | real target, model {pipeline.name}")
    return 0


def target_pose(args: argparse.Namespace):
    """(size, keypoints) of the target: from --pose's file, or detected in --pose-from's photo."""
    if not args.pose_from:
        return load_pose_file(args.pose, args.size)
    from .detection import PoseDetector
    from .wire.protocol import Limits

    with PoseDetector() as detector:
        detection = detector.detect_file(args.pose_from)
    for note in detection.notes:
        print(note, file=sys.stderr)
    size, keypoints = detection.size, detection.keypoints
    side = Limits().max_image_side
    if max(size) > side:   # a camera's full-size photo: the same pose in a frame the server takes
        scale = side / max(size)
        size, keypoints = (max(1, int(size[0] * scale)), max(1, int(size[1] * scale))), keypoints * scale
    print(f"target pose from {args.pose_from}: {detection.found} of 18 keypoints, frame {size[0]}×{size[1]}"
          + (f" (the photo's {detection.size[0]}×{detection.size[1]} scaled to {side} px a side)"
             if size != tuple(detection.size) else ""), file=sys.stderr)
    return size, keypoints


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.local == bool(args.server):
        raise SystemExit("error: pass either --local (run the model here) or --server ENDPOINT")
    if bool(args.pose) == bool(args.pose_from):
        raise SystemExit("error: pass either --pose POSE.json|POSE_DIR or --pose-from REFERENCE_PHOTO")
    batch = bool(args.pose) and Path(args.pose).is_dir()
    if args.frame_target and batch:
        raise SystemExit("error: --frame-target frames one pose; a folder of poses is an animation, whose frames "
                         "keep the camera's framing (frame the camera on the person instead)")
    if args.grid and not (args.local and not batch):
        raise SystemExit("error: --grid works for one pose with --local")
    out = Path(args.out)
    if not batch and (out.is_dir() or out.suffix.lower() not in IMAGE_SUFFIXES):
        raise ValueError(f"--out {args.out} must name an image file ({', '.join(IMAGE_SUFFIXES)}); "
                         "a folder is for a folder of poses")
    if args.alpha and (args.format == "jpeg" if batch else out.suffix.lower() in (".jpg", ".jpeg")):
        raise ValueError("--alpha needs PNG (JPEG has no alpha): " + ("drop --format jpeg" if batch else
                                                                    f"name --out {out.with_suffix('.png')}"))
    if args.alpha and args.grid:
        raise SystemExit("error: --grid draws a comparison, not a cut-out: drop --alpha")
    if args.local:
        return cmd_generate_batch_local(args) if batch else cmd_generate_local(args)
    return cmd_generate_server(args)


# ---------------------------------------------------------------------------------------------
# Serving: serve, worker, broker, keys

def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Batching, queue and limit flags shared by `serve` and `worker`; defaults from WorkerConfig."""
    from .wire.protocol import MIB, Limits
    from .worker import WorkerConfig

    w, limits = WorkerConfig(), Limits()
    add_model_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=w.max_batch,
                        help=f"largest batch per device (default {w.max_batch})")
    parser.add_argument("--max-delay-ms", type=float, default=w.max_delay_ms,
                        help=f"longest wait for a fuller batch after the first queued request (default {w.max_delay_ms:g})")
    parser.add_argument("--max-queue", type=int, default=w.max_queue,
                        help=f"requests admitted at once; beyond it clients get `overloaded` (default {w.max_queue})")
    parser.add_argument("--max-message-mb", type=float, default=limits.max_message_bytes / MIB,
                        help=f"largest request in MiB (default {limits.max_message_bytes / MIB:g})")
    parser.add_argument("--max-image-side", type=int, default=limits.max_image_side,
                        help=f"largest image side in px (default {limits.max_image_side})")
    parser.add_argument("--threads", type=int, default=w.threads,
                        help=f"image decode/encode threads (default: one per core, at most 4; here {w.threads})")
    parser.add_argument("--source-cache-mb", type=float, default=w.source_cache_mb,
                        help=f"decoded source images kept for reuse, by content (default {w.source_cache_mb:g}; 0 = off)")
    parser.add_argument("--frame-sources", action="store_true",
                        help="crop each new source photo to its person, as the datasets frame people, when the "
                             "person is small in it (a phone photo, a wide shot); detected with MediaPipe "
                             "BlazePose (the pose extra)")
    parser.add_argument("--summary-s", type=float, default=SUMMARY_S,
                        help=f"seconds between summary log lines (default {SUMMARY_S:g})")
    parser.add_argument("--info-details", action="store_true",
                        help="`info` also tells clients the host name, PID and the model's training provenance")
    parser.add_argument("--metrics-bind", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs prometheus_client)")
    add_log_format_argument(parser)


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per log line, and one line per request with its id")


def add_reply_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """Byte budgets for replies that clients do not read (serve and broker); defaults from ReplyBudget."""
    from .peers import ReplyBudget
    from .wire.protocol import MIB

    budget = ReplyBudget()
    parser.add_argument("--max-unread-mb", type=float, default=budget.per_client / MIB,
                        help="replies held for one client that is not reading, in MiB; past it they are dropped "
                             f"(default {budget.per_client / MIB:g})")
    parser.add_argument("--max-unread-total-mb", type=float, default=budget.total / MIB,
                        help=f"replies held for all such clients together, in MiB (default {budget.total / MIB:g})")


def reply_budget(args: argparse.Namespace):
    """The ReplyBudget of --max-unread-mb / --max-unread-total-mb."""
    from .peers import ReplyBudget
    from .wire.protocol import MIB

    try:
        return ReplyBudget(int(args.max_unread_mb * MIB), int(args.max_unread_total_mb * MIB))
    except ValueError:
        raise SystemExit("error: --max-unread-mb and --max-unread-total-mb must be positive") from None


def build_worker(args: argparse.Namespace, role: str):
    """A Worker with the CLI's settings, its model not loaded yet (`load_pipelines` gives it one)."""
    from .wire.protocol import MIB, Limits
    from .worker import Worker, WorkerConfig

    try:  # the config checks every value, before any model loads
        config = WorkerConfig(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
                              threads=args.threads, source_cache_mb=args.source_cache_mb,
                              frame_sources=args.frame_sources,
                              limits=Limits(int(args.max_message_mb * MIB), args.max_image_side))
    except ValueError as e:
        raise SystemExit(f"error: {e} (see `{args.command} --help`)") from None
    worker = Worker(config=config, role=role, details=args.info_details)
    worker.log_requests = args.log_format == "json"
    if args.metrics_bind:
        try:
            worker.enable_metrics(args.metrics_bind)
        except BaseException:
            worker.close()
            raise
    return worker


def load_pipelines(args: argparse.Namespace) -> list:
    """One pipeline per --device (comma-separated)."""
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    return [load_pipeline(argparse.Namespace(**{**vars(args), "device": device})) for device in devices]


def server_curve(args: argparse.Namespace, workers: bool = False):
    """The server side of CURVE from --curve-secret with --curve-clients (and, on a broker,
    --curve-workers; either folder alone), checked; None without them."""
    from .wire.curve import ServerKeys

    workers_dir = getattr(args, "curve_workers", None) if workers else None
    folders = "--curve-clients DIR and/or --curve-workers DIR" if workers else "--curve-clients DIR"
    if not (args.curve_secret or args.curve_clients or workers_dir):
        return None
    if not args.curve_secret or not (args.curve_clients or workers_dir):
        raise SystemExit(f"error: CURVE needs --curve-secret SERVER.key_secret and {folders}")
    curve = ServerKeys(Path(args.curve_secret), Path(args.curve_clients) if args.curve_clients else None,
                  Path(workers_dir) if workers_dir else None)
    curve.check()
    return curve


def cmd_serve(args: argparse.Namespace) -> int:
    from .wire.protocol import check_endpoint
    from .server import StopSignal, serve

    check_endpoint(args.bind, bind=True)
    curve = server_curve(args)
    stop = StopSignal()
    budget = reply_budget(args)
    worker = build_worker(args, "serve")
    # The socket is bound first: while the model loads, ping and info say `ready: false`.
    serve(worker, args.bind, stop.event, curve=curve, summary_s=args.summary_s, drain_s=args.drain_s,
          budget=budget, load=lambda: load_pipelines(args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .wire.protocol import check_endpoint
    from .server import StopSignal
    from .worker import connect_to_broker

    check_endpoint(args.connect)
    curve = None
    if args.curve_secret or args.server_key:
        from .wire.curve import ClientKeys
        if not (args.curve_secret and args.server_key):
            raise SystemExit("error: CURVE needs both --curve-secret WORKER.key_secret and --server-key BROKER.key")
        curve = ClientKeys.from_files(args.server_key, args.curve_secret)
    stop = StopSignal()
    worker = build_worker(args, "worker")
    try:
        # A worker registers with the broker only once its model is loaded, so the broker never
        # routes to a loading one (and says not ready while it has no worker).
        worker.start(load_pipelines(args))
        connect_to_broker(worker, args.connect, stop.event, heartbeat_s=args.heartbeat_ms / 1000,
                          summary_s=args.summary_s, curve=curve, drain_s=args.drain_s)
    finally:
        worker.close()
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from .broker import Broker, BrokerConfig
    from .server import StopSignal
    from .wire.protocol import MIB, check_endpoint

    check_endpoint(args.frontend, bind=True)
    check_endpoint(args.backend, bind=True)
    curve = server_curve(args, workers=True)
    budget = reply_budget(args)
    try:
        config = BrokerConfig(heartbeat_s=args.heartbeat_ms / 1000, max_queue=args.max_queue,
                              max_message_bytes=int(args.max_message_mb * MIB), summary_s=args.summary_s,
                              info_details=args.info_details, max_unread_bytes=budget.per_client,
                              max_unread_total_bytes=budget.total)
    except ValueError as e:
        raise SystemExit(f"error: {e} (see `broker --help`)") from None
    stop = StopSignal()
    Broker(args.frontend, args.backend, config, curve=curve).run(stop.event)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{args.name}.key", folder / f"{args.name}.key_secret"
    for path in (public, secret):
        if path.exists() and not args.force:
            raise SystemExit(f"error: {path} exists; pass --force to replace the key pair (every peer "
                             "holding its public key would then be refused)")
    old_umask = os.umask(0o077)   # the secret is never readable by others, not even for a moment
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(folder), args.name)
    finally:
        os.umask(old_umask)
    Path(secret_file).chmod(0o600)
    Path(public_file).chmod(0o644)
    print(f"public key: {public_file}   (give this one to the other side)")
    print(f"secret key: {secret_file}   (keep this one private)")
    return 0


# ---------------------------------------------------------------------------------------------
# Client commands: info, ping

def cmd_info(args: argparse.Namespace) -> int:
    from .wire.protocol import info_canvas

    with client_from_args(args) as client:
        info = client.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    server = info.get("server", {})
    print(f"{args.server}: {server.get('name')} {server.get('version')} ({server.get('role')}), "
          f"protocol {info.get('protocol_versions')}")
    for model in info.get("models", []):
        canvas = info_canvas(model) if "canvas" in model else "?"
        print(f"  model {model.get('name')}: preset {model.get('preset')}, canvas {canvas} (W×H), "
              f"stages {', '.join(model.get('stages', []))}, {model.get('dtype', '?')} on {model.get('backend', '?')}")
    print(f"  devices: {', '.join(info.get('devices', []))}; workers: {len(info.get('workers', []))}")
    batching, limits, counters = info.get("batching", {}), info.get("limits", {}), info.get("counters", {})
    print(f"  batching: max batch {batching.get('max_batch')}, max delay {batching.get('max_delay_ms')} ms; "
          f"limits: {limits.get('max_message_bytes', 0) / 2 ** 20:g} MiB/message, "
          f"{limits.get('max_image_side')} px/side, queue {limits.get('max_queue')}")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(counters.get("errors", {}).items())) or "none"
    print(f"  counters: {counters.get('requests')} requests, {counters.get('ok')} ok, errors: {errors}; "
          f"{counters.get('batches')} batches, mean batch {counters.get('mean_batch')}, "
          f"mean queue {counters.get('mean_queue_ms')} ms, mean compute {counters.get('mean_compute_ms')} ms")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    import time

    if args.ready:  # a readiness probe: exit 0 only when the server takes work
        with client_from_args(args) as client:
            ready = client.ready()
        print(f"{args.server}: {'ready' if ready else 'not ready (loading, draining or no workers)'}")
        return 0 if ready else 1
    with client_from_args(args) as client:
        for i in range(args.count):
            print(f"pong from {args.server}: {client.ping():.2f} ms")
            if i + 1 < args.count:
                time.sleep(args.interval)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench, sweep_then_configure

    if args.sweep:
        sweep_then_configure(args)  # may point --preset's run at the fastest path and batch
    if args.clients < 1 or args.rounds < 1:
        raise SystemExit("error: --clients and --rounds must be at least 1")
    return run_bench(args, load_pipeline(args), client_keys(args) if args.server else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg2-server", description="PG2 pose-guided person generation: runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with parameter counts and GFLOP per image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("generate", help="generate the source person in the given pose (or a folder of poses)")
    p.add_argument("--local", action="store_true", help="run the model in this process")
    add_model_arguments(p)
    add_client_arguments(p, required=False)
    p.add_argument("--source", required=True, help="photo of the person (PNG/JPEG)")
    p.add_argument("--pose",
                   help="pose JSON ({size, keypoints} or OpenPose JSON), or a folder of them (batch mode)")
    p.add_argument("--pose-from", metavar="PHOTO",
                   help="instead of --pose: the pose of the person in this photo, detected with MediaPipe BlazePose "
                        "(the pose extra); the output has the photo's size")
    p.add_argument("--frame-source", action="store_true",
                   help="crop the source photo to its person first, as the datasets frame people, when the person "
                        "is small in it (a phone photo, a wide shot); detected with MediaPipe BlazePose (the pose extra)")
    p.add_argument("--frame-target", action="store_true",
                   help="generate in a frame around the target pose's person, as the datasets frame people, "
                        "instead of the whole frame of --pose-from's photo or --pose's file, when the person is "
                        "small in it (one pose, not a folder: an animation keeps its camera)")
    p.add_argument("--out", required=True, help="output image (PNG/JPEG), or a folder in batch mode")
    p.add_argument("--grid", action="store_true", help="write source | target pose | G1 | G2 instead (--local)")
    p.add_argument("--alpha", action="store_true", help="add the person mask as alpha (PNG only)")
    p.add_argument("--format", choices=["png", "jpeg"], default="png", help="image format in batch mode")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight in batch mode (default 8)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                   help="the frame size the keypoints are in, for pose files that do not give one (OpenPose's own "
                        "JSON has no canvas size)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pose", help="detect the pose (COCO-18 keypoints) of the person in photos with MediaPipe "
                                    "BlazePose (the pose extra) and write pose JSON")
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="photos, or folders of them")
    p.add_argument("--out", required=True,
                   help="a .json file for one photo, else a folder (PHOTO_STEM.json per photo)")
    p.add_argument("--openpose", action="store_true", help="also write OpenPose JSON beside it (STEM_keypoints.json)")
    p.add_argument("--overlay", action="store_true", help="also draw the skeleton over the photo (STEM_overlay.png)")
    p.add_argument("--visibility", type=float, default=0.5,
                   help="BlazePose visibility below which a keypoint is written as null (default 0.5)")
    p.add_argument("--one-person", action="store_true", help="skip the search for further people (faster)")
    p.set_defaults(func=cmd_pose)

    p = sub.add_parser("demo", help="generate the bundled sample people and poses into one grid image")
    add_model_arguments(p)
    p.add_argument("--out", default="sample_grid.png", help="grid image to write (default sample_grid.png)")
    p.add_argument("--samples", help="a sample-set folder with samples.json (default: the bundled one)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the model over ZeroMQ (protocol v1), batching per device")
    add_worker_arguments(p)
    p.add_argument("--bind", default="tcp://127.0.0.1:5557", help="endpoint to bind (default tcp://127.0.0.1:5557)")
    p.add_argument("--curve-secret", metavar="FILE", help="server secret key file (server.key_secret)")
    p.add_argument("--curve-clients", metavar="DIR", help="folder of authorised client public keys (*.key)")
    p.add_argument("--drain-s", type=float, default=DRAIN_S,
                   help=f"on SIGTERM, wait this long for in-flight work (default {DRAIN_S:g})")
    add_reply_budget_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="serve the model for a broker (scale-out)")
    add_worker_arguments(p)
    p.add_argument("--connect", required=True, help="the broker's backend, e.g. tcp://BROKER:5558")
    p.add_argument("--heartbeat-ms", type=float, default=HEARTBEAT_S * 1000,
                   help=f"heartbeat interval (default {HEARTBEAT_S * 1000:g})")
    p.add_argument("--drain-s", type=float, default=DRAIN_S,
                   help=f"on SIGTERM, wait this long for in-flight work (default {DRAIN_S:g})")
    p.add_argument("--curve-secret", metavar="FILE", help="this worker's secret key file (WORKER.key_secret)")
    p.add_argument("--server-key", metavar="FILE", help="the broker's public key file (BROKER.key)")
    p.set_defaults(func=cmd_worker)

    from .broker import BrokerConfig
    from .wire.protocol import MIB

    broker_defaults = BrokerConfig()
    p = sub.add_parser("broker", help="load-balancing broker: clients on --frontend, workers on --backend")
    p.add_argument("--frontend", default="tcp://127.0.0.1:5557", help="endpoint for clients")
    p.add_argument("--backend", default="tcp://127.0.0.1:5558", help="endpoint for workers")
    p.add_argument("--heartbeat-ms", type=float, default=broker_defaults.heartbeat_s * 1000,
                   help=f"heartbeat interval (default {broker_defaults.heartbeat_s * 1000:g})")
    p.add_argument("--max-queue", type=int, default=broker_defaults.max_queue,
                   help=f"requests waiting for a worker (default {broker_defaults.max_queue})")
    p.add_argument("--max-message-mb", type=float, default=broker_defaults.max_message_bytes / MIB,
                   help=f"largest request in MiB (default {broker_defaults.max_message_bytes / MIB:g})")
    p.add_argument("--curve-secret", metavar="FILE", help="server secret key file for the frontend")
    p.add_argument("--curve-clients", metavar="DIR", help="folder of authorised client public keys")
    p.add_argument("--curve-workers", metavar="DIR",
                   help="folder of authorised worker public keys (CURVE on the backend; needs --curve-secret)")
    p.add_argument("--summary-s", type=float, default=broker_defaults.summary_s,
                   help=f"seconds between summary log lines (default {broker_defaults.summary_s:g})")
    p.add_argument("--info-details", action="store_true",
                   help="`info` also tells clients the workers' host names, PIDs and training provenance")
    add_reply_budget_arguments(p)
    add_log_format_argument(p)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("keys", help="create a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("info", help="describe a running server: models, devices, limits, counters")
    add_client_arguments(p)
    p.add_argument("--json", action="store_true", help="print the whole info reply as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ping", help="check that a server answers, and how fast")
    add_client_arguments(p)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--ready", action="store_true",
                   help="readiness probe: exit 1 when the server answers but is not ready, 3 when it does not answer")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("bench", help="served throughput and latency vs the raw pipeline")
    add_worker_arguments(p)
    add_client_arguments(p, required=False)
    p.add_argument("--clients", type=int, default=16, help="concurrent DEALER clients (default 16)")
    p.add_argument("--requests", type=int, default=0, help="requests in total (default: 8 per client, ≥ 64)")
    p.add_argument("--warmup", type=int, default=2, help="requests per client before timing (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="served runs, each between two raw runs; the ratio is their median (default 3)")
    p.add_argument("--output-format", choices=["png", "jpeg", "raw"], default="png",
                   help="result format the clients ask for (default png)")
    p.add_argument("--overhead", type=int, default=0,
                   help="also measure protocol overhead with this many requests at 1 client, batch 1")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--sweep", action="store_true",
                   help="first compare fp32 eager with the fast path (--dtype, default bfloat16) for --presets over "
                        "--batch-sizes, then serve --preset at its best batch size")
    p.add_argument("--presets", default="market,deepfashion", help="presets of --sweep (default market,deepfashion)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="batch sizes of --sweep (default 1,8,32,64)")
    p.add_argument("--sweep-rounds", type=int, default=3,
                   help="--sweep: the paths take turns this many times; each row is the median (default 3)")
    p.set_defaults(func=cmd_bench)
    return parser


# Serving mixes a batching thread running torch with decode/encode threads. Threads that spin
# while they wait (OpenMP's, and OpenCV's own pool) then starve the others: on 2 cores a 4 ms
# batch took up to 700 ms. Requests are decoded in parallel by the server's pool, so OpenCV needs
# no pool of its own, and OpenMP threads should sleep when idle.
SPIN_SENSITIVE = ("serve", "worker", "bench")


def quiet_idle_threads() -> None:
    """Passive OpenMP waits (read once, when torch loads OpenMP) and no OpenCV thread pool."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import cv2
    cv2.setNumThreads(1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in SPIN_SENSITIVE:
        quiet_idle_threads()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "log_format", "text") == "json":
        from .metrics import JsonFormatter
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        return args.func(args)
    except (KeypointError, PoseFileError, ValueError, SetupError, OSError) as e:  # a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from .wire.client import ServerError
        if isinstance(e, ServerError):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
