"""Broker + workers as real subprocesses: load balancing, a worker killed mid-stream, shutdown.
Then a broker in this process with workers whose every message the test writes: which worker
gets a request, and which reply counts."""
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from pg2_server.broker import Broker, BrokerConfig
from pg2_server.wire import protocol
from pg2_server.wire.client import Client, GenerateRequest, HandshakeError, ServerError, ServerTimeout
from pg2_server.wire.curve import ClientKeys
from pg2_server.wire.protocol import MIB, Limits
from pg2_server.worker_protocol import CANCEL, DISCONNECT, HEARTBEAT, READY, REPLY, REQUEST
from pg2_server.bench import BENCH_KEYPOINTS as KEYPOINTS
from conftest import free_port

SOURCE_PNG = cv2.imencode(".png", np.full((256, 176, 3), 120, np.uint8))[1].tobytes()


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "pg2_server.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(*processes):
    """SIGTERM, then the time to drain, then kill."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_workers(endpoint, count, timeout=60, curve=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Client(endpoint, timeout=1, retries=1, curve=curve) as client:
            try:
                info = client.info()
                if len(info["workers"]) >= count:
                    return info
            except Exception:
                pass
        time.sleep(0.3)
    raise AssertionError(f"{count} workers did not register")


@pytest.fixture
def cluster():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = cli("broker", "--frontend", frontend, "--backend", backend, "--heartbeat-ms", "200", "--info-details")
    workers = [cli("worker", "--connect", backend, "--preset", "tiny", "--random-weights", "--heartbeat-ms", "200",
                   "--max-batch", "2", "--max-delay-ms", "30") for _ in range(2)]
    processes = [broker, *workers]
    try:
        yield frontend, broker, workers
    finally:
        stop(*(process for process in processes if process.poll() is None))


def test_broker_answers_like_a_server_and_survives_a_killed_worker(cluster):
    """Two workers, one kill -9'd mid-stream: every request answered once; then none left."""
    frontend, broker, workers = cluster
    info = wait_for_workers(frontend, 2)
    assert info["server"]["role"] == "broker"
    assert [m["name"] for m in info["models"]] == ["tiny-random"]
    assert info["devices"] == ["cpu", "cpu"]
    assert len({w["pid"] for w in info["workers"]}) == 2

    with Client(frontend, timeout=30) as client:
        assert client.ping() > 0
        assert client.generate(SOURCE_PNG, KEYPOINTS, (176, 256)).image.width == 176

    # 60 pipelined requests; one worker dies (kill -9) after the first few replies.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    total = 60
    for i in range(total):
        header = {"v": 1, "op": "generate", "id": i, "keypoints": KEYPOINTS, "size": [40 + i, 64],
                  "source": {"format": "png"}}
        sock.send_multipart([msgpack.packb(header), SOURCE_PNG])
    replies = {}
    killed = False
    while len(replies) < total:
        assert sock.poll(30000), f"{len(replies)} of {total} replies"
        frames = sock.recv_multipart()
        header = msgpack.unpackb(frames[0])
        assert header["id"] not in replies, f"request {header['id']} answered twice"
        replies[header["id"]] = header
        if len(replies) == 6 and not killed:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed = True
    assert not sock.poll(1000), "an extra reply arrived"
    sock.close()
    assert all(h["ok"] for h in replies.values()), [h for h in replies.values() if not h["ok"]]
    assert all(h["image"]["width"] == 40 + i for i, h in replies.items())

    info = wait_for_workers(frontend, 1)
    assert len(info["workers"]) == 1
    assert info["counters"]["requests"] >= total
    assert info["counters"]["batches"] >= 1 and info["counters"]["mean_batch"] >= 1
    assert info["counters"]["resent"] >= 1  # the killed worker held requests; they went to the other

    # The broker and the surviving worker still serve, and stop cleanly.
    with Client(frontend, timeout=30) as client:
        results = list(client.generate_many(
            [GenerateRequest(SOURCE_PNG, KEYPOINTS, (50, 70), tag=i) for i in range(8)], in_flight=4))
    assert sorted(r.request.tag for r in results) == list(range(8))

    # Without workers the broker still answers ping, info and bad requests itself.
    workers[1].send_signal(signal.SIGTERM)
    assert workers[1].wait(timeout=30) == 0, workers[1].stdout.read()
    with Client(frontend, timeout=5, retries=1) as client:
        assert client.ping() > 0
        deadline = time.monotonic() + 10
        while client.info()["workers"]:
            assert time.monotonic() < deadline, "a stopped worker is still listed"
            time.sleep(0.2)
        assert client.ready() is False and client.info()["ready"] is False
    probe = subprocess.run([sys.executable, "-m", "pg2_server.cli", "ping", "--server", frontend, "--ready"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "not ready" in probe.stdout
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    sock.send_multipart([msgpack.packb({"v": 3, "op": "ping", "id": "x"})])
    assert sock.poll(5000)
    header = msgpack.unpackb(sock.recv_multipart()[0])
    sock.close()
    assert header["error"]["code"] == "unsupported_version" and header["id"] == "x"

    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=30) == 0
    assert "dropping worker" in broker.stdout.read()



def test_curve_on_both_links_only_authorised_workers_get_requests(tmp_path):
    """The whole setup of docs/server.md, keys on both links: a worker whose key is not in
    --curve-workers, or a plaintext one, never registers; a client not in --curve-clients gets no answer."""
    keys, authorised, clients = tmp_path / "keys", tmp_path / "workers", tmp_path / "clients"
    authorised.mkdir()
    clients.mkdir()
    for name in ("broker", "good", "mallory", "alice"):
        subprocess.run([sys.executable, "-m", "pg2_server.cli", "keys", str(keys), name], check=True,
                       capture_output=True)
    (authorised / "good.key").write_bytes((keys / "good.key").read_bytes())
    (clients / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    alice = ClientKeys.from_files(keys / "broker.key", keys / "alice.key_secret")
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    # A folder alone needs the broker's secret key.
    refused = subprocess.run([sys.executable, "-m", "pg2_server.cli", "broker", "--frontend", frontend,
                              "--backend", backend, "--curve-workers", str(authorised)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--curve-secret" in refused.stderr
    broker = cli("broker", "--frontend", frontend, "--backend", backend, "--heartbeat-ms", "200", "--info-details",
                 "--curve-secret", str(keys / "broker.key_secret"), "--curve-clients", str(clients),
                 "--curve-workers", str(authorised))
    worker_flags = ("worker", "--connect", backend, "--preset", "tiny", "--random-weights", "--heartbeat-ms", "200")
    good = cli(*worker_flags, "--curve-secret", str(keys / "good.key_secret"), "--server-key", str(keys / "broker.key"))
    mallory = cli(*worker_flags, "--curve-secret", str(keys / "mallory.key_secret"),
                  "--server-key", str(keys / "broker.key"))
    plaintext = cli(*worker_flags)
    processes = [broker, good, mallory, plaintext]
    try:
        info = wait_for_workers(frontend, 1, curve=alice)
        time.sleep(2.0)  # time enough for the others to try to register (10 heartbeats)
        with Client(frontend, timeout=1, retries=1) as client:  # a plaintext client: told to bring keys
            with pytest.raises(HandshakeError, match="uses CURVE encryption: pass --curve-server-key"):
                client.ping()
        with Client(frontend, timeout=30, curve=alice) as client:
            results = list(client.generate_many(
                [GenerateRequest(SOURCE_PNG, KEYPOINTS, (40 + i, 64), tag=i) for i in range(12)], in_flight=6))
            info = client.info()
        assert sorted(r.request.tag for r in results) == list(range(12))
        assert all(r.image.width == 40 + r.request.tag for r in results)
        assert [w["pid"] for w in info["workers"]] == [good.pid]
        assert info["workers"][0]["capacity"] >= 1
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = {}
        for name, process in zip(("broker", "good", "mallory", "plaintext"), processes):
            try:
                outputs[name] = process.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                process.kill()
                outputs[name] = process.communicate()[0]
    assert "CURVE" in outputs["good"]
    # The refused workers never got a request: they only ever waited for the broker.
    for name in ("mallory", "plaintext"):
        assert "reconnecting" in outputs[name], outputs[name]
        assert "worker stopped: 0 requests" in outputs[name], outputs[name]


def test_broker_deadlines_cancel_and_clients_that_go():
    """Requests waiting in the broker: deadline_exceeded, op cancel, and a gone client's work dropped."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = cli("broker", "--frontend", frontend, "--backend", backend, "--heartbeat-ms", "200")
    # The fashion preset in fp32 eager torch (~0.2 s an image on two cores), one image at a time,
    # capacity 2: the rest waits in the broker.
    worker = cli("worker", "--connect", backend, "--preset", "fashion", "--random-weights", "--heartbeat-ms", "200",
                 "--dtype", "float32", "--backend", "torch", "--max-batch", "1", "--max-delay-ms", "0")
    try:
        info = wait_for_workers(frontend, 1)
        assert info["ready"] is True and "pid" not in info["workers"][0]  # no --info-details
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(frontend)
        head = {"v": 1, "op": "generate", "keypoints": KEYPOINTS, "size": [176, 256], "source": {"format": "png"}}
        for i in range(8):
            sock.send_multipart([msgpack.packb({**head, "id": i}), SOURCE_PNG])
        sock.send_multipart([msgpack.packb({**head, "id": "hurry", "deadline_ms": 30}), SOURCE_PNG])
        sock.send_multipart([msgpack.packb({**head, "id": "patient", "deadline_ms": 60_000}), SOURCE_PNG])
        sock.send_multipart([msgpack.packb({"v": 1, "op": "cancel", "id": "x", "target": 7})])
        replies = {}
        while len(replies) < 11:
            assert sock.poll(60000), f"{len(replies)} of 11 replies"
            header = msgpack.unpackb(sock.recv_multipart()[0])
            assert header["id"] not in replies
            replies[header["id"]] = header
        sock.close()
        assert replies["x"]["ok"] and replies["x"]["cancelled"] == 1
        assert replies[7]["error"]["code"] == "cancelled"
        assert replies["hurry"]["error"]["code"] == "deadline_exceeded"
        assert replies["patient"]["ok"] and all(replies[i]["ok"] for i in range(7))

        # A client that sends 30 and goes: what still waits in the broker is dropped, not computed.
        gone = zmq.Context.instance().socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 0)
        gone.connect(frontend)
        for i in range(30):
            gone.send_multipart([msgpack.packb({**head, "id": i}), SOURCE_PNG])
        time.sleep(0.3)
        gone.close()
        started = time.monotonic()
        with Client(frontend, timeout=30) as client:
            assert client.generate(SOURCE_PNG, KEYPOINTS, (176, 256)).image.width == 176
            waited = time.monotonic() - started
            counters = client.info()["counters"]
        assert counters["cancelled"] >= 20, counters  # never left the broker, so never computed
        assert waited < 5, waited
    finally:
        stop(broker, worker)


def test_stray_messages_on_the_worker_port_do_not_break_the_broker():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = cli("broker", "--frontend", frontend, "--backend", backend, "--heartbeat-ms", "200")
    try:
        with Client(frontend, timeout=30) as client:
            assert client.info()["ready"] is False
        stray = zmq.Context.instance().socket(zmq.DEALER)
        stray.setsockopt(zmq.LINGER, 0)
        stray.connect(backend)
        for payload in ({"info": 5}, {"info": {"workers": [1]}}, {"info": {"devices": "cpu"}}, [1, 2],
                        {"capacity": "many"}):
            stray.send_multipart([READY, msgpack.packb(payload)])
        stray.send_multipart([READY, msgpack.packb({"info": {"workers": [{"host": "h"}]}, "capacity": 1})])
        stray.send_multipart([HEARTBEAT, msgpack.packb([1, 2])])   # counters that are not a map
        time.sleep(0.5)
        with Client(frontend, timeout=30) as client:
            info = client.info()
        assert broker.poll() is None and len(info["workers"]) == 1 and info["counters"]["batches"] == 0
        stray.close()
    finally:
        stop(broker)


def test_the_broker_admits_no_request_larger_than_its_workers_take():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = cli("broker", "--frontend", frontend, "--backend", backend, "--heartbeat-ms", "200",
                 "--max-message-mb", "4")
    worker = cli("worker", "--connect", backend, "--preset", "tiny", "--random-weights", "--heartbeat-ms", "200",
                 "--max-message-mb", "1")
    try:
        info = wait_for_workers(frontend, 1)
        assert info["limits"]["max_message_bytes"] == 2 ** 20
        big = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (900, 900, 3), np.uint8))[1].tobytes()
        assert 2 ** 20 < len(big) < 4 * 2 ** 20
        with Client(frontend, timeout=30) as client:
            with pytest.raises(ServerError, match="over the limit of 1048576") as refused:
                client.generate(big, KEYPOINTS, (176, 256))      # answered, to its id
            assert refused.value.code == "too_large"
            assert client.generate(SOURCE_PNG, KEYPOINTS, (176, 256)).image.width == 176
            assert len(client.info()["workers"]) == 1          # the worker kept its connection
        # Over the broker's own limit too: still answered, not dropped with the connection.
        bigger = cv2.imencode(".png", np.random.default_rng(1).integers(0, 256, (1300, 1300, 3), np.uint8))[1]
        assert 4 * 2 ** 20 < len(bigger) < 8 * 2 ** 20
        with Client(frontend, timeout=10, retries=1) as client:
            with pytest.raises(ServerError) as refused:
                client.generate(bigger.tobytes(), KEYPOINTS, (176, 256))
            assert refused.value.code == "too_large"
    finally:
        stop(broker, worker)


# -- a broker in this process, workers written by hand ------------------------------------------


def test_a_plaintext_worker_link_beside_curve_clients_is_named_in_the_log(tmp_path, caplog):
    import logging

    from pg2_server.broker import _local
    from pg2_server.wire.curve import ServerKeys

    assert _local("tcp://127.0.0.1:5558") and _local("ipc:///tmp/w") and _local("tcp://[::1]:5558")
    assert not _local("tcp://*:5558") and not _local("tcp://0.0.0.0:5558") and not _local("tcp://10.0.0.2:5558")
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    clients.mkdir()
    for name in ("broker", "alice"):
        subprocess.run([sys.executable, "-m", "pg2_server.cli", "keys", str(keys), name], check=True,
                       capture_output=True)
    (clients / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        broker = Broker(f"tcp://127.0.0.1:{free_port()}", f"tcp://{host}:{free_port()}", BrokerConfig(drain_s=0.1),
                        curve=ServerKeys(keys / "broker.key_secret", clients), context=zmq.Context())
        stop = threading.Event()
        stop.set()
        with caplog.at_level(logging.INFO, logger="pg2_server.broker"):
            broker.run(stop)
        assert f"(CURVE), workers on tcp://{host}" in caplog.text and "(plaintext)" in caplog.text
        assert ("can register as a worker and see every client's photo; add --curve-workers DIR" in caplog.text) \
            == warned, caplog.text


@contextmanager
def broker_in_thread():
    """A Broker routing in a thread of this process: yields (frontend, backend). Hand workers
    send no heartbeats, so it writes none off for silence."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = Broker(frontend, backend, BrokerConfig(liveness=1000, drain_s=0.2))
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop, ready), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield frontend, backend
    finally:
        stop.set()
        thread.join(timeout=10)


def dealer(endpoint):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def hand_worker(backend, capacity=1, max_message_bytes=Limits.max_message_bytes):
    """A worker that only registers: the test receives its requests and writes its replies."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + 4096)   # as worker.connect_to_broker sets it
    sock.connect(backend)
    info = {"workers": [{"host": "hand"}], "limits": {"max_message_bytes": max_message_bytes}}
    sock.send_multipart([READY, msgpack.packb({"info": info, "capacity": capacity})])
    return sock


def next_from_broker(worker, timeout=5.0):
    """(command, key, request header or None) of the next REQUEST or CANCEL, heartbeats skipped."""
    deadline = time.monotonic() + timeout
    while worker.poll(max(0.0, deadline - time.monotonic()) * 1000):
        frames = worker.recv_multipart()
        if frames[0] != HEARTBEAT:
            return frames[0], frames[1], msgpack.unpackb(frames[2]) if frames[0] == REQUEST else None
    raise AssertionError("nothing came from the broker")


def quiet(worker, seconds=0.5):
    """True when nothing but heartbeats comes from the broker for `seconds`."""
    try:
        next_from_broker(worker, seconds)
    except AssertionError:
        return True
    return False


def answer(worker, key, request_id, by):
    worker.send_multipart([REPLY, key, *protocol.encode_reply(request_id, {"by": by})])


def send_generate(client, request_id, source=SOURCE_PNG, **header):
    client.send_multipart([msgpack.packb({"v": 1, "op": "generate", "id": request_id, "keypoints": KEYPOINTS,
                                          "size": [176, 256], "source": {"format": "png"}, **header}), source])


def next_reply(client, timeout=5.0):
    assert client.poll(timeout * 1000), "no reply"
    return msgpack.unpackb(client.recv_multipart()[0])


def counters(frontend):
    with Client(frontend, timeout=5, retries=1) as client:
        return client.info()["counters"]


def test_a_reply_counts_only_from_the_worker_that_holds_the_request():
    with broker_in_thread() as (frontend, backend):
        workers = [hand_worker(backend), hand_worker(backend)]
        wait_for_workers(frontend, 2)
        client = dealer(frontend)
        send_generate(client, "a")
        send_generate(client, "b")
        (_, key0, header0), (_, key1, header1) = (next_from_broker(w) for w in workers)  # one each
        answer(workers[0], key1, header1["id"], "impostor")
        answer(workers[1], key1, header1["id"], "holder")
        answer(workers[0], key0, header0["id"], "holder")
        replies = [next_reply(client), next_reply(client)]
        assert {r["id"]: r["by"] for r in replies} == {"a": "holder", "b": "holder"}
        assert not client.poll(300)
        assert counters(frontend)["stray_replies"] == 1


def test_a_worker_outliving_its_broker_cannot_answer_the_next_brokers_requests():
    """Every client numbers its requests from 1, and every broker starts afresh: a worker still
    computing for a broker that stopped brings its late reply to the next one."""
    with broker_in_thread() as (frontend, backend):
        worker = hand_worker(backend)
        wait_for_workers(frontend, 1)
        first_client = dealer(frontend)   # held: a socket collected at once (LINGER 0) may never send
        send_generate(first_client, 1)
        _, old_key, _ = next_from_broker(worker)
    with broker_in_thread() as (frontend, backend):
        worker = hand_worker(backend)
        wait_for_workers(frontend, 1)
        client = dealer(frontend)
        send_generate(client, 1)
        _, key, _ = next_from_broker(worker)
        answer(worker, old_key, 1, "the client of the stopped broker")
        answer(worker, key, 1, "this client")
        assert next_reply(client)["by"] == "this client"
        assert not client.poll(300)


def test_a_request_goes_only_to_a_worker_whose_message_limit_it_fits():
    """Admitted while a worker with room for it was registered; then a narrower worker joins."""
    big = np.random.default_rng(0).bytes(2 * MIB)
    with broker_in_thread() as (frontend, backend):
        roomy = hand_worker(backend)
        wait_for_workers(frontend, 1)
        client = dealer(frontend)
        send_generate(client, "small")
        _, small_key, _ = next_from_broker(roomy)
        send_generate(client, "big", source=big)   # waits: the one worker that takes it is busy
        deadline = time.monotonic() + 5
        while counters(frontend)["waiting"] < 1:
            assert time.monotonic() < deadline, "the big request did not reach the broker"
            time.sleep(0.05)
        narrow = hand_worker(backend, max_message_bytes=MIB)
        wait_for_workers(frontend, 2)
        assert quiet(narrow)                       # free, but its socket would drop the connection
        answer(roomy, small_key, "small", "roomy")
        assert next_reply(client)["id"] == "small"
        assert next_from_broker(roomy)[2]["id"] == "big"

        roomy.send_multipart([DISCONNECT])         # it stops: no worker left can ever take the big one
        refused = next_reply(client)
        assert refused["id"] == "big" and refused["error"]["code"] == "too_large"
        assert f"over the limit of {MIB} " in refused["error"]["message"]
        send_generate(client, "after")             # the narrow worker kept its connection
        assert next_from_broker(narrow)[2]["id"] == "after"


def test_a_deadline_still_holds_after_the_worker_holding_the_request_stops():
    with broker_in_thread() as (frontend, backend):
        worker = hand_worker(backend)
        wait_for_workers(frontend, 1)
        client = dealer(frontend)
        send_generate(client, "hurry", deadline_ms=300)
        next_from_broker(worker)
        time.sleep(0.6)                            # a stalled worker holds it past its deadline...
        stopped = time.monotonic()
        worker.send_multipart([DISCONNECT])        # ...then stops, with no other worker to take it
        reply = next_reply(client)
        assert reply["id"] == "hurry" and reply["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - stopped < 2      # not after the broker's 60 s wait for a worker


def test_a_request_cancelled_on_a_worker_that_then_stops_is_not_sent_again():
    """One client cancels its request, another goes away, both while a worker holds them; the
    worker stops before answering: neither goes to another worker to be computed for nobody."""
    with broker_in_thread() as (frontend, backend):
        first = hand_worker(backend, capacity=2)
        wait_for_workers(frontend, 1)
        client, leaving = dealer(frontend), dealer(frontend)
        send_generate(client, "changed-mind")
        send_generate(leaving, "left")
        assert {next_from_broker(first)[2]["id"] for _ in range(2)} == {"changed-mind", "left"}
        client.send_multipart([msgpack.packb({"v": 1, "op": "cancel", "id": "c", "target": "changed-mind"})])
        assert next_reply(client)["forwarded"] == 1
        leaving.close()
        assert [next_from_broker(first)[0] for _ in range(2)] == [CANCEL, CANCEL]
        second = hand_worker(backend)
        wait_for_workers(frontend, 2)

        first.send_multipart([DISCONNECT])
        assert quiet(second)
        reply = next_reply(client)
        assert reply["id"] == "changed-mind" and reply["error"]["code"] == "cancelled"
        now = counters(frontend)
        assert (now["cancelled"], now["resent"]) == (2, 0)
