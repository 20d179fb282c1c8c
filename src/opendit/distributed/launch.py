"""The library's one process launcher: a `WorkerPool` of long-lived local workers, and `launch` (one call) on top.

    with WorkerPool(serve, nproc=4, args=(spec,)) as pool:  # serve(channel, spec) runs in 4 processes
        pool.send(request)                                   # -> channel.recv() in rank 0
        answer = pool.recv()                                 # <- channel.send(answer) in rank 0
    result = launch(fn, nproc=4, args=(request,))           # fn(*args) on every rank; rank 0's return value

Design:
- Processes are spawned (never forked: the parent may hold threads, CUDA state or a process group). Each worker sets
  the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT) in its own
  entry function, before anything in it reads the environment, so the code it runs initialises its process group
  with `init_from_env(...)` exactly as under `torchrun --nproc-per-node N`. Ranks > 0 print nothing but errors.
- Rendezvous: the parent hosts the job's TCPStore on a port the OS picks (port 0, so two jobs never race for one)
  and passes it as MASTER_PORT with TORCHELASTIC_USE_AGENT_STORE=True, which makes env:// connect every rank as a
  client of that store (the arrangement torchrun's agent uses). The store lives as long as the pool. A worker
  initialises the default process group once per lifetime: a second init on the same store finds the first one's
  keys and hangs, so long-lived workers keep their group between requests.
- Channels: one duplex pipe per worker. The parent never waits on one worker alone: `recv` waits
  (multiprocessing.connection.wait) on every channel and every process sentinel, so a worker that raises or dies ends
  the wait at once, not after some peer's collective times out.
- Failures: a worker's entry wrapper catches whatever its target raises, sends a FailureReport (message, traceback,
  time) and exits 1; for a death without a report (a signal, os._exit) the parent writes the report from the exit
  code. One failure usually makes its peers fail too, only because their connection to it dropped, so the parent
  collects reports for a short grace and reports the earliest that is not such a secondary failure (`root_cause`),
  then terminates the others (SIGTERM, SIGKILL after a grace). No restarts: inference is not elastic.
- Shutdown: close() closes the parent's channel ends (a worker blocked in channel.recv() then exits quietly), waits
  for the workers, terminates and kills the rest and reaps every one. A multiprocessing Finalize does the same if an
  open pool is garbage-collected or the interpreter exits, so no worker outlives its pool.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.util import Finalize
from typing import Any

from opendit.distributed.resources import warn_resources
from opendit.errors import OpenDiTError

LAUNCHER_PID = "OPENDIT_LAUNCHER_PID"

# Messages that mean "a peer went away", not a root cause: any other failure is preferred as the one to report.
_SECONDARY = re.compile(
    r"Connection closed by peer|Connection reset|Broken pipe|DistBackendError|Timed out|timed out|"
    r"NCCL communicator was aborted|remote process exited"
)
GRACE_S = 1.0  # after a first failure, how long to collect the other ranks' reports to find the root cause
KILL_GRACE_S = 2.0  # SIGTERM -> SIGKILL
GC_CLOSE_TIMEOUT_S = 5.0  # close() of a pool nobody closed (garbage-collected, or the interpreter exits)


class WorkerFailed(RuntimeError):
    """A worker raised or died: `rank` is its global rank, `message` its exception as 'Type: text' (or how it died),
    `traceback` its formatted traceback ('' for a death), `exitcode` its exit status (negative: killed by a signal).
    `input_error` is the text of an OpenDiTError (bad input) the worker raised, else None."""

    def __init__(
        self, rank: int, message: str, exitcode: int | None = None, traceback: str = "", input_error: str | None = None
    ):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message, self.exitcode, self.traceback = rank, message, exitcode, traceback
        self.input_error = input_error


@dataclass
class FailureReport:
    """One rank's failure, as the worker sent it (or the parent wrote it for a death without a report)."""

    rank: int
    message: str
    traceback: str = ""
    timestamp: float = 0.0  # time.time() when it failed (the parent's, when it saw a death)
    exitcode: int | None = None
    input_error: str | None = None

    @property
    def secondary(self) -> bool:
        """True if this only says a peer went away (a symptom of another rank's failure)."""
        return bool(_SECONDARY.search(self.message))

    def error(self) -> WorkerFailed:
        return WorkerFailed(self.rank, self.message, self.exitcode, self.traceback, self.input_error)


def root_cause(reports: list[FailureReport]) -> FailureReport:
    """The failure to report: the earliest that is not a secondary one (a dropped connection, a timeout); deaths by
    signal count as root causes. Only secondary ones: the earliest of them."""
    primary = [r for r in reports if not r.secondary]
    return min(primary or reports, key=lambda r: (r.timestamp, r.rank))


def exit_message(exitcode: int) -> str:
    """How a worker that sent no report ended: 'killed by signal SIGKILL (out of memory?)', 'exit code 3'."""
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = str(-exitcode)
    # the kernel's OOM killer is the usual sender of a SIGKILL nobody asked for
    return f"killed by signal {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")


# ------------------------------------------------------------------------------------------------ worker side
class _ParentGone(SystemExit):
    """The parent closed this worker's channel (the pool was closed, or the parent died): exit quietly."""


def _send(conn: Connection, obj: Any) -> None:
    """Every message by value, with the standard pickler: a Connection's own pickler (with torch imported) passes
    tensors as shared-memory handles that die with the sending process, so a worker's last answer (launch's return
    value) could be unreadable once it has exited."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


class WorkerChannel:
    """A worker's end of its channel: `rank` is its global rank; send() goes to the parent, recv() takes the next
    object the parent sent to this rank. Once the parent has closed the pool both end the worker quietly."""

    def __init__(self, rank: int, conn: Connection):
        self.rank = rank
        self._conn = conn

    def send(self, obj: Any) -> None:
        try:
            _send(self._conn, obj)
        except (BrokenPipeError, ConnectionResetError):
            raise _ParentGone(0) from None

    def recv(self) -> Any:
        try:
            return _recv(self._conn)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            raise _ParentGone(0) from None


def _report(conn: Connection, rank: int, exc: BaseException) -> None:
    """Send this worker's failure to the parent; if the parent cannot hear it, print it (the exit code still tells)."""
    text = str(exc)
    report = FailureReport(
        rank,
        f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
        "".join(traceback.format_exception(exc)),
        time.time(),
        1,
        text if isinstance(exc, OpenDiTError) else None,
    )
    try:
        _send(conn, report)
    except Exception:  # the channel is gone; stderr is the last place to say it
        print(report.traceback, file=sys.stderr)


def _release_ipc() -> None:
    """Run multiprocessing's exit finalizers (priority >= 0: semaphores, pools), as a normal exit would. Without
    this a worker leaving by os._exit or SIGTERM leaves its semaphores (tqdm creates one) registered with the
    resource tracker it shares with the parent, which then warns of 'leaked semaphore objects' at the parent's exit.
    Priority < 0 (queue feeder joins) is skipped: it may wait on a peer that is gone."""
    from multiprocessing import util

    try:
        util._run_finalizers(0)
    except Exception:  # a broken finalizer must not keep a failed worker alive
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    """The pool's SIGTERM: release IPC objects, then die of the signal as the default action would. (A main thread
    blocked in C runs this only once the call returns; the pool's SIGKILL after KILL_GRACE_S covers that.)"""
    _release_ipc()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _exit_now(status: int) -> None:
    """Leave by os._exit: after a failure, interpreter shutdown can block (a process group's destructor waiting on
    dead peers, non-daemon threads); any report is already in the pipe and the parent reaps us anyway."""
    _release_ipc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not mask the exit
            pass
    os._exit(status)


PARENT_POLL_S = 1.0  # how often a worker checks that its pool's process is still alive


def _watch_parent(parent_pid: int) -> None:
    """A worker's daemon thread: if the pool's process dies without closing the pool (SIGKILL, or a SIGTERM that
    skips the finalizers), the worker is re-parented; it then ends itself as a SIGTERM would, so no worker ever
    outlives its pool. (Polling, not PR_SET_PDEATHSIG: that fires when the *thread* that started the worker exits,
    and an Engine may be created on a short-lived thread.)"""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    _release_ipc()
    os.kill(os.getpid(), signal.SIGKILL)


def _entry(target: Callable, rank: int, conn: Connection, env: dict, threads: int, args: tuple) -> None:
    """Runs in each spawned process: the torchrun environment first (before anything reads it), a share of the
    CPU threads, ranks > 0 quiet, then target(channel, *args). Any exception becomes a report and exit status 1."""
    import threading

    parent = int(env.pop(LAUNCHER_PID, os.getppid()))
    threading.Thread(target=_watch_parent, args=(parent,), name="opendit-parent-watch", daemon=True).start()
    os.environ.update(env)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        import torch

        from opendit.distributed.env import quiet_unless_rank0

        if "OMP_NUM_THREADS" not in os.environ:  # an explicit OMP_NUM_THREADS is the user's choice
            torch.set_num_threads(threads)
        quiet_unless_rank0()
        target(WorkerChannel(rank, conn), *args)
    except _ParentGone:
        _exit_now(0)
    except BaseException as exc:  # KeyboardInterrupt and SystemExit are failures of this rank too
        _report(conn, rank, exc)
        _exit_now(1)
    conn.close()  # a normal return ends the process normally


# ------------------------------------------------------------------------------------------------ parent side
def _reap(processes: list, conns: list, timeout: float) -> None:
    """Close the parent's channel ends, wait up to `timeout` s for the workers to exit, then SIGTERM the rest and
    SIGKILL what is left after KILL_GRACE_S. Every process is joined (no zombies). Needs no reference to the pool,
    so it can run as the pool's finalizer."""
    for i, conn in enumerate(conns):
        if conn is not None:
            conn.close()
            conns[i] = None
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in processes if p.exitcode is None]
    for process in stuck:
        process.terminate()
    deadline = time.monotonic() + KILL_GRACE_S
    for process in stuck:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in stuck:
        if process.exitcode is None:
            process.kill()
            process.join()


class WorkerPool:
    """`nproc` spawned worker processes; process r runs target(channel, *args) in the torchrun environment of rank r.

    target must be importable (module level). A script that starts a pool must do so under
    `if __name__ == "__main__":`, as with any multiprocessing spawn. `processes[r]` is rank r's Process.
    """

    def __init__(
        self,
        target: Callable,
        nproc: int,
        args: tuple = (),
        threads_per_proc: int | None = None,
        model_bytes: int = 0,
    ):
        import torch.distributed as dist

        if nproc < 1:
            raise OpenDiTError(f"--nproc must be >= 1, got {nproc}")
        warn_resources(nproc, model_bytes)  # before anything starts: what this many processes will cost
        self.nproc = nproc
        self.processes: list[multiprocessing.Process] = []
        self._conns: list[Connection | None] = []
        self._pending: list[deque] = [deque() for _ in range(nproc)]
        self._exited = [False] * nproc
        self._reports: list[FailureReport] = []
        self._failed: WorkerFailed | None = None
        self._closed = False
        # port 0: the OS picks a free port, so concurrent jobs never race for one
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._finalizer = Finalize(self, _reap, (self.processes, self._conns, GC_CLOSE_TIMEOUT_S), exitpriority=10)
        threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
        context = multiprocessing.get_context("spawn")
        try:
            for rank in range(nproc):
                parent_end, child_end = context.Pipe(duplex=True)
                self._conns.append(parent_end)
                process = context.Process(
                    target=_entry,
                    args=(target, rank, child_end, self._env(rank), threads, args),
                    name=f"opendit-rank{rank}",
                )
                try:
                    process.start()
                finally:
                    child_end.close()  # only the worker holds its end: its exit then shows as EOF here too
                self.processes.append(process)
        except BaseException:
            self._shutdown(0.0)
            raise

    def _env(self, rank: int) -> dict[str, str]:
        world = str(self.nproc)
        return {
            LAUNCHER_PID: str(os.getpid()),  # read (and removed) by _entry: the worker's parent-death watch
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": world,
            "LOCAL_WORLD_SIZE": world,
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self._store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",  # env:// connects to our store instead of hosting one on rank 0
        }

    # ---------------------------------------------------------------------------------------------- messages
    def send(self, obj: Any, rank: int = 0) -> None:
        """Send obj (picklable) to rank `rank`'s channel. Raises WorkerFailed if any worker has failed."""
        self._check_usable()
        self._pump(0.0)
        self._raise_if_failed()
        conn = self._conns[rank]
        try:
            if conn is None:
                raise BrokenPipeError
            _send(conn, obj)
        except (BrokenPipeError, ConnectionResetError):
            # the worker is gone or going: its exit (or a peer's report) says why
            self.processes[rank].join(KILL_GRACE_S)
            self._pump(0.0)
            if not self._reports:
                code = self.processes[rank].exitcode
                self._reports.append(FailureReport(rank, "exited before taking a message", "", time.time(), code))
            self._raise_if_failed()

    def recv(self, rank: int = 0, timeout: float | None = None) -> Any:
        """The next object rank `rank` sent. While waiting, watches every worker: if any reports an exception or
        dies, the others are terminated and WorkerFailed is raised for the root cause. TimeoutError after
        `timeout` s. A worker that exits normally while we wait on it: WorkerFailed('exited before answering')."""
        self._check_usable()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            if self._pending[rank]:
                return self._pending[rank].popleft()
            if self._exited[rank]:  # exited normally (else its report is in) and everything it sent is read
                code = self.processes[rank].exitcode
                self._reports.append(FailureReport(rank, "exited before answering", "", time.time(), code))
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"rank {rank} sent nothing within {timeout} s")
            self._pump(left)

    @property
    def alive(self) -> bool:
        """True while the pool is open, no failure is known and every worker is running."""
        return (
            not self._closed
            and self._failed is None
            and not self._reports
            and all(p.exitcode is None for p in self.processes)
        )

    def close(self, timeout: float = 30.0) -> None:
        """Close the channels, wait up to `timeout` s for the workers to exit, then terminate and kill the rest;
        every worker is reaped. Idempotent; a failed pool is already closed."""
        self._closed = True
        self._shutdown(timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- internals
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise RuntimeError("this WorkerPool is closed")

    def _shutdown(self, timeout: float) -> None:
        if self._finalizer.still_active():
            self._finalizer.cancel()
            _reap(self.processes, self._conns, timeout)
        self._store = None  # the workers are gone: nobody needs the rendezvous any more

    def _pump(self, timeout: float | None) -> None:
        """Wait up to `timeout` s (None: forever) for any channel or process; take in whatever arrived."""
        channels = {conn: rank for rank, conn in enumerate(self._conns) if conn is not None}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes) if not self._exited[rank]}
        if not channels and not sentinels:
            return
        ready = wait([*channels, *sentinels], timeout)
        for item in ready:
            if item in channels:
                self._drain(channels[item])
        for item in ready:  # after the channels: a worker's last words arrive before its exit is judged
            if item in sentinels:
                self._on_exit(sentinels[item])

    def _drain(self, rank: int) -> None:
        """Read everything waiting on rank's channel: reports to the failure list, other objects to its queue."""
        conn = self._conns[rank]
        try:
            while conn is not None and conn.poll():
                item = _recv(conn)
                if isinstance(item, FailureReport):
                    self._reports.append(item)
                else:
                    self._pending[rank].append(item)
        except (EOFError, OSError):  # the worker closed its end (it exited): nothing more will come
            conn.close()
            self._conns[rank] = None

    def _on_exit(self, rank: int) -> None:
        process = self.processes[rank]
        process.join()  # its sentinel is ready, so this only reaps it
        self._exited[rank] = True
        self._drain(rank)  # what it sent before exiting is still in the pipe
        if self._conns[rank] is not None:  # a grandchild may hold the worker's end open; we are done with ours
            self._conns[rank].close()
            self._conns[rank] = None
        code = process.exitcode
        own = [r for r in self._reports if r.rank == rank]
        for report in own:
            report.exitcode = code
        if code != 0 and not own:
            self._reports.append(FailureReport(rank, exit_message(code), "", time.time(), code))

    def _raise_if_failed(self) -> None:
        """If any failure is known: collect the others' reports for up to GRACE_S (or until every worker has
        exited), end every worker, and raise WorkerFailed for the root cause."""
        if self._failed is not None:
            raise self._failed
        if not self._reports:
            return
        deadline = time.monotonic() + GRACE_S
        while not all(self._exited) and (left := deadline - time.monotonic()) > 0:
            self._pump(left)
        self._failed = root_cause(self._reports).error()
        self._shutdown(0.0)
        raise self._failed


# ------------------------------------------------------------------------------------------------ one call
def _call_once(channel: WorkerChannel, fn: Callable, args: tuple) -> None:
    """launch's target: fn(*args), then rank 0's return value (the other ranks': a marker) to the parent."""
    result = fn(*args)
    channel.send(result if channel.rank == 0 else None)  # only rank 0's value is wanted: others need not pickle


def launch(
    fn: Callable, nproc: int, args: tuple = (), threads_per_proc: int | None = None, model_bytes: int = 0
) -> Any:
    """Run fn(*args) in `nproc` local processes (a WorkerPool); return rank 0's return value once every rank is done.

    fn must be importable (module level); a script that calls this (or generate(nproc=N)) must do so under
    `if __name__ == "__main__":`, as with any multiprocessing spawn. Raises WorkerFailed if any rank raises or dies
    (the root cause's rank and message), or OpenDiTError if that root cause was one: bad input is the caller's error,
    not a crash. `model_bytes`: what each process will hold of the model (for the memory warning).
    """
    with WorkerPool(_call_once, nproc, (fn, args), threads_per_proc, model_bytes) as pool:
        try:
            results = [pool.recv(rank) for rank in range(nproc)]
        except WorkerFailed as failed:
            if failed.input_error is not None:
                raise OpenDiTError(failed.input_error) from None
            raise
    return results[0]
