import pytest
import torch

from pg2_server.model import count_flops, preset
from pg2_server.pipeline import FastPath, Pipeline
from pg2_server.throughput import PEAK_BF16_TFLOPS, compare, format_table, measure, peak_tflops


def test_measure_reports_consistent_figures():
    pipeline = Pipeline.random("tiny")
    m = measure(pipeline, batch=4, mode="fp32 eager", warmup=1, iterations=3, min_seconds=0.05)
    assert m.batch == 4 and m.images_per_s > 0
    assert m.images_per_s == pytest.approx(4 / (m.ms_per_batch / 1e3))
    flops = sum(count_flops(preset("tiny")).values())
    assert m.tflops == pytest.approx(flops * m.images_per_s / 1e12)
    assert m.mfu is None and m.peak_memory_mb is None     # CPU: no peak to divide by


def test_compare_pairs_reference_and_fast_path():
    rows = compare(["tiny"], [1, 2], device="cpu", dtype="float32",
                   fast=FastPath(compile=False), iterations=2)
    assert [(r["reference"]["batch"], r["fast"]["batch"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[0]["speedup"] == pytest.approx(rows[0]["fast"]["images_per_s"] / rows[0]["reference"]["images_per_s"])
    table = format_table(rows)
    assert table.count("\n") == 3 and "| tiny | 2 |" in table


def test_peak_lookup_prefers_the_specific_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0)) == PEAK_BF16_TFLOPS["H100 PCIe"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0)) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_tflops(torch.device("cuda", 0)) is None
    assert peak_tflops(torch.device("cpu")) is None
