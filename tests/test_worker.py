"""The Worker in-process: one reply per request on every path, internal errors hidden from the
client but logged with a trace, a failing device retired, drain before close, counters; and its
side of the broker link against a real Broker: capacity, drain, registering again."""
import collections
import logging
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from pg2_server.broker import Broker, BrokerConfig
from pg2_server.errors import SetupError
from pg2_server.wire import protocol
from pg2_server.pipeline import Pipeline
from pg2_server.wire.protocol import ImageSpec, Limits
from pg2_server.worker import Worker, WorkerConfig, connect_to_broker
from conftest import free_port

KEYPOINTS = [[8.0, 2.0 + i] for i in range(18)]
SOURCE = cv2.imencode(".png", np.full((32, 16, 3), 90, np.uint8))[1].tobytes()


class BrokenPipeline(Pipeline):
    """A real tiny pipeline whose batched run fails the way a bug would."""

    def run(self, batch):
        raise RuntimeError("secret internal detail: CUDA error 700")


def ask(worker, frames, timeout=20):
    replies, done = [], threading.Event()

    def reply(out):
        replies.append(out)
        done.set()

    worker.handle(frames, reply)
    assert done.wait(timeout)
    return replies


def generate(request_id, size=(16, 32)):
    return protocol.encode_generate(request_id, SOURCE, ImageSpec("png"), KEYPOINTS, size)


def outcome(frames):
    header = msgpack.unpackb(frames[0])
    return "ok" if header["ok"] else header["error"]["code"]


@pytest.fixture
def broken_worker():
    base = Pipeline.random("tiny")
    pipeline = BrokenPipeline(base.config, base.g1, base.g2, name="broken")
    worker = Worker([pipeline], WorkerConfig(max_batch=2, max_delay_ms=0, threads=2))
    yield worker
    worker.drain(5)
    worker.close()


def test_internal_error_is_logged_with_trace_and_hidden_from_the_client(broken_worker, caplog):
    with caplog.at_level(logging.ERROR, logger="pg2_server"):
        [reply] = ask(broken_worker, generate(7))
    header = msgpack.unpackb(reply[0])
    assert header == {"v": 1, "id": 7, "ok": False,
                      "error": {"code": "internal", "message": "internal server error; the server log has details"}}
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text
    assert broken_worker.in_flight == 0
    assert broken_worker.info()["counters"]["errors"] == {"internal": 1}
    # ping still answers after the failure
    [pong] = ask(broken_worker, protocol.encode_simple("ping", 1))
    assert msgpack.unpackb(pong[0])["pong"] is True


def test_a_device_that_keeps_failing_is_retired_and_a_healthy_one_takes_its_work(caplog):
    good = Pipeline.random("tiny")
    broken = BrokenPipeline(good.config, good.g1, good.g2, name="broken")
    worker = Worker([good, broken], WorkerConfig(max_batch=1, max_delay_ms=0, threads=2))
    replies, done = [], threading.Event()

    def collect(frames):
        replies.append(outcome(frames))
        if len(replies) == 10:
            done.set()

    try:
        with caplog.at_level(logging.ERROR, logger="pg2_server"):
            for i in range(10):
                worker.handle(generate(i), collect)
            assert done.wait(30)
        retired = worker.batchers[1]
        retired.join(5)
        # Two batches failed on the broken device; the third went back to the queue and a healthy device ran it.
        assert collections.Counter(replies) == {"ok": 8, "internal": 2}
        assert not retired.is_alive() and worker.batchers[0].is_alive() and worker.ready is True
        assert caplog.text.count("failed on cpu#1") == 3 and "failed on cpu#0" not in caplog.text
        assert "cpu#1 failed 3 batches in a row" in caplog.text
    finally:
        worker.close()


def test_a_worker_whose_only_device_keeps_failing_is_not_ready_yet_answers_every_request(broken_worker):
    codes = []
    for i in range(4):
        [reply] = ask(broken_worker, generate(i))
        codes.append(outcome(reply))
        if i == 0:
            assert broken_worker.ready is True  # one failure: still taking work
    assert codes == ["internal"] * 4  # the last device is not retired: its requests are answered
    assert broken_worker.ready is False and broken_worker.batchers[0].is_alive()
    [pong] = ask(broken_worker, protocol.encode_simple("ping", "p"))
    assert msgpack.unpackb(pong[0])["ready"] is False


def test_a_working_worker_answers_once_and_drains():
    worker = Worker([Pipeline.random("tiny")], WorkerConfig(max_batch=4, max_delay_ms=1, threads=2,
                                                            limits=Limits(max_image_side=64)))
    try:
        replies = {}
        done = threading.Event()
        lock = threading.Lock()

        def collect(frames):
            with lock:
                header = msgpack.unpackb(frames[0])
                assert header["id"] not in replies
                replies[header["id"]] = (header, frames[1:])
                if len(replies) == 10:
                    done.set()

        for i in range(9):
            worker.handle(generate(i), collect)
        # Over the image side limit of this worker: too_large, answered like the others.
        worker.handle(protocol.encode_generate(9, SOURCE, ImageSpec("png"), KEYPOINTS, (65, 32)), collect)
        assert done.wait(30)
        assert worker.drain(5) and worker.in_flight == 0
        assert all(replies[i][0]["ok"] and replies[i][0]["image"]["width"] == 16 for i in range(9))
        assert replies[9][0]["error"]["code"] == "too_large"
        # After drain, new work is refused with `overloaded`.
        [refused] = ask(worker, generate(10))
        assert msgpack.unpackb(refused[0])["error"]["code"] == "overloaded"
        counters = worker.info()["counters"]
        assert counters["ok"] == 9 and counters["errors"] == {"too_large": 1, "overloaded": 1}
        assert counters["batched_requests"] == 9
    finally:
        worker.close()


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_codec_threads_default_to_one_per_core_at_most_four(monkeypatch, cores, threads):
    from pg2_server import worker

    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert worker.codec_threads() == threads
    assert worker.WorkerConfig().threads == threads


# ---------------------------------------------------------------------------------------------
# The broker link: a real Broker in this process, the worker's socket loop on a thread


class Cluster:
    """A Broker and one Worker connected to it, each on a thread; `client` is a DEALER on the
    broker's frontend."""

    def __init__(self, worker, heartbeat_s=0.2):
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.worker = worker
        self.start_broker(heartbeat_s)
        self.worker_stop = threading.Event()
        self.worker_thread = threading.Thread(target=connect_to_broker, args=(worker, self.backend, self.worker_stop),
                                              kwargs={"heartbeat_s": heartbeat_s}, daemon=True)
        self.worker_thread.start()
        self.client = zmq.Context.instance().socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(self.frontend)

    def start_broker(self, heartbeat_s):
        self.broker = Broker(self.frontend, self.backend, BrokerConfig(heartbeat_s=heartbeat_s))
        self.broker_stop = threading.Event()
        self.broker_thread = threading.Thread(target=self.broker.run, args=(self.broker_stop,), daemon=True)
        self.broker_thread.start()

    def stop_broker(self):
        self.broker_stop.set()
        self.broker_thread.join(10)

    def registered(self, timeout=10):
        deadline = time.monotonic() + timeout
        while not self.broker.workers:
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.05)
        return next(iter(self.broker.workers.values()))

    def send(self, ids, size=(16, 32)):
        for request_id in ids:
            self.client.send_multipart(generate(request_id, size))

    def replies(self, count, timeout=20):
        got = {}
        while len(got) < count:
            assert self.client.poll(timeout * 1000), f"{len(got)} of {count} replies"
            header = msgpack.unpackb(self.client.recv_multipart()[0])
            got[header["id"]] = header
        return got

    def close(self):
        self.client.close()
        self.worker_stop.set()
        self.worker_thread.join(30)
        self.worker.close()
        self.stop_broker()


def test_the_worker_offers_the_broker_no_more_than_its_queue_admits():
    cluster = Cluster(Worker([Pipeline.random("tiny")], WorkerConfig(max_batch=16, max_queue=3, threads=1)))
    try:
        assert cluster.registered().capacity == 3  # not 2 batches of 16
        cluster.send(range(12))
        replies = cluster.replies(12)
    finally:
        cluster.close()
    assert all(header["ok"] for header in replies.values()), [h for h in replies.values() if not h["ok"]]


def test_a_stopping_worker_keeps_its_heartbeat_delivers_what_it_admitted_and_refuses_the_rest():
    # Eight 2048×2048 PNGs take about a second to encode on one thread: longer than the broker's
    # 0.6 s without a heartbeat after which it writes a worker off.
    worker = Worker([Pipeline.random("tiny")], WorkerConfig(max_batch=4, max_delay_ms=0, threads=1))
    cluster = Cluster(worker)
    try:
        cluster.registered()
        cluster.send(range(16), size=(2048, 2048))  # a capacity of 8: the other 8 wait in the broker
        deadline = time.monotonic() + 10
        while worker.in_flight < 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cluster.worker_stop.set()
        replies = cluster.replies(16)
        cluster.worker_thread.join(10)
        assert not cluster.worker_thread.is_alive()
        time.sleep(0.3)
        workers_left, resent = len(cluster.broker.workers), cluster.broker.resent
    finally:
        cluster.close()
    codes = collections.Counter("ok" if h["ok"] else h["error"]["code"] for h in replies.values())
    assert codes == {"ok": 8, "overloaded": 8}, codes
    assert all("shutting down" in h["error"]["message"] for h in replies.values() if not h["ok"])
    assert resent == 0  # the broker never wrote the draining worker off
    assert workers_left == 0  # it said goodbye at the end


def test_a_worker_the_broker_does_not_know_registers_again_and_says_why(caplog):
    cluster = Cluster(Worker([Pipeline.random("tiny")], WorkerConfig(threads=1)), heartbeat_s=1.0)
    try:
        cluster.registered()
        with caplog.at_level(logging.WARNING, logger="pg2_server.worker"):
            cluster.stop_broker()
            deadline = time.monotonic() + 5
            while True:  # a broker restarted on the same port: it answers the worker's heartbeat with DISCONNECT
                try:
                    cluster.start_broker(heartbeat_s=1.0)
                    break
                except SetupError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            cluster.registered(timeout=5)
        cluster.send(["after"])
        assert cluster.replies(1)["after"]["ok"]
    finally:
        cluster.close()
    assert f"broker {cluster.backend} does not know this worker; reconnecting" in caplog.text
    assert "silent for" not in caplog.text
