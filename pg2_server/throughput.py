"""Raw model throughput: fp32 eager (the reference) against every faster path, side by side.

Measures G1+G2 on device tensors (no image decoding, no framing), so the figures are the
model's own ceiling that the server's throughput is compared with. FLOPs come from
torch.utils.flop_counter; each row's share divides achieved FLOP/s by the machine's bf16
peak measured in the same run (`measure_peak`); MFU divides it by a card's datasheet peak.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from .keypoints import COUNT
from .model import count_flops, preset
from .pipeline import FastPath, Pipeline

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets; no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0, "B200": 2250.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, looked up by name; None if unknown or not CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):   # most specific name first
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass
class Measurement:
    preset: str
    mode: str
    batch: int
    images_per_s: float
    ms_per_batch: float
    tflops: float
    mfu: float | None
    peak_memory_mb: float | None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(pipeline: Pipeline, batch: int, mode: str, warmup: int = 3, iterations: int = 10,
            min_seconds: float = 1.0) -> Measurement:
    """Time `pipeline.forward` on a random batch; at least `iterations` runs and `min_seconds`."""
    device = pipeline.device
    width, height = pipeline.config.canvas
    generator = torch.Generator().manual_seed(0)
    sources = (torch.rand(batch, 3, height, width, generator=generator) * 2 - 1).to(device)
    maps = torch.where(torch.rand(batch, COUNT, height, width, generator=generator) < 0.02, 1.0, -1.0).to(device)
    coords = torch.rand(batch, 2 * COUNT, generator=generator).to(device)
    sources = sources.contiguous(memory_format=pipeline.memory_format)
    maps = maps.contiguous(memory_format=pipeline.memory_format)
    for _ in range(warmup):
        pipeline.forward(sources, maps, coords)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs, start = 0, time.perf_counter()
    while runs < iterations or time.perf_counter() - start < min_seconds:
        pipeline.forward(sources, maps, coords)
        runs += 1
    _synchronize(device)
    elapsed = (time.perf_counter() - start) / runs
    flops = sum(count_flops(pipeline.config).values()) * batch
    peak = peak_tflops(device)
    tflops = flops / elapsed / 1e12
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return Measurement(pipeline.config.preset, mode, batch, batch / elapsed, elapsed * 1e3, tflops,
                       tflops / peak if peak else None, memory)


def _best_rate(run, flops: float, repeats: int, seconds: float) -> float:
    """FLOP/s of `run()` at its best of `repeats` timed chunks (load from others only slows a chunk)."""
    run()
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - start < seconds:
            run()
            count += 1
        best = max(best, flops * count / (time.perf_counter() - start))
    return best


def measure_peak(device: str | torch.device = "cpu", repeats: int = 5, seconds: float = 0.3) -> dict[str, float]:
    """This machine's dense GFLOP/s, measured now: a large matmul and a 3×3 channels_last conv in fp32 and bf16.

    The share of it a model reaches says how much of the hardware it uses; a datasheet cannot
    say that for a CPU (clock, cores left by other work, which units torch dispatches to).
    """
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 2048
    # wide enough that the convolution is compute-bound (128 channels reach ~60 % of 512 here)
    batch, channels, side = (64, 256, 64) if device.type == "cuda" else (16, 512, 16)
    peak = {}
    with torch.inference_mode():
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
            peak[f"matmul_{label}"] = _best_rate(lambda: (a @ b, _synchronize(device)), 2 * n ** 3,
                                                 repeats, seconds) / 1e9
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype, memory_format=torch.channels_last)
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            flops = 2 * channels * channels * 9 * side * side * batch
            peak[f"conv_{label}"] = _best_rate(lambda: (conv(x), _synchronize(device)), flops, repeats, seconds) / 1e9
    peak["bf16"] = max(peak["matmul_bf16"], peak["conv_bf16"])
    peak["fp32"] = max(peak["matmul_fp32"], peak["conv_fp32"])
    return peak


@dataclass(frozen=True)
class SweepPath:
    """One way to run the model in the sweep: backend, dtype and torch's fast-path switches."""
    label: str
    backend: str
    dtype: str
    fast: FastPath | None = None


def sweep_paths(device: str, compile_mode: str = "none") -> list[SweepPath]:
    """fp32 eager (the reference) first, then every faster path this device and installation offer."""
    from . import openvino_backend
    from .pipeline import bf16_native

    device = torch.device(device)
    low = "bfloat16" if bf16_native(device) or device.type == "cpu" else "float16"
    paths = [SweepPath("fp32 eager", "torch", "float32"),
             SweepPath("fp32 channels_last", "torch", "float32", FastPath(compile=False)),
             SweepPath(f"{low} channels_last", "torch", low, FastPath(compile=False))]
    if compile_mode != "none":
        paths.append(SweepPath(f"{low} compiled ({compile_mode})", "torch", low,
                           FastPath(compile_mode=None if compile_mode == "default" else compile_mode)))
    if device.type == "cpu" and openvino_backend.available():
        paths += [SweepPath("OpenVINO fp32", "openvino", "float32"), SweepPath("OpenVINO bf16", "openvino", "bfloat16")]
    return paths


def compare(presets: list[str], batches: list[int], device: str = "cpu", paths: list[SweepPath] | None = None,
            iterations: int = 10, peak: dict | None = None, rounds: int = 1) -> list[dict]:
    """For each preset, path and batch: images/s, share of the measured bf16 peak, speed-up over fp32 eager.

    Every path gets its own copy of the same weights (a Pipeline converts its modules in place),
    so the fp32 eager reference is a true fp32 NCHW model and differences are numerics alone.
    With `rounds` > 1 the paths take turns, round after round, and each row is the round with
    the median rate: load from other processes then falls on every path alike.
    """
    paths = paths or sweep_paths(device)
    peak = peak if peak is not None else measure_peak(device)
    rows = []
    for name in presets:
        weights = Pipeline.random(name, device="cpu")
        pipelines = [Pipeline(preset(name), copy.deepcopy(weights.g1), copy.deepcopy(weights.g2), device=device,
                              dtype=path.dtype, fast=path.fast, backend=path.backend) for path in paths]
        runs: dict[tuple[int, int], list[Measurement]] = {}
        for _ in range(rounds):
            for index, (path, pipeline) in enumerate(zip(paths, pipelines)):
                for batch in batches:
                    runs.setdefault((index, batch), []).append(measure(pipeline, batch, path.label,
                                                                       iterations=iterations))
        for index, pipeline in enumerate(pipelines):
            for batch in batches:
                ordered = sorted(runs[(index, batch)], key=lambda m: m.images_per_s)
                m = ordered[len(ordered) // 2]
                reference = sorted(r.images_per_s for r in runs[(0, batch)])[len(ordered) // 2]
                rows.append({**asdict(m), "backend": pipeline.backend,
                             "dtype": str(pipeline.dtype).replace("torch.", ""),
                             "gflops": m.tflops * 1e3, "share_of_peak": m.tflops * 1e3 / peak["bf16"],
                             "speedup": m.images_per_s / reference, "rounds": len(ordered),
                             "runs_images_per_s": [r.images_per_s for r in runs[(index, batch)]]})
        del pipelines
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_peak(peak: dict) -> str:
    """One line: the measured peaks in GFLOP/s."""
    return (f"measured peak (best of 5, this run): bf16 conv {peak['conv_bf16']:,.0f}, matmul {peak['matmul_bf16']:,.0f}; "
            f"fp32 conv {peak['conv_fp32']:,.0f}, matmul {peak['matmul_fp32']:,.0f} GFLOP/s")


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `compare`'s rows."""
    lines = ["| preset | path | backend | dtype | batch | img/s | ms/batch | GFLOP/s | share of bf16 peak "
             "| vs fp32 eager | MFU | peak MiB |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['backend']} | {r['dtype']} | {r['batch']} "
                     f"| {r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | {r['gflops']:.0f} "
                     f"| {r['share_of_peak']:.1%} | {r['speedup']:.2f}× | {mfu} | {memory} |")
    return "\n".join(lines)
