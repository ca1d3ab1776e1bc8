"""Triton-style dynamic batching on a real tiny pipeline: full batches at once, partial ones
after at most the delay since the first queued job, failures reported for every job."""
import queue
import threading
import time

import numpy as np
import pytest

from pg2_server.batching import Batcher
from pg2_server.pipeline import Pipeline

KEYPOINTS = [[8.0, 2.0 + i] for i in range(18)]


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.random("tiny")


class Job:
    def __init__(self, prepared, enqueued=None):
        self.prepared = prepared
        self.enqueued = time.monotonic() if enqueued is None else enqueued


class Recorder:
    def __init__(self):
        self.batches = []
        self.errors = []
        self.event = threading.Event()

    def done(self, batch, coarse, final, started, ended):
        self.batches.append((len(batch), started, coarse.shape, final.shape))
        self.event.set()

    def failed(self, batch, error, retiring):
        self.errors.append((len(batch), error, retiring))
        self.event.set()


def start(pipeline, max_batch, max_delay_s):
    jobs, recorder = queue.Queue(), Recorder()
    batcher = Batcher(pipeline, jobs, max_batch, max_delay_s, recorder.done, recorder.failed)
    batcher.start()
    return jobs, recorder, batcher


def prepared(pipeline):
    return pipeline.prepare(np.full((32, 16, 3), 100, np.uint8), KEYPOINTS, (16, 32))


def test_a_full_batch_runs_at_once(pipeline):
    jobs, recorder, batcher = start(pipeline, max_batch=4, max_delay_s=30.0)
    first = Job(prepared(pipeline))
    for job in [first] + [Job(prepared(pipeline)) for _ in range(3)]:
        jobs.put(job)
    assert recorder.event.wait(10)
    size, started, coarse_shape, final_shape = recorder.batches[0]
    assert size == 4 and coarse_shape == (4, 3, 32, 16) and final_shape == (4, 3, 32, 16)
    assert started - first.enqueued < 5  # not the 30 s delay
    batcher.stop()
    batcher.join(5)
    assert not batcher.is_alive()


def test_a_partial_batch_waits_at_most_the_delay_after_the_first_job(pipeline):
    jobs, recorder, batcher = start(pipeline, max_batch=8, max_delay_s=0.3)
    first = Job(prepared(pipeline))
    jobs.put(first)
    time.sleep(0.1)
    jobs.put(Job(prepared(pipeline)))
    assert recorder.event.wait(10)
    size, started, _, _ = recorder.batches[0]
    assert size == 2
    assert 0.28 <= started - first.enqueued < 1.5
    batcher.stop()
    batcher.join(5)


def test_a_job_that_already_waited_runs_without_more_delay(pipeline):
    jobs, recorder, batcher = start(pipeline, max_batch=8, max_delay_s=5.0)
    stale = Job(prepared(pipeline), enqueued=time.monotonic() - 10)
    jobs.put(stale)
    assert recorder.event.wait(3)
    assert recorder.batches[0][0] == 1
    batcher.stop()
    batcher.join(5)


def test_a_failing_run_reports_every_job_and_the_batcher_goes_on(pipeline):
    jobs, recorder, batcher = start(pipeline, max_batch=2, max_delay_s=0.0)
    broken = Job(prepared(pipeline))
    broken.prepared.source = broken.prepared.source[:2]  # wrong channel count: G1 raises
    jobs.put(broken)
    jobs.put(Job(prepared(pipeline), enqueued=broken.enqueued))
    assert recorder.event.wait(10)
    assert recorder.errors and recorder.errors[0][0] in (1, 2)
    recorder.event.clear()
    jobs.put(Job(prepared(pipeline)))
    assert recorder.event.wait(10)
    # it goes on: the next batch runs (the good job queued beside the broken one may join it)
    assert recorder.batches and recorder.batches[-1][0] in (1, 2)
    batcher.stop()
    batcher.join(5)


def broken(pipeline):
    job = Job(prepared(pipeline))
    job.prepared.source = job.prepared.source[:2]  # wrong channel count: G1 raises
    return job


def test_a_device_that_fails_batches_in_a_row_stops_once_another_can_take_its_work(pipeline):
    jobs, recorder = queue.Queue(), Recorder()
    asked = []

    def retire(batcher):
        asked.append(batcher.failures)
        return len(asked) == 2  # the first time no other device is healthy, the second time one is

    batcher = Batcher(pipeline, jobs, 1, 0.0, recorder.done, recorder.failed, retire=retire)
    for job in [broken(pipeline), broken(pipeline), Job(prepared(pipeline))] + [broken(pipeline) for _ in range(5)]:
        jobs.put(job)
    batcher.start()
    batcher.join(20)
    assert not batcher.is_alive() and not batcher.healthy
    # A good batch between failures starts the count again; the retiring batch is reported as such.
    assert asked == [3, 4] and [retiring for _, _, retiring in recorder.errors] == [False] * 5 + [True]
    assert len(recorder.batches) == 1 and jobs.qsize() == 1  # the last broken job is left for another device


def test_stop_leaves_the_queued_jobs_unrun(pipeline):
    jobs, recorder = queue.Queue(), Recorder()
    batcher = Batcher(pipeline, jobs, 1, 0.0, recorder.done, recorder.failed)
    for _ in range(3):
        jobs.put(Job(prepared(pipeline)))
    batcher.stop()
    batcher.start()
    batcher.join(10)
    assert not batcher.is_alive() and recorder.batches == [] and recorder.errors == []


def test_settings_are_checked(pipeline):
    with pytest.raises(ValueError, match="max batch"):
        Batcher(pipeline, queue.Queue(), 0, 0.0, None, None)
    with pytest.raises(ValueError, match="max delay"):
        Batcher(pipeline, queue.Queue(), 1, -1.0, None, None)
