"""The parallel runtime: one torch DeviceMesh of a ParallelConfig over the world (or a subset of it), per-dim Comms.

This is the only place that knows about the mesh. Everything below it (parallelize, the attention kernels, the
sequence split/gather modules) receives a `Comm` for one mesh dimension. A runtime may also cover just a subset of
the world (`ranks=`), which is how one 4-process test world checks plans of 2, 3 and 4 ranks. The process
environment (rank, device, default process group, fault hook) is opendit.distributed.env.

Mesh layout (outermost -> innermost): pipefusion, dp, cfg, ring, ulysses, tp, as ParallelConfig documents; mesh index
i (the position in `ranks`) is that mixed-radix number of its coordinates. `runtime.mesh` is a 6-D DeviceMesh of
shape (pipefusion, dp, cfg, ring, ulysses, tp), size-1 dims included, named as MESH_DIMS.
Groups (`runtime.comms`):
- one per mesh dimension whose degree is > 1 (ranks that differ only in that coordinate): `mesh.get_group(name)`;
- "sp": ring x ulysses flattened (sequence index ring_i * ulysses + ulysses_i), where tokens are split and gathered.
  With both degrees > 1 it is a dist.new_group per (dp, cfg, tp) slice (DeviceMesh's `_flatten` is private API); with
  one of them > 1 it is that dimension's group (the same Comm object). `runtime.sp_mesh` is a 1-D DeviceMesh over it
  (for FSDP2 weight sharding);
- "all": every rank of the runtime (per-rank records at the end); the default group when the runtime is the world.
E.g. dp=2 x ring=2 x ulysses=2 over ranks 0..7: ulysses [0,1] [2,3] [4,5] [6,7]; ring [0,2] [1,3] [4,6] [5,7];
dp [0,4] [1,5] [2,6] [3,7]; sp [0,1,2,3] [4,5,6,7]; all [0..7].
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from opendit.distributed.comm import Comm, CommStats
from opendit.distributed.config import MESH_DIMS, ParallelConfig
from opendit.distributed.env import ENV_FAULT, parse_fault
from opendit.errors import OpenDiTError
from opendit.models.precision import parse_dtype

SP_DIMS = ("ring", "ulysses")  # the sequence-parallel dims; comm_dtype applies to these and "sp" only


def mesh_groups(plan: ParallelConfig, ranks: list[int]) -> dict[str, list[list[int]]]:
    """Global-rank lists of every group of every mesh dimension (degree > 1), plus "sp" and "all".

    ranks: global ranks in mesh order (len == plan.world_size).
    """
    shape = [getattr(plan, d) for d in MESH_DIMS]  # (pipefusion, dp, cfg, ring, ulysses, tp)
    mesh = torch.tensor(ranks).reshape(shape)  # of global ranks
    out: dict[str, list[list[int]]] = {}
    for axis, name in enumerate(MESH_DIMS):
        if shape[axis] > 1:
            out[name] = mesh.movedim(axis, -1).reshape(-1, shape[axis]).tolist()  # (others, degree)
    if plan.sp_degree > 1:
        # ranks that share (pipefusion, dp, cfg, tp): tp moved before ring, then (-1, ring * ulysses)
        out["sp"] = mesh.movedim(-1, MESH_DIMS.index("ring")).reshape(-1, plan.sp_degree).tolist()
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
    fault: tuple[int, int | str] | None = None  # (rank, denoising step or phase)
    mesh: DeviceMesh | None = None  # (pipefusion, dp, cfg, ring, ulysses, tp) over `ranks`, size-1 dims included
    sp_mesh: DeviceMesh | None = None  # 1-D over the "sp" group (FSDP2); None without sequence parallelism
    _exact: dict[str, Comm] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def group(self, name: str):
        """The process group of one mesh dimension ("dp", "cfg", "ring", "ulysses", "tp", "sp", "all"), or None."""
        comm = self.comms.get(name)
        return comm.group if comm is not None else None

    def exact(self, name: str) -> Comm | None:
        """A Comm over the same group that never changes the wire dtype: for results (model outputs, samples),
        which comm_dtype must not round; comm_dtype is for the activations inside attention only. Always an object
        of its own (same group and stats), so switching the activations' comm_dtype later never touches results."""
        comm = self.comms.get(name)
        if comm is None:
            return comm
        if name not in self._exact:
            self._exact[name] = Comm(comm.group, comm_dtype=None, stats=self.stats)
        return self._exact[name]


def _checked_ranks(plan: ParallelConfig, ranks: list[int] | None, world: int) -> list[int]:
    ranks = list(range(world)) if ranks is None else [int(r) for r in ranks]
    if len(ranks) != plan.world_size or len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
        raise OpenDiTError(
            f"plan {plan.describe()} needs {plan.world_size} distinct ranks of the {world}-process world, got {ranks}"
        )
    if ranks != sorted(ranks):
        # torch's new_group (and so DeviceMesh) orders a group's members by global rank: with unsorted ranks a
        # rank's position inside its groups would disagree with its mesh coordinates.
        raise OpenDiTError(
            f"runtime ranks must be in increasing order (mesh order = rank order), got {ranks}; "
            f"pass ranks={sorted(ranks)}"
        )
    return ranks


def _device_mesh(plan: ParallelConfig, ranks: list[int], device_type: str) -> DeviceMesh:
    """The MESH_DIMS DeviceMesh over `ranks`. COLLECTIVE over the whole world, subsets included.

    Rule (torch 2.13, torch/distributed/device_mesh.py): the constructor creates one group per row of every dimension
    (size-1 dims too, one single-rank group per rank) with dist.new_group, or with one dist.split_group per dimension
    on NCCL with a bound device; both must be entered by EVERY process of the world with the same mesh, in the same
    order, members or not. A process outside `ranks` therefore constructs the same mesh too: torch gives it no group
    (new_group -> NON_GROUP_MEMBER, split_group -> None), get_coordinate() is None and get_group() fails, so it only
    takes part in the creation and drops the mesh. A dimension spanning the whole world reuses the default group.
    """
    shape = [getattr(plan, d) for d in MESH_DIMS]
    return DeviceMesh(device_type, torch.tensor(ranks, dtype=torch.int).reshape(shape), mesh_dim_names=MESH_DIMS)


def _flat_sp_group(plan: ParallelConfig, groups: dict[str, list[list[int]]], me: int):
    """ring x ulysses flattened, when both are > 1: one dist.new_group per (dp, cfg) slice, members in sequence order
    (ring_i * ulysses + ulysses_i). Collective like _device_mesh: every process creates every slice, in mesh order.
    Returns this process's group, or None (single-dim sp, or outside the runtime)."""
    if plan.ring == 1 or plan.ulysses == 1:
        return None
    mine = None
    for members in groups["sp"]:
        group = dist.new_group(members)
        if me in members:
            mine = group
    return mine


def _coords(plan: ParallelConfig, index: int) -> dict[str, int]:
    coords, rest = {}, index
    for name in reversed(MESH_DIMS):  # innermost first: tp, ulysses, ring, cfg, dp, pipefusion
        coords[name] = rest % getattr(plan, name)
        rest //= getattr(plan, name)
    coords["sp"] = coords["ring"] * plan.ulysses + coords["ulysses"]
    return coords


def _local_groups(plan: ParallelConfig, mesh: DeviceMesh, sp_group, all_group) -> dict:
    """name -> this rank's ProcessGroup, for the dims of degree > 1, "sp" and "all"."""
    out = {name: mesh.get_group(name) for name in MESH_DIMS if getattr(plan, name) > 1}
    if plan.sp_degree > 1:
        out["sp"] = sp_group if sp_group is not None else out["ulysses" if plan.ulysses > 1 else "ring"]
    out["all"] = all_group
    return out


def build_runtime(
    plan: ParallelConfig,
    device: torch.device | str = "cpu",
    ranks: list[int] | None = None,
    stats: CommStats | None = None,
) -> Runtime | None:
    """Create the mesh, groups and Comms of `plan` over `ranks` (default: the whole world, increasing global ranks in
    mesh order). Collective: EVERY process of the world must call it with the same arguments (the rule of new_group
    and DeviceMesh, see _device_mesh); processes outside `ranks` get None."""
    if not dist.is_initialized():
        raise OpenDiTError("build_runtime needs an initialised process group; call init_from_env first")
    world = dist.get_world_size()
    ranks = _checked_ranks(plan, ranks, world)
    device = torch.device(device)
    me = dist.get_rank()
    groups = mesh_groups(plan, ranks)
    # Collective part, same order on every process: the mesh's groups, then the flattened sp groups, then "all".
    mesh = _device_mesh(plan, ranks, device.type)
    sp_group = _flat_sp_group(plan, groups, me)
    all_group = dist.group.WORLD if ranks == list(range(world)) else dist.new_group(ranks)
    if me not in ranks:
        return None
    members = {name: next(m for m in lists if me in m) for name, lists in groups.items()}
    comm_dtype = parse_dtype(plan.comm_dtype) if plan.comm_dtype else None
    stats = stats if stats is not None else CommStats()
    comms: dict[str, Comm | None] = {name: None for name in (*MESH_DIMS, "sp", "all")}
    for name, group in _local_groups(plan, mesh, sp_group, all_group).items():
        if dist.get_process_group_ranks(group) != members[name]:  # our layout and torch's must agree
            raise OpenDiTError(
                f"the {name!r} group of rank {me} holds ranks {dist.get_process_group_ranks(group)}, but the mesh "
                f"layout {MESH_DIMS} puts it with {members[name]}: torch {torch.__version__} lays "
                "DeviceMesh out differently from torch 2.13 (row-major); install torch 2.13, or report this"
            )
        if name == "sp" and sp_group is None:
            comms["sp"] = comms["ulysses" if plan.ulysses > 1 else "ring"]  # sp on one dimension: that dim's Comm
            continue
        # comm_dtype only for the sequence-parallel activations; cfg/dp/all carry results, always exact
        wire = comm_dtype if name in (*SP_DIMS, "sp") else None
        comms[name] = Comm(group, comm_dtype=wire, stats=stats)
    return Runtime(
        plan=plan,
        ranks=ranks,
        index=ranks.index(me),
        device=device,
        coords=_coords(plan, ranks.index(me)),
        comms=comms,
        stats=stats,
        group_ranks=members,
        fault=parse_fault(os.environ.get(ENV_FAULT)),
        mesh=mesh,
        sp_mesh=DeviceMesh.from_group(comms["sp"].group, device.type) if comms["sp"] is not None else None,
    )
