"""Python client of the generation server (wire protocol v1); the Blender add-on carries it.

    from pg2_server.wire.client import Client
    with Client("tcp://127.0.0.1:5557") as client:
        result = client.generate(open("person.png", "rb").read(), keypoints, (176, 256))
        open("out.png", "wb").write(result.image.data)

Imports only pyzmq, msgpack and its sibling modules of `pg2_server.wire` (relatively, so the
package works inside another one). A request that gets no reply within `timeout` is retried Lazy-Pirate style: close
the socket, open a new one, send again, at most `retries` attempts (generation is idempotent).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import zmq

from . import protocol
from .curve import ClientKeys
from .images import sniff_format
from .protocol import ImageSpec, OutputSpec, ProtocolError


class ServerError(Exception):
    """The server answered with an error: `code` (protocol error code) and `message`."""

    def __init__(self, code: str, message: str, endpoint: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.endpoint = endpoint


class ServerTimeout(ServerError):
    """No reply after every attempt: the server is down, unreachable or overloaded."""


class HandshakeError(ServerError):
    """The server is there but refused the connection's security handshake (CURVE keys)."""


# ZeroMQ's handshake events, watched on every client socket: a server that refuses the keys
# would otherwise look like one that is down, after every retry's timeout.
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _handshake_failure(event: int, endpoint: str, curve: bool) -> str | None:
    """What to fix, for a failed handshake event (None for any other event)."""
    if event not in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return None
    if not curve:   # whichever failure ZeroMQ reports, a client without keys met an encrypting server
        return (f"the server at {endpoint} uses CURVE encryption: pass --curve-server-key SERVER.key and "
                "--curve-client-key NAME.key_secret (Client(curve=ClientKeys.from_files(...)) in Python)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the server at {endpoint} refused this client's key: its public key (NAME.key) is not in the "
                "server's --curve-clients folder; ask the server's operator to add it")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"the server at {endpoint} does not speak CURVE as this client does: is it started with "
                "--curve-secret, and is it a pg2-server?")
    return (f"the CURVE handshake with {endpoint} failed: is --curve-server-key the public key of that server "
            "(its NAME.key, not another's)?")


@dataclass
class Image:
    """One result image as the server sent it: encoded bytes (or raw RGB/RGBA) and its size."""
    data: bytes
    format: str
    width: int
    height: int
    channels: int
    stage: str = "g2"

    @property
    def extension(self) -> str:
        return {"png": ".png", "jpeg": ".jpg", "raw": ".rgb"}[self.format]


@dataclass
class GenerateRequest:
    """One generate request; `source` is PNG/JPEG bytes, or raw RGB bytes with `source_size`."""
    source: bytes
    keypoints: Sequence
    size: Sequence[int]
    source_size: Sequence[int] | None = None
    output_format: str = "png"
    alpha: bool = False
    stages: Sequence[str] = ("g2",)
    model: str | None = None
    tag: object = None  # anything the caller wants back with the result (a frame number, a path)
    deadline_ms: float | None = None  # the server answers `deadline_exceeded` rather than start it later

    def frames(self, request_id) -> list[bytes]:
        fmt = source_format(self.source, self.source_size)
        width, height = self.source_size if self.source_size is not None else (None, None)
        output = OutputSpec(self.output_format, self.alpha, tuple(self.stages))
        return protocol.encode_generate(request_id, self.source, ImageSpec(fmt, width, height), self.keypoints,
                                        self.size, output, self.model, self.deadline_ms)


@dataclass
class Result:
    """A generate reply: `image` (final stage), `images` by stage, server timing, model name."""
    request: GenerateRequest
    images: dict[str, Image] = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    model: str = ""
    error: ServerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def image(self) -> Image:
        if self.error is not None:
            raise self.error
        return self.images.get("g2") or next(iter(self.images.values()))


def source_format(data: bytes, source_size=None) -> str:
    """'png'/'jpeg' from magic bytes; 'raw' when a size is given for raw RGB."""
    if source_size is not None:
        return "raw"
    fmt = sniff_format(data)
    if fmt is not None:
        return fmt
    raise ValueError("the source is neither PNG nor JPEG; for raw 8-bit RGB bytes pass source_size=(W, H)")


class Client:
    """Requests to one server (or broker) endpoint; not thread-safe: one Client per thread."""

    def __init__(self, endpoint: str = protocol.DEFAULT_ENDPOINT, timeout: float = 30.0, retries: int = 3,
                 curve: ClientKeys | None = None, context: zmq.Context | None = None):
        self.endpoint = protocol.check_endpoint(endpoint)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None   # the socket's handshake events
        # Replies that a call made while generate_many runs (a cancel, a ping) received for the
        # pipeline's requests, kept for it: id → reply.
        self._awaited: set[int] = set()
        self._held: dict[int, protocol.Reply] = {}

    # -- socket --------------------------------------------------------------------------------

    def _open(self) -> zmq.Socket:
        if self._socket is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.apply(sock)
            self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _poll(self, sock: zmq.Socket, timeout_ms: float) -> bool:
        """Whether a reply came within `timeout_ms`; raises HandshakeError at once when the server
        refuses the connection's handshake, instead of waiting out every retry."""
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + timeout_ms / 1000
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining = max(0.0, deadline - time.monotonic()) * 1000
            events = dict(poller.poll(remaining))
            if sock in events:
                return True
            if self._monitor is None or self._monitor not in events:
                return False
            event = recv_monitor_message(self._monitor)["event"]
            problem = _handshake_failure(event, self.endpoint, self.curve is not None)
            if problem is not None:
                self._reset()
                raise HandshakeError("handshake", problem, self.endpoint)

    def _reset(self) -> None:
        """Lazy Pirate: drop the socket (and any late replies) and start over with a new one."""
        if self._socket is not None:
            monitor, self._monitor = self._monitor, None
            if monitor is not None:
                try:   # a terminated context (a cancelled run) refuses this; closing both still frees them
                    self._socket.disable_monitor()
                except zmq.ZMQError:
                    pass
                monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one request at a time -------------------------------------------------------------------

    def _call(self, make_frames, max_image_side: int = 1 << 16) -> protocol.Reply:
        request_id = next(self._ids)
        frames = make_frames(request_id)
        for attempt in range(self.retries):
            sock = self._open()
            sock.send_multipart(frames, copy=len(frames[-1]) < 65536)
            deadline = time.monotonic() + self.timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poll(sock, remaining * 1000):
                    break
                reply = self._decode(sock.recv_multipart(), max_image_side)
                if reply.id == request_id:
                    return reply
                if reply.id in self._awaited:   # generate_many's: it takes it from here
                    self._held[reply.id] = reply
                # Otherwise a late reply to an earlier request: ignore it.
            self._reset()
        raise ServerTimeout("timeout", f"no reply from {self.endpoint} after {self.retries} attempt(s) of "
                                       f"{self.timeout:g} s; is `pg2-server serve` running there and reachable?",
                            self.endpoint)

    def _decode(self, frames: list, max_image_side: int) -> protocol.Reply:
        try:
            return protocol.decode_reply(frames, max_image_side)
        except ProtocolError as e:
            raise ServerError("bad_reply", f"the server at {self.endpoint} sent a malformed reply: {e.message}",
                              self.endpoint) from None

    def _check(self, reply: protocol.Reply) -> protocol.Reply:
        if not reply.ok:
            raise ServerError(reply.error.code, reply.error.message, self.endpoint)
        return reply

    def ping(self) -> float:
        """Round-trip time in milliseconds; raises ServerTimeout if the server does not answer."""
        started = time.perf_counter()
        self._check(self._call(lambda i: protocol.encode_simple("ping", i)))
        return (time.perf_counter() - started) * 1000

    def ready(self) -> bool:
        """Whether the server is ready for work (not loading or draining; a broker: has workers)."""
        reply = self._check(self._call(lambda i: protocol.encode_simple("ping", i)))
        return reply.header.get("ready", True) is True

    def cancel(self, target=None) -> int:
        """Cancel queued requests sent on this client's connection (`target`: one id; None: all);
        returns how many the server cancelled (each is answered `cancelled`)."""
        reply = self._check(self._call(lambda i: protocol.encode_cancel(i, target)))
        return int(reply.header.get("cancelled", 0))

    def info(self) -> dict:
        """The server's description: models, devices, limits, batching, counters."""
        header = dict(self._check(self._call(lambda i: protocol.encode_simple("info", i))).header)
        for key in ("v", "id", "ok"):
            header.pop(key, None)
        return header

    def generate(self, source: bytes, keypoints: Sequence, size: Sequence[int], *,
                 source_size: Sequence[int] | None = None, output_format: str = "png", alpha: bool = False,
                 stages: Sequence[str] = ("g2",), model: str | None = None,
                 deadline_ms: float | None = None) -> Result:
        """One image of the person in `source` (PNG/JPEG bytes) in the pose `keypoints` on a W×H frame."""
        request = GenerateRequest(source, keypoints, size, source_size, output_format, alpha, stages, model,
                                  deadline_ms=deadline_ms)
        result = self._result(request, self._call(request.frames))
        if result.error is not None:
            raise result.error
        return result

    def _result(self, request: GenerateRequest, reply: protocol.Reply) -> Result:
        if not reply.ok:
            return Result(request, error=ServerError(reply.error.code, reply.error.message, self.endpoint))
        specs = reply.header.get("images") or [reply.header.get("image")]
        images = {}
        for spec, data in zip(specs, reply.payloads):
            stage = spec.get("stage", "g2")
            images[stage] = Image(bytes(data), spec["format"], spec["width"], spec["height"], spec["channels"], stage)
        timing = reply.header.get("timing") if isinstance(reply.header.get("timing"), dict) else {}
        return Result(request, images, timing, str(reply.header.get("model", "")))

    # -- pipelined -------------------------------------------------------------------------------

    def generate_many(self, requests: Iterable[GenerateRequest], in_flight: int = 8,
                      raise_errors: bool = True) -> Iterator[Result]:
        """Send up to `in_flight` requests at once and yield results as they arrive (any order).

        A failed request raises ServerError (or, with raise_errors=False, yields a Result whose
        `error` is set). If no reply arrives within `timeout`, the socket is reopened and every
        outstanding request sent again, at most `retries` times each.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        try:
            pending = iter(requests)
            # id → (request, frames, attempts), in the order sent (dicts keep insertion order)
            outstanding: dict[int, tuple[GenerateRequest, list, int]] = {}
            exhausted = False
            while True:
                while not exhausted and len(outstanding) < in_flight:
                    try:
                        request = next(pending)
                    except StopIteration:
                        exhausted = True
                        break
                    request_id = next(self._ids)
                    frames = request.frames(request_id)
                    outstanding[request_id] = (request, frames, 1)
                    self._open().send_multipart(frames)
                self._awaited = set(outstanding)
                if not outstanding:
                    return
                held = next((i for i in outstanding if i in self._held), None)
                sock = self._open()
                if held is not None or self._poll(sock, self.timeout * 1000):
                    reply = self._held.pop(held) if held is not None else self._decode(sock.recv_multipart(), 1 << 16)
                    entry = outstanding.pop(reply.id, None)
                    if entry is None:
                        continue  # a duplicate reply to a request that was re-sent
                    result = self._result(entry[0], reply)
                    if result.error is not None and raise_errors:
                        raise result.error
                    yield result
                    continue
                # Nothing within the timeout: Lazy Pirate for everything still outstanding.
                self._reset()
                if any(attempts >= self.retries for _, _, attempts in outstanding.values()):
                    raise ServerTimeout("timeout", f"no reply from {self.endpoint} for {len(outstanding)} request(s) "
                                                   f"after {self.retries} attempt(s) of {self.timeout:g} s",
                                        self.endpoint)
                sock = self._open()
                for request_id, (request, frames, attempts) in list(outstanding.items()):
                    outstanding[request_id] = (request, frames, attempts + 1)
                    sock.send_multipart(frames)
        finally:   # done, failed or abandoned: nothing more to keep for it
            self._awaited, self._held = set(), {}
