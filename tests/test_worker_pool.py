"""WorkerPool: long-lived workers answer requests in turn over a gloo group initialised from env://; a worker that
raises or is killed ends the pool at once with its own rank and message (not a peer's dropped connection); close()
reaps every worker; launch() returns rank 0's value and re-raises bad input as OpenDiTError."""

from __future__ import annotations

import os
import signal
import time

import pytest

from opendit.distributed.launch import WorkerFailed, WorkerPool, exit_message, launch
from opendit.errors import OpenDiTError


# ------------------------------------------------------------------------------------------------ worker targets
def summing_worker(channel) -> None:
    """Per request k (sent to rank 0, broadcast to all): all_reduce of (rank + 1) * k; rank 0 answers with the sum.
    Request None ends the loop. Exercises init_from_env under the pool's environment."""
    import torch
    import torch.distributed as dist

    from opendit.distributed.env import init_from_env

    init_from_env(torch.device("cpu"), "gloo")
    channel.send(("ready", dist.get_rank(), dist.get_world_size(), os.environ["MASTER_PORT"]))
    try:
        while True:
            box = [channel.recv() if channel.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            value = torch.tensor([(channel.rank + 1.0) * box[0]])
            dist.all_reduce(value)
            if channel.rank == 0:
                channel.send(value.item())
    finally:
        dist.destroy_process_group()


def faulty_worker(channel, failing_rank: int, how: str) -> None:
    """Rank 0 takes a request and every rank enters an all_reduce; `failing_rank` instead raises or SIGKILLs itself
    first, so its peers are blocked in the collective when it goes (their errors are the secondary ones)."""
    import torch
    import torch.distributed as dist

    from opendit.distributed.env import init_from_env

    init_from_env(torch.device("cpu"), "gloo")
    channel.send("ready")
    box = [channel.recv() if channel.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if channel.rank == failing_rank:
        time.sleep(0.2)  # let the peers enter the collective
        if how == "raise":
            raise ValueError(f"bad request {box[0]!r}")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    channel.send("unreachable")


def idle_worker(channel) -> None:
    """Waits for requests without any process group; answers each with (rank, request)."""
    while True:
        channel.send((channel.rank, channel.recv()))


def rank_value(scale: int) -> int:
    return int(os.environ["RANK"]) * scale + 7


def bad_input() -> None:
    raise OpenDiTError("--steps must be >= 1, got 0")


def crash_on_rank1() -> None:
    if int(os.environ["RANK"]) == 1:
        raise KeyError("boom")
    time.sleep(120)  # rank 0 keeps working: the pool must still end it promptly


# ------------------------------------------------------------------------------------------------ fast units
def test_exit_messages():
    assert exit_message(-signal.SIGKILL) == "killed by signal SIGKILL (out of memory?)"
    assert exit_message(-signal.SIGTERM) == "killed by signal SIGTERM"
    assert exit_message(3) == "exit code 3"


def test_nproc_must_be_positive():
    with pytest.raises(OpenDiTError, match="--nproc must be >= 1"):
        WorkerPool(idle_worker, 0)


# ------------------------------------------------------------------------------------------------ processes
def assert_reaped(pool: WorkerPool) -> None:
    for process in pool.processes:
        assert process.exitcode is not None, process
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)  # reaped: not even a zombie is left


@pytest.mark.slow
def test_pool_answers_requests_in_turn_over_a_gloo_group():
    with WorkerPool(summing_worker, 2, threads_per_proc=1) as pool:
        ready = pool.recv(timeout=60)
        assert ready[:3] == ("ready", 0, 2) and int(ready[3]) > 0
        for k in (1, 2, 5):
            pool.send(k)
            assert pool.recv(timeout=30) == 3.0 * k  # (0 + 1) * k + (1 + 1) * k
        assert pool.alive
        pool.send(None)
    assert not pool.alive
    assert [p.exitcode for p in pool.processes] == [0, 0]
    assert_reaped(pool)


def fail_one_request(mode: str):
    """Start a 2-worker pool whose rank 1 fails (`mode`: raise or kill itself) on the first request; returns the
    WorkerFailed, the seconds from sending the request to the raise, and the (closed) pool."""
    pool = WorkerPool(faulty_worker, 2, (1, mode), threads_per_proc=1)
    try:
        assert pool.recv(timeout=60) == "ready"
        pool.send("req-1")
        start = time.monotonic()
        with pytest.raises(WorkerFailed) as info:
            pool.recv(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    return info.value, elapsed, pool


@pytest.mark.slow
def test_a_rank_raising_mid_request_ends_the_pool_with_its_message():
    failed, elapsed, pool = fail_one_request("raise")
    assert str(failed) == "rank 1 failed: ValueError: bad request 'req-1'"
    assert failed.exitcode == 1 and "faulty_worker" in failed.traceback and "ValueError" in failed.traceback
    assert elapsed < 5, elapsed
    assert not pool.alive
    assert_reaped(pool)
    with pytest.raises(WorkerFailed):  # the pool stays failed
        pool.send("req-2")


@pytest.mark.slow
def test_a_killed_rank_is_reported_not_its_peer_blocked_in_a_collective():
    failed, elapsed, pool = fail_one_request("kill")
    assert str(failed) == "rank 1 failed: killed by signal SIGKILL (out of memory?)"
    assert failed.exitcode == -signal.SIGKILL and failed.traceback == ""
    assert elapsed < 10, elapsed  # including the 0.2 s before the kill
    assert_reaped(pool)


@pytest.mark.slow
def test_a_worker_killed_from_the_parent_while_idle():
    with WorkerPool(idle_worker, 2, threads_per_proc=1) as pool:
        pool.send("a", rank=1)
        assert pool.recv(rank=1, timeout=60) == (1, "a")
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"^rank 0 failed: killed by signal SIGKILL"):
            pool.recv(rank=1, timeout=30)  # waiting on rank 1 still notices rank 0's death
        assert time.monotonic() - start < 3
    assert_reaped(pool)


@pytest.mark.slow
def test_recv_timeout_and_close_is_idempotent():
    pool = WorkerPool(idle_worker, 2, threads_per_proc=1)
    with pytest.raises(TimeoutError, match="rank 1 sent nothing within 0.2 s"):
        pool.recv(rank=1, timeout=0.2)
    for rank in (0, 1):  # both workers are up and waiting on their channels
        pool.send(f"to {rank}", rank=rank)
        assert pool.recv(rank=rank, timeout=60) == (rank, f"to {rank}")
    assert pool.alive
    start = time.monotonic()
    pool.close()  # idle workers see their channel close and exit by themselves
    assert time.monotonic() - start < 5
    pool.close()
    assert [p.exitcode for p in pool.processes] == [0, 0]
    assert_reaped(pool)
    with pytest.raises(RuntimeError, match="closed"):
        pool.recv()


@pytest.mark.slow
def test_launch_returns_rank0s_value():
    assert launch(rank_value, 2, (10,), threads_per_proc=1) == 7


@pytest.mark.slow
def test_launch_reraises_bad_input_as_opendit_error():
    with pytest.raises(OpenDiTError, match=r"^--steps must be >= 1, got 0$"):
        launch(bad_input, 2, threads_per_proc=1)


@pytest.mark.slow
def test_launch_ends_every_rank_when_one_raises():
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"^rank 1 failed: KeyError: 'boom'$") as info:
        launch(crash_on_rank1, 2, threads_per_proc=1)
    # rank 0's 120 s sleep was cut short (the margin covers process start-up on a loaded 2-core machine: 29 s seen)
    assert time.monotonic() - start < 60
    assert "crash_on_rank1" in info.value.traceback


PARENT_SCRIPT = """
import os, sys, time
from opendit.distributed.launch import WorkerPool

def busy(channel, folder):
    with open(os.path.join(folder, f"{os.getpid()}.pid"), "w"):
        pass
    while True:  # computing, never reading its channel: only the parent-death watch can end it
        time.sleep(0.05)

if __name__ == "__main__":
    pool = WorkerPool(busy, 2, (sys.argv[1],), threads_per_proc=1)
    print("started", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A parent killed without closing its pool (SIGKILL runs no finalizer) must not leave its workers running."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2, "workers did not start"
    finally:
        parent.kill()
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().split()[2] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:  # never leave them running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a worker outlived its killed parent"
