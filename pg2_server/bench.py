"""`pg2-server bench`: served throughput and latency next to the raw pipeline, in one run.

Drives a server (started here as a subprocess, or `--server ENDPOINT`) with N concurrent
DEALER clients, one request in flight each, and measures the same model in this process at
the same batch size (`raw_throughput`) before the first and after every one of `--rounds`
served runs; the ratio served/raw is the median over rounds. With `--overhead N` it also measures protocol
overhead: served minus raw latency at one client and batch 1, interleaved so that load from
other processes hits both alike. RSS comes from the server's own `info` counters.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .wire.client import Client, ServerError
from .errors import SetupError

# A standing person in a 176×256 frame (DeepFashion's size), COCO-18 order.
BENCH_FRAME = (176, 256)
BENCH_KEYPOINTS = [[88, 40], [88, 62], [66, 64], [58, 100], [54, 134], [110, 64], [118, 100], [122, 134],
                   [74, 130], [72, 180], [70, 228], [102, 130], [104, 180], [106, 228], [82, 34], [94, 34],
                   [76, 38], [100, 38]]


def bench_source(size=BENCH_FRAME, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test image with smooth structure (compresses like a photo, not like noise)."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.add(image, rng.integers(0, 8, image.shape, dtype=np.uint8))


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


@dataclass
class RawMeasurement:
    batch: int
    images_per_s: float
    ms_per_batch: float
    cpu_ms_per_image: float  # process CPU time: robust to other processes sharing the cores


def raw_throughput(pipeline, batch: int, source: np.ndarray, keypoints, size, iterations: int = 3,
                   min_seconds: float = 2.0) -> RawMeasurement:
    """Images/s of `pipeline.generate` (prepare + G1/G2 + finish) at one batch size, after one warm-up."""
    sources, poses, sizes = [source] * batch, [keypoints] * batch, [size] * batch
    pipeline.generate(sources, poses, sizes, batch_size=batch)
    runs, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while runs < iterations or time.perf_counter() - start < min_seconds:
        pipeline.generate(sources, poses, sizes, batch_size=batch)
        runs += 1
    elapsed = (time.perf_counter() - start) / runs
    cpu = (time.process_time() - cpu_start) / runs
    return RawMeasurement(batch, batch / elapsed, elapsed * 1000, cpu / batch * 1000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, bind: str, max_batch: int) -> list[str]:
    """The `pg2-server serve` command line for this bench's model and batching flags."""
    command = [sys.executable, "-m", "pg2_server.cli", "serve", "--bind", bind, "--device", args.device,
               "--dtype", args.dtype, "--backend", args.backend, "--max-batch", str(max_batch), "--max-delay-ms", str(args.max_delay_ms),
               "--max-queue", str(args.max_queue), "--threads", str(args.threads), "--seed", str(args.seed),
               "--source-cache-mb", str(args.source_cache_mb), "--model-threads", str(args.model_threads)]
    if args.fast:
        command += ["--fast", "--compile", args.compile]
    if args.random_weights:
        command += ["--preset", args.preset, "--random-weights"]
    elif args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    return command


@contextmanager
def started_server(command: list[str], endpoint: str, timeout: float = 120.0):
    """Run a server subprocess until the block ends; yields once it says it is ready (model loaded)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        with Client(endpoint, timeout=1.0, retries=1) as client:
            while True:
                if process.poll() is not None:
                    raise SetupError("the bench server exited: " + process.stderr.read().decode()[-2000:])
                try:
                    if client.ready():
                        break
                    time.sleep(0.1)
                except ServerError:
                    pass
                if time.monotonic() > deadline:
                    raise SetupError(f"the bench server was not ready within {timeout:g} s")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def drive(endpoint: str, clients: int, total: int, source: bytes, keypoints, size, timeout: float,
          curve=None, output_format: str = "png") -> tuple[list[float], float]:
    """`clients` threads, one request in flight each, `total` requests; returns (latencies ms, wall s)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(range(total))
    start_line = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with Client(endpoint, timeout=timeout, curve=curve) as client:
            start_line.wait()
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                started = time.perf_counter()
                try:
                    client.generate(source, keypoints, size, output_format=output_format)
                except BaseException as e:
                    errors.append(e)
                    return
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return latencies, wall


def measure_served(endpoint: str, args: argparse.Namespace, clients: int, total: int, source_png: bytes,
                   curve=None) -> dict:
    """Throughput, latency percentiles, batching and server CPU/RSS over `total` requests (server warm)."""
    with Client(endpoint, timeout=args.timeout, curve=curve) as client:
        before = client.info()["counters"]
        cpu_start = time.process_time()  # this process: the clients' share of a machine they share
        latencies, wall = drive(endpoint, clients, total, source_png, BENCH_KEYPOINTS, BENCH_FRAME,
                                args.timeout, curve, args.output_format)
        client_cpu = time.process_time() - cpu_start
        info_after = client.info()
    after = info_after["counters"]
    batches = after["batches"] - before["batches"]
    batched = after["batched_requests"] - before["batched_requests"]
    return {"clients": clients, "requests": total, "requests_per_s": total / wall, "latencies_ms": latencies,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "batches": batches, "batched": batched,
            "mean_batch": batched / batches if batches else 0.0,
            "server_cpu_s": after["cpu_s"] - before["cpu_s"] if "cpu_s" in after else None,
            "client_cpu_s": client_cpu, "rss_mb_warm": before.get("rss_mb"), "rss_mb_end": after.get("rss_mb"),
            "model": info_after["models"][0]["name"], "devices": info_after.get("devices")}


def served_rounds(endpoint: str, args: argparse.Namespace, clients: int, total: int, source_png: bytes, curve,
                  between) -> tuple[dict, list[dict]]:
    """Warm the server up, then `args.rounds` served runs with `between()` (a raw run) after each.

    Returns the runs pooled (median req/s, percentiles over every latency, overall mean batch,
    CPU and RSS) and the runs themselves.
    """
    with Client(endpoint, timeout=args.timeout, curve=curve) as client:
        rss_start = client.info()["counters"].get("rss_mb")
    # Warm-up: every client a few times, so the first (slow) batches are not timed.
    drive(endpoint, clients, clients * max(1, args.warmup), source_png, BENCH_KEYPOINTS, BENCH_FRAME, args.timeout,
          curve, args.output_format)
    runs = []
    for _ in range(args.rounds):
        runs.append(measure_served(endpoint, args, clients, total, source_png, curve))
        between()
    latencies = [ms for run in runs for ms in run.pop("latencies_ms")]
    batches, batched = sum(r["batches"] for r in runs), sum(r["batched"] for r in runs)
    cpu = [r["server_cpu_s"] for r in runs]
    pooled = {"clients": clients, "requests": total, "rounds": len(runs),
              "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
              "runs_requests_per_s": [r["requests_per_s"] for r in runs],
              "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
              "p99_ms": percentile(latencies, 99), "mean_batch": batched / batches if batches else 0.0,
              "server_cpu_ms_per_request": sum(cpu) / (total * len(runs)) * 1000 if None not in cpu else None,
              "client_cpu_ms_per_request": sum(r["client_cpu_s"] for r in runs) / (total * len(runs)) * 1000,
              "rss_mb_start": rss_start, "rss_mb_warm": runs[0]["rss_mb_warm"], "rss_mb_end": runs[-1]["rss_mb_end"],
              "model": runs[-1]["model"], "devices": runs[-1]["devices"]}
    return pooled, runs


def measure_overhead(endpoint: str, pipeline, count: int, source: np.ndarray, timeout: float, curve=None,
                     output_format: str = "png") -> dict:
    """p50 of served latency minus raw `generate` latency at batch 1, measured alternately."""
    source_png = png_bytes(source)
    served, raw = [], []
    with Client(endpoint, timeout=timeout, curve=curve) as client:
        for i in range(count + 3):
            started = time.perf_counter()
            client.generate(source_png, BENCH_KEYPOINTS, BENCH_FRAME, output_format=output_format)
            served_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            pipeline.generate([source], [BENCH_KEYPOINTS], [BENCH_FRAME])
            raw_ms = (time.perf_counter() - started) * 1000
            if i >= 3:  # the first few warm caches on both sides
                served.append(served_ms)
                raw.append(raw_ms)
    differences = [s - r for s, r in zip(served, raw)]
    return {"requests": count, "output_format": output_format, "served_p50_ms": statistics.median(served),
            "raw_p50_ms": statistics.median(raw),
            "overhead_p50_ms": statistics.median(served) - statistics.median(raw),
            "paired_difference_p50_ms": statistics.median(differences)}


def run_bench(args: argparse.Namespace, pipeline, curve=None) -> int:
    """The `bench` subcommand, after any --sweep: `pipeline` is the model served, `curve` the
    client's ClientKeys for --server (or None)."""
    clients = args.clients
    total = args.requests or max(64, 8 * clients)
    source = bench_source()
    source_png = png_bytes(source)
    batch = min(args.max_batch, clients)
    report: dict = {"source": f"{BENCH_FRAME[0]}×{BENCH_FRAME[1]} PNG ({len(source_png)} bytes)",
                    "output_format": args.output_format, "model_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}

    iterations = max(3, total // batch // 2)
    # Raw before the first served run and after each one (the server idle meanwhile): every
    # served run is compared with the raw runs on either side of it, so load from other
    # processes shows up as a spread across rounds instead of skewing one ratio.
    raw_runs = [raw_throughput(pipeline, batch, source, BENCH_KEYPOINTS, BENCH_FRAME, iterations)]

    def raw_again() -> None:
        raw_runs.append(raw_throughput(pipeline, batch, source, BENCH_KEYPOINTS, BENCH_FRAME, iterations))

    if args.server:
        report["served"], runs = served_rounds(args.server, args, clients, total, source_png, curve, raw_again)
    else:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        with started_server(server_command(args, endpoint, args.max_batch), endpoint):
            report["served"], runs = served_rounds(endpoint, args, clients, total, source_png, None, raw_again)
    rate = statistics.mean(r.images_per_s for r in raw_runs)
    report["raw"] = {"batch": batch, "images_per_s": rate, "ms_per_batch": batch / rate * 1000,
                     "runs_images_per_s": [r.images_per_s for r in raw_runs],
                     "cpu_ms_per_image": statistics.mean(r.cpu_ms_per_image for r in raw_runs)}
    ratios = [run["requests_per_s"] / ((raw_runs[i].images_per_s + raw_runs[i + 1].images_per_s) / 2)
              for i, run in enumerate(runs)]
    report["served_over_raw_runs"] = ratios
    report["served_over_raw"] = statistics.median(ratios)
    observed = max(1, round(report["served"]["mean_batch"]))
    if observed != batch:
        # Closed-loop clients can settle into smaller batches; compare at that size too.
        at_mean = raw_throughput(pipeline, observed, source, BENCH_KEYPOINTS, BENCH_FRAME, iterations)
        report["raw_at_mean_batch"] = {"batch": observed, "images_per_s": at_mean.images_per_s,
                                       "served_over_raw": report["served"]["requests_per_s"] / at_mean.images_per_s,
                                       "cpu_ms_per_image": at_mean.cpu_ms_per_image}
    if args.overhead:
        if args.server:
            report["overhead"] = measure_overhead(args.server, pipeline, args.overhead, source, args.timeout, curve,
                                                  args.output_format)
        else:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            with started_server(server_command(args, endpoint, 1), endpoint):
                report["overhead"] = measure_overhead(endpoint, pipeline, args.overhead, source, args.timeout,
                                                      output_format=args.output_format)
    report["load_average_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def sweep_then_configure(args: argparse.Namespace) -> None:
    """Raw throughput of every path (fp32 eager first) per preset and batch size, beside the
    machine's peak measured now; then point the served run at --preset's fastest path and batch
    (clients = 2 × batch keep every batch full)."""
    from .throughput import compare, format_peak, format_table, measure_peak, sweep_paths

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    compile_mode = getattr(args, "compile", "none")
    peak = measure_peak(args.device)
    print(f"raw model, {args.device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    print(format_peak(peak), flush=True)
    rows = compare(presets, batches, device=args.device, paths=sweep_paths(args.device, compile_mode), peak=peak,
                   iterations=2, rounds=args.sweep_rounds)
    after = measure_peak(args.device)
    print(format_peak(after) + " (again, after the sweep)", flush=True)
    # Other processes only ever lower a peak: the shares use the higher of the two measurements.
    best_peak = max(peak["bf16"], after["bf16"])
    for row in rows:
        row["share_of_peak"] = row["gflops"] / best_peak
    print(f"shares of the higher bf16 peak, {best_peak:,.0f} GFLOP/s:", flush=True)
    print(format_table(rows), flush=True)
    best = [r for r in rows if r["preset"] == args.preset]
    if best and args.random_weights:
        top = max(best, key=lambda r: r["images_per_s"])
        args.max_batch, args.clients = top["batch"], 2 * top["batch"]
        args.dtype, args.backend = top["dtype"], top["backend"]
        args.fast = top["backend"] == "torch" and top["mode"] != "fp32 eager"
        if not args.fast:
            args.compile = "none"
        print(f"served: --preset {args.preset} with {top['mode']} at its best batch {top['batch']}, "
              f"{2 * top['batch']} clients", flush=True)


def format_report(report: dict) -> str:
    served, raw = report["served"], report["raw"]
    lines = [f"model {served['model']} on {', '.join(served['devices'] or [])}; source {report['source']}; "
             f"{report['cpu_count']} CPUs, load average {report['load_average'][0]:.2f}",
             f"served: {served['clients']} clients × 1 in flight, {served['requests']} requests"
             f"{' × ' + str(served['rounds']) + ' rounds' if served.get('rounds', 1) > 1 else ''}: "
             f"{served['requests_per_s']:.2f} req/s, latency p50 {served['p50_ms']:.1f} ms, "
             f"p95 {served['p95_ms']:.1f} ms, p99 {served['p99_ms']:.1f} ms, mean batch {served['mean_batch']:.2f}",
             f"raw pipeline at batch {raw['batch']}"
             + (f", {report['model_threads']} model thread(s)" if "model_threads" in report else "")
             + f": {raw['images_per_s']:.2f} images/s "
             f"({raw['ms_per_batch']:.1f} ms/batch; before and after each served run: "
             f"{', '.join(f'{r:.2f}' for r in raw['runs_images_per_s'])})",
             f"served / raw: {report['served_over_raw']:.3f}"
             + (f" (median of {len(report['served_over_raw_runs'])} rounds: "
                f"{', '.join(f'{r:.3f}' for r in report['served_over_raw_runs'])})"
                if len(report.get('served_over_raw_runs', [])) > 1 else "")
             + (f" (raw at the served mean batch {report['raw_at_mean_batch']['batch']}: "
                f"{report['raw_at_mean_batch']['images_per_s']:.2f} images/s, served / raw "
                f"{report['raw_at_mean_batch']['served_over_raw']:.3f})" if "raw_at_mean_batch" in report else ""),
             cpu_line(report),
             f"server RSS: {served['rss_mb_start']} MiB at start, {served['rss_mb_warm']} MiB after warm-up, "
             f"{served['rss_mb_end']} MiB after {served['requests']} requests"]
    if "overhead" in report:
        o = report["overhead"]
        lines.append(f"protocol overhead at 1 client, batch 1, {o['output_format']} output ({o['requests']} requests): "
                     f"served p50 "
                     f"{o['served_p50_ms']:.2f} ms − raw p50 {o['raw_p50_ms']:.2f} ms = {o['overhead_p50_ms']:.2f} ms"
                     f" (median of paired differences {o['paired_difference_p50_ms']:.2f} ms)")
    return "\n".join(lines)


def cpu_line(report: dict) -> str:
    """CPU time per image, served (server process) against raw: comparable on a shared machine."""
    served = report["served"].get("server_cpu_ms_per_request")
    reference = report.get("raw_at_mean_batch", report["raw"])
    if served is None:
        return "server CPU time: not reported by this server"
    clients = report["served"].get("client_cpu_ms_per_request")
    return (f"CPU time per image: server {served:.1f} ms, raw pipeline at batch {reference['batch']} "
            f"{reference['cpu_ms_per_image']:.1f} ms (raw / served {reference['cpu_ms_per_image'] / served:.3f}; "
            "a machine shared with other work changes wall-clock figures far more than these)"
            + (f"; the bench's clients {clients:.1f} ms per request" if clients is not None else ""))
