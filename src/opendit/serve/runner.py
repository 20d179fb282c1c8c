"""The engine thread of `opendit serve`: owns the `opendit.Engine`, runs one batch at a time, restarts dead workers.

Faults: a worker that dies mid-batch makes the engine's receive raise WorkerFailed at once (the pool watches every
worker process; no collective timeout is waited for). That batch's jobs fail with 503 and the worker's message, the
engine is rebuilt (new worker processes, the model loaded again) and the queue goes on. After `max_restarts`
failures the server stops taking jobs, fails those queued and asks the HTTP server to exit with status 1.
Shutdown (SIGTERM): the queue stops taking jobs, the jobs already accepted are finished, then the engine closes.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

from opendit.distributed.launch import WorkerFailed
from opendit.errors import OpenDiTError
from opendit.serve.jobs import Job, JobQueue
from opendit.serve.metrics import ServeMetrics


class EngineRunner:
    def __init__(
        self,
        make_engine: Callable[[], object],
        queue: JobQueue,
        metrics: ServeMetrics,
        max_restarts: int = 3,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.make_engine, self.queue, self.metrics = make_engine, queue, metrics
        self.max_restarts, self.on_fatal = max_restarts, on_fatal
        self.engine = make_engine()
        self.state = "ok"  # ok | restarting | failed | stopped
        self.restarts = 0
        self.last_error: str | None = None
        self.last_batch: dict | None = None  # the last finished batch's record (the page's timeline)
        self.running: list[Job] = []  # the batch in the engine now
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="opendit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Finish the accepted jobs (within `timeout` s), then close the engine. True when everything finished."""
        self.queue.stop("the server is shutting down")
        self._stopping = True
        self._thread.join(timeout)
        finished = not self._thread.is_alive()
        for job in self.queue.drain():  # only when the deadline passed with jobs still queued
            job.fail("the server shut down before this job ran", 503)
        self.engine.close()
        self.state = "stopped"
        return finished

    @property
    def worker_pids(self) -> list[int]:
        return list(getattr(self.engine, "worker_pids", []))

    def _loop(self) -> None:
        while True:
            batch = self.queue.next_batch(timeout=0.2)
            self.metrics.queue_length.set(len(self.queue))
            if not batch:
                if self._stopping or self.state == "failed":
                    return
                continue
            self.running = batch
            try:
                self._run(batch)
            finally:
                self.running = []

    def _run(self, batch: list[Job]) -> None:
        start = time.time()
        for job in batch:
            job.status, job.started, job.steps = "running", start, getattr(job.call, "steps", 0) or 0
            job.emit("running", {"batch_requests": len(batch)})

        def on_step(done: int, total: int) -> None:
            for job in batch:
                job.step, job.steps = done, total
                job.emit("step", {"step": done, "steps": total})

        try:
            results = self.engine.run_calls([job.call for job in batch], on_step=on_step)
        except WorkerFailed as exc:
            self._fail(batch, f"a worker failed: {exc}", 503)
            self._restart(str(exc))
            return
        except OpenDiTError as exc:  # bad input found on a worker (engine still open), or the engine ended
            closed = self.engine.closed
            self._fail(batch, str(exc), 503 if closed else 400)
            if closed:
                self._restart(str(exc))
            return
        except Exception as exc:  # a bug: the job reports it, the engine is rebuilt (its state is unknown)
            traceback.print_exc()
            self._fail(batch, f"internal error: {type(exc).__name__}: {exc}", 500)
            self._restart(f"{type(exc).__name__}: {exc}")
            return
        self.metrics.observe_batch(batch, results, time.time() - start)
        self.last_batch = results[0].record
        for job, result in zip(batch, results):
            job.finish(result)

    def _fail(self, batch: list[Job], message: str, status: int) -> None:
        for job in batch:
            job.fail(message, status)
            self.metrics.requests.labels(status="failed").inc()

    def _restart(self, why: str) -> None:
        """New worker processes (bounded retries); beyond the bound the server gives up and exits non-zero."""
        self.last_error = why
        try:
            self.engine.close()
        except Exception:  # already ended by its failure
            pass
        while self.restarts < self.max_restarts:
            self.restarts += 1
            self.metrics.restarts.inc()
            self.state = "restarting"
            try:
                self.engine = self.make_engine()
                self.state = "ok"
                return
            except Exception as exc:  # the new workers failed to start or load
                self.last_error = f"restart {self.restarts} failed: {exc}"
        self.state = "failed"
        message = f"the workers failed {self.restarts + 1} times (last: {self.last_error}); the server gives up"
        for job in self.queue.stop(message):
            job.fail(message, 503)
        self.queue.drain()
        if self.on_fatal is not None:
            self.on_fatal(message)
