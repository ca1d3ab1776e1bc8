"""The generation worker: requests in, exactly one reply out, model batched per device.

`Worker.handle(frames, reply)` is the whole machinery behind a socket: it validates the
request, answers `ping`/`info` at once, decodes and prepares `generate` on a thread pool,
batches `Pipeline.run` per device (batching.Batcher) and finishes and encodes on the pool.
`pg2-server serve` puts it behind a ROUTER in one process (server.py); `pg2-server worker`
connects it to a broker (broker.py) with `connect_to_broker`.

A Worker made without pipelines is loading: it answers `ping` and `info` with `ready: false`
and holds `generate` requests (within `max_queue`, `deadline_ms` and `cancel`) until `start`
gives it the model, so a server can take its socket before the model has loaded.
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import msgpack
import zmq

from . import package_version, peers
from .batching import RETIRE_AFTER_FAILED_BATCHES, Batcher
from .codec import SourceCache, encode_image
from .keypoints import KeypointError
from .metrics import Counters
from .wire import protocol
from .wire.protocol import Limits, ProtocolError, Request
from .worker_protocol import (CANCEL, DISCONNECT, DRAIN_S, HEARTBEAT, HEARTBEAT_S, LIVENESS, READY, REPLY, REQUEST,
                              SUMMARY_S)

log = logging.getLogger("pg2_server.worker")
request_log = logging.getLogger("pg2_server.requests")  # one line per reply, at INFO when log_requests

Reply = Callable[[list], None]


def resident_memory_mb() -> float:
    """This process's resident set size in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if os.uname().sysname == "Darwin" else peak / 1024


def codec_threads() -> int:
    """Default decode/encode threads: one per core this process may use, at most 4.

    On a CPU server the model's threads take every core, and codec threads beyond the cores only
    preempt them: on 2 AMX cores serving `demo` with raw output, 2 threads gave served / raw
    0.864 and 0.893 against 0.815 and 0.803 with 4 (docs/performance.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass(frozen=True)
class WorkerConfig:
    """Batching, queue and limit settings of a worker (the CLI's serve/worker flags and their defaults)."""
    max_batch: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 256
    threads: int = field(default_factory=codec_threads)
    limits: Limits = field(default_factory=Limits)
    source_cache_mb: float = 64.0
    frame_sources: bool = False   # crop each new source photo to its person (BlazePose, the pose extra)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be ≥ 0, got {self.max_delay_ms}")
        if self.source_cache_mb < 0:
            raise ValueError(f"source_cache_mb must be ≥ 0 (0 = off), got {self.source_cache_mb}")


class Job:
    """One admitted generate request on its way through decode → batch → encode.

    `claimed` once a batcher took it for the device (too late to cancel), or a cancel took it
    from the batchers; `done` once its one reply is decided (both change under the worker's lock);
    `requeued` once a device that failed it was retired and it went back to the queue."""
    __slots__ = ("request", "_reply", "received", "enqueued", "started", "prepared", "pipeline", "done",
                 "peer", "deadline", "claimed", "requeued")

    def __init__(self, request: Request, reply: Reply, received: float, peer=None):
        self.request = request
        self._reply = reply
        self.received = received
        self.pipeline = None  # set when it is handed to the model (Worker._submit)
        self.peer = peer
        # The client's deadline counts from sending; its receipt here is the nearest time known.
        self.deadline = received + request.deadline_ms / 1000 if request.deadline_ms is not None else None
        self.enqueued = 0.0
        self.started = 0.0
        self.prepared = None
        self.done = False
        self.claimed = False
        self.requeued = False


class Worker:
    """Validates, batches and answers requests for the pipelines of one model (one per device).

    Without `pipelines` it is loading until `start(pipelines)` (see the module's docstring)."""

    def __init__(self, pipelines: Sequence = (), config: WorkerConfig = WorkerConfig(), role: str = "serve",
                 details: bool = False):
        self.pipelines: list = []
        self.model: str | None = None
        self.batchers: list[Batcher] = []
        self.config = config
        self.role = role
        self.counters = Counters()
        self.pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="pg2-codec")
        self.jobs: queue.Queue = queue.Queue()
        self.sources = SourceCache(int(config.source_cache_mb * 2 ** 20))
        self.detector = None
        if config.frame_sources:   # here, so that a missing MediaPipe stops the server before the model loads
            from .detection import PoseDetector
            self.detector = PoseDetector()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._idle = threading.Condition(self._in_flight_lock)
        self.accepting = True
        self.details = details
        self.delivery_stats: Callable[[], dict] | None = None  # set by the socket loop that owns a Delivery
        self.metrics = None        # a metrics.WorkerMetrics, from enable_metrics
        self.log_requests = False  # one INFO line per reply on the pg2_server.requests logger
        self._by_peer: dict[object, set] = {}  # admitted jobs not yet answered, per peer (for cancel)
        self._held: list[Job] = []  # admitted while the model loads, in arrival order
        if pipelines:
            self.start(pipelines)

    def start(self, pipelines: Sequence) -> None:
        """Put the loaded model to work: one batching thread per pipeline; the requests held while
        it loaded go to it in the order they came."""
        if not pipelines:
            raise ValueError("a worker needs at least one pipeline")
        if self.pipelines:
            raise RuntimeError("this worker has its model already")
        self.batchers = [Batcher(p, self.jobs, self.config.max_batch, self.config.max_delay_ms / 1000.0,
                                 functools.partial(self._batch_done, device=f"{p.device}#{i}"),
                                 functools.partial(self._batch_failed, device=f"{p.device}#{i}"),
                                 self._claim, self._may_retire) for i, p in enumerate(pipelines)]
        for batcher in self.batchers:
            batcher.start()
        if self.detector is not None:
            width, height = pipelines[0].config.canvas
            self.sources.finish = functools.partial(self._frame_source, aspect=width / height)
        with self._in_flight_lock:
            self.model = pipelines[0].name
            self.pipelines = list(pipelines)  # from here on, _admit submits instead of holding
            held, self._held = self._held, []
        for job in held:
            if job.done:
                continue
            refusal = self._refusal(job.request)
            if refusal is not None:
                self._finish_job(job, protocol.encode_error(job.request.id, *refusal), refusal[0])
            else:
                self._submit(job)

    def _frame_source(self, image, aspect: float):
        """A new source photo cropped to its person (detection.frame_person); kept in the source cache."""
        from .detection import frame_person

        framed, framing = frame_person(image, self.detector, aspect)
        log.info("source photo %d×%d %s", image.shape[1], image.shape[0], framing.note)
        return framed

    @property
    def loading(self) -> bool:
        """No model yet: generate requests are held until `start`."""
        return not self.pipelines

    # -- entry point ---------------------------------------------------------------------------

    def handle(self, frames: list, reply: Reply, peer=None) -> None:
        """Answer one request (frames after the envelope); `reply` is called exactly once, from any thread.

        `peer` names the connection it came on: `cancel` and `cancel_peer` act on one peer's work."""
        received = time.monotonic()
        try:
            request = protocol.decode_request(frames, self.config.limits)
        except ProtocolError as e:
            self.counters.request(None)
            self._error(reply, e.id, e.code, e.message, received, op=None)
            return
        self.counters.request(request.op)
        try:
            if request.op == "ping":
                self._send(reply, protocol.encode_reply(request.id, {"pong": True, "role": self.role,
                                                                     "ready": self.ready}), None,
                           request.id, "ping", received)
                log.debug("ping id=%r → ok", request.id)
            elif request.op == "cancel":
                cancelled = self.cancel(peer, request.target)
                self._send(reply, protocol.encode_reply(request.id, {"cancelled": cancelled}), None,
                           request.id, "cancel", received)
                log.debug("cancel id=%r target=%r → %d cancelled", request.id, request.target, cancelled)
            elif request.op == "info":
                self._send(reply, protocol.encode_reply(request.id, self.info()), None, request.id, "info", received)
                log.debug("info id=%r → ok", request.id)
            else:
                self._admit(request, reply, received, peer)
        except Exception:  # a bug: the client gets a reply, the log gets the trace
            log.error("internal error on request %r:\n%s", request.id, traceback.format_exc())
            self._error(reply, request.id, protocol.INTERNAL, "internal server error; the server log has details",
                        received, op=request.op)

    def _refusal(self, request: Request) -> tuple[str, str] | None:
        """(code, message) when the model cannot serve `request`: another model, or no G2 stage."""
        if request.model is not None and request.model != self.model:
            return protocol.UNKNOWN_MODEL, f"this server has no model {request.model!r}; it serves {self.model!r}"
        if "g2" in request.output.stages and self.pipelines[0].g2 is None:
            return protocol.BAD_REQUEST, f"model {self.model!r} has no G2 stage; ask for stages [\"g1\"]"
        return None

    def _admit(self, request: Request, reply: Reply, received: float, peer) -> None:
        refusal = None if self.loading else self._refusal(request)  # while loading: checked in start()
        if refusal is not None:
            self._error(reply, request.id, *refusal, received)
            return
        if not self.accepting:
            self._error(reply, request.id, protocol.OVERLOADED,
                        "the server is shutting down; retry on another server", received)
            return
        with self._in_flight_lock:
            admitted = self._in_flight < self.config.max_queue
            if admitted:
                self._in_flight += 1
        if not admitted:
            self._error(reply, request.id, protocol.OVERLOADED,
                        f"the server's queue is full ({self.config.max_queue} requests); retry later", received)
            return
        job = Job(request, reply, received, peer)
        with self._in_flight_lock:
            self._by_peer.setdefault(peer, set()).add(job)
            if not self.pipelines:
                self._held.append(job)
                return
        self._submit(job)

    def _submit(self, job: Job) -> None:
        """Hand an admitted job to the model: decoded and prepared on the pool, then batched."""
        job.pipeline = self.pipelines[0]
        try:
            self.pool.submit(self._guard, job, self._prepare, job)
        except RuntimeError:  # the pool is shut down: this worker is closing
            self._finish_job(job, protocol.encode_error(job.request.id, protocol.OVERLOADED,
                                                        "the server is shutting down; retry on another server"),
                             protocol.OVERLOADED)

    def expire_held(self) -> None:
        """While loading: answer `deadline_exceeded` to held requests whose deadline has passed, now
        rather than once the model is there."""
        with self._in_flight_lock:
            held = list(self._held)
        for job in held:
            self._expired(job)
        with self._in_flight_lock:
            self._held = [job for job in self._held if not job.done]

    def refuse_held(self, message: str) -> None:
        """Answer `overloaded` to every held request (the server stops, or its model failed to load)."""
        with self._in_flight_lock:
            held, self._held = self._held, []
        for job in held:
            self._finish_job(job, protocol.encode_error(job.request.id, protocol.OVERLOADED, message),
                             protocol.OVERLOADED)

    # -- the stages of a generate request ------------------------------------------------------

    def _prepare(self, job: Job) -> None:
        if job.done:
            return  # cancelled while it waited for a thread
        if self._expired(job):
            return
        request = job.request
        image = self.sources.decode(request.source, request.source_spec, self.config.limits.max_image_side,
                                    request.id)
        request.source = None  # the payload frame is no longer needed; free it early
        try:
            job.prepared = job.pipeline.prepare(image, request.keypoints, request.size)
        except (KeypointError, ValueError, TypeError) as e:
            raise ProtocolError(protocol.BAD_REQUEST, str(e), request.id) from None
        job.enqueued = time.monotonic()
        self.jobs.put(job)

    def _batch_done(self, batch: list, coarse, final, started: float, ended: float, device: str = "") -> None:
        compute_ms = (ended - started) * 1000
        queue_ms = sum((started - job.received) * 1000 for job in batch)
        self.counters.batch(len(batch), queue_ms, compute_ms)
        if self.metrics is not None:
            self.metrics.batch(device, [job.received for job in batch], started, ended)
        if len(batch) == 1 and self.jobs.empty():
            # Nothing is waiting for this device: finishing here saves a thread hand-off of latency.
            batch[0].started = started
            self._guard(batch[0], self._finish, batch[0], coarse[0], final[0], compute_ms, 1)
            return
        for i, job in enumerate(batch):
            job.started = started
            self.pool.submit(self._guard, job, self._finish, job, coarse[i], final[i], compute_ms, len(batch))

    def _may_retire(self, batcher: Batcher) -> bool:
        """A device failed batch after batch: its batcher may stop while another device is healthy
        (the last one goes on, so that requests are still answered)."""
        return any(other.healthy for other in self.batchers if other is not batcher)

    def _batch_failed(self, batch: list, error: BaseException, retiring: bool, device: str = "") -> None:
        log.error("batch of %d failed on %s:\n%s", len(batch), device, "".join(traceback.format_exception(error)))
        if retiring:
            log.error("%s failed %d batches in a row; its batching thread stops, the other devices take its work",
                      device, RETIRE_AFTER_FAILED_BATCHES)
        for job in batch:
            if retiring and not job.requeued:  # once: a request that fails on two devices gets `internal`
                job.requeued = True
                with self._in_flight_lock:
                    job.claimed = False
                self.jobs.put(job)
            else:
                self._finish_job(job, protocol.encode_error(job.request.id, protocol.INTERNAL,
                                                            "internal server error; the server log has details"),
                                 protocol.INTERNAL)

    def _finish(self, job: Job, coarse, final, compute_ms: float, batch_size: int) -> None:
        request = job.request
        output = request.output
        generation = job.pipeline.finish(job.prepared, coarse, final, with_g1="g1" in output.stages,
                                         with_alpha=output.alpha)
        job.prepared = None
        payloads, specs = [], []
        for stage in output.stages:
            data, spec = encode_image(generation.g1 if stage == "g1" else generation.image,
                                      generation.alpha, output, stage)
            payloads.append(data)
            specs.append(spec.to_dict())
        now = time.monotonic()
        timing = {"queue_ms": round((job.started - job.received) * 1000, 3), "compute_ms": round(compute_ms, 3),
                  "total_ms": round((now - job.received) * 1000, 3), "batch": batch_size}
        frames = protocol.encode_reply(request.id, {"image": specs[0], "images": specs, "timing": timing,
                                                    "model": self.model}, payloads)
        self.counters.generation(timing["total_ms"])
        log.debug("generate id=%r %dx%d %s → ok, batch %d, queue %.1f ms, compute %.1f ms, total %.1f ms",
                  request.id, request.size[0], request.size[1], output.format, batch_size, timing["queue_ms"],
                  timing["compute_ms"], timing["total_ms"])
        self._finish_job(job, frames, None)

    def _guard(self, job: Job, step, *args) -> None:
        """Run one stage on the pool; any failure becomes the job's one reply."""
        try:
            step(*args)
        except ProtocolError as e:
            self._finish_job(job, protocol.encode_error(job.request.id, e.code, e.message), e.code)
        except Exception:
            log.error("internal error on request %r:\n%s", job.request.id, traceback.format_exc())
            self._finish_job(job, protocol.encode_error(job.request.id, protocol.INTERNAL,
                                                        "internal server error; the server log has details"),
                             protocol.INTERNAL)

    def _finish_job(self, job: Job, frames: list, error_code: str | None) -> bool:
        """Send the job's one reply; False (and nothing sent) if it had one already."""
        with self._in_flight_lock:
            if job.done:
                return False
            job.done = True
            self._unlist(job)
            # Counted out before the reply leaves: a broker that reads it sends the next request at
            # once, and must find the room it was told of (capacity ≤ max_queue).
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()
        if error_code is not None:
            log.debug("generate id=%r → %s", job.request.id, error_code)
        self._send(job._reply, frames, error_code, job.request.id, "generate", job.received,
                   job.started - job.received if job.started else None)
        return True

    def _unlist(self, job: Job) -> None:
        """Forget an answered job in the per-peer index (under the lock)."""
        jobs = self._by_peer.get(job.peer)
        if jobs is not None:
            jobs.discard(job)
            if not jobs:
                del self._by_peer[job.peer]

    def _expired(self, job: Job) -> bool:
        """Answer `deadline_exceeded` if the job's deadline has passed (it is then never computed)."""
        if job.deadline is None or time.monotonic() <= job.deadline:
            return False
        late_ms = (time.monotonic() - job.received) * 1000
        self._finish_job(job, protocol.encode_error(
            job.request.id, protocol.DEADLINE_EXCEEDED,
            f"the request could not start within its deadline_ms of {job.request.deadline_ms:g} "
            f"({late_ms:.0f} ms since it arrived); send a longer deadline or retry when the server is less busy"),
            protocol.DEADLINE_EXCEEDED)
        return True

    def _claim(self, job: Job) -> bool:
        """A batcher asks to run `job` on its device: no if it was answered or is past its deadline."""
        if job.done or self._expired(job):
            return False
        with self._in_flight_lock:
            if job.done or job.claimed:   # claimed: being cancelled
                return False
            job.claimed = True
        return True

    def cancel(self, peer, request_id=None) -> int:
        """Answer `cancelled` to `peer`'s queued requests (one id, or all with None) that no device
        has started; returns how many."""
        with self._in_flight_lock:
            jobs = [job for job in self._by_peer.get(peer, ())
                    if not job.claimed and (request_id is None or job.request.id == request_id)]
            for job in jobs:   # taken from the batchers before they are answered: none starts now
                job.claimed = True
        cancelled = 0
        for job in jobs:
            cancelled += self._finish_job(job, protocol.encode_error(
                job.request.id, protocol.CANCELLED, "the request was cancelled before it started"),
                protocol.CANCELLED)
        return cancelled

    def cancel_peer(self, peer) -> int:
        """A peer went away: its queued work is cancelled (the replies go nowhere) and never computed."""
        cancelled = self.cancel(peer)
        if cancelled:
            log.info("cancelled %d queued requests of a client that went away", cancelled)
        return cancelled

    # -- replies -------------------------------------------------------------------------------

    def _send(self, reply: Reply, frames: list, error_code: str | None, request_id=None, op: str | None = None,
              received: float | None = None, queued_s: float | None = None) -> None:
        self.counters.reply(error_code)
        op = op or "invalid"  # rejected before its op was known to be valid
        if self.metrics is not None:
            self.metrics.replied(op, error_code, received)
        if self.log_requests:
            fields = {"id": request_id, "op": op, "code": error_code or "ok"}
            if received is not None:
                fields["total_ms"] = round((time.monotonic() - received) * 1000, 3)
            if queued_s is not None:
                fields["queue_ms"] = round(queued_s * 1000, 3)
            request_log.info("%s id=%r → %s", op, request_id, error_code or "ok", extra={"request": fields})
        reply(frames)

    def _error(self, reply: Reply, request_id, code: str, message: str, received: float,
               op: str | None = "generate") -> None:
        log.debug("request id=%r → %s: %s (%.1f ms)", request_id, code, message,
                  (time.monotonic() - received) * 1000)
        self._send(reply, protocol.encode_error(request_id, code, message), code, request_id, op, received)

    # -- state ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ready(self) -> bool:
        """Taking new work: the model loaded, not draining, and at least one device healthy."""
        return self.accepting and any(b.healthy for b in self.batchers)

    def info(self, details: bool | None = None) -> dict:
        """The `info` reply body: models, devices, limits, batching, counters; host, PID and the
        model's training provenance only with `details` (default: the worker's setting)."""
        details = self.details if details is None else details
        models = [self.pipelines[0].describe()] if self.pipelines else []  # none while loading
        for model in models:
            model.pop("device", None)
        counters = self.counters.snapshot()
        counters.update(in_flight=self._in_flight, queued=self.jobs.qsize() + len(self._held),
                        rss_mb=round(resident_memory_mb(), 1),
                        cpu_s=round(time.process_time(), 3), source_cache_hits=self.sources.hits,
                        source_cache_misses=self.sources.misses)
        if self.delivery_stats is not None:
            counters.update(self.delivery_stats())
        devices = [str(p.device) for p in self.pipelines]
        worker = {"devices": devices, "models": [m["name"] for m in models]}
        if details:
            worker.update(host=socket.gethostname(), pid=os.getpid())
        else:
            for model in models:
                # Where and what it was trained on is for operators (--info-details), not every client.
                model.pop("provenance", None)
        return {"protocol_versions": list(protocol.SUPPORTED_VERSIONS),
                "server": {"name": "pg2-server", "version": package_version(), "role": self.role},
                "ready": self.ready, "models": models, "devices": devices,
                "workers": [worker],
                "limits": {"max_message_bytes": self.config.limits.max_message_bytes,
                           "max_image_side": self.config.limits.max_image_side,
                           "max_queue": self.config.max_queue},
                "batching": {"max_batch": self.config.max_batch, "max_delay_ms": self.config.max_delay_ms},
                "counters": counters}

    def enable_metrics(self, bind: str) -> None:
        """Serve Prometheus metrics on HOST:PORT (needs prometheus_client)."""
        from .metrics import WorkerMetrics

        self.metrics = WorkerMetrics(queue_depth=self.jobs.qsize, in_flight=lambda: self._in_flight,
                                     delivery_stats=lambda: self.delivery_stats() if self.delivery_stats else {})
        self.metrics.serve(bind)
        log.info("metrics on http://%s/metrics", bind)

    def summary(self) -> str:
        """One log line: totals since start."""
        c = self.counters.snapshot()
        errors = ", ".join(f"{k} {v}" for k, v in sorted(c["errors"].items())) or "none"
        return (f"{c['requests']} requests ({c['ok']} ok; errors: {errors}), {c['batches']} batches, "
                f"mean batch {c['mean_batch']}, mean queue {c['mean_queue_ms']} ms, "
                f"mean compute {c['mean_compute_ms']} ms, in flight {self._in_flight}")

    def drain(self, timeout: float) -> bool:
        """Stop admitting work and wait until every admitted request is answered."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def refuse_unfinished(self) -> None:
        """The drain time ran out: answer `overloaded` to every admitted request without a reply yet
        (a batch already running on a device still ends, its results unsent)."""
        with self._in_flight_lock:
            jobs = [job for jobs in self._by_peer.values() for job in jobs]
            for job in jobs:   # taken from the batchers first: none starts now
                job.claimed = True
        message = "the server is shutting down and could not finish this request in time; retry on another server"
        for job in jobs:
            self._finish_job(job, protocol.encode_error(job.request.id, protocol.OVERLOADED, message),
                             protocol.OVERLOADED)

    def close(self) -> None:
        """Stop the batchers and the pool, leaving queued work unrun (after `drain` or `refuse_unfinished`)."""
        for batcher in self.batchers:
            batcher.stop()
        for batcher in self.batchers:
            batcher.join(timeout=30)  # a running batch cannot be interrupted
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.detector is not None:
            self.detector.close()


class Outbox:
    """Replies from any thread to the one thread that owns the socket, over inproc PUSH/PULL."""

    def __init__(self, context: zmq.Context, name: str):
        self.context = context
        self.address = f"inproc://pg2-outbox-{name}-{id(self)}"
        self.pull = context.socket(zmq.PULL)
        self.pull.bind(self.address)
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def send(self, frames: list) -> None:
        """Queue one outgoing multipart message (thread-safe)."""
        push = getattr(self._local, "push", None)
        if push is None:
            push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(self.address)
            self._local.push = push
            with self._lock:
                self._sockets.append(push)
        push.send_multipart(frames, copy=False)

    def deliver(self, send: Callable[[list], None]) -> None:
        """Pass every queued message to `send` (on the socket's own thread), without waiting for more."""
        for frames in peers.waiting(self.pull):
            send(frames)

    def close(self) -> None:
        with self._lock:
            for push in self._sockets:
                push.close()
            self._sockets.clear()
        self.pull.close(linger=0)


# ---------------------------------------------------------------------------------------------
# Worker ↔ broker: the worker's side of worker_protocol.py.


def connect_to_broker(worker: Worker, endpoint: str, stop: threading.Event, heartbeat_s: float = HEARTBEAT_S,
                      liveness: int = LIVENESS, context: zmq.Context | None = None, summary_s: float = SUMMARY_S,
                      curve=None, drain_s: float = DRAIN_S) -> None:
    """Serve `worker` through a broker's backend until `stop` is set (Paranoid Pirate worker).

    Sends READY with its info, a heartbeat every `heartbeat_s`; if the broker is silent for
    `liveness` heartbeats, reconnects and registers again. With `curve` (wire.curve.ClientKeys: the
    broker's public key and this worker's key pair) the link is encrypted and authenticated.
    Once `stop` is set it goes on sending heartbeats and replies until what it admitted is answered
    (for at most `drain_s`; what is left then is answered `overloaded`), then sends DISCONNECT.
    """
    context = context or zmq.Context.instance()
    outbox = Outbox(context, "worker")
    # Two batches per device keep the devices busy; more than max_queue would only be refused.
    capacity = min(worker.config.max_batch * 2 * len(worker.pipelines), worker.config.max_queue)

    def open_socket() -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, worker.config.limits.max_message_bytes + 4096)
        sock.setsockopt(zmq.SNDTIMEO, int(heartbeat_s * liveness * 1000))
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
        return sock

    def to_broker(frames: list, wait: bool = False) -> None:
        # A DEALER whose connection never completed (a broker that refused this worker's key, or
        # is down) blocks on send: heartbeats are not waited for, replies for a bounded time
        # (SNDTIMEO), after which the broker will have written this worker off and re-sent them.
        try:
            sock.send_multipart(frames, 0 if wait else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            (log.warning if wait else log.debug)("broker %s not reachable; a %s message was not sent", endpoint,
                                                 bytes(frames[0])[:10].decode(errors="replace"))

    unanswered = 0  # requests handed to the worker whose reply has not gone to the broker yet

    def send_reply(frames: list) -> None:
        nonlocal unanswered
        unanswered -= 1
        to_broker(frames, wait=True)

    def register() -> None:
        to_broker([READY, msgpack.packb({"info": worker.info(details=True), "capacity": capacity})])

    sock = open_socket()
    register()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(outbox.pull, zmq.POLLIN)
    last_heard = last_sent = last_summary = time.monotonic()
    log.info("worker connected to broker %s (%s), capacity %d%s", endpoint, worker.summary(), capacity,
             ", CURVE" if curve is not None else "")
    draining_until = None
    try:
        while True:
            events = dict(poller.poll(100))
            now = time.monotonic()
            if stop.is_set() and draining_until is None:
                # Heartbeats and replies go on while admitted work finishes; new requests get `overloaded`.
                worker.accepting = False
                draining_until = now + drain_s
            forgotten = False  # the broker does not know this worker: it dropped it, or restarted
            if outbox.pull in events:
                outbox.deliver(send_reply)
            if sock in events:
                for frames in peers.waiting(sock):
                    last_heard = now
                    command = frames[0].bytes
                    if command == REQUEST and len(frames) >= 3:
                        key = frames[1].bytes
                        # The broker's key is unique per request: it is the request's "peer" here.
                        unanswered += 1
                        worker.handle([f.buffer for f in frames[2:]],
                                      lambda reply, key=key: outbox.send([REPLY, key, *reply]), peer=key)
                    elif command == CANCEL and len(frames) >= 2:
                        worker.cancel(frames[1].bytes)
                    elif command == DISCONNECT:
                        forgotten = True
            if now - last_sent >= heartbeat_s:
                to_broker([HEARTBEAT, msgpack.packb(worker.info()["counters"])])
                last_sent = now
            silent_s = now - last_heard
            # A stopping worker does not register again.
            if draining_until is None and (forgotten or silent_s > heartbeat_s * liveness):
                log.warning("broker %s %s; reconnecting", endpoint,
                            "does not know this worker" if forgotten else f"silent for {silent_s:.1f} s")
                poller.unregister(sock)
                sock.close()
                sock = open_socket()
                register()
                poller.register(sock, zmq.POLLIN)
                last_heard = last_sent = time.monotonic()
            if now - last_summary >= summary_s:
                log.info("worker: %s", worker.summary())
                last_summary = now
            if draining_until is not None and (unanswered == 0 or now > draining_until):
                break
        if unanswered:
            log.warning("%d requests still running after %g s; answering them `overloaded`", unanswered, drain_s)
            worker.refuse_unfinished()
        outbox.deliver(send_reply)
        to_broker([DISCONNECT])
        log.info("worker stopped: %s", worker.summary())
    finally:
        sock.close(linger=500)
        outbox.close()
