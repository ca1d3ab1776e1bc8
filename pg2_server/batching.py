"""Dynamic batching with Triton's semantics: one thread per device pulls prepared jobs.

A full batch (`max_batch` jobs) runs at once; otherwise the batcher waits at most
`max_delay_s` after the first queued job arrived (not after the batcher got to it: a job that
already waited while the device was busy runs with whatever is queued behind it).

A device that fails RETIRE_AFTER_FAILED_BATCHES batches in a row is unhealthy; its batcher
stops when its owner says another device can take the work (`retire`), so that a broken GPU
does not fail fast through a queue that a healthy one could serve.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

log = logging.getLogger("pg2_server.batching")

_STOP = object()
RETIRE_AFTER_FAILED_BATCHES = 3


class Batcher(threading.Thread):
    """Runs `pipeline.run` on batches taken from a shared queue of jobs (`job.prepared`, `job.enqueued`).

    A failed batch goes to `on_error(batch, error, retiring)`; `retiring` says this thread stops
    after it (so that its owner can give the batch to another device)."""

    def __init__(self, pipeline, jobs: queue.Queue, max_batch: int, max_delay_s: float,
                 on_done: Callable[[Sequence, object, object, float, float], None],
                 on_error: Callable[[Sequence, BaseException, bool], None],
                 claim: Callable[[object], bool] = lambda job: True,
                 retire: Callable[[Batcher], bool] = lambda batcher: False):
        super().__init__(name=f"batcher-{pipeline.device}", daemon=True)
        if max_batch < 1:
            raise ValueError(f"max batch must be at least 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max delay must be ≥ 0, got {max_delay_s}")
        self.pipeline = pipeline
        self.jobs = jobs
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.on_done = on_done
        self.on_error = on_error
        self.claim = claim
        self.retire = retire
        self.busy = False
        self.failures = 0  # batches failed in a row
        self.stopping = False

    @property
    def healthy(self) -> bool:
        """Running, and its device has not failed RETIRE_AFTER_FAILED_BATCHES batches in a row."""
        return self.is_alive() and self.failures < RETIRE_AFTER_FAILED_BATCHES

    def stop(self) -> None:
        """Ask the thread to end after its current batch, leaving the queued jobs unrun."""
        self.stopping = True
        self.jobs.put(_STOP)  # wakes it if it waits for a job

    def collect(self) -> list | None:
        """The next batch, or None once stopped. Each job is claimed as it is taken: one that was
        cancelled or is past its deadline is left out (its reply is the claim's business)."""
        while True:
            first = self.jobs.get()
            if first is _STOP or self.stopping:
                return None
            if self.claim(first):
                break
        batch = [first]
        deadline = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self.jobs.put(_STOP)  # run this batch, then stop on the next collect
                break
            if self.claim(job):
                batch.append(job)
        return batch

    def run(self) -> None:
        while True:
            batch = self.collect()
            if batch is None:
                return
            started = time.monotonic()
            self.busy = True
            try:
                coarse, final = self.pipeline.run([job.prepared for job in batch])
            except BaseException as e:  # every job must still get a reply
                self.busy = False
                self.failures += 1
                retiring = self.failures >= RETIRE_AFTER_FAILED_BATCHES and self.retire(self)
                self.on_error(batch, e, retiring)
                if retiring:
                    return
                continue
            self.busy = False
            self.failures = 0
            self.on_done(batch, coarse, final, started, time.monotonic())
