"""The bench's measuring pieces, and one short end-to-end run against a real server subprocess."""
import json
import subprocess
import sys

import numpy as np

from pg2_server.bench import BENCH_FRAME, BENCH_KEYPOINTS, bench_source, format_report, percentile, png_bytes, \
    raw_throughput
from pg2_server.codec import declared_size
from pg2_server.pipeline import Pipeline


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) in (50, 51)
    assert percentile(values, 95) == 95 or percentile(values, 95) == 96
    assert percentile(values, 99) in (99, 100)
    assert percentile([7.0], 99) == 7.0
    assert np.isnan(percentile([], 50))


def test_bench_source_is_a_deterministic_176_by_256_png():
    image = bench_source()
    assert image.shape == (256, 176, 3) and image.dtype == np.uint8
    assert np.array_equal(image, bench_source())
    data = png_bytes(image)
    assert declared_size(data, "png") == BENCH_FRAME
    assert len(BENCH_KEYPOINTS) == 18


def test_raw_throughput_counts_images_of_the_whole_pipeline():
    pipeline = Pipeline.random("tiny")
    measured = raw_throughput(pipeline, 4, bench_source(), BENCH_KEYPOINTS, BENCH_FRAME, iterations=2,
                              min_seconds=0.0)
    assert measured.batch == 4
    assert measured.images_per_s > 0
    assert abs(measured.ms_per_batch - 4 / measured.images_per_s * 1000) < 1e-6
    assert measured.cpu_ms_per_image > 0


def test_report_shows_ratio_latency_and_memory():
    report = {"source": "176×256 PNG (1 bytes)", "cpu_count": 2, "load_average": (1.0, 1.0, 1.0),
              "served": {"model": "tiny-random", "devices": ["cpu"], "clients": 16, "requests": 64,
                         "requests_per_s": 9.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "mean_batch": 16.0,
                         "rss_mb_start": 250.0, "rss_mb_warm": 300.0, "rss_mb_end": 301.0,
                         "server_cpu_ms_per_request": 100.0, "client_cpu_ms_per_request": 4.25},
              "raw": {"batch": 16, "images_per_s": 10.0, "ms_per_batch": 1600.0, "runs_images_per_s": [9.5, 10.5],
                      "cpu_ms_per_image": 95.0},
              "served_over_raw": 0.9, "served_over_raw_runs": [0.85, 0.9, 0.95], "output_format": "png",
              "overhead": {"requests": 10, "output_format": "png", "served_p50_ms": 12.0, "raw_p50_ms": 10.5, "overhead_p50_ms": 1.5,
                           "paired_difference_p50_ms": 1.4}}
    text = format_report(report)
    assert "served / raw: 0.900 (median of 3 rounds: 0.850, 0.900, 0.950)" in text and "mean batch 16.00" in text
    assert "301.0 MiB after 64 requests" in text and "= 1.50 ms" in text
    assert "raw / served 0.950" in text and "clients 4.2 ms per request" in text


def test_bench_end_to_end_compares_each_round_with_raw_runs_around_it():
    result = subprocess.run([sys.executable, "-m", "pg2_server.cli", "bench", "--preset", "tiny", "--random-weights",
                             "--clients", "2", "--max-batch", "2", "--requests", "8", "--rounds", "2", "--warmup", "1",
                             "--overhead", "5", "--output-format", "raw", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    served, raw = report["served"], report["raw"]
    assert served["rounds"] == 2 and len(served["runs_requests_per_s"]) == 2
    assert len(raw["runs_images_per_s"]) == 3 and raw["batch"] == 2
    assert len(report["served_over_raw_runs"]) == 2
    assert min(report["served_over_raw_runs"]) <= report["served_over_raw"] <= max(report["served_over_raw_runs"])
    assert 1 <= served["mean_batch"] <= 2 and served["server_cpu_ms_per_request"] > 0
    assert served["client_cpu_ms_per_request"] > 0
    assert report["overhead"]["requests"] == 5 and report["overhead"]["raw_p50_ms"] > 0


def test_bench_refuses_zero_rounds():
    result = subprocess.run([sys.executable, "-m", "pg2_server.cli", "bench", "--preset", "tiny", "--random-weights",
                             "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--rounds must be at least 1" in result.stderr
