"""Uneven sequence sharding: how many tokens each rank holds, and the modules that shard and gather them.

A sequence of L tokens over P ranks gives rank r a contiguous block of `sizes[r]` tokens, with sizes ⌈L/P⌉ for the
first L mod P ranks and ⌊L/P⌋ for the rest (or shares proportional to load-balancer weights). No padding, ever.
`TokenShard` / `TokenGather` run at the split / gather points a model's spec declares (parallel/apply.py hooks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from opendit.distributed.comm import Comm, check_sizes
from opendit.errors import OpenDiTError


def split_sizes(length: int, parts: int, weights: Sequence[float] | None = None) -> list[int]:
    """Sizes of `parts` contiguous blocks covering `length` items; every block gets >= 1 item.

    Without weights: ⌈L/P⌉ for the first L mod P blocks, ⌊L/P⌋ for the rest (e.g. 13 over 3 -> [5, 4, 4]).
    With weights (e.g. measured per-rank speed): shares proportional to the weights by largest remainder, then any
    empty block takes one item from the largest block, so that every rank takes part.
    """
    if not isinstance(length, int) or not isinstance(parts, int) or parts < 1 or length < 0:
        raise OpenDiTError(
            f"split_sizes needs an int length >= 0 and int parts >= 1, got length={length!r}, parts={parts!r}"
        )
    if length < parts:
        raise OpenDiTError(
            f"cannot split {length} tokens/heads over {parts} ranks so that every rank gets at least one; "
            f"use at most {length} ranks for this dimension (or a larger input / a different parallel degree)"
        )
    if weights is None:
        base, extra = divmod(length, parts)
        return [base + 1 if r < extra else base for r in range(parts)]
    weights = [float(w) for w in weights]
    if len(weights) != parts or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise OpenDiTError(f"weights must be {parts} finite non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    ideal = [length * w / total for w in weights]
    sizes = [math.floor(x) for x in ideal]
    # Largest remainder: hand the leftover items to the largest fractional parts (ties -> lower rank).
    order = sorted(range(parts), key=lambda r: (-(ideal[r] - sizes[r]), r))
    for r in order[: length - sum(sizes)]:
        sizes[r] += 1
    for r in range(parts):  # every rank >= 1 item (possible because length >= parts)
        if sizes[r] == 0:
            donor = max(range(parts), key=lambda j: (sizes[j], -j))
            sizes[donor] -= 1
            sizes[r] = 1
    return sizes


def offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each block: [0, s0, s0+s1, ...] (length P)."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def head_sizes(heads: int, parts: int) -> list[int]:
    """Heads per rank of a head-parallel (Ulysses) group: ⌈H/P⌉ for the first H mod P ranks, ⌊H/P⌋ for the rest."""
    if heads < parts:
        raise OpenDiTError(
            f"Ulysses degree {parts} exceeds the {heads} attention heads, so some rank would get no head; "
            f"use ulysses <= {heads} (and ring for the remaining factor, i.e. usp) or pure ring attention"
        )
    return split_sizes(heads, parts)


class TokenShard(nn.Module):
    """(B, T, C) -> (B, sizes[rank], C): keep this rank's contiguous block of tokens along `dim` (no communication)."""

    def __init__(self, comm: Comm, sizes: Sequence[int], dim: int = 1):
        super().__init__()
        self.sizes = check_sizes(sizes, comm.size)
        self.rank, self.dim = comm.rank, dim
        self.start = offsets(self.sizes)[self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != sum(self.sizes):
            raise OpenDiTError(
                f"TokenShard got {x.shape[self.dim]} tokens along dim {self.dim} but was built for {sum(self.sizes)} "
                f"(sizes {self.sizes}); rebuild the plan for this input size"
            )
        return x.narrow(self.dim, self.start, self.sizes[self.rank]).contiguous()  # (B, T_rank, C)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sizes={self.sizes}, dim={self.dim}"


class TokenGather(nn.Module):
    """(B, sizes[rank], D) -> (B, T, D): all-gather every rank's tokens along `dim` in rank order (uneven allowed)."""

    def __init__(self, comm: Comm, sizes: Sequence[int], dim: int = 1):
        super().__init__()
        self.comm = comm
        self.sizes = check_sizes(sizes, comm.size)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(x, self.dim, self.sizes)  # (B, T, D); checks x.shape[dim] == sizes[rank]

    def extra_repr(self) -> str:
        return f"rank={self.comm.rank}, sizes={self.sizes}, dim={self.dim}"


def check_qkv(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_sizes: Sequence[int], rank: int):
    """Input contract of a sequence-parallel AttentionCore: q, k, v (B, S_rank, H, D), S_rank = seq_sizes[rank]."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise OpenDiTError(f"{kernel} expects q, k, v of one shape (B, S, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] != seq_sizes[rank]:
        raise OpenDiTError(
            f"{kernel} on rank {rank}: got {q.shape[1]} tokens but seq_sizes[{rank}] = {seq_sizes[rank]} "
            f"(seq_sizes {list(seq_sizes)}); shard tokens with the same sizes the kernel was built with"
        )
