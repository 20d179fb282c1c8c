"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: all-to-all from sequence shards to head shards and back.

Rank r holds q, k, v for its S_r tokens and all H heads. One all-to-all gives it all S tokens for its H_r heads, where
it runs ordinary attention; a second all-to-all returns the output to (S_r tokens, H heads). Uneven is exact: tokens
split by `seq_sizes` (any), heads split ⌈H/P⌉/⌊H/P⌋ (4 heads over 3 ranks -> 2, 1, 1); heads are independent, so any
split gives the same numbers. H < P is an error (a rank would have nothing to do): use ring or usp instead.

Messages per call: q, k, v are packed into ONE all-to-all (`pack_qkv=True`, default), then one for the output: 2 calls.
With pack_qkv=False it is the classic 4 (q, k, v, out); the bytes are the same either way (see `ulysses_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opendit.distributed.comm import Comm
from opendit.models.attention import AttentionCore, local_attention
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import check_qkv, check_sizes, head_sizes


class UlyssesAttention:
    """AttentionCore: (B, S_rank, H, D) x3 -> (B, S_rank, H, D) over one Ulysses group.

    comm: the Ulysses group; seq_sizes: tokens per group rank (uneven allowed);
    attn: the attention run on (B, S, H_rank, D) after the first all-to-all (default local SDPA; USP passes ring);
    pack_qkv: one all-to-all for q, k, v together (2 calls per attention) instead of three (4 calls).
    """

    def __init__(
        self,
        comm: Comm,
        seq_sizes: Sequence[int],
        attn: AttentionCore = local_attention,
        pack_qkv: bool = True,
    ):
        self.comm = comm
        self.seq_sizes = check_sizes(seq_sizes, comm.size)
        self.attn = attn
        self.pack_qkv = pack_qkv

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        comm, me = self.comm, self.comm.rank
        check_qkv("UlyssesAttention", q, k, v, self.seq_sizes, me)
        heads = head_sizes(q.shape[2], comm.size)
        # seq -> heads: scatter the head dim (2) by head sizes, gather the seq dim (1) by seq sizes.
        # (B, S_r, H, D) -> (B, S, H_r, D) for each of q, k, v.
        if self.pack_qkv:
            q, k, v = comm.all_to_all([q, k, v], 2, 1, heads, self.seq_sizes)
        else:
            hq, hk, hv = (comm.all_to_all(t, 2, 1, heads, self.seq_sizes, async_op=True) for t in (q, k, v))
            q, k, v = hq.wait(), hk.wait(), hv.wait()
        out = self.attn(q, k, v)  # (B, S, H_r, D): every token, this rank's heads
        # heads -> seq: scatter the seq dim (1) by seq sizes, gather the head dim (2) by head sizes.
        return comm.all_to_all(out, 1, 2, self.seq_sizes, heads)  # (B, S_r, H, D)


def ulysses_bytes(
    seq_sizes: Sequence[int], batch: int, heads: int, head_dim: int, rank: int | None = None, itemsize: int = 4
) -> int:
    """Bytes UlyssesAttention sends per call (CommStats convention: to other ranks only), packed or not.

    Rank r sends q, k, v rows of its S_r tokens for the heads of every other rank, then the output of its H_r heads
    for the tokens of every other rank: itemsize * B * D * (3 * S_r * (H - H_r) + H_r * (S - S_r)).
    rank=None -> sum over ranks. Even split: 4 * B * S * H * D * itemsize * (P - 1) / P^2 per rank.
    """
    p = len(seq_sizes)
    hs = head_sizes(heads, p)
    total_s = sum(seq_sizes)

    def one(r: int) -> int:
        return itemsize * batch * head_dim * (3 * seq_sizes[r] * (heads - hs[r]) + hs[r] * (total_s - seq_sizes[r]))

    return sum(one(r) for r in range(p)) if rank is None else one(rank)


def ulysses_calls(world: int, pack_qkv: bool = True) -> int:
    """All-to-all calls per UlyssesAttention call on each rank (0 on one rank: nothing to exchange)."""
    if world == 1:
        return 0
    return 2 if pack_qkv else 4


class UlyssesStrategy(SequenceStrategy):
    """`--sp-impl ulysses`: q, k, v packed in one all-to-all (seq -> heads), local attention, one all-to-all back."""

    name = "ulysses"
    summary = "all-to-all seq->heads (q, k, v packed), local attention, all-to-all back; 2 calls per block"
    uses = ("ulysses",)

    def core(self, runtime, sizes: list[int]):
        return UlyssesAttention(runtime.comms["ulysses"], sizes)

    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        heads = head_sizes(dims.num_heads, plan.ulysses)[rank % plan.ulysses]
        return AttentionWork(q_tokens=sum(sizes), heads=heads, qkv_rows=sizes[rank], dispatch_ops=0.3)

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        nbytes = ulysses_bytes(sizes, batch, dims.num_heads, dims.head_dim, rank=rank, itemsize=itemsize)
        return [CommItem("all_to_all", nbytes, ulysses_calls(plan.ulysses), plan.ulysses)]

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        return ulysses_buffers(dims, plan, batch, sizes, itemsize)


def ulysses_buffers(dims, plan, batch: float, sizes: list[int], itemsize: int) -> float:
    """Peak send/receive bytes of one Ulysses attention: packed q, k, v send (3 x (B, S_r, C)), their receive and the
    output's send/receive on (B, S, H_r, D) tensors."""
    unit = batch * max(sizes) * dims.hidden_size * itemsize  # one (B, S_r, C) tensor
    h_u = max(head_sizes(dims.num_heads, plan.ulysses))
    full_heads = batch * sum(sizes) * h_u * dims.head_dim * itemsize  # one (B, S, H_r, D) tensor
    return 3 * unit + 3 * full_heads + 2 * full_heads


register(UlyssesStrategy())
