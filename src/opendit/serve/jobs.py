"""Jobs of `opendit serve` and the bounded queue they wait in.

A job is one HTTP request's checked call (`Engine.check`). The queue hands the engine thread one batch at a time:
the oldest job, plus later jobs whose settings merge with it (batching.merge_key: same steps, scheduler, guidance and
size) up to `max_batch` images. The oldest job is in every batch, so no job waits for more batches than there are
jobs ahead of it (no starvation), while compatible jobs behind an incompatible one still share its loop.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from opendit.engine.batching import merge_key


class QueueFull(Exception):
    """The queue holds its limit of jobs (HTTP 429)."""


class NotAccepting(Exception):
    """The server is shutting down or its engine has failed for good (HTTP 503)."""


@dataclass
class Job:
    call: object  # generation.Call or pipelines.PipelineCall
    images: int  # how many images (or videos) the call makes
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued -> running -> done | failed
    step: int = 0
    steps: int = 0
    error: str | None = None
    http_status: int = 200  # of a failed job: 503 (a worker died, the server stopped), 400 (bad input), 500
    result: object = None  # GenerationResult when done
    started: float | None = None
    finished: float | None = None
    events: list[tuple[str, dict]] = field(default_factory=list)  # (name, data) in order, for the SSE stream
    done_event: threading.Event = field(default_factory=threading.Event)

    def emit(self, name: str, data: dict) -> None:
        self.events.append((name, data))  # list.append is atomic; readers only read up to len()

    def finish(self, result) -> None:
        self.result, self.status, self.finished = result, "done", time.time()
        self.emit("done", {"id": self.id})
        self.done_event.set()

    def fail(self, message: str, http_status: int) -> None:
        self.error, self.http_status, self.status, self.finished = message, http_status, "failed", time.time()
        self.emit("failed", {"error": message, "status": http_status})
        self.done_event.set()

    @property
    def finished_ok(self) -> bool:
        return self.status == "done"


class JobQueue:
    """FIFO of queued jobs (at most `limit`), every job ever submitted by id (the last `keep` finished ones)."""

    def __init__(self, limit: int, max_batch: int, keep: int = 1000):
        self.limit, self.max_batch, self.keep = limit, max_batch, keep
        self._queued: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()
        self.accepting = True
        self.refusal = "the server is shutting down"

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self.accepting:
                raise NotAccepting(self.refusal)
            if len(self._queued) >= self.limit:
                raise QueueFull(f"the queue is full ({self.limit} jobs waiting); retry later")
            self._queued.append(job)
            self._jobs[job.id] = job
            job.emit("queued", {"position": len(self._queued)})
            self._forget_old()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._queued)

    def next_batch(self, timeout: float) -> list[Job]:
        """The next batch (oldest job first), or [] after `timeout` s with nothing queued."""
        with self._cond:
            if not self._queued:
                self._cond.wait(timeout)
            if not self._queued:
                return []
            head = self._queued[0]
            batch, images = [head], head.images
            key = merge_key(head.call)
            if key is not None:
                for job in self._queued[1:]:
                    if merge_key(job.call) == key and images + job.images <= self.max_batch:
                        batch.append(job)
                        images += job.images
            taken = {job.id for job in batch}
            self._queued = [job for job in self._queued if job.id not in taken]
            for position, job in enumerate(self._queued, 1):
                job.emit("queued", {"position": position})
            return batch

    def stop(self, refusal: str) -> list[Job]:
        """Take no more jobs; returns those still queued (the caller finishes or fails them)."""
        with self._cond:
            self.accepting, self.refusal = False, refusal
            self._cond.notify_all()
            return list(self._queued)

    def drain(self) -> list[Job]:
        """Remove and return every queued job."""
        with self._cond:
            queued, self._queued = self._queued, []
            return queued

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.done_event.is_set()]
        for job_id in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job_id]
