"""`pg2-server serve`: a ROUTER socket in front of a Worker, in one process.

One thread owns the socket: it reads requests (REQ or DEALER envelopes), hands them to the
Worker, and sends the replies the Worker's threads queue in its Outbox. SIGINT/SIGTERM stop
the intake: requests already admitted finish (or fail) with a reply, later ones are told
`overloaded`, and the process exits 0.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import peers, protocol
from .worker import Outbox, Worker
from .errors import SetupError

log = logging.getLogger("pg2_server.server")


@dataclass(frozen=True)
class Curve:
    """CURVE settings of a server or broker: its certificate (with secret key) and the folders of
    authorised public keys, one for clients and, on a broker, one for workers (either may be None)."""
    secret_file: Path
    clients_dir: Path | None = None
    workers_dir: Path | None = None

    def check(self) -> None:
        if not Path(self.secret_file).is_file():
            raise ValueError(f"CURVE secret certificate {self.secret_file} does not exist; create one with "
                             "`pg2-server keys DIR server`")
        for what, folder in (("client", self.clients_dir), ("worker", self.workers_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"CURVE {what} key directory {folder} does not exist; put the {what}s' "
                                 "NAME.key files there")

    @property
    def domains(self) -> dict[str, Path]:
        """ZAP domain → folder of the public keys it accepts."""
        return {domain: Path(folder) for domain, folder in (("clients", self.clients_dir),
                                                            ("workers", self.workers_dir)) if folder is not None}


def start_authenticator(context: zmq.Context, curve: Curve | None) -> ThreadAuthenticator | None:
    """One ZAP handler for `context` that accepts, per domain, only the public keys in its folder."""
    if curve is None or not curve.domains:
        return None
    curve.check()
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("pg2_server.auth"))
    authenticator.start()
    for domain, folder in curve.domains.items():
        authenticator.configure_curve(domain=domain, location=str(folder))
    return authenticator


def curve_server(sock: zmq.Socket, curve: Curve, domain: str) -> None:
    """Make `sock` (before bind) a CURVE server whose peers are checked against `domain`'s keys."""
    public, secret = zmq.auth.load_certificate(str(curve.secret_file))
    if secret is None:
        raise ValueError(f"{curve.secret_file} holds no secret key; pass the NAME.key_secret file")
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_socket(context: zmq.Context, sock: zmq.Socket, curve: Curve | None) -> ThreadAuthenticator | None:
    """Make `sock` a CURVE server that accepts only the public keys in `curve.clients_dir`."""
    if curve is None:
        return None
    if curve.clients_dir is None:
        raise ValueError("CURVE on a server needs the folder of authorised client keys")
    authenticator = start_authenticator(context, curve)
    curve_server(sock, curve, "clients")
    return authenticator


@dataclass(frozen=True)
class ReplyBudget:
    """Bytes of replies held for clients that do not read them: per client, and in all."""
    per_client: int = 64 * 2 ** 20
    total: int = 512 * 2 ** 20


class StopSignal:
    """SIGINT/SIGTERM → an Event (installed only from the main thread)."""

    def __init__(self):
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        log.info("received %s: finishing in-flight requests, then exiting", signal.Signals(number).name)
        self.event.set()


def serve(worker: Worker, bind: str, stop: threading.Event, curve: Curve | None = None,
          context: zmq.Context | None = None, summary_s: float = 60.0, drain_s: float = 60.0,
          ready: threading.Event | None = None, budget: ReplyBudget = ReplyBudget()) -> None:
    """Answer requests on `bind` until `stop` is set, then drain and close."""
    context = context or zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 2000)
    # MAXMSGSIZE is per frame; decode_request checks the message as a whole.
    router.setsockopt(zmq.MAXMSGSIZE, worker.config.limits.max_message_bytes)
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
    log.info("serving model %s on %s (devices %s, max batch %d, max delay %g ms, max queue %d%s)",
             worker.model, bind, ", ".join(str(p.device) for p in worker.pipelines), worker.config.max_batch,
             worker.config.max_delay_ms, worker.config.max_queue, ", CURVE" if curve else "")
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
            for peer in tracker.gone():
                gone(peer)
            if outbox.pull in events:
                outbox.deliver(delivery.send)
            delivery.flush()
            if router in events:
                while True:
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    receive(frames)
            now = time.monotonic()
            if now - last_summary >= summary_s:
                log.info("summary: %s", worker.summary())
                last_summary = now
            if draining_until is not None and (worker.in_flight == 0 or now > draining_until):
                break
        if worker.in_flight:
            log.warning("%d requests still running after %g s; exiting without their replies",
                        worker.in_flight, drain_s)
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
