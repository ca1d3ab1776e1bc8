"""Dynamic batching with Triton's semantics: one thread per device pulls prepared jobs.

A full batch (`max_batch` jobs) runs at once; otherwise the batcher waits at most
`max_delay_s` after the first queued job arrived (not after the batcher got to it: a job that
already waited while the device was busy runs with whatever is queued behind it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

log = logging.getLogger("pg2_server.batching")

_STOP = object()


class Batcher(threading.Thread):
    """Runs `pipeline.run` on batches taken from a shared queue of jobs (`job.prepared`, `job.enqueued`)."""

    def __init__(self, pipeline, jobs: queue.Queue, max_batch: int, max_delay_s: float,
                 on_done: Callable[[Sequence, object, object, float, float], None],
                 on_error: Callable[[Sequence, BaseException], None],
                 claim: Callable[[object], bool] = lambda job: True):
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
        self.busy = False

    def stop(self) -> None:
        """Ask the thread to end after its current batch (one sentinel per batcher)."""
        self.jobs.put(_STOP)

    def collect(self) -> list | None:
        """The next batch, or None once stopped. Each job is claimed as it is taken: one that was
        cancelled or is past its deadline is left out (its reply is the claim's business)."""
        while True:
            first = self.jobs.get()
            if first is _STOP:
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
                self.on_error(batch, e)
                continue
            self.busy = False
            self.on_done(batch, coarse, final, started, time.monotonic())
