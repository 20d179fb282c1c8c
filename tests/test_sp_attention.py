"""Sequence-parallel attention kernels (Ulysses, ring, USP, FastSeq) against single-process attention, with their
analytic byte counts; the ring's log-sum-exp merge; uneven splits; bad inputs."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from helpers import hybrid_bytes, ring_calls
from opendit.distributed.comm import Comm, CommStats
from opendit.errors import OpenDiTError
from opendit.models.attention import SelfAttention, local_attention
from opendit.parallel.attention.fastseq import (
    FastSeqAttention,
    chunk_plan,
    fastseq_bytes,
    fastseq_calls,
    qkv_head_slice,
)
from opendit.parallel.attention.ring import (
    RingAttention,
    attention_math_lse,
    attention_with_lse,
    merge_attention,
    ring_bytes,
)
from opendit.parallel.attention.ulysses import UlyssesAttention, head_sizes, ulysses_bytes, ulysses_calls
from opendit.parallel.attention.usp import HybridAttention, group_sizes
from opendit.parallel.sequence import TokenGather, TokenShard, offsets, split_sizes

TOL = 1e-5  # max relative error, fp32


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (inf on a shape mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# world size -> (batch, tokens, heads, head_dim); 3 and 4 split neither tokens nor heads evenly
CASES = {2: (2, 16, 4, 8), 3: (2, 13, 4, 8), 4: (2, 18, 6, 8)}


def _qkv(b: int, s: int, h: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen) for _ in range(3))  # (B, S, H, D) x3, same on every rank


def _shard(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return t[:, offsets(sizes)[rank] : offsets(sizes)[rank] + sizes[rank]]  # (B, S_r, ...)


def _measure(comm: Comm, fn):
    comm.stats.reset()
    out = fn()
    snap = comm.stats.snapshot()
    return out, {k: (v["calls"], v["bytes"]) for k, v in snap.items()}


def _kernels_worker(rank: int, world: int) -> dict:
    b, s, h, d = CASES[world]
    comm = Comm(dist.new_group(list(range(world))))
    res: dict = {"err": {}, "comm": {}}
    sizes = split_sizes(s, world)
    q, k, v = _qkv(b, s, h, d, seed=1)
    ref = _shard(local_attention(q, k, v), sizes, rank)  # (B, S_r, H, D), full attention then this rank's rows
    ql, kl, vl = (_shard(t, sizes, rank) for t in (q, k, v))

    # Ulysses, packed (2 calls) and classic (4 calls), uneven tokens and heads
    for pack in (True, False):
        out, stats = _measure(comm, lambda pack=pack: UlyssesAttention(comm, sizes, pack_qkv=pack)(ql, kl, vl))
        res["err"][f"ulysses_pack={pack}"] = max_rel(out, ref)
        res["comm"][f"ulysses_pack={pack}"] = (
            stats,
            {"all_to_all": (ulysses_calls(world, pack), ulysses_bytes(sizes, b, h, d, rank=rank))},
        )

    # Ring, fused lse kernel and the pure-torch path
    out, stats = _measure(comm, lambda: RingAttention(comm, sizes)(ql, kl, vl))
    res["err"]["ring"] = max_rel(out, ref)
    res["comm"]["ring"] = (stats, {"p2p": (ring_calls(world), ring_bytes(sizes, b, h, d, rank=rank))})
    res["err"]["ring_math_lse"] = max_rel(RingAttention(comm, sizes, attn=attention_math_lse)(ql, kl, vl), ref)

    # comm_dtype=bf16 halves the bytes, error small but real
    half = Comm(comm.group, comm_dtype=torch.bfloat16)
    out16 = UlyssesAttention(half, sizes)(ql, kl, vl)
    res["bf16_err"] = max_rel(out16, ref)
    res["comm"]["ulysses_bf16"] = (
        {k: (v["calls"], v["bytes"]) for k, v in half.stats.snapshot().items()},
        {"all_to_all": (2, ulysses_bytes(sizes, b, h, d, rank=rank, itemsize=2))},
    )

    # FastSeq against the unmodified module, 1..3 all-gather chunks, then after an in-place weight change
    torch.manual_seed(2)
    module = SelfAttention(h * d, h)
    plain = copy.deepcopy(module)
    x = torch.randn(b, s, h * d, generator=torch.Generator().manual_seed(3))  # (B, S, C)
    with torch.no_grad():
        want = _shard(plain(x), sizes, rank)
        for chunks in (1, 2, 3):
            FastSeqAttention.install(module, comm, sizes, chunks=chunks)
            out, stats = _measure(comm, lambda: module(_shard(x, sizes, rank)))
            res["err"][f"fastseq_chunks={chunks}"] = max_rel(out, want)
            gather_bytes = (world - 1) * b * sizes[rank] * h * d * 4  # this rank's x to every other rank
            total = fastseq_bytes(sizes, b, h, d, rank=rank)
            calls = fastseq_calls(sizes, chunks)
            res["comm"][f"fastseq_chunks={chunks}"] = (
                stats,
                {"all_gather": (calls["all_gather"], gather_bytes), "all_to_all": (1, total - gather_bytes)},
            )
        for m in (module, plain):
            m.qkv.weight.mul_(0.5)  # the cached head slice must notice
        res["err"]["fastseq_after_weight_change"] = max_rel(
            module(_shard(x, sizes, rank)), _shard(plain(x), sizes, rank)
        )
        FastSeqAttention.uninstall(module)
        res["err"]["uninstalled"] = max_rel(module(x), plain(x))
    res["state_keys_unchanged"] = list(module.state_dict()) == list(plain.state_dict())

    # TokenShard / TokenGather round trip
    shard, gather = TokenShard(comm, sizes), TokenGather(comm, sizes)
    tokens = torch.randn(b, s, 5)
    res["err"]["shard_gather"] = max_rel(gather(shard(tokens)), tokens)

    # bad inputs: a helpful OpenDiTError, not a hang or a shape error deep inside
    res["bad"] = []
    for bad in (
        lambda: UlyssesAttention(comm, sizes)(q, k, v),  # full sequence instead of this rank's shard
        lambda: RingAttention(comm, sizes)(q, k, v),
        lambda: UlyssesAttention(comm, sizes[:-1]),  # one size per rank missing
        lambda: TokenShard(comm, sizes)(torch.zeros(b, s + 1, 5)),
    ):
        try:
            bad()
            res["bad"].append(None)
        except OpenDiTError as err:
            res["bad"].append(str(err))

    if world == 4:  # USP 2 (ulysses, inner) x 2 (ring): r = ring_idx * 2 + ulysses_idx
        u_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        r_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        stats = CommStats()
        u_comm = Comm(u_groups[rank // 2], stats=stats)
        r_comm = Comm(r_groups[rank % 2], stats=stats)
        hh = 3  # heads 2, 1 over the Ulysses pair; tokens 5, 5, 4, 4 -> ring blocks 10, 8
        q3, k3, v3 = _qkv(b, s, hh, d, seed=4)
        ref3 = _shard(local_attention(q3, k3, v3), sizes, rank)
        out = HybridAttention(u_comm, r_comm, sizes)(*(_shard(t, sizes, rank) for t in (q3, k3, v3)))
        res["err"]["usp_2x2"] = max_rel(out, ref3)
        res["comm"]["usp_2x2"] = (
            {"total": stats.total_bytes, "calls": stats.snapshot()["all_to_all"]["calls"]},
            {"total": hybrid_bytes(sizes, 2, 2, b, hh, d, rank=rank), "calls": 2},
        )
    return res


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_kernels_match_single_process(world):
    results = run_distributed(_kernels_worker, world)
    b, s, h, d = CASES[world]
    assert len(results) == world
    for rank, res in enumerate(results):
        for name, err in res["err"].items():
            assert err <= TOL, f"world {world} rank {rank} {name}: max relative error {err:.3g} > {TOL}"
        for name, (got, want) in res["comm"].items():
            assert got == want, f"world {world} rank {rank} {name}: recorded {got} != analytic {want}"
        assert 1e-4 < res["bf16_err"] < 2e-2, res["bf16_err"]
        assert res["state_keys_unchanged"]
        assert all(res["bad"]), f"rank {rank}: bad input raised no OpenDiTError: {res['bad']}"
        assert "seq_sizes" in res["bad"][0] and "seq_sizes" in res["bad"][1] and "split_sizes" in res["bad"][2]
    # the bf16 halving, summed over ranks, equals the fp32 formula / 2
    total16 = sum(r["comm"]["ulysses_bf16"][0]["all_to_all"][1] for r in results)
    assert total16 * 2 == ulysses_bytes(split_sizes(s, world), b, h, d)
    if world == 4:
        assert "usp_2x2" in results[0]["err"]


# ------------------------------------------------------------------------------------------ single-process tests
def test_split_sizes():
    assert split_sizes(13, 3) == [5, 4, 4]
    assert split_sizes(16, 4) == [4, 4, 4, 4]
    assert split_sizes(3, 3) == [1, 1, 1]
    assert split_sizes(10, 2, weights=[3, 1]) == [8, 2]  # 7.5 / 2.5: tie on the remainder -> lower rank
    assert split_sizes(10, 3, weights=[1, 0, 0]) == [8, 1, 1]  # every rank keeps >= 1 token
    assert sum(split_sizes(257, 4, weights=[1.3, 0.7, 1.0, 1.0])) == 257
    with pytest.raises(OpenDiTError, match="at most 2 ranks"):
        split_sizes(2, 3)
    with pytest.raises(OpenDiTError, match="weights"):
        split_sizes(10, 2, weights=[1.0])
    with pytest.raises(OpenDiTError, match="weights"):
        split_sizes(10, 2, weights=[-1.0, 2.0])
    assert head_sizes(4, 3) == [2, 1, 1]
    with pytest.raises(OpenDiTError, match="ulysses <= 2"):
        head_sizes(2, 3)


@pytest.mark.parametrize("lse_fn", [attention_with_lse, attention_math_lse])
def test_lse_merge_equals_full_attention(lse_fn):
    """Attend to uneven key blocks separately, merge by lse: the full attention, and the full log-sum-exp."""
    b, h, sq, d = 2, 3, 7, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, sq, d, generator=gen)
    k, v = torch.randn(b, h, 10, d, generator=gen) * 3, torch.randn(b, h, 10, d, generator=gen)  # * 3: peaky softmax
    scores = q @ k.transpose(-1, -2) / d**0.5  # (B, H, Sq, Sk)
    ref_out, ref_lse = torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)
    _, lse_full = lse_fn(q, k, v)
    assert (lse_full - ref_lse).abs().max() < 1e-5  # a zero or base-2 lse would fail here
    out = lse = None
    for start, n in ((3, 4), (0, 3), (7, 1), (8, 2)):  # uneven blocks, out of order (as around a ring)
        block = lse_fn(q, k[:, :, start : start + n], v[:, :, start : start + n])
        out, lse = merge_attention(out, lse, *block)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert max_rel(out, ref_out) <= TOL
    assert (lse - ref_lse).abs().max() < 1e-5


def test_lse_merge_bf16_inputs_merge_in_fp32():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    out = lse = None
    for sl in (slice(0, 2), slice(2, 6)):
        out, lse = merge_attention(
            out, lse, *attention_with_lse(q.bfloat16(), k[:, :, sl].bfloat16(), v[:, :, sl].bfloat16())
        )
    assert out.dtype == torch.float32
    assert max_rel(out, ref) < 2e-2


def test_byte_formulas_match_the_known_ratios():
    """Even split, per rank: Ulysses 4*B*S*C*(P-1)/P^2; FastSeq 0.75x Ulysses at P=2, 1.25x at P=4 (as published)."""
    b, s, h, d = 1, 64, 4, 8
    for p in (2, 4):
        sizes = split_sizes(s, p)
        assert ulysses_bytes(sizes, b, h, d, rank=0) == 4 * 4 * b * s * h * d * (p - 1) // p**2
        assert ring_bytes(sizes, b, h, d) == (p - 1) * 2 * b * s * h * d * 4
    assert fastseq_bytes(split_sizes(s, 2), b, h, d) * 4 == ulysses_bytes(split_sizes(s, 2), b, h, d) * 3
    assert fastseq_bytes(split_sizes(s, 4), b, h, d) * 4 == ulysses_bytes(split_sizes(s, 4), b, h, d) * 5
    assert ring_bytes([5, 3, 2], 1, 1, 1, rank=0) == (5 + 2) * 2 * 4  # own block, then the one from rank 2
    assert hybrid_bytes([5, 5, 4, 4], 2, 2, 1, 3, 8) == ulysses_bytes([5, 5], 1, 3, 8) + ulysses_bytes(
        [4, 4], 1, 3, 8
    ) + ring_bytes([10, 8], 1, 2, 8) + ring_bytes([10, 8], 1, 1, 8)


def test_fastseq_helpers():
    w = torch.arange(3 * 4 * 2 * 5, dtype=torch.float32).reshape(24, 5)  # (3*H*Dh, C), H=4, Dh=2
    bias = torch.arange(24, dtype=torch.float32)
    ws, bs = qkv_head_slice(w, bias, 4, 2, start=1, count=2)
    rows = [part * 8 + head * 2 + i for part in range(3) for head in (1, 2) for i in range(2)]  # (3, H_r, Dh) order
    assert torch.equal(ws, w[rows]) and torch.equal(bs, bias[rows])
    assert chunk_plan([5, 4, 4], 2) == [[3, 2, 2], [2, 2, 2]]
    assert chunk_plan([2, 1], 5) == [[1, 1], [1, 0]]  # capped at the largest shard; zero pieces allowed


def test_bad_inputs_are_opendit_errors():
    fake = SimpleNamespace(rank=0, size=2)  # validation happens before any communication
    with pytest.raises(OpenDiTError, match="split_sizes"):
        UlyssesAttention(fake, [3, 3, 3])
    with pytest.raises(OpenDiTError, match="split_sizes"):
        RingAttention(fake, [4, 0])
    with pytest.raises(OpenDiTError, match="ring-major"):
        group_sizes([2, 2, 2], 2, 2)
    with pytest.raises(OpenDiTError, match="SelfAttention"):
        FastSeqAttention(torch.nn.Linear(4, 4), fake, [2, 2])
    with pytest.raises(OpenDiTError, match="seq_sizes"):
        RingAttention(fake, [3, 2])(*(torch.zeros(1, 2, 1, 4) for _ in range(3)))
