"""The same-host shared-memory transport (distributed/shm.py) against gloo: the same bytes for every collective shape,
many ops in flight waited out of order, slots that grow, and the errors it must give."""

import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError
from opendit.parallel.sequence import offsets, split_sizes


def _ops(comm: Comm, rank: int, world: int, seed: int) -> list[torch.Tensor]:
    """A mixed sequence of collectives (uneven, zero-size pieces, several in flight, waited out of order)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for it in range(6):
        b, s, h, d = 2, 11 + 3 * it, 3 + it % 4, 5
        seq, heads = split_sizes(s, world), split_sizes(h, world)
        so = offsets(seq)
        full = [torch.randn(b, s, h, d, generator=gen) for _ in range(3)]
        mine = [f[:, so[rank] : so[rank] + seq[rank]] for f in full]  # (B, S_r, H, D), non-contiguous views
        handles = [comm.all_to_all(m, 2, 1, heads, seq, async_op=True) for m in mine]  # 3 in flight
        handles.append(comm.all_gather(mine[0], 1, seq, async_op=True))  # a 4th, different kind
        order = [3, 1, 0, 2] if it % 2 else [0, 1, 2, 3]  # out-of-order waits
        got = {i: handles[i].wait() for i in order}
        out += [got[i] for i in range(4)]
        # same-dim all-to-all with zero-size pieces (rank i sends M[i][j] rows to rank j)
        m = [[(i + 2 * j + it) % 3 for j in range(world)] for i in range(world)]
        rows = torch.randn(sum(m[rank]), 4, generator=gen) + rank
        out.append(comm.all_to_all(rows, 0, 0, m[rank], [m[i][rank] for i in range(world)]))
        prev = (rank - 1) % world
        out.append(comm.ring_exchange(torch.full((rank + 1 + it, 3), float(rank)), (prev + 1 + it, 3)).wait())
        pair = (torch.randn(2, rank + 2, 3, generator=gen)[:, :, ::2], torch.full((2, rank + 2, 2), float(it)))
        out.append(comm.ring_exchange(pair, (2, 2, prev + 2, 2)).wait())  # K, V as one stacked message, strided
    big = torch.randn(3 << 18, generator=gen) + rank  # 3 MiB: larger than the first slots, which must grow
    out.append(comm.all_gather(big, 0, [big.numel()] * world))
    return out


def _shm_vs_gloo(rank: int, world: int, seed: int) -> dict:
    group = dist.new_group(list(range(world)))
    shm_comm = Comm(group)
    os.environ["OPENDIT_CPU_TRANSPORT"] = "gloo"
    gloo_comm = Comm(group)
    del os.environ["OPENDIT_CPU_TRANSPORT"]
    got = _ops(shm_comm, rank, world, seed)
    want = _ops(gloo_comm, rank, world, seed)
    diffs = [float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(got, want)]
    shapes_equal = all(a.shape == b.shape for a, b in zip(got, want))
    bytes_equal = shm_comm.stats.bytes == gloo_comm.stats.bytes and shm_comm.stats.calls == gloo_comm.stats.calls
    used = shm_comm._shm not in (None, False) and gloo_comm._shm is False
    slots = len(shm_comm._shm.slots) if used else 0
    return {"max_diff": max(diffs), "shapes": shapes_equal, "bytes": bytes_equal, "used": used, "slots": slots}


@pytest.mark.parametrize("world", [2, 3])
def test_shm_transport_delivers_what_gloo_delivers(world):
    for rank, res in enumerate(run_distributed(_shm_vs_gloo, world, 7 + world)):
        assert res["used"], f"rank {rank}: the shared-memory path was not taken (or gloo's was not)"
        assert res["shapes"] and res["max_diff"] == 0.0, f"rank {rank}: {res}"
        assert res["bytes"], f"rank {rank}: CommStats differ between the transports"
        assert 4 <= res["slots"] <= 16, f"rank {rank}: {res['slots']} slots for 4 ops in flight"


def _mismatched_order(rank: int, world: int) -> None:
    comm = Comm(dist.new_group(list(range(world))))
    x = torch.ones(2, 4)
    if rank == 1:  # rank 1 runs one all-gather more than rank 0 before the exchange both expect
        comm.all_gather(x, 0, [2] * world)
    comm.ring_exchange(x, (2, 4)).wait()
    comm.ring_exchange(x, (2, 4)).wait()


def test_shm_transport_names_a_mismatched_op_order():
    from dist_utils import DistributedError

    with pytest.raises(DistributedError, match="different orders"):
        run_distributed(_mismatched_order, 2, timeout=120)


def _disagreeing_sizes(rank: int, world: int) -> None:
    comm = Comm(dist.new_group(list(range(world))))
    x = torch.ones(3 if rank == 0 else 2, 4)
    comm.all_gather(x, 0, [3, 2] if rank == 0 else [2, 2])  # rank 1 expects 2 rows from rank 0, which sends 3


def test_shm_transport_refuses_disagreeing_sizes():
    from dist_utils import DistributedError

    with pytest.raises(DistributedError, match="disagree on the split sizes"):
        run_distributed(_disagreeing_sizes, 2, timeout=120)


def _unmappable_peer(rank: int, world: int) -> dict:
    from opendit.distributed import shm

    if rank == 1:  # this rank may not map its peer's memory (e.g. another user): every rank must fall back to gloo

        def refuse(*_args, **_kwargs):
            raise OpenDiTError("mapping refused (test)")

        shm._Segment.open_peer = classmethod(lambda cls, *a, **k: refuse())
    comm = Comm(dist.new_group(list(range(world))))
    x = torch.full((2, 3), float(rank))
    got = comm.all_gather(x, 0, [2] * world)
    return {
        "fell_back": comm._shm is False,
        "ok": bool((got == torch.arange(world).repeat_interleave(2)[:, None]).all()),
    }


def test_shm_transport_falls_back_to_gloo_on_every_rank_when_one_cannot_map():
    for rank, res in enumerate(run_distributed(_unmappable_peer, 2)):
        assert res == {"fell_back": True, "ok": True}, f"rank {rank}: {res}"
