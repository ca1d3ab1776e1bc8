import pytest
import torch

from pg2_server.model import count_flops, preset
from pg2_server.pipeline import FastPath, Pipeline
from pg2_server import throughput
from pg2_server.throughput import PEAK_BF16_TFLOPS, SweepPath, compare, format_peak, format_table, measure, \
    measure_peak, peak_tflops


def test_measure_reports_consistent_figures():
    pipeline = Pipeline.random("tiny")
    m = measure(pipeline, batch=4, mode="fp32 eager", warmup=1, iterations=3, min_seconds=0.05)
    assert m.batch == 4 and m.images_per_s > 0
    assert m.images_per_s == pytest.approx(4 / (m.ms_per_batch / 1e3))
    flops = sum(count_flops(preset("tiny")).values())
    assert m.tflops == pytest.approx(flops * m.images_per_s / 1e12)
    assert m.mfu is None and m.peak_memory_mb is None     # CPU: no peak to divide by


def test_compare_measures_every_path_against_its_own_fp32_eager_reference():
    paths = [SweepPath("fp32 eager", "torch", "float32"),
             SweepPath("bf16 channels_last", "torch", "bfloat16", FastPath(compile=False))]
    peak = {"bf16": 100.0}
    rows = compare(["tiny"], [1, 2], device="cpu", paths=paths, iterations=2, peak=peak)
    assert [(r["mode"], r["batch"]) for r in rows] == [("fp32 eager", 1), ("fp32 eager", 2),
                                                       ("bf16 channels_last", 1), ("bf16 channels_last", 2)]
    assert [(r["backend"], r["dtype"]) for r in rows] == [("torch", "float32")] * 2 + [("torch", "bfloat16")] * 2
    assert rows[0]["speedup"] == 1.0
    assert rows[2]["speedup"] == pytest.approx(rows[2]["images_per_s"] / rows[0]["images_per_s"])
    assert rows[3]["share_of_peak"] == pytest.approx(rows[3]["gflops"] / 100.0)
    table = format_table(rows)
    assert table.count("\n") == 5 and "| tiny | bf16 channels_last | torch | bfloat16 | 2 |" in table


def test_the_reference_is_a_true_fp32_eager_model(monkeypatch):
    seen = []
    real = throughput.measure
    monkeypatch.setattr(throughput, "measure", lambda p, *a, **k: seen.append(
        (p.memory_format, next(p.g1.parameters()).dtype)) or real(p, *a, **k))
    compare(["tiny"], [1], paths=[SweepPath("bf16", "torch", "bfloat16", FastPath(compile=False)),
                                  SweepPath("fp32 eager", "torch", "float32")], iterations=1, peak={"bf16": 1.0})
    # the fast path converted its own copy: the fp32 model measured after it is untouched
    assert seen == [(torch.channels_last, torch.bfloat16), (torch.contiguous_format, torch.float32)]


def test_measured_peak_has_both_dtypes():
    peak = measure_peak("cpu", repeats=1, seconds=0.01)
    assert set(peak) == {"matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16", "bf16", "fp32"}
    assert all(v > 0 for v in peak.values()) and peak["bf16"] == max(peak["matmul_bf16"], peak["conv_bf16"])
    assert "bf16 conv" in format_peak(peak)


def test_peak_lookup_prefers_the_specific_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0)) == PEAK_BF16_TFLOPS["H100 PCIe"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0)) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_tflops(torch.device("cuda", 0)) is None
    assert peak_tflops(torch.device("cpu")) is None
