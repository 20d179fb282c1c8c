"""The communication layer: every collective against what it must deliver, exactly, and its byte accounting."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from opendit.distributed.comm import Comm, CommStats
from opendit.errors import OpenDiTError
from opendit.parallel.sequence import offsets, split_sizes


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b|, or inf on a shape/dtype mismatch (so a wrong shape can never pass as 'close')."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


def _comm_worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    comm = Comm(group)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"diff": {}, "bytes": {}, "errors": []}
    b, s, h, d = 2, 7, 5, 3
    seq, heads = split_sizes(s, world), split_sizes(h, world)  # world 3: [3, 2, 2], [2, 2, 1]
    so, ho = offsets(seq), offsets(heads)
    full = torch.randn(b, s, h, d, generator=gen)  # same everywhere (same seed)
    mine = full[:, so[rank] : so[rank] + seq[rank]]  # (B, S_r, H, D), a non-contiguous view when B > 1
    my_heads = full[:, :, ho[rank] : ho[rank] + heads[rank]]  # (B, S, H_r, D)
    item = 4

    # all_to_all seq -> heads and back, uneven both ways, non-contiguous input
    comm.stats.reset()
    out = comm.all_to_all(mine, 2, 1, heads, seq)
    res["diff"]["a2a_seq_to_heads"] = _diff(out, my_heads)
    back = comm.all_to_all(out, 1, 2, seq, heads)
    res["diff"]["a2a_heads_to_seq"] = _diff(back, mine)
    fwd = b * d * seq[rank] * (h - heads[rank]) * item  # what this rank sends to the others' heads
    sent = fwd + b * d * heads[rank] * (s - seq[rank]) * item  # ... plus its heads of the others' tokens
    res["bytes"]["a2a"] = (comm.stats.bytes["all_to_all"], sent, comm.stats.calls["all_to_all"], 2)

    # packed: three tensors in one message, async
    comm.stats.reset()
    handle = comm.all_to_all([mine, 2 * mine, mine + 1], 2, 1, heads, seq, async_op=True)
    q, k, v = handle.wait()
    res["diff"]["a2a_packed"] = max(_diff(q, my_heads), _diff(k, 2 * my_heads), _diff(v, my_heads + 1))
    res["bytes"]["a2a_packed"] = (
        comm.stats.bytes["all_to_all"],
        3 * b * d * seq[rank] * (h - heads[rank]) * item,
        comm.stats.calls["all_to_all"],
        1,
    )

    # same-dim all-to-all with an arbitrary send matrix M[i][j] (rows rank i sends to rank j, zeros included)
    m = [[(i + 2 * j) % 3 for j in range(world)] for i in range(world)]
    rows = torch.cat([torch.full((m[rank][j], 2), float(10 * rank + j)) for j in range(world)])  # (sum_j M[r][j], 2)
    got = comm.all_to_all(rows.t(), 1, 1, m[rank], [m[i][rank] for i in range(world)])  # dim 1 of a (2, N) view
    want = torch.cat([torch.full((m[i][rank], 2), float(10 * i + rank)) for i in range(world)]).t()
    res["diff"]["a2a_same_dim"] = _diff(got, want)

    # all_gather: uneven along dim 1, even along dim 0, async
    comm.stats.reset()
    res["diff"]["gather_uneven"] = _diff(comm.all_gather(mine, 1, seq), full)
    even = full.reshape(-1)[: world * 4].reshape(world, 4)  # (P, 4): row r on rank r
    handle = comm.all_gather(even[rank : rank + 1], 0, [1] * world, async_op=True)
    res["diff"]["gather_even_async"] = _diff(handle.wait(), even)
    res["bytes"]["all_gather"] = (
        comm.stats.bytes["all_gather"],
        ((world - 1) * mine.numel() + (world - 1) * 4) * item,
        comm.stats.calls["all_gather"],
        2,
    )

    # ring exchange: uneven shapes (rank r sends (r+1, 2) filled with r), async
    comm.stats.reset()
    prev = (rank - 1) % world
    handle = comm.ring_exchange(torch.full((rank + 1, 2), float(rank)), (prev + 1, 2))
    res["diff"]["ring"] = _diff(handle.wait(), torch.full((prev + 1, 2), float(prev)))
    res["bytes"]["p2p"] = (comm.stats.bytes["p2p"], (rank + 1) * 2 * item, comm.stats.calls["p2p"], 1)

    # broadcast from the last rank
    comm.stats.reset()
    t = torch.full((3,), float(rank))
    comm.broadcast(t, src=world - 1)
    res["diff"]["broadcast"] = _diff(t, torch.full((3,), float(world - 1)))
    res["bytes"]["broadcast"] = (
        comm.stats.bytes["broadcast"],
        3 * item * (world - 1) if rank == world - 1 else 0,
        comm.stats.calls["broadcast"],
        1,
    )

    # comm_dtype=bf16: half the bytes, values rounded through bf16, fp32 result; bf16 data passes unchanged
    half = Comm(group, comm_dtype=torch.bfloat16)
    out16 = half.all_to_all(mine, 2, 1, heads, seq)
    res["diff"]["bf16_a2a"] = _diff(out16, my_heads.bfloat16().float())
    res["bf16_a2a_err"] = _diff(out16, my_heads)
    res["bytes"]["bf16_a2a"] = (half.stats.bytes["all_to_all"], fwd // 2, 1, 1)  # 2-byte elements: half
    g16 = half.all_gather(mine, 1, seq)
    res["diff"]["bf16_gather"] = _diff(g16, full.bfloat16().float())
    ring16 = half.ring_exchange(torch.full((2,), 1.0 / 3 + rank), (2,)).wait()
    res["diff"]["bf16_ring"] = _diff(ring16, torch.full((2,), 1.0 / 3 + prev).bfloat16().float())
    already = half.all_gather(mine.bfloat16(), 1, seq)
    res["diff"]["bf16_input"] = _diff(already, full.bfloat16())

    # bad input -> OpenDiTError with a message that says what to do
    for bad in (
        lambda: comm.all_to_all(mine, 2, 1, heads[:-1], seq),  # one size missing
        lambda: comm.all_to_all(mine, 2, 1, heads, [s] * world),  # gather size != local shape
        lambda: comm.all_gather(mine, 1, [1] * world),  # local shape != sizes[rank]
        lambda: comm.all_to_all([mine, mine[:, :, :1]], 2, 1, heads, seq),  # packing different shapes
        lambda: Comm(None),
    ):
        try:
            bad()
            res["errors"].append(None)
        except OpenDiTError as err:
            res["errors"].append(str(err))
    return res


@pytest.mark.slow
def test_collectives_world3_exact_and_counted():
    results = run_distributed(_comm_worker, 3)
    for rank, res in enumerate(results):
        for name, diff in res["diff"].items():
            assert diff == 0.0, f"rank {rank} {name}: max |diff| {diff}"
        for name, (got_bytes, want_bytes, got_calls, want_calls) in res["bytes"].items():
            assert got_bytes == want_bytes, f"rank {rank} {name}: recorded {got_bytes} B, expected {want_bytes} B"
            assert got_calls == want_calls, f"rank {rank} {name}: {got_calls} calls, expected {want_calls}"
        assert 0 < res["bf16_a2a_err"] < 2e-2, res["bf16_a2a_err"]  # bf16 really rounds, and only a little
        assert all(res["errors"]), f"rank {rank}: some bad input raised no OpenDiTError: {res['errors']}"
        assert "split_sizes" in res["errors"][0] and "gather_sizes" in res["errors"][1]
        assert "explicit process group" in res["errors"][4]


def test_comm_stats_snapshot_reset_and_steps():
    stats = CommStats()
    stats.record("all_to_all", 100)
    stats.record("all_to_all", 50)
    stats.record("p2p", 8)
    assert stats.total_bytes == 158 and stats.total_calls == 3
    snap = stats.end_step()
    assert snap["all_to_all"]["calls"] == 2 and snap["all_to_all"]["bytes"] == 150 and snap["p2p"]["bytes"] == 8
    assert stats.total_bytes == 0 and stats.snapshot() == {}
    stats.record("p2p", 4)
    stats.end_step()
    assert [h["p2p"]["bytes"] for h in stats.history] == [8, 4]


def test_comm_needs_an_initialised_group():
    with pytest.raises(OpenDiTError, match="explicit process group"):
        Comm(None)
    if not dist.is_initialized():
        with pytest.raises(OpenDiTError, match="init_process_group"):
            Comm(object())


def _raise_on_rank1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever for rank 1: the helper must end it


def _sleep_forever(rank: int, world: int) -> None:
    import time

    time.sleep(3600)


@pytest.mark.slow
def test_dist_utils_propagates_the_error_and_times_out():
    from dist_utils import DistributedError

    with pytest.raises(DistributedError, match="boom on rank 1") as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    assert "Traceback" in str(info.value) and "_raise_on_rank1" in str(info.value)
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(_sleep_forever, 1, timeout=8)
