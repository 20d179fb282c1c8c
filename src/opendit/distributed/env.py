"""The process environment of a distributed job: who we are in the world, which device, the default process group.

Everything here reads environment variables or the default process group; the mesh of groups built on top of it is
opendit.distributed.mesh.

Environment:
- RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: set by torchrun or opendit's launcher.
- OPENDIT_PG_TIMEOUT_S: process-group timeout in seconds (default 60): a collective waiting longer on a dead or stuck
  peer raises, so the job ends with an error instead of hanging.
- OPENDIT_FAULT_INJECT="rank=R,step=S": TEST HOOK. The rank with global rank R raises at the end of denoising step S
  (0-based). Used by tests/test_launch.py to check that one failing rank ends the whole job with its message.
  "rank=R,phase=encode" / "rank=R,phase=decode": rank R raises as it starts a text encoder's forward (on the rank
  that owns the encoder) / its band of the split VAE decode, while its peers wait in that phase's collectives
  (tests/test_pipeline_failures.py).
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


def visible_gpus() -> int:
    """GPUs this process can see (0 without CUDA). Asks the driver for a count only: no context is created."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pinned_one_gpu() -> bool:
    """True where the launcher gave this process exactly one GPU (CUDA_VISIBLE_DEVICES names one device, as SLURM's
    --gpus-per-task=1 does): then every rank's GPU is its cuda:0."""
    names = [n for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    return len(names) == 1 and visible_gpus() == 1


def rank_gpu_index() -> int:
    """This rank's GPU: cuda:LOCAL_RANK, or cuda:0 where the launcher pinned one GPU per process."""
    return 0 if pinned_one_gpu() else int(os.environ.get("LOCAL_RANK", "0"))


def check_visible_gpus(nproc: int, requested: str | None = None) -> None:
    """OpenDiTError when `nproc` local processes would need more GPUs than this node shows: every rank needs its own
    GPU (NCCL refuses two ranks on one device), and running the job on CPU instead is asked for with --device cpu,
    never done silently. No GPU at all (a CPU machine) is fine: the job runs on CPU with gloo."""
    if requested is not None and requested.startswith("cpu"):
        return
    gpus = visible_gpus()
    if (gpus > 0 or (requested or "").startswith("cuda")) and gpus < nproc and not pinned_one_gpu():
        raise OpenDiTError(
            f"{nproc} processes on this node need {nproc} GPUs (one each), but {gpus} are visible; use --nproc "
            f"{max(gpus, 1)} (or torchrun --nproc-per-node {max(gpus, 1)}), or --device cpu to run on CPU with gloo"
        )


def pick_device(requested: str | None = None) -> tuple[torch.device, str]:
    """(device, backend) for this worker: cuda:LOCAL_RANK + NCCL when every local rank has a GPU, CPU + gloo on a
    machine without GPUs or with --device cpu; fewer GPUs than local processes is an error (check_visible_gpus)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if requested is not None and requested.startswith("cpu"):
        return torch.device("cpu"), "gloo"
    check_visible_gpus(local_world, requested)
    if visible_gpus() > 0:
        return torch.device("cuda", rank_gpu_index()), "nccl"
    return torch.device("cpu"), "gloo"


def single_device(requested: str | None = None) -> torch.device:
    """The device of a one-process engine: --device as given (default cuda when available, else cpu). A CUDA device
    becomes the current device (torch.cuda.set_device), so streams, events and the traces' CUDA timings of
    `--device cuda:N` are on GPU N, not on GPU 0."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


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


FAULT_PHASES = ("encode", "decode")  # the phases OPENDIT_FAULT_INJECT's phase= names (besides a denoising step)


def parse_fault(spec: str | None) -> tuple[int, int | str] | None:
    """'rank=1,step=2' -> (1, 2); 'rank=1,phase=decode' -> (1, 'decode'); None/'' -> None."""
    if not spec:
        return None
    try:
        parts = dict(item.split("=", 1) for item in spec.split(","))
        if "phase" in parts and parts["phase"] in FAULT_PHASES and "step" not in parts:
            return int(parts["rank"]), parts["phase"]
        return int(parts["rank"]), int(parts["step"])
    except (KeyError, ValueError) as exc:
        raise OpenDiTError(
            f"{ENV_FAULT}={spec!r} is malformed; expected e.g. 'rank=1,step=2' or 'rank=1,phase=encode' (phases: "
            f"{', '.join(FAULT_PHASES)})"
        ) from exc


def inject_phase_fault(phase: str) -> None:
    """TEST HOOK: raise InjectedFault if OPENDIT_FAULT_INJECT names this rank and `phase` (a no-op otherwise: one
    environment read)."""
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return
    fault, rank = parse_fault(spec), global_rank()
    if fault == (rank, phase):
        raise InjectedFault(f"injected fault on rank {rank} during {phase} ({ENV_FAULT}={spec})")
