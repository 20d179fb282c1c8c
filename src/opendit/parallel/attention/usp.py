"""USP (unified sequence parallelism): Ulysses inside ring groups, on a 2-D (ring x ulysses) layout.

Ranks are numbered r = ring_idx * U + ulysses_idx (Ulysses innermost: the U ranks of one Ulysses group are adjacent,
i.e. on the fastest links). `seq_sizes` lists the tokens of every rank in that global order (length R * U).

Per call on rank (g, u), with q, k, v (B, S_r, H, D):
1. Ulysses all-to-all inside group g: (B, S_r, H, D) -> (B, S_g, H_u, D), where S_g = sum of group g's shards
   (the group's tokens in rank order, i.e. one contiguous block of the sequence) and H_u = heads of Ulysses rank u;
2. ring attention over the R ranks with the same u (same heads), blocks S_0 .. S_{R-1}: exact merge by lse;
3. Ulysses all-to-all back: (B, S_g, H_u, D) -> (B, S_r, H, D).
Uneven token shards, uneven head splits and uneven ring blocks are all exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError
from opendit.parallel.attention.ring import LseAttention, RingAttention, attention_with_lse, ring_bytes
from opendit.parallel.attention.ulysses import UlyssesAttention, head_sizes, ulysses_bytes


def group_sizes(seq_sizes: Sequence[int], ulysses: int, ring: int) -> list[list[int]]:
    """Split the global per-rank sizes (length R * U, rank r = g * U + u) into R lists of U: group g's shards."""
    if len(seq_sizes) != ulysses * ring:
        raise OpenDiTError(
            f"seq_sizes lists {len(seq_sizes)} ranks but ulysses {ulysses} x ring {ring} = {ulysses * ring}; "
            f"pass one size per rank of the whole sequence-parallel mesh, in rank order (ring-major)"
        )
    return [list(seq_sizes[g * ulysses : (g + 1) * ulysses]) for g in range(ring)]


class HybridAttention:
    """AttentionCore for USP: (B, S_rank, H, D) x3 -> (B, S_rank, H, D).

    ulysses_comm: this rank's Ulysses group (size U, group rank = ulysses_idx);
    ring_comm: this rank's ring group (size R, group rank = ring_idx), ranks with the same ulysses_idx;
    seq_sizes: tokens per rank of the whole U*R mesh in global order r = ring_idx * U + ulysses_idx.
    """

    def __init__(
        self,
        ulysses_comm: Comm,
        ring_comm: Comm,
        seq_sizes: Sequence[int],
        attn: LseAttention = attention_with_lse,
        pack_qkv: bool = True,
    ):
        u_deg, r_deg = ulysses_comm.size, ring_comm.size
        groups = group_sizes(seq_sizes, u_deg, r_deg)
        self.ring_idx, self.ulysses_idx = ring_comm.rank, ulysses_comm.rank
        block_sizes = [sum(g) for g in groups]  # (R,) tokens per ring block = per Ulysses group
        self.ring = RingAttention(ring_comm, block_sizes, attn=attn)
        self.ulysses = UlyssesAttention(ulysses_comm, groups[self.ring_idx], attn=self.ring, pack_qkv=pack_qkv)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ulysses(q, k, v)  # Ulysses a2a -> ring attention (B, S_g, H_u, D) -> a2a back


def hybrid_bytes(
    seq_sizes: Sequence[int],
    ulysses: int,
    ring: int,
    batch: int,
    heads: int,
    head_dim: int,
    rank: int | None = None,
    itemsize: int = 4,
) -> int:
    """Bytes HybridAttention sends per call (CommStats convention), for global rank r = g * U + u or all ranks:
    ulysses_bytes within group g (H heads, the group's shards) + ring_bytes within ring u (H_u heads, group blocks)."""
    groups = group_sizes(seq_sizes, ulysses, ring)
    blocks = [sum(g) for g in groups]
    hs = head_sizes(heads, ulysses)

    def one(r: int) -> int:
        g, u = divmod(r, ulysses)
        a2a = ulysses_bytes(groups[g], batch, heads, head_dim, rank=u, itemsize=itemsize)
        return a2a + ring_bytes(blocks, batch, hs[u], head_dim, rank=g, itemsize=itemsize)

    return sum(one(r) for r in range(ulysses * ring)) if rank is None else one(rank)
