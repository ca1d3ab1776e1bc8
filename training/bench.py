"""`pg2-train bench`: training samples/s per stage, MFU on a GPU, and data-loader samples/s.

    pg2-train bench --preset market --batch-size 16 --stage 1 2      # fp32 eager next to bf16 (+compile)
    pg2-train bench --preset demo --width 32 --stage 1 2              # a wider demo model
    pg2-train bench --data --preset market --data-root DIR --annotations CSV --pairs CSV --workers 0 4 8

Training is timed on fixed random batches (the data loader is measured separately), so the
figure is the networks' speed. FLOPs per step are counted with torch's FlopCounterMode on one
real step (forward and backward); MFU = FLOP/s over the card's dense bf16 peak. The machine's
own peak (large matmul and channels_last conv, fp32 and bf16) is measured in the same run and
each line gives its share of the bf16 one, and bf16's speed-up over fp32 eager.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from pg2_server.keypoints import COUNT
from pg2_server.model import Generator1, preset
from pg2_server.pipeline import bf16_native
from pg2_server.throughput import format_peak, measure_peak, peak_tflops

from .trainer import TRAINING_DEFAULTS

from .distributed import Distributed

def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The card's dense bf16 peak in FLOP/s (the runtime's table), or None where unknown."""
    if override_tflops:
        return override_tflops * 1e12
    tflops = peak_tflops(device)
    return tflops * 1e12 if tflops else None


def random_batch(config, batch_size: int, generator: torch.Generator) -> dict:
    """A batch of the trainer's shapes and value ranges, without touching the disk."""
    width, height = config.canvas
    return {"source": torch.rand(batch_size, 3, height, width, generator=generator) * 2 - 1,
            "target": torch.rand(batch_size, 3, height, width, generator=generator) * 2 - 1,
            "heatmaps": torch.where(torch.rand(batch_size, COUNT, height, width, generator=generator) < 0.02, 1.0, -1.0),
            "mask": (torch.rand(batch_size, 1, height, width, generator=generator) < 0.3).float(),
            "coordinates": torch.rand(batch_size, 2 * COUNT, generator=generator)}


def bench_training(preset_name: str, stage: int, batch_size: int, steps: int, warmup: int, device: torch.device,
                   bf16: bool, compile: bool, peak: float | None, width: int | None = None) -> dict:
    """Time `steps` training steps of one stage; returns samples/s, FLOP per step and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from .trainer import Trainer, train_config

    config = train_config(preset_name, stage, batch_size=batch_size, bf16=bf16, channels_last=bf16,
                          compile=compile, workers=0)
    model_config = preset(preset_name, **({"base_width": width} if width else {}))
    g1_state = Generator1(model_config).state_dict() if stage == 2 else None
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, model_config, run_dir, None, Distributed(device=device), g1_state=g1_state)
        batch = random_batch(model_config, batch_size, torch.Generator().manual_seed(0))
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        for _ in range(warmup):
            trainer.train_step(batch)
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    flops = counter.get_total_flops()
    result = {"samples_per_s": steps * batch_size / elapsed, "step_ms": 1000 * elapsed / steps,
              "flop_per_step": flops, "tflops": flops * steps / elapsed / 1e12}
    if peak:
        result["mfu"] = flops * steps / elapsed / peak
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def bench_data(args: argparse.Namespace) -> None:
    from .data import PairDataset, PairSampler, load_split, make_loader

    config = preset(args.preset)
    split = load_split(args.data_root, args.annotations, args.pairs)
    dataset = PairDataset(split, config)
    batch_size = args.batch_size or TRAINING_DEFAULTS[args.preset]["batch_size"]
    print(f"data loader, preset {args.preset} (canvas {config.canvas} W×H), batch {batch_size}, "
          f"{len(dataset)} pairs; {split.report.summary()}")
    for workers in args.workers:
        loader = make_loader(dataset, batch_size, PairSampler(len(dataset), seed=0), workers)
        batches = iter(loader)
        for _ in range(min(2, args.batches)):  # worker start-up is not throughput
            next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        elapsed = time.perf_counter() - start
        del batches
        print(f"  workers {workers:>2}: {args.batches * batch_size / elapsed:10.1f} samples/s")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.data:
        if not (args.data_root and args.annotations and args.pairs):
            raise ValueError("bench --data needs --data-root, --annotations and --pairs")
        bench_data(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    batch_size = args.batch_size or TRAINING_DEFAULTS[args.preset]["batch_size"]
    peak = peak_flops(device, args.peak_tflops)
    variants = [("fp32 eager", False, False)]
    if bf16_native(device):
        variants.append(("bf16 + channels_last", True, False))
        if args.compile:
            variants.append(("bf16 + channels_last + compile", True, True))
    elif args.compile:
        variants.append(("fp32 + compile", False, True))
    measured = measure_peak(device)
    print(f"training, preset {args.preset}{f' width {args.width}' if args.width else ''}, batch {batch_size}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
          + (f", datasheet peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""))
    print("  " + format_peak(measured))
    if not bf16_native(device):
        print("  this device has no bf16 units: fp32 only")
    for stage in args.stage:
        reference = None
        for label, bf16, compile in variants:
            r = bench_training(args.preset, stage, batch_size, args.steps, args.warmup, device, bf16, compile, peak,
                               args.width)
            reference = reference or r["samples_per_s"]
            line = (f"  stage {stage} {label:<32} {r['samples_per_s']:9.1f} samples/s  {r['step_ms']:8.1f} ms/step  "
                    f"{r['flop_per_step'] / 1e9:9.1f} GFLOP/step  {r['tflops'] * 1e3:8.1f} GFLOP/s  "
                    f"{r['tflops'] * 1e3 / measured['bf16']:6.1%} of bf16 peak  "
                    f"{r['samples_per_s'] / reference:5.2f}× fp32")
            if "mfu" in r:
                line += f"  MFU {100 * r['mfu']:5.1f}%"
            if "max_memory_gib" in r:
                line += f"  {r['max_memory_gib']:.1f} GiB"
            print(line, flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training samples/s per stage (MFU on GPU) or, with --data, loader samples/s")
    p.add_argument("--preset", default="market", choices=list(TRAINING_DEFAULTS))
    p.add_argument("--batch-size", type=int, help="default: the preset's official batch")
    p.add_argument("--width", type=int, help="channels of the first level instead of the preset's")
    p.add_argument("--stage", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, compile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, help="the card's peak for MFU (default: known cards' bf16 peak)")
    p.add_argument("--data", action="store_true", help="measure the data loader instead")
    p.add_argument("--data-root")
    p.add_argument("--annotations")
    p.add_argument("--pairs")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8], help="data: worker counts to try")
    p.add_argument("--batches", type=int, default=20, help="data: timed batches per worker count")
    p.set_defaults(func=cmd_bench)
