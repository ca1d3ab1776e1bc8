"""`pg2-server broker`: zguide's load-balancing broker with heartbeats, in front of workers.

Clients connect to the frontend exactly as to `pg2-server serve`. Workers (`pg2-server
worker`, worker.connect_to_broker) connect a DEALER to the backend and speak worker_protocol.py.

A worker silent for `liveness` heartbeats is dropped; the requests it held are sent once more
to another worker (generation is idempotent), and answered `overloaded` if that fails too;
those their client cancelled (or left) meanwhile are not sent again. A request goes only to a
worker whose message limit it fits. Each request is answered once, by the worker that holds it:
any other reply (late, after a re-send, or for a key of a broker before a restart) is dropped.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import zmq

from . import package_version, peers
from .errors import SetupError
from .metrics import Counters
from .peers import ReplyBudget
from .wire import protocol
from .wire.curve import ServerKeys, curve_server, start_authenticator
from .wire.protocol import Limits, ProtocolError
from .worker_protocol import (CANCEL, DISCONNECT, DRAIN_S, HEARTBEAT, HEARTBEAT_S, LIVENESS, READY, REPLY, REQUEST,
                              SUMMARY_S)

log = logging.getLogger("pg2_server.broker")


@dataclass(frozen=True)
class BrokerConfig:
    """Heartbeats, queue bound and limits of a broker."""
    heartbeat_s: float = HEARTBEAT_S
    liveness: int = LIVENESS
    max_queue: int = 1024
    max_message_bytes: int = Limits.max_message_bytes
    max_wait_s: float = 60.0       # a request waiting this long for any worker is answered `overloaded`
    max_attempts: int = 2          # the first send plus one re-send after a worker died
    summary_s: float = SUMMARY_S
    drain_s: float = DRAIN_S
    info_details: bool = False     # hosts, PIDs and training provenance in `info`
    max_unread_bytes: int = ReplyBudget.per_client          # replies held for one client that does not read
    max_unread_total_bytes: int = ReplyBudget.total         # ... and for all of them

    def __post_init__(self) -> None:
        for name in ("liveness", "max_queue", "max_attempts", "max_message_bytes", "max_unread_bytes",
                     "max_unread_total_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s}")


@dataclass
class WorkerState:
    identity: bytes
    info: dict
    capacity: int
    expires: float
    max_message_bytes: int  # its socket drops the connection that brings a larger message
    in_flight: set = field(default_factory=set)
    counters: dict = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return [m.get("name") for m in self.info.get("models", []) if isinstance(m, dict)]

    def serves(self, model: str | None) -> bool:
        """Whether it serves `model` (None: any model)."""
        return model is None or model in self.models


@dataclass
class Pending:
    envelope: list
    frames: list
    request_id: object
    model: str | None
    received: float
    size: int                      # bytes of its frames, against the workers' message limits
    attempts: int = 0
    worker: bytes | None = None
    header: dict | None = None
    deadline: float | None = None  # monotonic; from the header's deadline_ms
    cancelled: bool = False        # its client cancelled it (or went away) while a worker held it

    @property
    def peer(self) -> bytes:
        return self.envelope[0].bytes if isinstance(self.envelope[0], zmq.Frame) else bytes(self.envelope[0])


def _ready(ready) -> tuple[dict, int, int | None]:
    """A worker's READY payload → (info, capacity, max_message_bytes if given); ValueError when it
    is not what workers send, so that one stray message on the worker port cannot break the
    broker's `info` or its loop."""
    if not isinstance(ready, dict) or not isinstance(ready.get("info", {}), dict):
        raise ValueError("READY must be a map with an `info` map")
    info = ready.get("info", {})
    for key, kind in (("workers", list), ("devices", list), ("models", list), ("limits", dict)):
        if not isinstance(info.get(key, kind()), kind):
            raise ValueError(f"READY info.{key} must be a {kind.__name__}")
    if not all(isinstance(w, dict) for w in info.get("workers", [])):
        raise ValueError("READY info.workers must hold maps")
    capacity = ready.get("capacity", 1)
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise ValueError("READY capacity must be an integer")
    limit = info.get("limits", {}).get("max_message_bytes")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError("READY info.limits.max_message_bytes must be a positive integer")
    return info, capacity, limit


def _local(endpoint: str) -> bool:
    """An endpoint only this machine reaches: ipc://, inproc://, or tcp:// on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class Broker:
    """Routes client requests to the least-busy live worker and their replies back."""

    def __init__(self, frontend: str, backend: str, config: BrokerConfig = BrokerConfig(),
                 curve: ServerKeys | None = None, context: zmq.Context | None = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 2000)
        # Per frame, as serve's: at twice the limit, a larger message is answered `too_large`.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_message_bytes)
        self.frontend.setsockopt(zmq.RCVHWM, 10000)
        peers.configure(self.frontend)
        self.authenticator = start_authenticator(self.context, curve)
        if curve is not None and curve.clients_dir is not None:
            curve_server(self.frontend, curve, "clients")
        self.backend = self.context.socket(zmq.ROUTER)
        if curve is not None and curve.workers_dir is not None:
            # Workers see every client's image: only the keys in workers_dir may register.
            curve_server(self.backend, curve, "workers")
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a dead worker raises instead of dropping
        self.backend.setsockopt(zmq.SNDHWM, 10000)
        self.backend.setsockopt(zmq.RCVHWM, 10000)
        try:
            self.frontend.bind(frontend)
            self.backend.bind(backend)
        except zmq.ZMQError as e:
            self.close()
            raise SetupError(f"cannot bind {frontend} / {backend}: {e}") from None
        self.endpoints = (frontend, backend)
        self.delivery = peers.Delivery(self.frontend, config.max_unread_bytes, config.max_unread_total_bytes)
        self.tracker = peers.PeerTracker(self.frontend)
        self.by_peer: dict[bytes, set[bytes]] = {}  # client → keys of its pending requests
        self.deadlines: list[tuple[float, bytes]] = []  # heap of (deadline, key)
        self.cancelled = 0
        self.workers: dict[bytes, WorkerState] = {}
        self.pending: dict[bytes, Pending] = {}
        self.waiting: deque[bytes] = deque()
        # Unique across broker processes too: a worker that outlives a broker still answers its keys.
        prefix = secrets.token_bytes(8)
        self.keys = (prefix + i.to_bytes(8, "big") for i in itertools.count(1))
        self.counters = Counters()
        self.resent = 0
        self.stray_replies = 0  # replies from a worker for a request it does not hold
        self.accepting = True

    # -- clients -------------------------------------------------------------------------------

    def _reply(self, envelope: list, frames: list, error_code: str | None) -> None:
        self.counters.reply(error_code)
        self.delivery.send(envelope + frames)

    def _take(self, key: bytes) -> Pending | None:
        """Remove a pending request (answered, cancelled or expired) from every index."""
        entry = self.pending.pop(key, None)
        if entry is not None:
            keys = self.by_peer.get(entry.peer)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_peer[entry.peer]
            if entry.worker is not None and entry.worker in self.workers:
                self.workers[entry.worker].in_flight.discard(key)
            elif entry.worker is None:
                try:
                    self.waiting.remove(key)  # so the queue bound counts only what still waits
                except ValueError:
                    pass
        return entry

    def cancel(self, peer: bytes, request_id=None, answer: bool = True) -> tuple[int, int]:
        """Cancel `peer`'s requests (one id, or all): those waiting here are answered `cancelled`;
        for those a worker holds, the worker is asked to cancel them if not started, and they are
        not sent again if that worker stops. Returns (cancelled here, forwarded to workers)."""
        here = forwarded = 0
        for key in list(self.by_peer.get(peer, ())):
            entry = self.pending[key]
            if request_id is not None and entry.request_id != request_id:
                continue
            if entry.worker is None:
                self._take(key)
                here += 1
                self.cancelled += 1
                if answer:
                    self._error(entry.envelope, entry.request_id, protocol.CANCELLED,
                                "the request was cancelled before it started")
            else:
                forwarded += 1
                entry.cancelled = True
                try:
                    self.backend.send_multipart([entry.worker, CANCEL, key], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the worker is gone or full: its reply, if any, still comes back once
        return here, forwarded

    def peer_gone(self, peer: bytes) -> None:
        """A client went away: its waiting requests are dropped, its workers' ones cancelled."""
        here, forwarded = self.cancel(peer, answer=False)
        self.delivery.forget(peer)
        if here or forwarded:
            log.info("a client went away: %d waiting requests dropped, %d cancelled on workers", here, forwarded)

    def expire(self, now: float) -> None:
        """Answer `deadline_exceeded` to waiting requests whose deadline has passed."""
        while self.deadlines and self.deadlines[0][0] < now:
            _, key = heapq.heappop(self.deadlines)
            entry = self.pending.get(key)
            if entry is None or entry.worker is not None:
                continue  # answered, or a worker has it (with the time that was left; drop() re-arms it)
            self._expired(key, entry)

    def _expired(self, key: bytes, entry: Pending) -> None:
        self._take(key)
        self._error(entry.envelope, entry.request_id, protocol.DEADLINE_EXCEEDED,
                    f"no worker could start the request within its deadline_ms of "
                    f"{entry.header['deadline_ms']:g}; send a longer deadline or retry later")

    def _error(self, envelope: list, request_id, code: str, message: str) -> None:
        self._reply(envelope, protocol.encode_error(request_id, code, message), code)

    @property
    def message_limit(self) -> int:
        """The largest request admitted: the broker's own limit, or a registered worker's if
        smaller (a worker's socket drops a connection that brings a larger one, and with it
        every request in flight there)."""
        return min([self.config.max_message_bytes, *(w.max_message_bytes for w in self.workers.values())])

    def on_client(self, frames: list) -> None:
        for peer in self.tracker.seen(frames):
            self.peer_gone(peer)
        envelope, message = protocol.split_envelope(frames)
        try:
            if not message:
                raise ProtocolError(protocol.BAD_REQUEST, "empty message: frame 0 must be the header")
            header = protocol.decode_header(message[0].buffer)   # ≤ 64 KiB: it names the id to answer
            total = sum(len(f) for f in message)
            limit = self.message_limit
            if total > limit:
                raise ProtocolError(protocol.TOO_LARGE, f"the message is {total} bytes, over the limit of {limit}",
                                    protocol.readable_id(header))
        except ProtocolError as e:
            self.counters.request(None)
            self._error(envelope, e.id, e.code, e.message)
            return
        request_id = header.get("id")
        op = header["op"]
        self.counters.request(op)
        if op == "ping":
            if len(message) > 1:
                self._error(envelope, request_id, protocol.BAD_REQUEST, "op ping takes no payload frames")
            else:
                self._reply(envelope, protocol.encode_reply(request_id, {"pong": True, "role": "broker",
                                                                         "ready": self.ready}), None)
            return
        if op == "cancel":
            target = header.get("target")
            if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int))):
                self._error(envelope, request_id, protocol.BAD_REQUEST,
                            "cancel's target must be the id of a request sent on this connection")
                return
            here, forwarded = self.cancel(frames[0].bytes, target)
            self._reply(envelope, protocol.encode_reply(request_id, {"cancelled": here, "forwarded": forwarded}),
                        None)
            return
        if op == "info":
            self._reply(envelope, protocol.encode_reply(request_id, self.info()), None)
            return
        model = header.get("model") if isinstance(header.get("model"), str) else None
        if model is not None and self.workers and not any(model in w.models for w in self.workers.values()):
            served = sorted({m for w in self.workers.values() for m in w.models})
            self._error(envelope, request_id, protocol.UNKNOWN_MODEL,
                        f"no worker serves model {model!r}; available: {', '.join(served)}")
            return
        if not self.accepting:
            self._error(envelope, request_id, protocol.OVERLOADED, "the broker is shutting down; retry later")
            return
        if len(self.waiting) >= self.config.max_queue:
            self._error(envelope, request_id, protocol.OVERLOADED,
                        f"{len(self.waiting)} requests are waiting for a worker; retry later")
            return
        deadline_ms = header.get("deadline_ms")
        if deadline_ms is not None and (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float))
                                        or not 0 < deadline_ms <= protocol.MAX_DEADLINE_MS):
            self._error(envelope, request_id, protocol.BAD_REQUEST, f"deadline_ms must be a number of milliseconds "
                                                                   f"in (0, {protocol.MAX_DEADLINE_MS}]")
            return
        key = next(self.keys)
        now = time.monotonic()
        entry = Pending(envelope, message, request_id, model, now, total, header=header)
        if deadline_ms is not None:
            entry.deadline = now + deadline_ms / 1000
            heapq.heappush(self.deadlines, (entry.deadline, key))
            if len(self.deadlines) > 2 * len(self.pending) + 64:   # answered and cancelled ones go
                self.deadlines = [d for d in self.deadlines if d[1] in self.pending]
                heapq.heapify(self.deadlines)
        self.pending[key] = entry
        self.by_peer.setdefault(entry.peer, set()).add(key)
        self.waiting.append(key)

    # -- workers -------------------------------------------------------------------------------

    def _choose(self, entry: Pending) -> WorkerState | None:
        """The least-busy worker with room that serves the request's model and takes its size."""
        best = None
        for worker in self.workers.values():
            if len(worker.in_flight) >= worker.capacity:
                continue
            if not worker.serves(entry.model) or entry.size > worker.max_message_bytes:
                continue
            if best is None or len(worker.in_flight) < len(best.in_flight):
                best = worker
        return best

    def dispatch(self) -> None:
        """Send waiting requests to workers with room, oldest first."""
        if not self.waiting or not self.workers:
            return
        held = deque()
        while self.waiting:
            key = self.waiting.popleft()
            entry = self.pending.get(key)
            if entry is None:
                continue
            worker = self._choose(entry)
            if worker is None:
                limits = [w.max_message_bytes for w in self.workers.values() if w.serves(entry.model)]
                if limits and entry.size > max(limits):
                    # Admitted while no worker (or a larger one) was registered: none now can take it.
                    self._take(key)
                    self._error(entry.envelope, entry.request_id, protocol.TOO_LARGE,
                                f"the message is {entry.size} bytes, over the limit of {max(limits)} of the "
                                f"workers serving it")
                    continue
                held.append(key)
                if not any(len(w.in_flight) < w.capacity for w in self.workers.values()):
                    break
                continue
            frames = entry.frames
            if entry.deadline is not None:
                # The worker counts the deadline from its own receipt: send the time that is left.
                remaining_ms = (entry.deadline - time.monotonic()) * 1000
                if remaining_ms <= 0:
                    self._expired(key, entry)
                    continue
                frames = [msgpack.packb({**entry.header, "deadline_ms": remaining_ms}), *entry.frames[1:]]
            try:
                self.backend.send_multipart([worker.identity, REQUEST, key, *frames], copy=False)
            except zmq.ZMQError:  # EHOSTUNREACH: the worker's connection is gone
                held.append(key)
                self.drop(worker.identity, "its connection is gone")
                continue
            entry.attempts += 1
            entry.worker = worker.identity
            worker.in_flight.add(key)
        held.extend(self.waiting)
        self.waiting = held

    def on_worker(self, frames: list) -> None:
        identity, command = frames[0].bytes, frames[1].bytes if len(frames) > 1 else b""
        worker = self.workers.get(identity)
        now = time.monotonic()
        expires = now + self.config.heartbeat_s * self.config.liveness
        if command == READY:
            try:
                info, capacity, limit = _ready(msgpack.unpackb(frames[2].bytes, raw=False) if len(frames) > 2 else {})
            except Exception:
                log.warning("ignoring a malformed READY from a worker")
                return
            if worker is not None:
                self.drop(identity, "it registered again")
            self.workers[identity] = WorkerState(identity, info, max(1, capacity), expires,
                                                 limit or self.config.max_message_bytes)
            hosts = [w.get("host") for w in info.get("workers", [])]
            log.info("worker %s ready: %s on %s, capacity %d (%d workers)", identity.hex(), info.get("devices"),
                     ", ".join(map(str, hosts)), capacity, len(self.workers))
            return
        if worker is None:
            # A worker we dropped (or from before a restart): make it register again.
            if command != DISCONNECT:
                try:
                    self.backend.send_multipart([identity, DISCONNECT])
                except zmq.ZMQError:
                    pass
            return
        worker.expires = expires
        if command == HEARTBEAT:
            if len(frames) > 2:
                try:
                    counters = msgpack.unpackb(frames[2].bytes, raw=False)
                except Exception:
                    counters = None
                worker.counters = counters if isinstance(counters, dict) else {}
        elif command == REPLY and len(frames) >= 4:
            key = frames[2].bytes
            if key not in worker.in_flight:
                # Answered already, re-sent to another worker, or a key of a broker before a
                # restart (which may name another client's request here): one reply, from its holder.
                self.stray_replies += 1
                log.debug("dropping a reply from worker %s for a request it does not hold", identity.hex())
                return
            entry = self._take(key)
            reply = frames[3:]
            self._reply(entry.envelope, reply, _error_code(reply[0].bytes))
        elif command == DISCONNECT:
            self.drop(identity, "it is shutting down")

    def drop(self, identity: bytes, why: str) -> None:
        """Forget a worker; re-send its requests once, or answer them `overloaded` (or `cancelled`
        when their client cancelled them meanwhile)."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        log.warning("dropping worker %s (%s) with %d requests in flight", identity.hex(), why,
                    len(worker.in_flight))
        for key in sorted(worker.in_flight, reverse=True):
            entry = self.pending.get(key)
            if entry is None:
                continue
            if entry.cancelled:
                self._take(key)
                self.cancelled += 1
                self._error(entry.envelope, entry.request_id, protocol.CANCELLED,
                            "the request was cancelled, and the worker that held it stopped")
            elif entry.attempts < self.config.max_attempts:
                self.resent += 1
                entry.worker = None
                self.waiting.appendleft(key)  # oldest first, ahead of newer requests
                if entry.deadline is not None:  # expire() let go of it when the worker took it
                    heapq.heappush(self.deadlines, (entry.deadline, key))
            else:
                self._take(key)
                self._error(entry.envelope, entry.request_id, protocol.OVERLOADED,
                            f"the workers handling this request stopped {entry.attempts} times; retry later")

    def housekeeping(self, now: float) -> None:
        """Heartbeats out, dead workers dropped, requests that waited too long answered."""
        for identity, worker in list(self.workers.items()):
            if now > worker.expires:
                self.drop(identity, f"no heartbeat for {self.config.heartbeat_s * self.config.liveness:g} s")
                continue
            try:
                self.backend.send_multipart([identity, HEARTBEAT])
            except zmq.ZMQError:
                self.drop(identity, "its connection is gone")
        while self.waiting:
            entry = self.pending.get(self.waiting[0])
            if entry is not None and now - entry.received < self.config.max_wait_s:
                break
            key = self.waiting.popleft()
            if entry is not None:
                self._take(key)
                self._error(entry.envelope, entry.request_id, protocol.OVERLOADED,
                            f"no worker took this request within {self.config.max_wait_s:g} s; retry later")

    # -- info ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Taking new work: not draining, and at least one worker registered."""
        return self.accepting and bool(self.workers)

    def info(self) -> dict:
        """The `info` body: the workers' models and devices, the broker's limits, summed counters."""
        models, seen, devices, workers = [], set(), [], []
        totals = {"batches": 0, "batched_requests": 0}
        for worker in self.workers.values():
            for model in worker.info.get("models", []):
                if isinstance(model, dict) and model.get("name") not in seen:
                    seen.add(model.get("name"))
                    models.append(model)
            devices.extend(worker.info.get("devices", []))
            for description in worker.info.get("workers", []):
                description = {**description, "in_flight": len(worker.in_flight), "capacity": worker.capacity}
                if not self.config.info_details:
                    description.pop("host", None)
                    description.pop("pid", None)
                workers.append(description)
            for key in totals:
                value = worker.counters.get(key, 0)
                totals[key] += value if isinstance(value, int) else 0
        counters = self.counters.snapshot()
        counters.update(totals, mean_batch=round(totals["batched_requests"] / totals["batches"], 3)
                        if totals["batches"] else 0.0, waiting=len(self.waiting),
                        in_flight=sum(1 for e in self.pending.values() if e.worker is not None), resent=self.resent,
                        cancelled=self.cancelled, stray_replies=self.stray_replies, **self.delivery.stats())
        first = next(iter(self.workers.values()), None)
        limits = dict(first.info.get("limits", {})) if first else {}
        limits.update(max_message_bytes=self.message_limit, max_queue=self.config.max_queue)
        if not self.config.info_details:
            models = [{k: v for k, v in m.items() if k != "provenance"} for m in models]
        return {"protocol_versions": list(protocol.SUPPORTED_VERSIONS),
                "server": {"name": "pg2-server", "version": package_version(), "role": "broker"},
                "ready": self.ready, "models": models, "devices": devices, "workers": workers, "limits": limits,
                "batching": first.info.get("batching", {}) if first else {}, "counters": counters}

    # -- loop ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Route until `stop` is set; then answer what is pending (or wait for it) and close."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        clients_curve = self.frontend.curve_server
        workers_curve = self.backend.curve_server
        log.info("broker: clients on %s (%s), workers on %s (%s)", self.endpoints[0],
                 "CURVE" if clients_curve else "plaintext", self.endpoints[1],
                 "CURVE" if workers_curve else "plaintext")
        if clients_curve and not workers_curve and not _local(self.endpoints[1]):
            log.warning("clients use CURVE but the workers' link %s is plaintext: anything that reaches it can "
                        "register as a worker and see every client's photo; add --curve-workers DIR",
                        self.endpoints[1])
        if ready is not None:
            ready.set()
        next_beat = last_summary = time.monotonic()
        drain_until = None
        try:
            while True:
                timeout = max(0.0, next_beat - time.monotonic())
                # Held replies are retried soon: ZeroMQ gives no per-peer writable event.
                events = dict(poller.poll(min(timeout, 0.002 if self.delivery.holding else 0.1) * 1000))
                for peer in self.tracker.gone():
                    self.peer_gone(peer)
                self.delivery.flush()
                if self.backend in events:
                    for frames in peers.waiting(self.backend):
                        self.on_worker(frames)
                if self.frontend in events:
                    for frames in peers.waiting(self.frontend):
                        self.on_client(frames)
                now = time.monotonic()
                self.expire(now)
                self.dispatch()
                if now >= next_beat:
                    self.housekeeping(now)
                    next_beat = now + self.config.heartbeat_s
                if now - last_summary >= self.config.summary_s:
                    c = self.counters.snapshot()
                    log.info("summary: %d requests, %d ok, errors %s, %d workers, %d waiting, %d re-sent",
                             c["requests"], c["ok"], c["errors"] or "none", len(self.workers), len(self.waiting),
                             self.resent)
                    last_summary = now
                if stop.is_set():
                    if drain_until is None:
                        self.accepting = False
                        drain_until = now + self.config.drain_s
                    if not self.pending or now > drain_until:
                        break
            for key, entry in list(self.pending.items()):
                self._error(entry.envelope, entry.request_id, protocol.OVERLOADED,
                            "the broker is shutting down; retry later")
            self.pending.clear()
            self.delivery.flush()
        finally:
            self.close()

    def close(self) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.close()
        self.frontend.close()
        self.backend.close(linger=0)
        if self.authenticator:
            self.authenticator.stop()


def _error_code(header: bytes) -> str | None:
    """The error code of a worker's reply header (None when ok), for the counters."""
    try:
        data = msgpack.unpackb(header, raw=False)
        return None if data.get("ok") else str(data.get("error", {}).get("code", protocol.INTERNAL))
    except Exception:
        return protocol.INTERNAL
