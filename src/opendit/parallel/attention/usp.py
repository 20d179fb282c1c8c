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
from opendit.parallel.attention.ring import (
    LseAttention,
    RingAttention,
    attention_with_lse,
    ring_comm_items,
    ring_merge_elements,
)
from opendit.parallel.attention.ulysses import UlyssesAttention, ulysses_bytes, ulysses_calls
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import head_sizes


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


class USPStrategy(SequenceStrategy):
    """`--sp-impl usp`: Ulysses inside each group of U adjacent ranks, ring attention across the R groups."""

    name = "usp"
    summary = "Ulysses all-to-all inside groups of adjacent ranks, ring attention across the groups (ulysses x ring)"
    uses = ("ulysses", "ring")
    auto = True

    def check(self, plan, dims) -> list[str]:
        if plan.ulysses == 1 or plan.ring == 1:
            raise OpenDiTError("sp-impl usp needs both --ulysses > 1 and --ring > 1")
        return []

    def core(self, runtime, sizes: list[int]):
        return HybridAttention(runtime.comms["ulysses"], runtime.comms["ring"], sizes)

    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        g, u = divmod(rank, plan.ulysses)
        group = group_sizes(sizes, plan.ulysses, plan.ring)[g]
        heads = head_sizes(dims.num_heads, plan.ulysses)[u]
        merge = ring_merge_elements(batch, sum(group), heads, dims.head_dim, plan.ring - 1, 4)
        return AttentionWork(
            q_tokens=sum(group),  # the group's tokens for this rank's heads, against all keys through the ring
            heads=heads,
            qkv_rows=sizes[rank],
            key_blocks=plan.ring,
            extra_elementwise=merge,
            dispatch_ops=0.3 + 0.3 * (plan.ring - 1),
        )

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        g, u = divmod(rank, plan.ulysses)
        groups = group_sizes(sizes, plan.ulysses, plan.ring)
        a2a = ulysses_bytes(groups[g], batch, dims.num_heads, dims.head_dim, rank=u, itemsize=itemsize)
        heads = head_sizes(dims.num_heads, plan.ulysses)[u]
        blocks = [sum(group) for group in groups]
        ring = ring_comm_items(blocks, g, batch, heads, dims.head_dim, itemsize, attn_s, plan.ulysses)
        return [CommItem("all_to_all", a2a, ulysses_calls(plan.ulysses), plan.ulysses), *ring]

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        unit = batch * max(sizes) * dims.hidden_size * itemsize  # one (B, S_r, C) tensor
        h_u = max(head_sizes(dims.num_heads, plan.ulysses))
        group_heads = batch * sum(sizes) / plan.ring * h_u * dims.head_dim * itemsize  # one (B, S_g, H_u, D) tensor
        return 3 * unit + (3 + 4 + 4 / itemsize + 2) * group_heads  # a2a send/recv, K/V + in flight, fp32 out


register(USPStrategy())
