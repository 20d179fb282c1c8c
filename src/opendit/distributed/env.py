"""The process environment of a distributed job: who we are in the world, which device, the default process group.

Everything here reads environment variables or the default process group; the mesh of groups built on top of it is
opendit.distributed.mesh.

Environment:
- RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: set by torchrun or opendit's launcher.
- OPENDIT_PG_TIMEOUT_S: process-group timeout in seconds (default 60): a collective waiting longer on a dead or stuck
  peer raises, so the job ends with an error instead of hanging.
- OPENDIT_FAULT_INJECT="rank=R,step=S": TEST HOOK. The rank with global rank R raises at the end of denoising step S
  (0-based). Used by tests/test_launch.py to check that one failing rank ends the whole job with its message.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from opendit.errors import OpenDiTError

ENV_TIMEOUT = "OPENDIT_PG_TIMEOUT_S"
ENV_FAULT = "OPENDIT_FAULT_INJECT"
DEFAULT_TIMEOUT_S = 60.0


class InjectedFault(RuntimeError):
    """Raised by the OPENDIT_FAULT_INJECT test hook."""


def in_distributed_env() -> bool:
    """True inside a worker started by torchrun or opendit's launcher (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    """This process's rank in the world (0 outside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def pick_device(requested: str | None = None) -> tuple[torch.device, str]:
    """(device, backend) for this worker: cuda:LOCAL_RANK + NCCL when every local rank has a GPU, else CPU + gloo."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if requested is not None and requested.startswith("cpu"):
        return torch.device("cpu"), "gloo"
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if requested is not None and requested.startswith("cuda") and not enough_gpus:
        raise OpenDiTError(
            f"--device {requested} with {local_world} processes on this node needs {local_world} GPUs, "
            f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}; use --device cpu or fewer --nproc"
        )
    if enough_gpus:
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def init_from_env(device: torch.device, backend: str) -> bool:
    """Initialise the default process group from env:// (torchrun / our launcher). Returns True if it did so here
    (the caller then owns `dist.destroy_process_group()`), False if it was already initialised."""
    if dist.is_initialized():
        return False
    if not in_distributed_env():
        raise OpenDiTError("not inside a distributed job: run with --nproc N or under torchrun --nproc-per-node N")
    timeout = timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return True


def quiet_unless_rank0() -> None:
    """Ranks > 0 print nothing but errors: stdout goes to /dev/null and warnings are dropped (stderr stays, so
    tracebacks and error lines still show)."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        warnings.simplefilter("ignore")


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """'rank=1,step=2' -> (1, 2); None/'' -> None."""
    if not spec:
        return None
    try:
        parts = dict(item.split("=", 1) for item in spec.split(","))
        return int(parts["rank"]), int(parts["step"])
    except (KeyError, ValueError) as exc:
        raise OpenDiTError(f"{ENV_FAULT}={spec!r} is malformed; expected e.g. 'rank=1,step=2'") from exc
