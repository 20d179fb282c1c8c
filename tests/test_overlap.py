"""Overlapped communication paths against single-process attention (fp32 <= 1e-5), their byte and call counts, and
the synchronous measurement mode (`Comm.sync`) that the scaling benchmark uses to compute the hidden fraction.

Paths: Ulysses overlap (K/V before Q, head-group pipelining, 1..3 groups), FastSeq's chunked all-gather, ring's
K/V prefetch, each also with every async op forced synchronous (same result, bit for bit), and with bf16 on the wire
(half the bytes, small measured error). World 2 splits 17 tokens 9/8; world 3 splits 13 tokens 5/4/4 and 7 heads 3/2/2.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError
from opendit.models.attention import SelfAttention
from opendit.parallel.attention.fastseq import FastSeqAttention, fastseq_bytes
from opendit.parallel.attention.ring import RingAttention, ring_bytes
from opendit.parallel.attention.ulysses import ulysses_bytes
from opendit.parallel.attention.ulysses_overlap import (
    UlyssesOverlapAttention,
    overlap_head_groups,
    ulysses_overlap_calls,
)
from opendit.parallel.sequence import offsets, split_sizes

TOL = 1e-5
CASES = {2: (2, 17, 6, 8), 3: (2, 13, 7, 8)}  # world -> (batch, tokens, heads, head_dim)
VARIANTS = [(1, True), (1, False), (2, True), (3, False)]  # (chunks, kv_first)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _shard(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return t[:, offsets(sizes)[rank] : offsets(sizes)[rank] + sizes[rank]]  # (B, S_r, ...)


def _run(comm: Comm, fn):
    """(output, {kind: (calls, bytes)}, total wait seconds) of one call."""
    comm.stats.reset()
    out = fn()
    snap = comm.stats.snapshot()
    return out, {k: (v["calls"], v["bytes"]) for k, v in snap.items()}, sum(v["wait_s"] for v in snap.values())


def _run_async_and_sync(comm: Comm, fn):
    """(output, comm stats, output with every collective completed before the next compute, its stats, its wait)."""
    out, stats, _ = _run(comm, fn)
    comm.sync = True
    try:
        out_sync, stats_sync, wait = _run(comm, fn)
    finally:
        comm.sync = False
    return out, stats, out_sync, stats_sync, wait


def _overlap_worker(rank: int, world: int) -> dict:
    b, s, h, d = CASES[world]
    group = dist.new_group(list(range(world)))
    comm = Comm(group)
    sizes = split_sizes(s, world)
    torch.manual_seed(0)
    module = SelfAttention(h * d, h)
    plain = copy.deepcopy(module)
    x = torch.randn(b, s, h * d, generator=torch.Generator().manual_seed(1))  # (B, S, C), same on every rank
    xr = _shard(x, sizes, rank)
    res: dict = {"err": {}, "comm": {}, "same_sync": {}, "wait": {}}
    with torch.no_grad():
        want = _shard(plain(x), sizes, rank)  # (B, S_r, C)
        a2a = ulysses_bytes(sizes, b, h, d, rank=rank)
        for chunks, kv_first in VARIANTS:
            name = f"ulysses_overlap chunks={chunks} kv_first={kv_first}"
            UlyssesOverlapAttention.install(module, comm, sizes, chunks=chunks, kv_first=kv_first)
            # sync: same messages, each completed before the next compute: identical numbers
            out, stats, out_sync, stats_sync, wait = _run_async_and_sync(comm, lambda: module(xr))
            res["err"][name] = max_rel(out, want)
            res["comm"][name] = (stats, {"all_to_all": (ulysses_overlap_calls(world, h, chunks, kv_first), a2a)})
            res["same_sync"][name] = torch.equal(out, out_sync) and stats == stats_sync
            res["wait"][name] = wait

        # bf16 on the wire: half the bytes, a small but real error
        half = Comm(group, comm_dtype=torch.bfloat16)
        UlyssesOverlapAttention.install(module, half, sizes)
        out16, stats16, _ = _run(half, lambda: module(xr))
        res["bf16_err"] = max_rel(out16, want)
        res["comm"]["ulysses_overlap bf16"] = (
            stats16,
            {"all_to_all": (ulysses_overlap_calls(world, h), ulysses_bytes(sizes, b, h, d, rank=rank, itemsize=2))},
        )
        UlyssesOverlapAttention.uninstall(module)
        res["err"]["uninstalled"] = max_rel(module(x), plain(x))
        res["keys"] = list(module.state_dict()) == list(plain.state_dict())

        # FastSeq (chunked all-gather under the QKV matmul) and ring (K/V prefetch): async vs forced sync
        FastSeqAttention.install(module, comm, sizes, chunks=2)
        out, stats, out_sync, _, wait = _run_async_and_sync(comm, lambda: module(xr))
        res["err"]["fastseq"] = max_rel(out, want)
        res["same_sync"]["fastseq"] = torch.equal(out, out_sync)
        res["wait"]["fastseq"] = wait
        total = sum(v[1] for v in stats.values())
        res["comm"]["fastseq"] = ({"total": total}, {"total": fastseq_bytes(sizes, b, h, d, rank=rank)})
        FastSeqAttention.uninstall(module)

        module.core = RingAttention(comm, sizes)
        out, stats, out_sync, _, wait = _run_async_and_sync(comm, lambda: module(xr))
        res["err"]["ring"] = max_rel(out, want)
        res["same_sync"]["ring"] = torch.equal(out, out_sync)
        res["wait"]["ring"] = wait
        res["comm"]["ring"] = (stats, {"p2p": (world - 1, ring_bytes(sizes, b, h, d, rank=rank))})

        try:  # the full sequence instead of this rank's shard: a helpful error, not a shape error inside
            UlyssesOverlapAttention(plain, comm, sizes)(x)
            res["bad"] = None
        except OpenDiTError as err:
            res["bad"] = str(err)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_overlapped_paths_match_single_process(world):
    results = run_distributed(_overlap_worker, world)
    for rank, res in enumerate(results):
        for name, err in res["err"].items():
            assert err <= TOL, f"world {world} rank {rank} {name}: max relative error {err:.3g} > {TOL}"
        for name, (got, want) in res["comm"].items():
            assert got == want, f"world {world} rank {rank} {name}: recorded {got} != analytic {want}"
        for name, same in res["same_sync"].items():
            assert same, f"world {world} rank {rank} {name}: forced-sync run differs from the overlapped run"
        for name, wait in res["wait"].items():
            assert wait > 0, f"world {world} rank {rank} {name}: sync mode recorded no wait time"
        assert 1e-4 < res["bf16_err"] < 2e-2, res["bf16_err"]
        assert res["keys"]
        assert res["bad"] is not None and "seq_sizes" in res["bad"], res["bad"]


def test_head_groups_cover_every_head_once():
    assert overlap_head_groups(16, 2, 2) == [[4, 4], [4, 4]]
    assert overlap_head_groups(7, 3, 5) == [[2, 1, 1], [1, 1, 1]]  # capped at the smallest rank's 2 heads
    assert overlap_head_groups(4, 3, 2) == [[2, 1, 1]]  # a rank with one head: one group
    for heads, parts, chunks in ((16, 2, 3), (6, 4, 2), (28, 8, 4)):
        groups = overlap_head_groups(heads, parts, chunks)
        per_rank = [sum(g[j] for g in groups) for j in range(parts)]
        assert per_rank == split_sizes(heads, parts) and all(n >= 1 for g in groups for n in g)
    assert ulysses_overlap_calls(1, 16) == 0
    assert ulysses_overlap_calls(2, 16, chunks=2, kv_first=True) == 6
    assert ulysses_overlap_calls(2, 16, chunks=1, kv_first=False) == 2  # = packed Ulysses
    with pytest.raises(OpenDiTError, match="chunks"):
        overlap_head_groups(16, 2, 0)
    with pytest.raises(OpenDiTError, match="ulysses <= 2"):
        overlap_head_groups(2, 3, 1)
    fake = SimpleNamespace(rank=0, size=2)
    with pytest.raises(OpenDiTError, match="SelfAttention"):
        UlyssesOverlapAttention(torch.nn.Linear(4, 4), fake, [2, 2])
