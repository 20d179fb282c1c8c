"""Run a function in N gloo processes on localhost, for tests.

    results = run_distributed(fn, world_size, *args, timeout=120)

`fn(rank, world_size, *args)` must be a module-level (picklable) function; it runs in a fresh process with one
torch thread and a gloo process group over 127.0.0.1 (free port). Its return value (picklable) comes back in
`results[rank]`. The first exception on any rank is re-raised here as DistributedError with that rank's traceback text
(the other ranks are terminated); if the job is not done within `timeout` seconds, every process is killed and
DistributedError says which ranks were still running, so a hang fails the test instead of hanging it.

The processes are forked from a forkserver that imported torch and diffusers once (PRELOAD), not spawned: a spawned
rank spends ~4 s of CPU importing them, which over the suite's few hundred ranks was a third of `make test`'s time on
2 cores. The forkserver is a single-threaded process that never ran torch work (safe to fork, as spawn is); each rank
gets the caller's environment at the time of the call (the server's own is the one it started with). Tests that
measure a rank's resident set pass `start_method="spawn"`: a forked rank faults in the server's library pages as it
touches them, which reads as growth of its resident set.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A worker raised, or the job timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "diffusers", "opendit.families", "opendit.parallel.entry"]


def _worker(rank: int, fn: Callable, world_size: int, port: int, timeout: float, out_dir: str, args: tuple,
            environ: dict) -> None:  # fmt: skip
    os.environ.clear()
    os.environ.update(environ)  # the caller's, as a spawned process would have it
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    # On an exception the group is NOT torn down: destroying it could wait on peers, and the process exit that
    # reports the error must come first (the parent then terminates the other ranks).
    result = fn(rank, world_size, *args)
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    start_method: str = "forkserver") -> list[Any]:  # fmt: skip
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; returns the per-rank results in rank order."""
    for attempt in range(3):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                _run(fn, world_size, args, timeout, out_dir, start_method)
            except DistributedError as err:  # another test grabbed our port between free_port() and bind: retry
                if attempt < 2 and "address already in use" in str(err).lower():
                    continue
                raise
            results = []
            for r in range(world_size):
                with open(Path(out_dir) / f"{r}.pkl", "rb") as f:
                    results.append(pickle.load(f))
            return results
    raise AssertionError("unreachable")


def _run(fn: Callable, world_size: int, args: tuple, timeout: float, out_dir: str, start_method: str) -> None:
    port = free_port()
    mp.set_forkserver_preload(PRELOAD)  # read when this process's forkserver starts (its first job)
    ctx = mp.start_processes(
        _worker,
        args=(fn, world_size, port, timeout, out_dir, args, dict(os.environ)),
        nprocs=world_size,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if ctx.join(timeout=0.5, grace_period=1.0):  # peers stuck in C++ get SIGKILL after 1 s
                    return
            except mp.ProcessRaisedException as err:  # message holds the failing rank's traceback text
                raise DistributedError(str(err)) from None
            except mp.ProcessExitedException as err:
                raise DistributedError(f"a worker died without a Python exception: {err}") from None
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                raise DistributedError(f"timed out after {timeout:.0f} s; ranks still running: {alive}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
