"""Wire protocol v1: schema, validation, limits, error codes, and a fuzzed decoder."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2_server.wire import protocol
from pg2_server.wire.protocol import ImageSpec, Limits, OutputSpec, ProtocolError

KEYPOINTS = [[10.0 + i, 20.0 + 2 * i] for i in range(17)] + [None]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def header(**changes):
    base = {"v": 1, "op": "generate", "id": "r1", "keypoints": KEYPOINTS, "size": [176, 256],
            "source": {"format": "png"}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def frames(head, *payloads):
    return [msgpack.packb(head), *payloads] if not isinstance(head, bytes) else [head, *payloads]


def error_of(message_frames, limits=Limits()):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(message_frames, limits)
    return caught.value


def test_generate_round_trip_keeps_every_field():
    sent = protocol.encode_generate("abc", b"\x01\x02" * 6, ImageSpec("raw", 2, 2), KEYPOINTS, (176, 256),
                                    OutputSpec("raw", True, ("g2", "g1"), 90), model="demo")
    request = protocol.decode_request(sent)
    assert request.op == "generate" and request.id == "abc" and request.v == 1
    assert request.keypoints[0] == (10.0, 20.0) and request.keypoints[17] is None
    assert len(request.keypoints) == 18
    assert request.size == (176, 256) and request.size.width == 176 and request.size.height == 256
    assert request.source_spec == ImageSpec("raw", 2, 2)
    assert bytes(request.source) == b"\x01\x02" * 6
    assert request.output == OutputSpec("raw", True, ("g2", "g1"), 90)
    assert request.model == "demo"


def test_defaults_of_output_and_simple_ops():
    request = protocol.decode_request(frames(header(), PNG_MAGIC))
    assert request.output == OutputSpec("png", False, ("g2",), 95)
    assert request.model is None
    for op in ("info", "ping"):
        decoded = protocol.decode_request(protocol.encode_simple(op, 7))
        assert (decoded.op, decoded.id) == (op, 7)


@pytest.mark.parametrize("bad, code, words", [
    (b"\xc1", "bad_request", "not valid MessagePack"),
    (msgpack.packb([1, 2, 3]), "bad_request", "must be a MessagePack map"),
    (msgpack.packb({"v": 2, "op": "ping", "id": 1}), "unsupported_version", "version 2"),
    (msgpack.packb({"v": "1", "op": "ping", "id": 1}), "bad_request", '"v": 1'),
    (msgpack.packb({"op": "ping", "id": 1}), "bad_request", '"v": 1'),
    (msgpack.packb({"v": 1, "op": "explode", "id": 1}), "unknown_op", "explode"),
    (msgpack.packb({"v": 1, "id": 1}), "bad_request", '"op"'),
    (msgpack.packb({"v": 1, "op": "ping", "id": [1]}), "bad_request", "id must be"),
    (msgpack.packb({"v": 1, "op": "ping"}) + b"\x00", "bad_request", "more than one"),
    # a header bomb: millions of empty maps would take seconds and gigabytes to build
    (msgpack.packb({"v": 1, "op": "ping", "id": 1, "x": [{}] * 100_000}), "too_large", "over 65536"),
    (msgpack.packb({"v": 1, "op": "ping", "id": 1, "x": [0] * 300}), "bad_request", "longer than a request has"),
])
def test_header_errors(bad, code, words):
    error = error_of([bad])
    assert error.code == code
    assert words in error.message


@pytest.mark.parametrize("changes, code, words", [
    ({"keypoints": KEYPOINTS[:17]}, "bad_request", "18 entries"),
    ({"keypoints": KEYPOINTS[:17] + [[math.nan, 1.0]]}, "bad_request", "keypoint 17 has a non-finite"),
    ({"keypoints": KEYPOINTS[:17] + [[math.inf, 1.0]]}, "bad_request", "non-finite"),
    ({"keypoints": KEYPOINTS[:17] + [["1", 2]]}, "bad_request", "non-numeric"),
    ({"keypoints": KEYPOINTS[:17] + [[True, 2]]}, "bad_request", "non-numeric"),
    ({"keypoints": KEYPOINTS[:17] + [[1, 2, 3]]}, "bad_request", "keypoint 17 must be [x, y]"),
    ({"keypoints": "everywhere"}, "bad_request", "list of 18"),
    ({"size": [-5, 256]}, "bad_request", "at least 1"),
    ({"size": [0, 256]}, "bad_request", "at least 1"),
    ({"size": [176, 100000]}, "too_large", "over the server's limit of 4096"),
    ({"size": [176.0, 256]}, "bad_request", "integer"),
    ({"size": [176]}, "bad_request", "[W, H]"),
    ({"source": {"format": "gif"}}, "bad_request", "png, jpeg, raw"),
    ({"source": {"format": "raw"}}, "bad_request", "needs width and height"),
    ({"source": {"format": "png", "width": 5000, "height": 10}}, "too_large", "source width"),
    ({"source": {"format": "png", "colour": 1}}, "bad_request", "unknown key 'colour'"),
    ({"output": {"format": "jpeg", "alpha": True}}, "bad_request", "no alpha"),
    ({"output": {"stages": ["g3"]}}, "bad_request", "stages"),
    ({"output": {"stages": ["g1", "g1"]}}, "bad_request", "distinct"),
    ({"output": {"alpha": 1}}, "bad_request", "true or false"),
    ({"model": 5}, "bad_request", "model must be a string"),
    ({"keypoint": KEYPOINTS}, "bad_request", "unknown key 'keypoint'"),
    ({"size": _DROP}, "bad_request", "generate needs 'size'"),
])
def test_generate_header_errors_keep_the_id(changes, code, words):
    error = error_of(frames(header(**changes), PNG_MAGIC))
    assert (error.code, error.id) == (code, "r1")
    assert words in error.message


def test_frame_count_and_raw_length_are_checked():
    assert "exactly one payload frame" in error_of(frames(header())).message
    assert "got 2" in error_of(frames(header(), PNG_MAGIC, b"extra")).message
    raw = header(source={"format": "raw", "width": 4, "height": 2})
    error = error_of(frames(raw, b"\x00" * 23))
    assert error.code == "bad_request" and "must be 24 bytes" in error.message
    assert protocol.decode_request(frames(raw, b"\x00" * 24)).source_spec.width == 4
    assert "takes no payload" in error_of(frames({"v": 1, "op": "ping", "id": 1}, b"x")).message
    assert "empty" in error_of([]).message


def test_message_over_the_limit_is_too_large_and_keeps_the_id():
    error = error_of(frames(header(), PNG_MAGIC + b"\x00" * 2000), Limits(max_message_bytes=1000))
    assert (error.code, error.id) == ("too_large", "r1")
    assert "over the server's limit of 1000" in error.message


def test_image_side_limit_comes_from_the_limits():
    error = error_of(frames(header(size=[600, 400]), PNG_MAGIC), Limits(max_image_side=512))
    assert error.code == "too_large" and "512" in error.message


def test_reply_round_trip_and_mismatched_payloads():
    spec = ImageSpec("raw", 2, 1, 3, "g2").to_dict()
    reply = protocol.decode_reply(protocol.encode_reply(5, {"image": spec, "images": [spec]}, [b"\x00" * 6]))
    assert reply.ok and reply.id == 5 and bytes(reply.payloads[0]) == b"\x00" * 6
    with pytest.raises(ProtocolError, match="must be 6 bytes"):
        protocol.decode_reply(protocol.encode_reply(5, {"images": [spec]}, [b"\x00" * 5]))
    with pytest.raises(ProtocolError, match="describes 1 images but carries 0"):
        protocol.decode_reply(protocol.encode_reply(5, {"images": [spec]}))
    failed = protocol.decode_reply(protocol.encode_error(9, "overloaded", "queue full"))
    assert not failed.ok and failed.error.code == "overloaded" and failed.error.message == "queue full"


@pytest.mark.parametrize("endpoint, words", [
    ("http://gpu-box:5557", "web address"),
    ("https://gpu-box", "web address"),
    ("gpu-box:5557", "no transport"),
    ("tcp://gpu-box", "host and a port"),
    ("tcp://gpu-box:99999", "host and a port"),
    ("udp://gpu-box:5557", "unknown transport"),
    ("", "empty"),
])
def test_endpoint_validation_says_what_to_type(endpoint, words):
    with pytest.raises(ValueError, match=words):
        protocol.check_endpoint(endpoint)


def test_valid_endpoints():
    assert protocol.check_endpoint(" tcp://10.0.0.2:5557 ") == "tcp://10.0.0.2:5557"
    assert protocol.check_endpoint("tcp://*:5557", bind=True) == "tcp://*:5557"
    assert protocol.check_endpoint("ipc:///tmp/pg2.sock") == "ipc:///tmp/pg2.sock"


def test_info_canvas_is_the_one_height_first_size():
    assert protocol.info_canvas({"name": "tiny-random", "canvas": [32, 16]}) == protocol.Size(width=16, height=32)
    assert str(protocol.Size(16, 32)) == "16×32"


def test_split_envelope_handles_req_and_dealer():
    assert protocol.split_envelope([b"id", b"", b"h", b"p"]) == ([b"id", b""], [b"h", b"p"])
    assert protocol.split_envelope([b"id", b"h", b"p"]) == ([b"id"], [b"h", b"p"])


def test_the_wire_package_works_copied_into_another_package(tmp_path):
    """The add-on copies `pg2_server/wire/` whole into its own package: it must import nothing else
    of pg2_server, and no numpy, torch or OpenCV."""
    source = Path(protocol.__file__).parent
    shutil.copytree(source, tmp_path / "addon_wire", ignore=shutil.ignore_patterns("__pycache__"))
    modules = sorted(p.stem for p in source.glob("*.py") if p.stem != "__init__")
    assert {"client", "curve", "images", "keypoints", "protocol"} <= set(modules)
    code = ("import sys\nfor name in ('numpy', 'torch', 'cv2'): sys.modules[name] = None\n"
            + "".join(f"import addon_wire.{m}\n" for m in modules)
            + "import addon_wire.client as c\nc.Client('tcp://127.0.0.1:1', timeout=1)\n"
            "bad = [m for m in sys.modules if m.startswith('pg2_server')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Fuzzing: untrusted bytes raise ProtocolError and nothing else.

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=20) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40)


def _decode_or_protocol_error(message_frames):
    try:
        protocol.decode_request(message_frames, Limits(max_message_bytes=4096, max_image_side=64))
    except ProtocolError as e:
        assert e.code in protocol.ERROR_CODES
        assert isinstance(e.message, str) and e.message


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzz_random_bytes(message_frames):
    _decode_or_protocol_error(message_frames)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(protocol._REQUEST_KEYS) + ["x"]), json_like, max_size=8),
       st.sampled_from(["generate", "info", "ping", None]), st.lists(st.binary(max_size=32), max_size=3))
def test_fuzz_structured_headers(fields, op, payloads):
    head = {"v": 1, **fields}
    if op is not None:
        head["op"] = op
    _decode_or_protocol_error([msgpack.packb(head, use_bin_type=True), *payloads])


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_fuzz_truncated_and_mutated_valid_headers(noise):
    valid = msgpack.packb(header())
    cut = len(noise) % len(valid)
    _decode_or_protocol_error([valid[:cut] + noise, PNG_MAGIC])
    _decode_or_protocol_error([noise + valid[cut:], PNG_MAGIC])


def test_deadline_ms_is_optional_and_checked():
    request = protocol.decode_request(frames(header(deadline_ms=250), PNG_MAGIC))
    assert request.deadline_ms == 250.0
    assert protocol.decode_request(frames(header(), PNG_MAGIC)).deadline_ms is None
    for bad in (0, -1, float("inf"), float("nan"), "soon", True, 10 ** 9):
        error = error_of(frames(header(deadline_ms=bad), PNG_MAGIC))
        assert error.code == "bad_request" and "deadline_ms" in error.message and error.id == "r1"
    encoded = protocol.encode_generate("d", PNG_MAGIC, ImageSpec("png"), [None] * 18, (8, 8), deadline_ms=1500)
    assert msgpack.unpackb(encoded[0])["deadline_ms"] == 1500
    assert protocol.decode_request(encoded).deadline_ms == 1500.0


def test_cancel_has_an_optional_target_and_no_payload():
    request = protocol.decode_request(protocol.encode_cancel(5, "frame-0001"))
    assert (request.op, request.id, request.target) == ("cancel", 5, "frame-0001")
    assert protocol.decode_request(protocol.encode_cancel(6)).target is None
    assert error_of(frames({"v": 1, "op": "cancel", "id": 7, "target": [1]})).code == "bad_request"
    assert error_of(frames({"v": 1, "op": "cancel", "id": 8}, b"x")).code == "bad_request"
    assert {"deadline_exceeded", "cancelled"} <= set(protocol.ERROR_CODES) and "cancel" in protocol.OPS
