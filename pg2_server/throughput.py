"""Raw model throughput: fp32 eager (the reference) against the fast path, side by side.

Measures G1+G2 on device tensors (no image decoding, no framing), so the figures are the
model's own ceiling that the server's throughput is compared with. FLOPs come from
torch.utils.flop_counter; MFU divides achieved FLOP/s by the card's dense bf16 peak.
"""
from __future__ import annotations

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
    height, width = pipeline.config.canvas
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


def compare(presets: list[str], batches: list[int], device: str = "cuda", dtype: str = "bfloat16",
            fast: FastPath | None = None, iterations: int = 10) -> list[dict]:
    """For each preset and batch: fp32 eager and the fast path, with the speed-up ratio."""
    fast = fast or FastPath()
    rows = []
    for name in presets:
        eager = Pipeline.random(name, device=device)
        # The same weights in both, so any output difference is numerics alone.
        quick = Pipeline(preset(name), eager.g1, eager.g2, device=device, dtype=dtype, fast=fast)
        for batch in batches:
            reference = measure(eager, batch, "fp32 eager", iterations=iterations)
            measured = measure(quick, batch, f"{dtype} fast", iterations=iterations)
            rows.append({"reference": asdict(reference), "fast": asdict(measured),
                         "speedup": measured.images_per_s / reference.images_per_s})
        del eager, quick
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `compare`'s rows."""
    lines = ["| preset | batch | fp32 eager img/s | fast img/s | speed-up | fast ms/batch | TFLOP/s | MFU | "
             "peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ref, fast = row["reference"], row["fast"]
        mfu = f"{fast['mfu']:.1%}" if fast["mfu"] is not None else "n/a"
        memory = f"{fast['peak_memory_mb']:.0f}" if fast["peak_memory_mb"] is not None else "n/a"
        lines.append(f"| {fast['preset']} | {fast['batch']} | {ref['images_per_s']:.1f} | {fast['images_per_s']:.1f} "
                     f"| {row['speedup']:.2f}× | {fast['ms_per_batch']:.2f} | {fast['tflops']:.2f} | {mfu} | {memory} |")
    return "\n".join(lines)
