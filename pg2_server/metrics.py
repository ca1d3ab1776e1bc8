"""The counters of `info`, Prometheus metrics of a worker (`serve`/`worker --metrics-bind HOST:PORT`),
and JSON log lines.

Metrics use the `prometheus_client` library (the `monitoring` extra); each Worker has its own
registry, served over HTTP at /metrics by the library's own server thread.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from .errors import SetupError

# Seconds: from a tiny model's few milliseconds to a busy server's seconds.
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    """Requests by result code, latency and queue-time histograms, batch sizes, queue depth,
    requests in flight, and batches and busy seconds per device."""

    def __init__(self, queue_depth, in_flight, delivery_stats=None):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
            from prometheus_client.core import CounterMetricFamily
        except ImportError:
            raise SetupError("--metrics-bind needs the prometheus_client package: "
                               "pip install 'pg2-blender[monitoring]'") from None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pg2_requests", "Replies sent, by op and result code (ok or the error code)",
                                ["op", "code"], registry=r)
        self.latency = Histogram("pg2_request_latency_seconds", "Generate requests answered ok: receipt to reply",
                                 buckets=_TIME_BUCKETS, registry=r)
        self.queue_time = Histogram("pg2_queue_time_seconds", "Generate requests: receipt to start on a device",
                                    buckets=_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("pg2_batch_size", "Requests per batch run on a device", ["device"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.device_seconds = Counter("pg2_device_busy_seconds", "Seconds a device spent running batches",
                                      ["device"], registry=r)
        Gauge("pg2_queue_depth", "Prepared requests waiting for a device", registry=r).set_function(queue_depth)
        Gauge("pg2_in_flight", "Admitted generate requests not yet answered", registry=r).set_function(in_flight)

        class Undelivered:
            """Replies counted in pg2_requests that never reached their client (read at each scrape)."""

            def collect(self):
                family = CounterMetricFamily("pg2_replies_undelivered", "Replies sent but not delivered: dropped "
                                             "over the unread-reply budgets, or their client gone", labels=["reason"])
                stats = delivery_stats() if delivery_stats is not None else {}
                family.add_metric(["budget"], stats.get("replies_dropped", 0))
                family.add_metric(["client_gone"], stats.get("replies_unreachable", 0))
                yield family

        r.register(Undelivered())

    def replied(self, op: str, code: str | None, received: float | None) -> None:
        self.requests.labels(op, code or "ok").inc()
        if op == "generate" and code is None and received is not None:   # refusals and cancels are not latency
            self.latency.observe(time.monotonic() - received)

    def batch(self, device: str, jobs_received: list, started: float, ended: float) -> None:
        self.batch_size.labels(device).observe(len(jobs_received))
        self.device_seconds.labels(device).inc(ended - started)
        for received in jobs_received:
            self.queue_time.observe(started - received)

    def serve(self, bind: str):
        """Serve /metrics on HOST:PORT (a thread of prometheus_client); returns (server, thread)."""
        from prometheus_client import start_http_server

        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--metrics-bind needs HOST:PORT, e.g. 127.0.0.1:9108; got {bind!r}")
        return start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            line.update(request)
        if record.exc_info:
            line["trace"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class Counters:
    """Requests, errors by code, batches and times; a consistent snapshot for `info`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.requests = 0
        self.by_op: dict[str, int] = {}
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.batches = 0
        self.batched = 0
        self.queue_ms = 0.0
        self.compute_ms = 0.0
        self.total_ms = 0.0
        self.generated = 0

    def request(self, op: str | None) -> None:
        with self._lock:
            self.requests += 1
            if op:
                self.by_op[op] = self.by_op.get(op, 0) + 1

    def reply(self, error_code: str | None) -> None:
        with self._lock:
            if error_code is None:
                self.ok += 1
            else:
                self.errors[error_code] = self.errors.get(error_code, 0) + 1

    def batch(self, size: int, queue_ms: float, compute_ms: float) -> None:
        with self._lock:
            self.batches += 1
            self.batched += size
            self.queue_ms += queue_ms
            self.compute_ms += compute_ms * size

    def generation(self, total_ms: float) -> None:
        with self._lock:
            self.generated += 1
            self.total_ms += total_ms

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "by_op": dict(self.by_op), "ok": self.ok,
                    "errors": dict(self.errors), "batches": self.batches, "batched_requests": self.batched,
                    "mean_batch": round(self.batched / self.batches, 3) if self.batches else 0.0,
                    "mean_queue_ms": round(self.queue_ms / self.batched, 3) if self.batched else 0.0,
                    "mean_compute_ms": round(self.compute_ms / self.batched, 3) if self.batched else 0.0,
                    "mean_total_ms": round(self.total_ms / self.generated, 3) if self.generated else 0.0,
                    "uptime_s": round(time.monotonic() - self.started, 3)}
