"""`pg2-server serve`: a ROUTER socket in front of a Worker, in one process.

One thread owns the socket: it reads requests (REQ or DEALER envelopes), hands them to the
Worker, and sends the replies the Worker's threads queue in its Outbox. SIGINT/SIGTERM stop
the intake: requests already admitted finish (or fail) with a reply, later ones are told
`overloaded`, and the process exits 0; those not finished when the drain time runs out are told
`overloaded` too. A second signal exits at once.

The socket is bound before the model loads (on a thread of its own, `ModelLoad`): meanwhile
`ping` and `info` answer `ready: false`, and generate requests wait in the Worker for the model.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Sequence

import zmq

from . import peers
from .peers import ReplyBudget
from .errors import SetupError
from .wire import protocol
from .wire.curve import ServerKeys, secure_socket
from .worker import Outbox, Worker
from .worker_protocol import DRAIN_S, SUMMARY_S

log = logging.getLogger("pg2_server.server")


def _runs_on(pipeline) -> str:
    """'cpu bfloat16 on openvino': a pipeline's device, dtype and backend, for the log."""
    dtype = str(getattr(pipeline, "dtype", "?")).replace("torch.", "")
    return f"{pipeline.device} {dtype} on {getattr(pipeline, 'backend', '?')}"


class StopSignal:
    """SIGINT/SIGTERM → an Event; a second one exits the process at once (installed only from the
    main thread)."""

    def __init__(self):
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.event.is_set():
            log.warning("received %s again: exiting now, without the replies still due", name)
            os._exit(128 + number)
        log.info("received %s: finishing in-flight requests, then exiting", name)
        self.event.set()


class ModelLoad(threading.Thread):
    """Runs `load` (which returns the pipelines) off the socket's thread; keeps what it returned
    or raised, SystemExit included, for the socket's thread to act on."""

    def __init__(self, load: Callable[[], Sequence]):
        super().__init__(name="pg2-model-load")
        self._load = load
        self.pipelines: Sequence | None = None
        self.error: BaseException | None = None
        self.began = time.monotonic()

    def run(self) -> None:
        try:
            self.pipelines = self._load()
        except BaseException as e:  # re-raised on the socket's thread, which exits with it
            self.error = e


def serve(worker: Worker, bind: str, stop: threading.Event, curve: ServerKeys | None = None,
          context: zmq.Context | None = None, summary_s: float = SUMMARY_S, drain_s: float = DRAIN_S,
          ready: threading.Event | None = None, budget: ReplyBudget = ReplyBudget(),
          load: Callable[[], Sequence] | None = None) -> None:
    """Answer requests on `bind` until `stop` is set, then drain and close. With `load`, `worker`
    has no model yet: the socket is bound first, `load()` runs on a thread, and its pipelines
    start the worker once they are there (an error it raises ends `serve` with that error)."""
    context = context or zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 2000)
    # MAXMSGSIZE is per frame, and ZeroMQ drops the connection of a frame over it, unanswered: at
    # twice the message limit, decode_request answers a message over the limit `too_large` with its
    # id, and one frame still cannot make the server buffer without bound.
    router.setsockopt(zmq.MAXMSGSIZE, 2 * worker.config.limits.max_message_bytes)
    router.setsockopt(zmq.RCVHWM, 10000)
    peers.configure(router)
    authenticator = secure_socket(context, router, curve)
    outbox = Outbox(context, "serve")
    try:
        router.bind(bind)
    except zmq.ZMQError as e:
        outbox.close()
        router.close(linger=0)
        if authenticator:
            authenticator.stop()
        raise SetupError(f"cannot bind {bind}: {e}") from None
    delivery = peers.Delivery(router, budget.per_client, budget.total)
    tracker = peers.PeerTracker(router)
    worker.delivery_stats = delivery.stats
    loop_thread = threading.get_ident()

    def replier(envelope: list):
        def reply(frames: list) -> None:
            if threading.get_ident() == loop_thread:
                delivery.send(envelope + frames)
            else:
                outbox.send(envelope + frames)
        return reply

    def gone(peer: bytes) -> None:
        worker.cancel_peer(peer)
        delivery.forget(peer)

    def receive(frames: list) -> None:
        for peer in tracker.seen(frames):
            gone(peer)
        envelope, message = protocol.split_envelope(frames)
        worker.handle([f.buffer for f in message], replier(envelope), peer=frames[0].bytes)

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(outbox.pull, zmq.POLLIN)

    def serving() -> None:
        log.info("serving model %s on %s (devices %s, max batch %d, max delay %g ms, max queue %d%s)",
                 worker.model, bind, ", ".join(_runs_on(p) for p in worker.pipelines), worker.config.max_batch,
                 worker.config.max_delay_ms, worker.config.max_queue, ", CURVE" if curve else "")

    loading = None
    if load is not None:
        log.info("listening on %s%s; loading the model (not ready until it is loaded)", bind,
                 " with CURVE" if curve else "")
        loading = ModelLoad(load)
        loading.start()
    else:
        serving()
    if ready is not None:
        ready.set()
    last_summary = time.monotonic()
    draining_until = None
    try:
        while True:
            # Held replies are retried soon: ZeroMQ gives no per-peer writable event.
            events = dict(poller.poll(2 if delivery.holding else 50))
            if stop.is_set() and draining_until is None:  # before reading: a ping now must say not ready
                worker.accepting = False
                draining_until = time.monotonic() + drain_s
                if loading is not None:
                    worker.refuse_held("the server is shutting down before its model loaded; "
                                       "retry on another server")
            if loading is not None and draining_until is None:
                if loading.is_alive():
                    worker.expire_held()
                elif loading.error is not None:
                    log.error("the model did not load; exiting")
                    worker.refuse_held("the server could not load its model; retry on another server")
                    raise loading.error
                else:
                    worker.start(loading.pipelines)
                    log.info("model loaded in %.1f s; ready", time.monotonic() - loading.began)
                    serving()
                    loading = None
            for peer in tracker.gone():
                gone(peer)
            if outbox.pull in events:
                outbox.deliver(delivery.send)
            delivery.flush()
            if router in events:
                for frames in peers.waiting(router):
                    receive(frames)
            now = time.monotonic()
            if now - last_summary >= summary_s:
                log.info("summary: %s", worker.summary())
                last_summary = now
            if draining_until is not None and (worker.in_flight == 0 or now > draining_until):
                break
        if worker.in_flight:
            log.warning("%d requests still running after %g s; answering them `overloaded`", worker.in_flight,
                        drain_s)
            worker.refuse_unfinished()
        # Answer what reached the socket during the drain (as `overloaded`), then deliver.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            events = dict(poller.poll(20))
            if outbox.pull in events:
                outbox.deliver(delivery.send)
            delivery.flush()
            if router in events:
                receive(router.recv_multipart(copy=False))
        outbox.deliver(delivery.send)
        delivery.flush()
        log.info("stopped: %s", worker.summary())
    finally:
        worker.close()
        outbox.deliver(delivery.send)
        delivery.flush()
        outbox.close()
        tracker.close()
        router.close()
        if authenticator:
            authenticator.stop()
        if loading is not None and loading.is_alive():
            # Loading cannot be interrupted; the process exits once it ends (its model unused).
            log.info("stopped before the model finished loading; exiting once it has")
            loading.join()
