"""The parallel runtime: process group from the environment, one mesh of groups from a ParallelConfig, per-dim Comms.

This is the only place that knows about the world. Everything below it (parallelize, the attention kernels, the
sequence split/gather modules) receives a `Comm` for one mesh dimension. A runtime may also cover just a subset of
the world (`ranks=`), which is how one 4-process test world checks plans of 2, 3 and 4 ranks.

Mesh layout (outermost -> innermost): dp, cfg, ring, ulysses, as ParallelConfig documents. Mesh index i (the position
in `ranks`) has coordinates i = ((dp_i * cfg + cfg_i) * ring + ring_i) * ulysses + ulysses_i. Groups:
- one per mesh dimension whose degree is > 1 (ranks that differ only in that coordinate);
- "sp": ring x ulysses flattened (sequence index ring_i * ulysses + ulysses_i), where tokens are split and gathered;
- "all": every rank of the runtime (per-rank records at the end).

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
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from opendit.distributed.comm import Comm, CommStats
from opendit.distributed.config import MESH_DIMS, ParallelConfig
from opendit.errors import OpenDiTError
from opendit.precision import parse_dtype

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


def mesh_groups(plan: ParallelConfig, ranks: list[int]) -> dict[str, list[list[int]]]:
    """Global-rank lists of every group of every mesh dimension (degree > 1), plus "sp" and "all".

    ranks: global ranks in mesh order (len == plan.world_size).
    """
    shape = [getattr(plan, d) for d in MESH_DIMS]  # (dp, cfg, ring, ulysses)
    mesh = torch.tensor(ranks).reshape(shape)  # (dp, cfg, ring, ulysses) of global ranks
    out: dict[str, list[list[int]]] = {}
    for axis, name in enumerate(MESH_DIMS):
        if shape[axis] > 1:
            out[name] = mesh.movedim(axis, -1).reshape(-1, shape[axis]).tolist()  # (others, degree)
    if plan.sp_degree > 1:
        out["sp"] = mesh.reshape(plan.dp * plan.cfg, plan.sp_degree).tolist()  # (dp*cfg, ring*ulysses)
    out["all"] = [list(ranks)]
    return out


@dataclass
class Runtime:
    """This rank's view of the mesh. `comms[name]` is None for a dimension of degree 1."""

    plan: ParallelConfig
    ranks: list[int]  # global ranks of the runtime, in mesh order
    index: int  # this process's position in `ranks` (its rank within the runtime)
    device: torch.device
    coords: dict[str, int]
    comms: dict[str, Comm | None]
    stats: CommStats
    group_ranks: dict[str, list[int]] = field(default_factory=dict)  # name -> global ranks of this rank's group
    fault: tuple[int, int] | None = None
    _exact: dict[str, Comm] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_output_rank(self) -> bool:
        return self.index == 0

    def group(self, name: str):
        """The process group of one mesh dimension ("dp", "cfg", "ring", "ulysses", "sp", "all"), or None."""
        comm = self.comms.get(name)
        return comm.group if comm is not None else None

    def exact(self, name: str) -> Comm | None:
        """A Comm over the same group that never changes the wire dtype: for results (model outputs, samples),
        which comm_dtype must not round; comm_dtype is for the activations inside attention only."""
        comm = self.comms.get(name)
        if comm is None or comm.comm_dtype is None:
            return comm
        if name not in self._exact:
            self._exact[name] = Comm(comm.group, comm_dtype=None, stats=self.stats)
        return self._exact[name]


def build_runtime(
    plan: ParallelConfig,
    device: torch.device | str = "cpu",
    ranks: list[int] | None = None,
    stats: CommStats | None = None,
) -> Runtime | None:
    """Create the groups and Comms of `plan` over `ranks` (default: the whole world). Collective: EVERY process of
    the world must call it with the same arguments (dist.new_group's rule); processes outside `ranks` get None."""
    if not dist.is_initialized():
        raise OpenDiTError("build_runtime needs an initialised process group; call init_from_env first")
    world = dist.get_world_size()
    ranks = list(range(world)) if ranks is None else [int(r) for r in ranks]
    if len(ranks) != plan.world_size or len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
        raise OpenDiTError(
            f"plan {plan.describe()} needs {plan.world_size} distinct ranks of the {world}-process world, got {ranks}"
        )
    me = dist.get_rank()
    comm_dtype = parse_dtype(plan.comm_dtype) if plan.comm_dtype else None
    stats = stats if stats is not None else CommStats()
    comms: dict[str, Comm | None] = {name: None for name in (*MESH_DIMS, "sp", "all")}
    group_ranks: dict[str, list[int]] = {}
    whole_world = ranks == list(range(world))
    for name, lists in mesh_groups(plan, ranks).items():
        if name == "sp" and plan.sp_degree in (plan.ulysses, plan.ring):
            continue  # sequence parallel on one dimension: "sp" is that dimension's group (filled below)
        for members in lists:
            # new_group is collective over the whole world: every process creates every group, in the same order.
            group = dist.group.WORLD if name == "all" and whole_world else dist.new_group(members)
            if me in members:
                # comm_dtype only for the sequence-parallel activations; cfg/dp/all carry results, always exact
                wire = comm_dtype if name in ("ulysses", "ring", "sp") else None
                comms[name] = Comm(group, comm_dtype=wire, stats=stats)
                group_ranks[name] = members
    if me not in ranks:
        return None
    if plan.sp_degree > 1 and comms["sp"] is None:
        alias = "ulysses" if plan.ulysses > 1 else "ring"
        comms["sp"], group_ranks["sp"] = comms[alias], group_ranks[alias]
    index = ranks.index(me)
    coords, rest = {}, index
    for name in reversed(MESH_DIMS):  # innermost first: ulysses, ring, cfg, dp
        coords[name] = rest % getattr(plan, name)
        rest //= getattr(plan, name)
    coords["sp"] = coords["ring"] * plan.ulysses + coords["ulysses"]
    return Runtime(
        plan=plan,
        ranks=ranks,
        index=index,
        device=torch.device(device),
        coords=coords,
        comms=comms,
        stats=stats,
        group_ranks=group_ranks,
        fault=parse_fault(os.environ.get(ENV_FAULT)),
    )
