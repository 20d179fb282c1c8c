"""build_runtime's DeviceMesh and groups: every plan's groups hold the ranks its coordinates say, over the whole world
and over subsets of it, and each group really reduces over exactly those ranks."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from opendit.distributed.config import MESH_DIMS, ParallelConfig
from opendit.errors import OpenDiTError

pytestmark = pytest.mark.slow  # spawns gloo processes

# (plan, ranks of the 4-process world it runs on; None = all of them)
CASES = [
    (ParallelConfig(dp=2, ulysses=2), None),
    (ParallelConfig(cfg=2, ring=2), None),
    (ParallelConfig(ring=2, ulysses=2, comm_dtype="bf16"), None),  # sp = ring x ulysses flattened
    (ParallelConfig(ulysses=2), [1, 3]),  # a subset: ranks 0 and 2 are outside
    (ParallelConfig(ring=3), [0, 1, 2]),  # a subset: rank 3 is outside
    (ParallelConfig(ulysses=2, tp=2), None),  # tp innermost: sp groups are the ranks tp apart
    (ParallelConfig(cfg=2, tp=2), None),
    (ParallelConfig(tp=2), [2, 3]),
    (ParallelConfig(pipefusion=4), None),  # stages outermost
]


def _coords(plan: ParallelConfig, index: int) -> dict[str, int]:
    """Mesh coordinates of position `index`, written out independently of opendit's own helper."""
    t = index % plan.tp
    u = index // plan.tp % plan.ulysses
    r = index // (plan.tp * plan.ulysses) % plan.ring
    c = index // (plan.tp * plan.ulysses * plan.ring) % plan.cfg
    d = index // (plan.tp * plan.ulysses * plan.ring * plan.cfg) % plan.dp
    f = index // (plan.tp * plan.ulysses * plan.ring * plan.cfg * plan.dp)
    return {"pipefusion": f, "dp": d, "cfg": c, "ring": r, "ulysses": u, "tp": t, "sp": r * plan.ulysses + u}


def expected_members(plan: ParallelConfig, ranks: list[int], index: int) -> dict[str, list[int]]:
    """Global ranks sharing every coordinate but one (ordered by that one): the group of each dimension; "sp" shares
    dp, cfg and tp, ordered by the sequence index; "all" is the runtime."""
    me = _coords(plan, index)
    coords = [_coords(plan, j) for j in range(len(ranks))]
    out = {}
    for name in MESH_DIMS:
        same = [j for j in range(len(ranks)) if all(coords[j][o] == me[o] for o in MESH_DIMS if o != name)]
        out[name] = [ranks[j] for j in sorted(same, key=lambda j: coords[j][name])]
    same_slice = [j for j in range(len(ranks)) if all(coords[j][o] == me[o] for o in ("pipefusion", "dp", "cfg", "tp"))]
    out["sp"] = [ranks[j] for j in sorted(same_slice, key=lambda j: coords[j]["sp"])]
    out["all"] = list(ranks)
    return out


def _mesh_worker(rank: int, world: int) -> list:
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.sharding import _as_mesh

    results = []
    for plan, ranks in CASES:
        runtime = build_runtime(plan, "cpu", ranks=ranks)  # collective: every process, every case
        if runtime is None:
            results.append(None)
            continue
        mesh = runtime.mesh
        res = {
            "dim_names": mesh.mesh_dim_names,
            "shape": tuple(mesh.shape),
            "coordinate": mesh.get_coordinate(),
            "coords": runtime.coords,
            "mesh_members": {d: dist.get_process_group_ranks(mesh.get_group(d)) for d in MESH_DIMS},
            "members": {},
            "sums": {},
            "group_ranks": runtime.group_ranks,
            "wire": {},
        }
        for name in (*MESH_DIMS, "sp", "all"):  # same order on every rank: each collective meets its whole group
            comm = runtime.comms[name]
            if comm is None:
                continue
            res["members"][name] = dist.get_process_group_ranks(runtime.group(name))
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=runtime.group(name))
            res["sums"][name] = int(total.item())
            res["wire"][name] = comm.comm_dtype
        sp = runtime.sp_mesh
        res["sp_mesh"] = None if sp is None else (sp.ndim, sp.mesh.tolist(), _as_mesh(sp, "cpu") is sp)
        if runtime.comms["sp"] is not None:  # a Comm still turns into an equivalent 1-D mesh for FSDP2
            res["sp_from_comm"] = _as_mesh(runtime.comms["sp"], "cpu").mesh.tolist()
        results.append(res)
    try:  # unsorted ranks are refused before any collective, identically on every process
        build_runtime(ParallelConfig(ulysses=2), "cpu", ranks=[3, 1])
        results.append("accepted")
    except OpenDiTError as err:
        results.append(str(err))
    return results


def test_runtime_groups_follow_the_mesh_coordinates_on_the_world_and_on_subsets():
    per_rank = run_distributed(_mesh_worker, 4, timeout=60)
    for rank, results in enumerate(per_rank):
        assert "pass ranks=[1, 3]" in results[-1]
        for (plan, ranks), res in zip(CASES, results[:-1]):
            ranks = list(range(4)) if ranks is None else ranks
            if rank not in ranks:
                assert res is None, (rank, plan)
                continue
            index = ranks.index(rank)
            expect = expected_members(plan, ranks, index)
            assert res["dim_names"] == ("pipefusion", "dp", "cfg", "ring", "ulysses", "tp")
            assert res["shape"] == tuple(getattr(plan, d) for d in MESH_DIMS)  # size-1 dims included
            assert res["coordinate"] == tuple(_coords(plan, index)[d] for d in MESH_DIMS)
            assert res["coords"] == _coords(plan, index)
            assert res["mesh_members"] == {d: expect[d] for d in MESH_DIMS}, (rank, plan)
            live = [d for d in MESH_DIMS if getattr(plan, d) > 1] + (["sp"] if plan.sp_degree > 1 else []) + ["all"]
            assert sorted(res["members"]) == sorted(live), (rank, plan)
            for name in live:
                assert res["members"][name] == expect[name], (rank, plan, name)  # "sp": in sequence order
                assert res["group_ranks"][name] == expect[name], (rank, plan, name)
                assert res["sums"][name] == sum(expect[name]), (rank, plan, name)
                wire = torch.bfloat16 if plan.comm_dtype and name in ("ring", "ulysses", "sp") else None
                assert res["wire"][name] == wire, (rank, plan, name)
            if plan.sp_degree > 1:
                assert res["sp_mesh"] == (1, expect["sp"], True)
                assert res["sp_from_comm"] == expect["sp"]
            else:
                assert res["sp_mesh"] is None
