"""The Worker in-process: one reply per request on every path, internal errors hidden from the
client but logged with a trace, drain before close, counters."""
import logging
import threading

import cv2
import msgpack
import numpy as np
import pytest

from pg2_server.wire import protocol
from pg2_server.pipeline import Pipeline
from pg2_server.wire.protocol import ImageSpec, Limits
from pg2_server.worker import Worker, WorkerConfig

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


def generate(request_id):
    return protocol.encode_generate(request_id, SOURCE, ImageSpec("png"), KEYPOINTS, (16, 32))


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
