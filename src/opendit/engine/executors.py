"""The three ways an engine runs its calls, behind one interface, chosen once from the world size (`start_executor`):

- `InProcess` (one process, or torchrun with one process): the replica lives in the caller's process.
- `LocalPool` (nproc > 1 outside torchrun): a WorkerPool of nproc processes started once; each loads its replica and
  runs `serve_ranks`. The executor sends ("call", Call) to rank 0's channel, rank 0 broadcasts it to every rank over
  the control group, every rank runs it in lockstep, rank 0 sends ("step", done, total) after each step and then the
  GenerationResult; ("close",) makes every rank leave the process group and exit. Scripts using this mode must
  create the engine under `if __name__ == "__main__":` (the workers are spawned).
- `Torchrun` (inside torchrun with WORLD_SIZE > 1): every rank builds its replica. Rank 0 is the caller's own
  process (its `run` broadcasts the call and runs it); the other ranks serve rank 0's calls inside `start_executor`
  until rank 0 closes, and get an executor whose `is_main` is False.

The broadcasts go over a control group (gloo, every rank) with a long timeout, not the runtime's "all" group: between
calls the serving ranks wait for as long as the caller takes, which must not trip the process-group timeout (that
timeout, OPENDIT_PG_TIMEOUT_S, is what ends a call whose peer died). A dead peer while idle is still noticed: the
WorkerPool (or torchrun's agent) sees the process exit and ends the others.

Interface: `run(call, on_step) -> GenerationResult`, `close()`, `is_main`, `worker_pids`, `closed_reason` (None while
usable; set when closed or after a failure, and then `run` raises OpenDiTError with it).
"""

from __future__ import annotations

from opendit.distributed.env import in_distributed_env
from opendit.engine.replica import Replica
from opendit.errors import OpenDiTError


class Executor:
    name = ""
    is_main = True
    worker_pids: list[int] = []
    closed_reason: str | None = None
    spec = None

    def run(self, call, on_step=None):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class InProcess(Executor):
    name = "in-process"

    def __init__(self, spec):
        self.replica = Replica(spec)
        self.spec = self.replica.spec

    def run(self, call, on_step=None):
        return self.replica.run(call, on_step=on_step)

    def close(self) -> None:
        self.closed_reason = self.closed_reason or "close() was called; create a new opendit.Engine"


class Torchrun(Executor):
    name = "torchrun"

    def __init__(self, spec):
        self.replica = Replica(spec)
        self.spec = self.replica.spec  # rank 0's (they agree)
        self.failed = False
        if not self.replica.is_output:
            serve_ranks(self.replica)  # until rank 0 closes its engine
            self.replica.close()
            self.is_main = False
            self.closed_reason = "this rank served rank 0's calls until rank 0 closed its engine"

    def run(self, call, on_step=None):
        try:
            self.replica.broadcast(("call", call))
            return self.replica.run(call, on_step=on_step)
        except BaseException as exc:  # the other ranks may be stuck in a collective: no further calls
            self.closed_reason, self.failed = f"rank 0 failed: {type(exc).__name__}: {exc}", True
            raise

    def close(self) -> None:
        self.closed_reason = self.closed_reason or "close() was called; create a new opendit.Engine"
        if self.is_main and not self.failed and self.replica is not None:
            self.replica.broadcast(("close",))
            self.replica.close()
        self.replica = None


class LocalPool(Executor):
    name = "pool"

    def __init__(self, spec):
        from opendit.distributed.env import check_visible_gpus
        from opendit.distributed.launch import WorkerFailed, WorkerPool

        self.spec, self.pool, self.failed, self.busy = spec, None, False, False
        check_visible_gpus(spec.world, spec.settings.device)  # in the parent, before any worker starts
        try:
            self.pool = WorkerPool(pool_worker, spec.world, (spec,), model_bytes=spec.worker_bytes())
            self.pool.recv()  # ("ready", load_s) from rank 0, after every rank loaded
        except WorkerFailed as exc:
            self._fail(exc)

    @property
    def worker_pids(self) -> list[int]:
        return [process.pid for process in self.pool.processes] if self.pool is not None else []

    def _fail(self, exc) -> None:
        """A worker failed: end every worker and raise its message (bad input found on a worker: OpenDiTError)."""
        self.closed_reason, self.failed = str(exc), True
        if self.pool is not None:
            self.pool.close()
        if exc.input_error is not None:  # e.g. a corrupt checkpoint: not a crash
            raise OpenDiTError(exc.input_error) from None
        raise exc

    def run(self, call, on_step=None):
        from opendit.distributed.launch import WorkerFailed

        self.busy = True  # until the result is back: an interrupted call leaves rank 0 busy with it
        try:
            self.pool.send(("call", call))
            result = self.pool.recv()
            while isinstance(result, tuple) and result[0] == "step":  # rank 0's ("step", done, total)
                if on_step is not None:
                    on_step(result[1], result[2])
                result = self.pool.recv()
        except WorkerFailed as exc:
            self._fail(exc)
        except BaseException:  # e.g. KeyboardInterrupt: a later result would answer the wrong call
            self.closed_reason = "a call was interrupted before its result came back; create a new opendit.Engine"
            self.pool.close(timeout=2.0)  # the workers are mid-call: no clean exit to wait for
            raise
        self.busy = False
        return result

    def close(self) -> None:
        from opendit.distributed.launch import WorkerFailed

        self.closed_reason = self.closed_reason or "close() was called; create a new opendit.Engine"
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        try:
            if pool.alive and not self.failed and not self.busy:
                pool.send(("close",))  # every rank leaves its loop and the process group, and exits
        except WorkerFailed as exc:  # a worker died while idle: nothing left to close cleanly
            self.closed_reason = str(exc)
        pool.close()


def start_executor(spec) -> Executor:
    """The executor for this spec's world size and environment (see the module docstring)."""
    if spec.world == 1:
        return InProcess(spec)
    if in_distributed_env():
        return Torchrun(spec)
    return LocalPool(spec)


def serve_ranks(replica: Replica, channel=None) -> None:
    """The serving loop of a parallel job's ranks: rank 0 takes each message from its channel (pool mode; under
    torchrun rank 0 is the caller and never runs this loop) and broadcasts it; every rank runs each call; rank 0
    sends each result back. Returns at ("close",)."""
    while True:
        message = None
        if channel is not None and replica.is_output:
            try:
                message = channel.recv()
            except SystemExit:  # the pool closed the channel without a close message (gc, parent exit): release
                replica.broadcast(("close",))  # the peers waiting in the broadcast, so that they exit cleanly too
                raise
        message = replica.broadcast(message)
        if message[0] == "close":
            return
        progress = None
        if channel is not None and replica.is_output:  # ("step", done, total) after every step, then the result
            progress = lambda done, total: channel.send(("step", done, total))  # noqa: E731
        result = replica.run(message[1], on_step=progress)
        if channel is not None and replica.is_output:
            channel.send(result)


def pool_worker(channel, spec) -> None:
    """Entry point of every WorkerPool process of a local engine: load once, say ready, serve until close.

    An exception ends this process; the pool then ends the others and the engine raises WorkerFailed with it."""
    import threading

    from tqdm.auto import tqdm

    # tqdm's default lock is a multiprocessing semaphore, registered with the resource tracker this process shares
    # with the caller: a worker that the pool ends (os._exit, SIGTERM) would leave the caller's exit warning of
    # "leaked semaphore objects". One progress bar per process needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    replica = Replica(spec)
    replica.barrier()  # every rank loaded: a failure to load is reported by the engine's constructor, not a call
    if replica.is_output:
        channel.send(("ready", replica.load_s))
    serve_ranks(replica, channel)
    replica.close()
