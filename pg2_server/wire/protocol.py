"""Wire protocol v1 (docs/protocol.md): message schema, validation, encode/decode, error codes.

A message is multipart: frame 0 a MessagePack map (the header), frames 1.. the binary payloads
the header describes. This module imports only msgpack and the standard library, because the
Blender add-on carries it (with client.py) into its own package. Decoding untrusted bytes
raises nothing but `ProtocolError`, and every declared size is checked against the limits
before anything proportional to it is allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack

VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Error codes (docs/protocol.md, "Replies").
BAD_REQUEST = "bad_request"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OP = "unknown_op"
UNKNOWN_MODEL = "unknown_model"
TOO_LARGE = "too_large"
OVERLOADED = "overloaded"
INTERNAL = "internal"
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
ERROR_CODES = (BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OP, UNKNOWN_MODEL, TOO_LARGE, OVERLOADED, INTERNAL,
               DEADLINE_EXCEEDED, CANCELLED)

OPS = ("generate", "info", "ping", "cancel")
IMAGE_FORMATS = ("png", "jpeg", "raw")
STAGES = ("g1", "g2")
KEYPOINT_COUNT = 18
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"

_REQUEST_KEYS = {"v", "op", "id", "keypoints", "size", "source", "output", "model", "deadline_ms"}
_SOURCE_KEYS = {"format", "width", "height"}
_OUTPUT_KEYS = {"format", "alpha", "stages", "quality"}
# Deeper nesting than any valid header needs; bounds msgpack's recursion on hostile input.
_MAX_DEPTH = 8
_MAX_ID_LENGTH = 256
# A request's header holds 18 keypoints and a few fields (a few hundred bytes); refused above this
# before it is unpacked, so no header makes the server build millions of objects.
MAX_HEADER_BYTES = 64 * 1024
MAX_DEADLINE_MS = 86_400_000  # a day
MIB = 2 ** 20


class Size(NamedTuple):
    """Pixels as (width, height): the one order of sizes in this project, and of "size" on the
    wire. Only the `info` reply's "canvas" is [H, W], as version 1 shipped it (`info_canvas`)."""
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}×{self.height}"


def info_canvas(model: dict) -> Size:
    """The canvas of one model of an `info` reply, whose "canvas" is [height, width]."""
    height, width = model["canvas"]
    return Size(int(width), int(height))


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` is one of ERROR_CODES, `id` the request's if read."""

    def __init__(self, code: str, message: str, id: str | int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Limits:
    """What a server accepts: bytes per message, pixels per image side."""
    max_message_bytes: int = 32 * MIB
    max_image_side: int = 4096

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")
        if self.max_image_side < 16:
            raise ValueError(f"max_image_side must be at least 16, got {self.max_image_side}")


@dataclass(frozen=True)
class ImageSpec:
    """Describes one image payload frame."""
    format: str
    width: int | None = None
    height: int | None = None
    channels: int = 3
    stage: str | None = None

    def to_dict(self) -> dict:
        data = {"format": self.format, "width": self.width, "height": self.height, "channels": self.channels}
        if self.stage is not None:
            data["stage"] = self.stage
        return data


@dataclass(frozen=True)
class OutputSpec:
    """What the client wants back: format, alpha channel, stages (frames in this order)."""
    format: str = "png"
    alpha: bool = False
    stages: tuple[str, ...] = ("g2",)
    quality: int = 95


@dataclass
class Request:
    """A decoded, validated request; `source`/`source_spec` only for generate."""
    op: str
    id: str | int | None
    v: int = VERSION
    keypoints: list | None = None          # 18 × (x, y) tuple or None
    size: Size | None = None               # the target frame
    source_spec: ImageSpec | None = None
    source: bytes | memoryview | None = None
    output: OutputSpec = field(default_factory=OutputSpec)
    model: str | None = None
    deadline_ms: float | None = None       # generate: how long the client waits, from sending
    target: str | int | None = None        # cancel: the id of the request to cancel (None: all of this peer's)


# ---------------------------------------------------------------------------------------------
# Header decoding

def _unpack(frame, request: bool = False) -> object:
    # A request header's arrays and maps are short (18 keypoints, a handful of keys).
    limits = {"max_array_len": 256, "max_map_len": 64} if request else {}
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True, **limits)
    except msgpack.ExtraData:
        raise ProtocolError(BAD_REQUEST, "the header frame holds more than one MessagePack object") from None
    except ValueError as e:
        if "exceeds max_" in str(e):
            raise ProtocolError(BAD_REQUEST, f"the header holds a list or map longer than a request has ({e})") from None
        raise ProtocolError(BAD_REQUEST, f"the header frame is not valid MessagePack ({type(e).__name__}); "
                                         "frame 0 must be a MessagePack map") from None
    except (msgpack.FormatError, msgpack.StackError, ValueError, UnicodeDecodeError, TypeError) as e:
        raise ProtocolError(BAD_REQUEST, f"the header frame is not valid MessagePack ({type(e).__name__}); "
                                         "frame 0 must be a MessagePack map") from None
    except Exception as e:  # msgpack's C extension may raise other types on hostile input
        raise ProtocolError(BAD_REQUEST, f"the header frame is not valid MessagePack ({type(e).__name__})") from None


def _depth(value, limit: int) -> int:
    """Nesting depth of lists/maps, stopping once past `limit`."""
    if limit < 0:
        return 1
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def readable_id(header: dict) -> str | int | None:
    value = header.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and -2 ** 63 <= value < 2 ** 64:
        return value
    if isinstance(value, str) and len(value) <= _MAX_ID_LENGTH:
        return value
    return None


def decode_header(frame) -> dict:
    """Frame 0 → a header map with a valid `v`, `op` and `id`; raises ProtocolError."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(TOO_LARGE, f"the header frame is {len(frame)} bytes, over {MAX_HEADER_BYTES}: frame 0 "
                                       "holds the request's fields, images go in the frames after it")
    header = _unpack(frame, request=True)
    if not isinstance(header, dict):
        raise ProtocolError(BAD_REQUEST, f"the header must be a MessagePack map, got {type(header).__name__}")
    request_id = readable_id(header)
    if _depth(header, _MAX_DEPTH) > _MAX_DEPTH:
        raise ProtocolError(BAD_REQUEST, "the header is nested too deeply", request_id)
    if "id" in header and header["id"] is not None and request_id is None:
        raise ProtocolError(BAD_REQUEST, f"id must be a string (≤ {_MAX_ID_LENGTH} characters) or an "
                                         "integer", None)
    v = header.get("v")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(BAD_REQUEST, f"the header needs \"v\": {VERSION} (the protocol version)", request_id)
    if v not in SUPPORTED_VERSIONS:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {v} is not supported; this server speaks "
                                                 f"{', '.join(map(str, SUPPORTED_VERSIONS))}", request_id)
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, f"the header needs \"op\": one of {', '.join(OPS)}", request_id)
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op[:40]!r}; use one of {', '.join(OPS)}", request_id)
    return header


# ---------------------------------------------------------------------------------------------
# Request validation

def _int(value, what: str, request_id, low: int = 1, high: int | None = None, code_high: str = TOO_LARGE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(BAD_REQUEST, f"{what} must be an integer, got {_show(value)}", request_id)
    if value < low:
        raise ProtocolError(BAD_REQUEST, f"{what} must be at least {low}, got {value}", request_id)
    if high is not None and value > high:
        raise ProtocolError(code_high, f"{what} is {value}, over the server's limit of {high}", request_id)
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown_keys(data: dict, allowed: set, what: str, request_id) -> None:
    extra = [k for k in data if k not in allowed]
    if extra:
        raise ProtocolError(BAD_REQUEST, f"unknown key {_show(extra[0])} in {what}; allowed: "
                                         f"{', '.join(sorted(allowed))}", request_id)


def _keypoints(value, request_id) -> list:
    if not isinstance(value, list):
        raise ProtocolError(BAD_REQUEST, f"keypoints must be a list of {KEYPOINT_COUNT} [x, y] pairs or null "
                                         f"(COCO-18 order), got {type(value).__name__}", request_id)
    if len(value) != KEYPOINT_COUNT:
        raise ProtocolError(BAD_REQUEST, f"keypoints must have {KEYPOINT_COUNT} entries in COCO-18 order, "
                                         f"got {len(value)}", request_id)
    points = []
    for i, point in enumerate(value):
        if point is None:
            points.append(None)
            continue
        if not isinstance(point, list) or len(point) != 2:
            raise ProtocolError(BAD_REQUEST, f"keypoint {i} must be [x, y] or null, got {_show(point)}", request_id)
        for c in point:
            if isinstance(c, bool) or not isinstance(c, (int, float)):
                raise ProtocolError(BAD_REQUEST, f"keypoint {i} has a non-numeric coordinate {_show(c)}", request_id)
            if not math.isfinite(c) or abs(c) > 1e9:
                raise ProtocolError(BAD_REQUEST, f"keypoint {i} has a non-finite or absurd coordinate {c!r}; "
                                                 "send null for a missing keypoint", request_id)
        points.append((float(point[0]), float(point[1])))
    return points


def _size(value, limits: Limits, request_id) -> Size:
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError(BAD_REQUEST, f"size must be [W, H] (two integers), got {_show(value)}", request_id)
    width = _int(value[0], "size width", request_id, high=limits.max_image_side)
    height = _int(value[1], "size height", request_id, high=limits.max_image_side)
    return Size(width, height)


def _source_spec(value, limits: Limits, request_id) -> ImageSpec:
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, "source must be a map {format: png|jpeg|raw, width, height}", request_id)
    _unknown_keys(value, _SOURCE_KEYS, "source", request_id)
    fmt = value.get("format")
    if fmt not in IMAGE_FORMATS:
        raise ProtocolError(BAD_REQUEST, f"source format must be one of {', '.join(IMAGE_FORMATS)}, "
                                         f"got {_show(fmt)}", request_id)
    width, height = value.get("width"), value.get("height")
    if fmt == "raw" and (width is None or height is None):
        raise ProtocolError(BAD_REQUEST, "a raw source needs width and height", request_id)
    if width is not None:
        width = _int(width, "source width", request_id, high=limits.max_image_side)
    if height is not None:
        height = _int(height, "source height", request_id, high=limits.max_image_side)
    return ImageSpec(fmt, width, height)


def _output_spec(value, request_id) -> OutputSpec:
    if value is None:
        return OutputSpec()
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, "output must be a map {format, alpha, stages}", request_id)
    _unknown_keys(value, _OUTPUT_KEYS, "output", request_id)
    fmt = value.get("format", "png")
    if fmt not in IMAGE_FORMATS:
        raise ProtocolError(BAD_REQUEST, f"output format must be one of {', '.join(IMAGE_FORMATS)}, "
                                         f"got {_show(fmt)}", request_id)
    alpha = value.get("alpha", False)
    if not isinstance(alpha, bool):
        raise ProtocolError(BAD_REQUEST, f"output alpha must be true or false, got {_show(alpha)}", request_id)
    if alpha and fmt == "jpeg":
        raise ProtocolError(BAD_REQUEST, "jpeg has no alpha channel; ask for png or raw with alpha", request_id)
    stages = value.get("stages", ["g2"])
    if (not isinstance(stages, list) or not stages or len(stages) > len(STAGES)
            or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages)):
        raise ProtocolError(BAD_REQUEST, f"output stages must be a non-empty list of distinct names from "
                                         f"{', '.join(STAGES)}, got {_show(stages)}", request_id)
    quality = value.get("quality", 95)
    quality = _int(quality, "output quality", request_id, low=1, high=100, code_high=BAD_REQUEST)
    return OutputSpec(fmt, alpha, tuple(stages), quality)


def decode_request(frames, limits: Limits = Limits()) -> Request:
    """Frames of one request (header, payloads) → a validated Request; raises ProtocolError."""
    if not frames:
        raise ProtocolError(BAD_REQUEST, "empty message: frame 0 must be the header")
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        request_id = None
        if len(frames[0]) <= limits.max_message_bytes:
            try:
                request_id = readable_id(decode_header(frames[0]))
            except ProtocolError:
                pass  # the size is the error to report; the header's own faults come second
        raise ProtocolError(TOO_LARGE, f"the message is {total} bytes, over the server's limit of "
                                       f"{limits.max_message_bytes}", request_id)
    header = decode_header(frames[0])
    request_id = readable_id(header)
    op = header["op"]
    payloads = frames[1:]
    if op != "generate":
        if payloads:
            raise ProtocolError(BAD_REQUEST, f"op {op} takes no payload frames, got {len(payloads)}", request_id)
        target = None
        if op == "cancel" and header.get("target") is not None:
            target = readable_id({"id": header["target"]})
            if target is None:
                raise ProtocolError(BAD_REQUEST, "cancel's target must be the id (string or integer) of a request "
                                                 "sent on this connection, or absent for all of them", request_id)
        return Request(op, request_id, header["v"], target=target)
    _unknown_keys(header, _REQUEST_KEYS, "the generate header", request_id)
    for key in ("keypoints", "size", "source"):
        if key not in header:
            raise ProtocolError(BAD_REQUEST, f"generate needs {key!r}", request_id)
    keypoints = _keypoints(header["keypoints"], request_id)
    size = _size(header["size"], limits, request_id)
    spec = _source_spec(header["source"], limits, request_id)
    output = _output_spec(header.get("output"), request_id)
    model = header.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(BAD_REQUEST, f"model must be a string, got {_show(model)}", request_id)
    deadline_ms = header.get("deadline_ms")
    if deadline_ms is not None:
        if (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float))
                or not math.isfinite(deadline_ms) or not 0 < deadline_ms <= MAX_DEADLINE_MS):
            raise ProtocolError(BAD_REQUEST, f"deadline_ms must be a number of milliseconds in (0, "
                                             f"{MAX_DEADLINE_MS}], got {_show(deadline_ms)}", request_id)
        deadline_ms = float(deadline_ms)
    if len(payloads) != 1:
        raise ProtocolError(BAD_REQUEST, f"generate takes exactly one payload frame (the source image), "
                                         f"got {len(payloads)}", request_id)
    source = payloads[0]
    if spec.format == "raw" and len(source) != spec.width * spec.height * 3:
        raise ProtocolError(BAD_REQUEST, f"a raw source of {spec.width}×{spec.height} must be "
                                         f"{spec.width * spec.height * 3} bytes (8-bit RGB), got {len(source)}",
                            request_id)
    if not len(source):
        raise ProtocolError(BAD_REQUEST, "the source image frame is empty", request_id)
    return Request(op, request_id, header["v"], keypoints, size, spec, source, output, model, deadline_ms)


# ---------------------------------------------------------------------------------------------
# Encoding

def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode_generate(id, source: bytes, source_spec: ImageSpec, keypoints, size,
                    output: OutputSpec | None = None, model: str | None = None,
                    deadline_ms: float | None = None) -> list[bytes]:
    """Frames of a generate request; keypoints are 18 × (x, y) or None."""
    header = {"v": VERSION, "op": "generate", "id": id,
              "keypoints": [None if p is None else [float(p[0]), float(p[1])] for p in keypoints],
              "size": [int(size[0]), int(size[1])],
              "source": {k: v for k, v in (("format", source_spec.format), ("width", source_spec.width),
                                           ("height", source_spec.height)) if v is not None}}
    if output is not None:
        header["output"] = {"format": output.format, "alpha": output.alpha, "stages": list(output.stages),
                            "quality": output.quality}
    if model is not None:
        header["model"] = model
    if deadline_ms is not None:
        header["deadline_ms"] = deadline_ms
    return [_pack(header), source]


def encode_simple(op: str, id) -> list[bytes]:
    """Frames of an `info` or `ping` request."""
    return [_pack({"v": VERSION, "op": op, "id": id})]


def encode_cancel(id, target=None) -> list[bytes]:
    """Frames of a `cancel` request: the queued request `target` (None: all sent on this connection)."""
    header = {"v": VERSION, "op": "cancel", "id": id}
    if target is not None:
        header["target"] = target
    return [_pack(header)]


def encode_error(id, code: str, message: str) -> list[bytes]:
    """Frames of an error reply."""
    return [_pack({"v": VERSION, "id": id, "ok": False, "error": {"code": code, "message": message}})]


def encode_reply(id, body: dict, payloads=()) -> list:
    """Frames of a success reply: header `body` plus v/id/ok, then payload frames."""
    return [_pack({"v": VERSION, "id": id, "ok": True, **body}), *payloads]


@dataclass
class Reply:
    """A decoded reply: header map and payload frames; `error` set when ok is false."""
    id: str | int | None
    ok: bool
    header: dict
    payloads: list
    error: ProtocolError | None = None


def decode_reply(frames, max_image_side: int = 1 << 16) -> Reply:
    """Frames of a reply → Reply; checks that payload frames match their descriptions."""
    if not frames:
        raise ProtocolError(BAD_REQUEST, "empty reply from the server")
    header = _unpack(frames[0])
    if not isinstance(header, dict) or not isinstance(header.get("ok"), bool):
        raise ProtocolError(BAD_REQUEST, "the server's reply header is not a map with \"ok\"")
    request_id = readable_id(header)
    payloads = list(frames[1:])
    if not header["ok"]:
        error = header.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            raise ProtocolError(BAD_REQUEST, "the server's error reply has no error code", request_id)
        message = error.get("message") if isinstance(error.get("message"), str) else "(no message)"
        return Reply(request_id, False, header, payloads, ProtocolError(error["code"], message, request_id))
    images = header.get("images")
    if images is None and "image" in header:
        images = [header["image"]]
    if images is not None:
        if not isinstance(images, list) or len(images) != len(payloads):
            raise ProtocolError(BAD_REQUEST, f"the reply describes {len(images) if isinstance(images, list) else 0}"
                                             f" images but carries {len(payloads)} frames", request_id)
        for spec, data in zip(images, payloads):
            _check_image_frame(spec, data, max_image_side, request_id)
    return Reply(request_id, True, header, payloads)


def _check_image_frame(spec, data, max_image_side: int, request_id) -> None:
    if not isinstance(spec, dict) or spec.get("format") not in IMAGE_FORMATS:
        raise ProtocolError(BAD_REQUEST, "the reply has an image without a known format", request_id)
    limits = Limits(max_image_side=max_image_side)
    width = _int(spec.get("width"), "reply image width", request_id, high=limits.max_image_side)
    height = _int(spec.get("height"), "reply image height", request_id, high=limits.max_image_side)
    channels = _int(spec.get("channels"), "reply image channels", request_id, high=4, code_high=BAD_REQUEST)
    if spec["format"] == "raw" and len(data) != width * height * channels:
        raise ProtocolError(BAD_REQUEST, f"a raw reply image of {width}×{height}×{channels} must be "
                                         f"{width * height * channels} bytes, got {len(data)}", request_id)


# ---------------------------------------------------------------------------------------------
# Envelopes and endpoints

def split_envelope(frames: list) -> tuple[list, list]:
    """ROUTER frames → (envelope, message): identity, plus the empty delimiter REQ adds."""
    if len(frames) >= 2 and len(frames[1]) == 0:
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def check_endpoint(endpoint: str, bind: bool = False) -> str:
    """A ZeroMQ endpoint `tcp://host:port` (or ipc://, inproc://); explains what to type if not."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValueError("the server endpoint is empty; use tcp://HOST:PORT, e.g. " + DEFAULT_ENDPOINT)
    endpoint = endpoint.strip()
    scheme, sep, rest = endpoint.partition("://")
    if scheme in ("http", "https", "ws", "wss"):
        raise ValueError(f"{endpoint!r} is a web address, but the server speaks ZeroMQ; use "
                         f"tcp://HOST:PORT, e.g. tcp://{rest.split('/')[0] or '127.0.0.1:5557'}")
    if not sep:
        raise ValueError(f"{endpoint!r} has no transport; use tcp://HOST:PORT, e.g. tcp://{endpoint}")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"{endpoint!r} needs a path or name after {scheme}://")
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"unknown transport {scheme!r} in {endpoint!r}; use tcp://HOST:PORT")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit() or not (0 < int(port) < 65536):
        if bind and rest.endswith(":*") and host:
            return endpoint
        raise ValueError(f"{endpoint!r} needs a host and a port 1-65535, e.g. " + DEFAULT_ENDPOINT)
    if "/" in host:
        raise ValueError(f"{endpoint!r} has a path; a ZeroMQ endpoint is just tcp://HOST:PORT")
    return endpoint
