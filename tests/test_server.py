"""`pg2-server serve` as a real subprocess on loopback: every op, envelopes, batching, errors,
limits, overload, CURVE, loading and SIGTERM, and the CLI clients."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from pg2_server.wire import protocol
from pg2_server.wire.client import Client, GenerateRequest, HandshakeError, ServerError, ServerTimeout
from pg2_server.wire.curve import ClientKeys
from pg2_server.bench import BENCH_KEYPOINTS
from conftest import free_port

KEYPOINTS = [*BENCH_KEYPOINTS[:16], None, BENCH_KEYPOINTS[17]]  # the standing person, one ear missing
FRAME = (176, 256)


def source_image(width=176, height=256):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x * y) % 256], axis=2).astype(np.uint8)


def png(image):
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


SOURCE_PNG = png(source_image())


def start_server(*flags, env=None):
    """A `pg2-server serve` subprocess with the tiny preset; returns (process, endpoint) once it answers."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "pg2_server.cli", "serve", "--preset", "tiny", "--random-weights",
               "--bind", endpoint, *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    wait_until_serving(process, endpoint, curve=None if "--curve-secret" not in flags else "skip")
    return process, endpoint


def wait_until_serving(process, endpoint, curve=None, timeout=60):
    """Until the server is ready: it answers (not ready) as soon as it is bound, while its model loads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        if curve == "skip":  # a CURVE server cannot be pinged without keys: wait for its log line
            time.sleep(0.5)
            return
        try:
            with Client(endpoint, timeout=0.5, retries=1) as client:
                if client.ready():
                    return
            time.sleep(0.1)
        except ServerTimeout:
            pass
    raise AssertionError("server did not start")


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, out


@pytest.fixture(scope="module")
def server():
    process, endpoint = start_server("--max-batch", "8", "--max-delay-ms", "20", "--max-message-mb", "1",
                                     "--summary-s", "1")
    yield endpoint
    code, out = stop_server(process)
    assert code == 0, out
    assert "summary:" in out and "stopped:" in out


def ask(endpoint, frames, timeout=20.0, socket_type=zmq.DEALER):
    """Send raw frames on a fresh socket; returns (header, payloads) or None if nothing came back."""
    context = zmq.Context.instance()
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout * 1000):
            return None
        reply = sock.recv_multipart()
        return msgpack.unpackb(reply[0]), reply[1:]
    finally:
        sock.close()


def generate_header(request_id="g", **changes):
    head = {"v": 1, "op": "generate", "id": request_id, "keypoints": KEYPOINTS, "size": list(FRAME),
            "source": {"format": "png"}}
    head.update(changes)
    return head


def decode(image_bytes):
    decoded = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_UNCHANGED)
    return decoded


# ---------------------------------------------------------------------------------------------
# Ops and envelopes

def test_ping_and_info(server):
    with Client(server, timeout=10) as client:
        assert client.ping() > 0
        info = client.info()
    assert info["protocol_versions"] == [1]
    assert info["server"]["name"] == "pg2-server" and info["server"]["role"] == "serve"
    [model] = info["models"]
    assert model["name"] == "tiny-random" and model["canvas"] == [32, 16] and model["stages"] == ["g1", "g2"]
    assert model["keypoints"][:3] == ["nose", "neck", "right_shoulder"] and len(model["keypoints"]) == 18
    assert info["devices"] == ["cpu"]
    assert info["limits"] == {"max_message_bytes": 2 ** 20, "max_image_side": 4096, "max_queue": 256}
    assert info["batching"] == {"max_batch": 8, "max_delay_ms": 20.0}
    for key in ("requests", "errors", "batches", "mean_batch", "mean_queue_ms", "mean_compute_ms", "rss_mb"):
        assert key in info["counters"]


def test_generate_png_has_the_frame_size(server):
    with Client(server, timeout=20) as client:
        result = client.generate(SOURCE_PNG, KEYPOINTS, (120, 200))
    image = result.image
    assert (image.format, image.width, image.height, image.channels) == ("png", 120, 200, 3)
    assert decode(image.data).shape == (200, 120, 3)
    assert result.model == "tiny-random"
    assert set(result.timing) >= {"queue_ms", "compute_ms", "total_ms"}
    assert result.timing["total_ms"] >= result.timing["compute_ms"] > 0


def test_generate_raw_source_raw_output_with_alpha_and_both_stages(server):
    raw = source_image(40, 60)
    small_pose = [None if p is None else [p[0] * 40 / 176, p[1] * 60 / 256] for p in KEYPOINTS]
    with Client(server, timeout=20) as client:
        result = client.generate(raw.tobytes(), small_pose, (40, 60), source_size=(40, 60), output_format="raw",
                                 alpha=True, stages=("g2", "g1"))
    assert list(result.images) == ["g2", "g1"]
    for image in result.images.values():
        assert (image.width, image.height, image.channels) == (40, 60, 4)
        pixels = np.frombuffer(image.data, np.uint8).reshape(60, 40, 4)
        assert set(np.unique(pixels[:, :, 3])) <= {0, 255} and pixels[:, :, 3].max() == 255
    # The alpha channel is the same pose mask for both stages; the pixels differ (G2 adds its map).
    g1 = np.frombuffer(result.images["g1"].data, np.uint8).reshape(60, 40, 4)
    g2 = np.frombuffer(result.images["g2"].data, np.uint8).reshape(60, 40, 4)
    assert np.array_equal(g1[:, :, 3], g2[:, :, 3])
    assert not np.array_equal(g1[:, :, :3], g2[:, :, :3])


def test_generate_jpeg(server):
    with Client(server, timeout=20) as client:
        result = client.generate(SOURCE_PNG, KEYPOINTS, FRAME, output_format="jpeg")
    assert result.image.data[:3] == b"\xff\xd8\xff"
    assert decode(result.image.data).shape == (256, 176, 3)


def test_same_request_gives_the_same_image(server):
    with Client(server, timeout=20) as client:
        first = client.generate(SOURCE_PNG, KEYPOINTS, FRAME, output_format="raw")
        second = client.generate(SOURCE_PNG, KEYPOINTS, FRAME, output_format="raw")
    assert first.image.data == second.image.data


def test_req_socket_gets_its_envelope_back(server):
    reply = ask(server, [msgpack.packb(generate_header("req-1")), SOURCE_PNG], socket_type=zmq.REQ)
    header, payloads = reply
    assert header["ok"] and header["id"] == "req-1" and len(payloads) == 1
    assert decode(payloads[0]).shape == (256, 176, 3)
    header, _ = ask(server, protocol.encode_simple("ping", "p"), socket_type=zmq.REQ)
    assert header == {"v": 1, "id": "p", "ok": True, "pong": True, "role": "serve", "ready": True}


def test_pipelined_dealer_requests_come_back_matched_by_id(server):
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server)
    sizes = {f"r{i}": (40 + 8 * i, 50 + 4 * i) for i in range(12)}
    try:
        for request_id, size in sizes.items():
            sock.send_multipart([msgpack.packb(generate_header(request_id, size=list(size))), SOURCE_PNG])
        seen = {}
        while len(seen) < len(sizes):
            assert sock.poll(30000), f"only {len(seen)} replies"
            frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[0])
            assert header["ok"], header
            assert header["id"] not in seen
            seen[header["id"]] = (header["image"]["width"], header["image"]["height"])
            assert decode(frames[1]).shape[:2] == sizes[header["id"]][::-1]
    finally:
        sock.close()
    assert seen == sizes


def test_eight_clients_twenty_five_requests_each_batched(server):
    with Client(server, timeout=30) as client:
        before = client.info()["counters"]
    failures, done = [], []

    def run(index):
        size = (48 + index, 64)
        try:
            with Client(server, timeout=60) as client:
                for _ in range(25):
                    result = client.generate(SOURCE_PNG, KEYPOINTS, size, output_format="raw")
                    assert (result.image.width, result.image.height) == size
                    assert len(result.image.data) == size[0] * size[1] * 3
                    done.append(index)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert len(done) == 200
    with Client(server, timeout=30) as client:
        after = client.info()["counters"]
    batches = after["batches"] - before["batches"]
    batched = after["batched_requests"] - before["batched_requests"]
    assert batched == 200
    assert batched / batches > 1.5, f"mean batch {batched / batches}"
    assert after["mean_batch"] > 1


# ---------------------------------------------------------------------------------------------
# Every error code from a real bad request, and the server keeps serving

def _frames(head, *payloads):
    return [head if isinstance(head, bytes) else msgpack.packb(head), *payloads]


BAD_REQUESTS = {
    "malformed msgpack": (_frames(b"\xc1\xc1"), "bad_request", None),
    "header not a map": (_frames(msgpack.packb(["v", 1])), "bad_request", None),
    "wrong v": (_frames({"v": 9, "op": "ping", "id": 1}), "unsupported_version", 1),
    "unknown op": (_frames({"v": 1, "op": "train", "id": 2}), "unknown_op", 2),
    "17 keypoints": (_frames(generate_header(3, keypoints=KEYPOINTS[:17]), SOURCE_PNG), "bad_request", 3),
    "NaN coordinate": (_frames(generate_header(4, keypoints=KEYPOINTS[:17] + [[float("nan"), 1]]), SOURCE_PNG),
                       "bad_request", 4),
    "inf coordinate": (_frames(generate_header(5, keypoints=[[float("inf"), 1]] + KEYPOINTS[1:]), SOURCE_PNG),
                       "bad_request", 5),
    "string coordinate": (_frames(generate_header(6, keypoints=[["a", "b"]] + KEYPOINTS[1:]), SOURCE_PNG),
                          "bad_request", 6),
    "negative size": (_frames(generate_header(7, size=[-176, 256]), SOURCE_PNG), "bad_request", 7),
    "huge size": (_frames(generate_header(8, size=[176, 10 ** 6]), SOURCE_PNG), "too_large", 8),
    "raw frame wrong length": (_frames(generate_header(9, source={"format": "raw", "width": 10, "height": 10}),
                                       b"\x00" * 299), "bad_request", 9),
    "undecodable png": (_frames(generate_header(10), SOURCE_PNG[:200]), "bad_request", 10),
    "not a png at all": (_frames(generate_header(11), b"hello world"), "bad_request", 11),
    "missing frame": (_frames(generate_header(12)), "bad_request", 12),
    "extra frame": (_frames(generate_header(13), SOURCE_PNG, b"more"), "bad_request", 13),
    "unknown model": (_frames(generate_header(14, model="deepfashion-v9"), SOURCE_PNG), "unknown_model", 14),
    # each frame under the 1 MiB a frame may have, the two together over the message's 1 MiB
    "over the message limit": (_frames(generate_header(15, pad="x" * 60_000), b"\x00" * 1_000_000),
                               "too_large", 15),
    # one frame over the 1 MiB message limit: ZeroMQ passes it on (its per-frame cap is twice that)
    "one frame over the message limit": (_frames(generate_header(17), b"\x00" * (2 ** 20 + 10)), "too_large", 17),
    "header over 64 KiB": (_frames(generate_header(16, pad="x" * 70_000), SOURCE_PNG), "too_large", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_its_error_code_and_the_server_keeps_serving(server, name):
    frames, code, request_id = BAD_REQUESTS[name]
    reply = ask(server, frames)
    assert reply is not None, "no reply"
    header, payloads = reply
    assert header["ok"] is False and payloads == []
    assert header["error"]["code"] == code, header
    assert header["id"] == request_id
    assert isinstance(header["error"]["message"], str) and len(header["error"]["message"]) > 10
    with Client(server, timeout=20) as client:
        assert client.generate(SOURCE_PNG, KEYPOINTS, FRAME).image.width == 176


def test_ping_answers_while_the_model_is_busy(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server)
    for i in range(48):
        sock.send_multipart([msgpack.packb(generate_header(i, size=[352, 512])), SOURCE_PNG])
    time.sleep(0.05)
    with Client(server, timeout=20) as client:
        client.ping()
        pinged = time.monotonic()
    answered = 0
    while answered < 48:
        assert sock.poll(30000)
        sock.recv_multipart()
        answered += 1
    finished = time.monotonic()
    sock.close()
    assert pinged < finished


def test_frame_over_twice_the_message_limit_is_dropped_by_zeromq_and_others_are_unaffected(server):
    assert ask(server, _frames(generate_header(16), b"\x00" * (2 * 2 ** 20 + 10)), timeout=2) is None
    with Client(server, timeout=20) as client:
        assert client.ping() > 0
        assert client.generate(SOURCE_PNG, KEYPOINTS, FRAME).image.height == 256


def test_client_raises_server_error_with_code(server):
    with Client(server, timeout=20) as client:
        with pytest.raises(ServerError) as caught:
            client.generate(SOURCE_PNG, KEYPOINTS[:17], FRAME)
    assert caught.value.code == "bad_request" and "18 entries" in caught.value.message


def test_info_counts_errors_by_code(server):
    ask(server, _frames({"v": 1, "op": "nope", "id": "x"}))
    with Client(server, timeout=20) as client:
        counters = client.info()["counters"]
    assert counters["errors"].get("unknown_op", 0) >= 1
    assert counters["by_op"]["ping"] >= 1


# ---------------------------------------------------------------------------------------------
# CLI clients against the server

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pg2_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_ping_info(server, tmp_path):
    source = tmp_path / "person.png"
    source.write_bytes(SOURCE_PNG)
    pose = tmp_path / "pose.json"
    pose.write_text(json.dumps({"size": [88, 128], "keypoints": KEYPOINTS}))
    out = tmp_path / "out" / "result.png"
    done = run_cli("generate", "--server", server, "--source", str(source), "--pose", str(pose), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert cv2.imread(str(out)).shape == (128, 88, 3)
    bmp = tmp_path / "person.bmp"          # a format the wire does not take: sent as PNG by the client
    cv2.imwrite(str(bmp), cv2.imread(str(source)))
    done = run_cli("generate", "--server", server, "--source", str(bmp), "--pose", str(pose), "--out",
                   str(tmp_path / "from_bmp.png"))
    assert done.returncode == 0, done.stderr
    assert cv2.imread(str(tmp_path / "from_bmp.png")).shape == (128, 88, 3)
    done = run_cli("ping", "--server", server)
    assert done.returncode == 0 and "pong from" in done.stdout
    done = run_cli("info", "--server", server, "--json")
    assert json.loads(done.stdout)["models"][0]["name"] == "tiny-random"
    model = json.loads(run_cli("info", "--server", server, "--json").stdout)["models"][0]
    done = run_cli("info", "--server", server)
    assert "model tiny-random" in done.stdout and "mean batch" in done.stdout
    assert f"{model['dtype']} on {model['backend']}" in done.stdout


def test_cli_batch_mode_writes_one_image_per_pose(server, tmp_path):
    source = tmp_path / "person.png"
    source.write_bytes(SOURCE_PNG)
    poses = tmp_path / "poses"
    poses.mkdir()
    for i in range(6):
        (poses / f"frame_{i:04d}.json").write_text(json.dumps({"size": [60 + i, 80], "keypoints": KEYPOINTS}))
    (poses / "frame_bad.json").write_text(json.dumps({"size": [60, 80], "keypoints": KEYPOINTS[:3]}))
    out = tmp_path / "out"
    done = run_cli("generate", "--server", server, "--source", str(source), "--pose", str(poses), "--out",
                   str(out), "--in-flight", "4")
    # A malformed pose file is reported by name before anything is sent.
    assert done.returncode == 2 and "frame_bad.json" in done.stderr
    assert not out.exists() or not any(out.iterdir())
    poses.joinpath("frame_bad.json").unlink()
    done = run_cli("generate", "--server", server, "--source", str(source), "--pose", str(poses), "--out",
                   str(out), "--in-flight", "4")
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"frame_{i:04d}.png" for i in range(6)]
    assert cv2.imread(str(out / "frame_0003.png")).shape == (80, 63, 3)


def test_cli_local_batch_mode_needs_no_server(tmp_path):
    source = tmp_path / "person.png"
    source.write_bytes(SOURCE_PNG)
    poses = tmp_path / "poses"
    poses.mkdir()
    for i in range(3):
        (poses / f"f{i}.json").write_text(json.dumps({"size": [40, 50 + i], "keypoints": KEYPOINTS}))
    out = tmp_path / "out"
    done = run_cli("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
                   "--pose", str(poses), "--out", str(out), "--in-flight", "2", "--format", "jpeg")
    assert done.returncode == 0, done.stderr
    assert [cv2.imread(str(out / f"f{i}.jpg")).shape for i in range(3)] == [(50, 40, 3), (51, 40, 3), (52, 40, 3)]


def test_cli_reports_a_pasted_web_address_and_a_dead_server(tmp_path):
    done = run_cli("ping", "--server", "http://localhost:5557")
    assert done.returncode == 2 and "web address" in done.stderr and "tcp://localhost:5557" in done.stderr
    done = run_cli("ping", "--server", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3", "--retries", "2")
    assert done.returncode == 3 and "no reply" in done.stderr and "2 attempt(s)" in done.stderr


# ---------------------------------------------------------------------------------------------
# Overload, shutdown, CURVE: servers of their own

def test_full_queue_answers_overloaded():
    process, endpoint = start_server("--max-queue", "1", "--max-delay-ms", "400", "--max-batch", "8")
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for i in range(6):
            sock.send_multipart([msgpack.packb(generate_header(i)), SOURCE_PNG])
        codes = {}
        while len(codes) < 6:
            assert sock.poll(20000)
            header = msgpack.unpackb(sock.recv_multipart()[0])
            codes[header["id"]] = "ok" if header["ok"] else header["error"]["code"]
        sock.close()
        assert codes[0] == "ok"
        assert list(codes.values()).count("overloaded") >= 3
        assert set(codes.values()) <= {"ok", "overloaded"}
    finally:
        code, out = stop_server(process)
    assert code == 0, out


def test_sigterm_under_load_replies_to_every_request_and_exits_zero():
    process, endpoint = start_server("--max-batch", "4", "--max-delay-ms", "10", "--device", "cpu,cpu")
    with Client(endpoint, timeout=20) as client:
        assert client.info()["devices"] == ["cpu", "cpu"]  # one batching thread each
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for i in range(40):
            sock.send_multipart([msgpack.packb(generate_header(i)), SOURCE_PNG])
        assert sock.poll(30000)
        replies = [msgpack.unpackb(sock.recv_multipart()[0])]
        process.send_signal(signal.SIGTERM)
        while len(replies) < 40:
            assert sock.poll(30000), f"{len(replies)} of 40 replies"
            replies.append(msgpack.unpackb(sock.recv_multipart()[0]))
        process.wait(timeout=30)
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
    out = process.stdout.read()
    assert process.returncode == 0, out
    assert sorted(r["id"] for r in replies) == list(range(40))
    outcomes = ["ok" if r["ok"] else r["error"]["code"] for r in replies]
    assert set(outcomes) <= {"ok", "overloaded"} and outcomes.count("ok") >= 1
    assert "SIGTERM" in out and "stopped:" in out


def test_curve_authorised_key_is_served_unknown_key_is_not(tmp_path):
    keys = tmp_path / "keys"
    authorised = tmp_path / "authorised"
    for name in ("server", "alice", "mallory"):
        done = run_cli("keys", str(keys), name)
        assert done.returncode == 0 and f"{name}.key_secret" in done.stdout
    authorised.mkdir()
    (authorised / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    assert "exists" in run_cli("keys", str(keys), "alice").stderr
    process, endpoint = start_server("--curve-secret", str(keys / "server.key_secret"),
                                     "--curve-clients", str(authorised))
    try:
        alice = ClientKeys.from_files(keys / "server.key", keys / "alice.key_secret")
        deadline = time.monotonic() + 30
        while True:  # the server may still be loading
            try:
                with Client(endpoint, timeout=1, retries=1, curve=alice) as client:
                    assert client.ping() > 0
                    assert client.generate(SOURCE_PNG, KEYPOINTS, FRAME).image.width == 176
                break
            except ServerTimeout:
                assert time.monotonic() < deadline
        # Refused handshakes are said at once, with what to fix, not after every retry's timeout.
        mallory = ClientKeys.from_files(keys / "server.key", keys / "mallory.key_secret")
        wrong_server = ClientKeys.from_files(keys / "mallory.key", keys / "alice.key_secret")
        for curve, message in ((mallory, "refused this client's key: its public key (NAME.key) is not in the "
                                         "server's --curve-clients folder"),
                               (None, "uses CURVE encryption: pass --curve-server-key SERVER.key and --curve-client-key"),
                               (wrong_server, "is --curve-server-key the public key of that server")):
            started = time.monotonic()
            with Client(endpoint, timeout=20, retries=3, curve=curve) as client:
                with pytest.raises(HandshakeError, match=re.escape(message)):
                    client.ping()
            assert time.monotonic() - started < 10
        done = run_cli("ping", "--server", endpoint, "--curve-server-key", str(keys / "server.key"),
                       "--curve-client-key", str(keys / "alice.key_secret"))
        assert done.returncode == 0, done.stderr
        # The folder is the allow-list as it is now: alice's key removed is refused at her next
        # connection, mallory's added is let in, without a restart.
        (authorised / "alice.key").unlink()
        (authorised / "mallory.key").write_bytes((keys / "mallory.key").read_bytes())
        with Client(endpoint, timeout=1, retries=1, curve=alice) as client:
            with pytest.raises(HandshakeError, match="refused this client's key"):
                client.ping()
        with Client(endpoint, timeout=5, retries=1, curve=mallory) as client:
            assert client.ping() > 0
    finally:
        code, out = stop_server(process)
    assert code == 0, out
    assert "refused a client whose key" in out and "client keys in" in out and "read again: 1 authorised" in out


def test_keys_never_replace_a_pair_unasked_and_keep_the_secret_private(tmp_path):
    keys = tmp_path / "keys"
    assert run_cli("keys", str(keys), "server").returncode == 0
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    assert oct((keys / "server.key").stat().st_mode & 0o777) == "0o644"
    secret = (keys / "server.key_secret").read_bytes()
    (keys / "server.key").rename(tmp_path / "server.key")   # the public key moved away, the secret left
    done = run_cli("keys", str(keys), "server")
    assert done.returncode != 0 and "server.key_secret exists; pass --force" in done.stderr
    assert (keys / "server.key_secret").read_bytes() == secret
    assert run_cli("keys", str(keys), "server", "--force").returncode == 0
    assert (keys / "server.key_secret").read_bytes() != secret


def test_a_client_key_folder_no_client_could_pass_is_refused_at_start(tmp_path):
    from pg2_server.wire.curve import ServerKeys

    keys = tmp_path / "keys"
    for name in ("server", "alice"):
        assert run_cli("keys", str(keys), name).returncode == 0
    authorised = tmp_path / "authorised"
    authorised.mkdir()
    server = ServerKeys(keys / "server.key_secret", authorised)
    with pytest.raises(ValueError, match="holds no NAME.key public keys"):
        server.check()
    (authorised / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    server.check()
    (authorised / "bob.key").write_text("nonsense\n")       # one bad key would lock out alice too
    with pytest.raises(ValueError, match="holds a key that cannot be read"):
        server.check()


# ---------------------------------------------------------------------------------------------
# Under abuse: far keypoints, clients that never read or go away, deadlines, cancel, readiness

FAR_KEYPOINTS = [[1e8, 1e8], [-1e8, -1e8], [1e8, -1e8], [-1e8, 1e8]] + KEYPOINTS[4:]


def test_keypoints_at_plus_minus_1e8_are_answered_at_once_with_flat_memory(server):
    with Client(server, timeout=20) as client:
        before = client.info()["counters"]["rss_mb"]
        started = time.monotonic()
        results = list(client.generate_many(
            [GenerateRequest(SOURCE_PNG, FAR_KEYPOINTS, (64, 128), tag=i) for i in range(8)], in_flight=4))
        elapsed = time.monotonic() - started
        after = client.info()["counters"]["rss_mb"]
    assert all(r.ok and r.image.width == 64 for r in results)
    assert elapsed < 5, f"{elapsed:.1f} s for 8 requests"  # was: minutes and gigabytes per request
    assert after - before < 50, f"RSS {before} → {after} MiB"


def test_info_hides_host_pid_and_provenance_without_info_details(server, busy_server):
    with Client(server, timeout=10) as client:
        info = client.info()
    assert info["ready"] is True
    assert info["workers"] == [{"devices": ["cpu"], "models": ["tiny-random"]}]
    assert "provenance" not in info["models"][0]
    with Client(busy_server, timeout=10) as client:  # started with --info-details
        info = client.info()
    assert info["workers"][0]["pid"] > 0 and isinstance(info["workers"][0]["host"], str)
    assert "provenance" in info["models"][0]


@pytest.fixture(scope="module")
def busy_server():
    """The fashion preset in fp32 eager torch, one image at a time (~0.2 s each on two cores; the demo
    preset in bf16 takes ~13 ms, too fast for a queue to form): requests queue for the model."""
    process, endpoint = start_server("--preset", "fashion", "--dtype", "float32", "--backend", "torch",
                                     "--max-batch", "1", "--max-delay-ms", "0", "--info-details")
    yield endpoint
    code, out = stop_server(process)
    assert code == 0, out


def send_slow(sock, ids, **changes):
    for request_id in ids:
        sock.send_multipart([msgpack.packb(generate_header(request_id, **changes)), SOURCE_PNG])


def collect(sock, count, timeout=60):
    replies = {}
    while len(replies) < count:
        assert sock.poll(timeout * 1000), f"{len(replies)} of {count} replies"
        header = msgpack.unpackb(sock.recv_multipart()[0])
        assert header["id"] not in replies, f"{header['id']} answered twice"
        replies[header["id"]] = "ok" if header["ok"] else header["error"]["code"]
    return replies


def dealer(endpoint, **options):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(endpoint)
    return sock


def counters(endpoint):
    with Client(endpoint, timeout=20) as client:
        return client.info()["counters"]


def test_deadline_exceeded_is_never_computed(busy_server):
    before = counters(busy_server)
    sock = dealer(busy_server)
    try:
        send_slow(sock, [f"slow{i}" for i in range(6)])
        sock.send_multipart([msgpack.packb(generate_header("hurry", deadline_ms=50)), SOURCE_PNG])
        sock.send_multipart([msgpack.packb(generate_header("patient", deadline_ms=60_000)), SOURCE_PNG])
        replies = collect(sock, 8)
    finally:
        sock.close()
    assert replies.pop("hurry") == "deadline_exceeded"
    assert set(replies.values()) == {"ok"}
    after = counters(busy_server)
    assert after["batched_requests"] - before["batched_requests"] == 7  # the late one never reached the model
    assert after["errors"].get("deadline_exceeded", 0) - before["errors"].get("deadline_exceeded", 0) == 1
    bad = ask(busy_server, _frames(generate_header("neg", deadline_ms=-5), SOURCE_PNG))[0]
    assert bad["error"]["code"] == "bad_request" and "deadline_ms" in bad["error"]["message"]


def test_cancel_one_queued_request_then_all(busy_server):
    sock = dealer(busy_server)
    try:
        send_slow(sock, [f"c{i}" for i in range(8)])
        time.sleep(0.1)
        started = time.monotonic()
        sock.send_multipart(protocol.encode_cancel("x1", "c7"))
        first = {}
        while "x1" not in first or "c7" not in first:
            assert sock.poll(20000)
            header = msgpack.unpackb(sock.recv_multipart()[0])
            first[header["id"]] = header
        cancel_s = time.monotonic() - started
        assert first["x1"]["ok"] and first["x1"]["cancelled"] == 1
        assert first["c7"]["error"]["code"] == "cancelled"
        sock.send_multipart(protocol.encode_cancel("x2"))  # no target: everything still queued
        replies = collect(sock, 10 - len(first))
    finally:
        sock.close()
    replies.update({k: "ok" if h["ok"] else h["error"]["code"] for k, h in first.items()})
    assert cancel_s < 1.0, f"cancel took {cancel_s:.2f} s"  # the queue ahead of it took ~1.5 s
    outcomes = [replies[f"c{i}"] for i in range(8)]
    assert set(outcomes) <= {"ok", "cancelled"} and outcomes.count("cancelled") >= 3
    assert replies["x2"] == "ok"


def test_work_of_a_client_that_went_away_is_cancelled(busy_server):
    before = counters(busy_server)
    gone = dealer(busy_server)
    send_slow(gone, [f"g{i}" for i in range(40)])
    time.sleep(0.2)
    gone.close()
    time.sleep(0.2)
    started = time.monotonic()
    with Client(busy_server, timeout=20) as client:
        assert client.generate(SOURCE_PNG, KEYPOINTS, FRAME).image.width == 176
    waited = time.monotonic() - started
    after = counters(busy_server)
    cancelled = after["errors"].get("cancelled", 0) - before["errors"].get("cancelled", 0)
    computed = after["batched_requests"] - before["batched_requests"] - 1
    assert cancelled >= 20 and computed + cancelled == 40, (cancelled, computed)
    # Had they been computed, the next client would have waited for all of them.
    assert waited * 1000 < cancelled * after["mean_compute_ms"] / 2, (waited, cancelled, after["mean_compute_ms"])


def test_replies_to_a_client_that_never_reads_stay_within_the_budget():
    process, endpoint = start_server("--max-unread-mb", "1", "--max-unread-total-mb", "8")
    try:
        replies_to_a_client_that_never_reads(endpoint)
    finally:
        code, out = stop_server(process)
    assert code == 0, out
    assert "dropping a 3145" in out  # the log says which reply went and why


def replies_to_a_client_that_never_reads(busy_server):
    before = counters(busy_server)
    rss_before = before["rss_mb"]
    reader = dealer(busy_server, RCVHWM=1, RCVBUF=4096)
    count = 40  # 40 raw replies of 3 MiB: 120 MiB if all were kept
    for i in range(count):
        reader.send_multipart([msgpack.packb(generate_header(f"u{i}", size=[1024, 1024],
                                                             output={"format": "raw"})), SOURCE_PNG])
    deadline = time.monotonic() + 60
    while True:
        now = counters(busy_server)
        if now["ok"] - before["ok"] >= count:  # every reply was made (sent, held or dropped)
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.3)
    now = counters(busy_server)
    assert now["reply_bytes_held"] <= 2 ** 20
    assert now["replies_dropped"] - before["replies_dropped"] >= count - 20
    assert now["rss_mb"] - rss_before < 80, f"RSS {rss_before} → {now['rss_mb']} MiB"
    reader.close()
    time.sleep(0.5)
    after = counters(busy_server)
    assert after["reply_bytes_held"] == 0 and after["replies_held"] == 0
    with Client(busy_server, timeout=20) as client:  # others are served as before
        assert client.generate(SOURCE_PNG, KEYPOINTS, FRAME).image.width == 176


def test_ping_ready_probe(server, busy_server):
    done = run_cli("ping", "--server", server, "--ready")
    assert done.returncode == 0 and "ready" in done.stdout
    with Client(server, timeout=10) as client:
        assert client.ready() is True


def test_not_ready_while_draining():
    process, endpoint = start_server("--preset", "demo", "--max-batch", "1", "--max-delay-ms", "0")
    sock = dealer(endpoint)
    try:
        send_slow(sock, range(40))
        assert sock.poll(30000)
        first = msgpack.unpackb(sock.recv_multipart()[0])
        process.send_signal(signal.SIGTERM)
        with Client(endpoint, timeout=5, retries=1) as client:
            ready = client.ready()
        replies = collect(sock, 39)
        process.wait(timeout=30)
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
    assert ready is False
    assert first["ok"] and len(replies) == 39 and process.returncode == 0


def send_big_work(endpoint, count=64):
    """`count` requests of 2048×2048 PNGs, about 0.1 s each to encode on one codec thread (--threads 1);
    returns the DEALER once the first is answered."""
    sock = dealer(endpoint)
    send_slow(sock, range(count), size=[2048, 2048])
    assert sock.poll(30000)
    sock.recv_multipart()
    return sock


def test_when_the_drain_time_runs_out_the_rest_is_answered_overloaded_and_the_server_exits():
    process, endpoint = start_server("--threads", "1", "--drain-s", "1")
    sock = send_big_work(endpoint)
    try:
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        replies = {}
        while len(replies) < 63:
            assert sock.poll(20000), f"{len(replies)} of 63 replies"
            header = msgpack.unpackb(sock.recv_multipart()[0])
            replies[header["id"]] = header
        code = process.wait(timeout=30)
        stopped_s = time.monotonic() - signalled
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
    out = process.stdout.read()
    refused = [h for h in replies.values() if not h["ok"]]
    assert code == 0, out
    assert len(refused) >= 20, f"{len(refused)} refused"  # the rest would have taken ~6 s
    assert {h["error"]["code"] for h in refused} == {"overloaded"}
    assert all("shutting down" in h["error"]["message"] for h in refused)
    assert stopped_s < 4, f"exited {stopped_s:.1f} s after SIGTERM with --drain-s 1"
    assert "answering them `overloaded`" in out


def test_a_second_signal_exits_at_once():
    process, endpoint = start_server("--threads", "1")
    sock = send_big_work(endpoint)
    try:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=3)  # the 60 s drain would take ~6 s here
    finally:
        sock.close()
        if process.poll() is None:
            process.kill()
    out = process.stdout.read()
    assert code == 128 + signal.SIGINT, out
    assert "received SIGINT again: exiting now" in out


def start_loading_server(*flags):
    """A server with a model that takes seconds to load (the market preset's 77 M random fp32
    weights, after importing torch); returns (process, endpoint, ping header) at its first answer."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "pg2_server.cli", "serve", "--preset", "market",
                                "--random-weights", "--dtype", "float32", "--backend", "torch", "--bind", endpoint,
                                *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while (pong := ask(endpoint, protocol.encode_simple("ping", "p"), timeout=0.1)) is None:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
    return process, endpoint, pong[0]


def test_bound_before_the_model_loads_not_ready_until_then_and_requests_wait_for_it():
    process, endpoint, pong = start_loading_server("--max-batch", "1", "--max-delay-ms", "0")
    probe = subprocess.Popen([sys.executable, "-m", "pg2_server.cli", "ping", "--server", endpoint, "--ready",
                              "--timeout", "10", "--retries", "1"], stdout=subprocess.PIPE, text=True)
    sock = dealer(endpoint)
    try:
        info = ask(endpoint, protocol.encode_simple("info", "i"))[0]
        sock.send_multipart(_frames(generate_header("waits", size=[64, 128]), SOURCE_PNG))
        sent = time.monotonic()
        sock.send_multipart(_frames(generate_header("hurry", size=[64, 128], deadline_ms=200), SOURCE_PNG))
        sock.send_multipart(_frames(generate_header("bad", size=[0, 128]), SOURCE_PNG))
        probe_out = probe.communicate(timeout=60)[0]
        order = []
        while len(order) < 3:
            assert sock.poll(60000), order
            header = msgpack.unpackb(sock.recv_multipart()[0])
            order.append((header["id"], "ok" if header["ok"] else header["error"]["code"], time.monotonic() - sent,
                          header.get("timing")))
        with Client(endpoint, timeout=10) as client:
            ready, info_after = client.ready(), client.info()
    finally:
        sock.close()
        code, out = stop_server(process)
    assert pong == {"v": 1, "id": "p", "ok": True, "pong": True, "role": "serve", "ready": False}
    assert info["ready"] is False and info["models"] == [] and info["devices"] == []
    assert info["server"]["role"] == "serve" and info["limits"]["max_queue"] == 256
    assert probe.returncode == 1 and "not ready" in probe_out, probe_out
    # Refused at once and expired at its deadline while the model loads; the other waits for it.
    assert [o[:2] for o in order] == [("bad", "bad_request"), ("hurry", "deadline_exceeded"), ("waits", "ok")]
    assert order[1][2] < order[2][2] - 0.5, order  # the expiry came well before the model did
    assert order[2][3]["queue_ms"] > 500, order  # its wait for the model counts as queueing
    assert ready is True and info_after["ready"] is True and info_after["models"][0]["name"] == "market-random"
    assert info_after["counters"]["errors"] == {"bad_request": 1, "deadline_exceeded": 1}
    assert code == 0, out
    assert "loading the model" in out and "model loaded in" in out and "serving model market-random" in out


def test_stopped_while_loading_answers_the_waiting_requests_and_exits_zero():
    process, endpoint, _ = start_loading_server()
    sock = dealer(endpoint)
    try:
        sock.send_multipart(_frames(generate_header("waits", size=[64, 128]), SOURCE_PNG))
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert sock.poll(20000)
        header = msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()
    out = process.communicate(timeout=60)[0]
    assert header["id"] == "waits" and header["error"]["code"] == "overloaded"
    assert "before its model loaded" in header["error"]["message"]
    assert process.returncode == 0, out
    assert "stopped before the model finished loading" in out


def test_a_model_that_fails_to_load_ends_the_server_with_its_error(tmp_path):
    done = run_cli("serve", "--checkpoint", str(tmp_path / "missing.json"), "--bind",
                   f"tcp://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "missing.json does not exist" in done.stderr, done.stderr


def test_a_metrics_port_out_of_range_is_named_not_a_traceback():
    from pg2_server.metrics import WorkerMetrics

    metrics = WorkerMetrics(queue_depth=lambda: 0, in_flight=lambda: 0)
    for bind in ("127.0.0.1:99999", "127.0.0.1:0", ":9108", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="--metrics-bind needs HOST:PORT"):
            metrics.serve(bind)


def test_prometheus_metrics_and_json_log_lines():
    import urllib.request

    metrics_port = free_port()
    process, endpoint = start_server("--metrics-bind", f"127.0.0.1:{metrics_port}", "--log-format", "json",
                                     "--max-batch", "4", "--max-delay-ms", "20")
    try:
        with Client(endpoint, timeout=20) as client:
            results = list(client.generate_many(
                [GenerateRequest(SOURCE_PNG, KEYPOINTS, (40, 64), tag=i) for i in range(6)], in_flight=6))
            assert all(r.ok for r in results)
        assert ask(endpoint, _frames(generate_header("bad-1", size=[0, 5]), SOURCE_PNG))[0]["error"]["code"] \
            == "bad_request"
        with Client(endpoint, timeout=5) as client:
            counters = client.info()["counters"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        code, out = stop_server(process)
    assert code == 0, out
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['pg2_requests_total{code="ok",op="generate"}'] == 6
    assert values['pg2_requests_total{code="bad_request",op="invalid"}'] == 1  # rejected while decoding
    assert values["pg2_request_latency_seconds_count"] == 6
    # replies sent but never delivered, as info counts them (none dropped over the budgets here)
    assert values['pg2_replies_undelivered_total{reason="client_gone"}'] == counters["replies_unreachable"]
    assert values['pg2_replies_undelivered_total{reason="budget"}'] == counters["replies_dropped"] == 0
    assert values["pg2_queue_time_seconds_count"] == 6
    assert values['pg2_batch_size_sum{device="cpu#0"}'] == 6
    assert values['pg2_device_busy_seconds_total{device="cpu#0"}'] > 0
    assert values["pg2_queue_depth"] == 0 and values["pg2_in_flight"] == 0
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(out.strip().splitlines())  # every line is JSON
    requests = [line for line in lines if line["logger"] == "pg2_server.requests" and line["op"] not in ("ping", "info")]
    assert sorted(r["id"] for r in requests if r["code"] == "ok") == list(range(1, 7))
    assert [r["code"] for r in requests if r["id"] == "bad-1"] == ["bad_request"]
    assert all(r["total_ms"] >= 0 for r in requests)
