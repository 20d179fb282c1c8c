"""Spawn N local workers with torch's elastic launcher (the machinery behind `torchrun`) and return rank 0's result.

    result = launch(fn, nproc=4, args=(request,))   # fn(*args) runs in 4 processes; rank 0's return value comes back

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), so the
code it runs is the same code that runs under `torchrun --nproc-per-node N -m opendit ...`: it initialises the
process group from env (opendit.distributed.mesh.init_from_env). Rendezvous is c10d on localhost with a free port, as
`torchrun --standalone` does.

Failure: if any worker raises, the agent (polling every 0.1 s) terminates the others and `launch` raises
WorkerFailed with THAT rank's message (the first observed failure, preferring the root cause over peers that only
saw their connection drop). No restarts: inference is not elastic. Ranks > 0 print nothing but errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opendit.errors import OpenDiTError

# Messages that mean "a peer went away", not a root cause: prefer any other failure when picking the one to report.
_SECONDARY = re.compile(r"Signal \d+|Connection closed by peer|Connection reset|DistBackendError|Timed out|timed out")
_AGENT_LOGGERS = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.agent.server.local_elastic_agent",
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
    "torch.distributed.launcher.api",
    "torch.multiprocessing.spawn",
)


class WorkerFailed(RuntimeError):
    """A worker raised: `rank` is its global rank, `message` its exception as 'Type: text'."""

    def __init__(self, rank: int, message: str, exitcode: int | None = None, traceback: str = ""):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message, self.exitcode, self.traceback = rank, message, exitcode, traceback


def _worker(fn: Callable, args: tuple, threads: int) -> Any:
    """Runs in each spawned process: quiet ranks > 0, one share of the CPU threads, then fn(*args)."""
    import torch

    from opendit.distributed.mesh import quiet_unless_rank0

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    quiet_unless_rank0()
    return fn(*args)


def _error_data(failure: Any) -> dict:
    """The 'message' entry of a worker's error file: {"message": "Type: text", "extraInfo": {"py_callstack", ...}}."""
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, dict) else {"message": message or failure.message}


def _sibling_failures(failure: Any) -> list[tuple[int, dict]]:
    """Every worker's error file of this attempt: the agent reports only the first process it saw exit, which may
    be a peer that died of the root cause's dropped connection. Files: <log dir>/<run>/attempt_k/<local rank>/."""
    path = Path(str(getattr(failure, "error_file", "")))
    found = []
    if path.name == "error.json" and path.parent.parent.is_dir():
        for rank_dir in path.parent.parent.iterdir():
            error_file = rank_dir / "error.json"
            if rank_dir.name.isdigit() and error_file.is_file():
                try:
                    message = json.loads(error_file.read_text()).get("message")
                except (OSError, ValueError):
                    continue
                if isinstance(message, dict):
                    found.append((int(rank_dir.name), message))
    return found


def root_failure(exc: Any) -> WorkerFailed:
    """The failure to report from a ChildFailedError: among all workers that wrote an error, the earliest whose
    message is not just a signal or a dropped connection (a peer of the root cause); else the agent's first one.
    Local rank == global rank: `launch` runs one node."""
    candidates = [(rank, _error_data(f)) for rank, f in exc.failures.items()]
    for failure in exc.failures.values():
        candidates += _sibling_failures(failure)

    def when(item: tuple[int, dict]) -> tuple[int, int]:
        return int(item[1].get("extraInfo", {}).get("timestamp", 0) or 0), item[0]

    primary = [c for c in candidates if not _SECONDARY.search(str(c[1].get("message")))]
    rank, data = sorted(primary or candidates, key=when)[0]
    exitcode = exc.failures[rank].exitcode if rank in exc.failures else 1
    traceback = str(data.get("extraInfo", {}).get("py_callstack", ""))
    return WorkerFailed(rank, str(data.get("message") or f"exit code {exitcode}"), exitcode, traceback)


def launch(fn: Callable, nproc: int, args: tuple = (), threads_per_proc: int | None = None) -> Any:
    """Run fn(*args) in `nproc` local processes started by torch's elastic agent; return rank 0's return value.

    fn must be importable (module level) because workers are spawned; a script that calls this (or
    generate(nproc=N)) must do so under `if __name__ == "__main__":`, as with any multiprocessing spawn.
    Raises WorkerFailed if any rank raises (or OpenDiTError, unchanged, if the first failure was one: bad input is
    the caller's error, not a crash).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise OpenDiTError(f"--nproc must be >= 1, got {nproc}")
    threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"opendit-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # The agent logs every failure with the whole traceback (and SIGTERMs to peers as warnings); we report the root
    # cause ourselves (WorkerFailed carries its traceback), so only critical agent messages get through.
    loggers = [logging.getLogger(name) for name in _AGENT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _worker)(fn, args, threads)
    except ChildFailedError as exc:
        failed = root_failure(exc)
        if failed.message.startswith("OpenDiTError: "):
            raise OpenDiTError(failed.message.removeprefix("OpenDiTError: ")) from None
        raise failed from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return results[0]
