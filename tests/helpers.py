"""Reference formulas and measures that only the tests use: the USP byte formula, ring call counts, error metrics,
the manual token-share refinement and per-module parameter bytes (the library's own code paths do not need them)."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.parallel.attention.ring import ring_bytes
from opendit.parallel.attention.ulysses import ulysses_bytes
from opendit.parallel.attention.usp import group_sizes
from opendit.parallel.balance import speed_shares
from opendit.parallel.sequence import head_sizes


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


def ring_calls(world: int) -> int:
    """P2P exchanges (CommStats 'p2p' calls) per RingAttention call on each rank."""
    return world - 1


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp64: one number for 'how far is this precision from the reference'."""
    ref = ref.detach().double()
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def gather_rows(rows: list[dict]) -> list[dict]:
    """Inside a launched world: every rank's result rows, concatenated in rank order on every rank; then the process
    group is torn down (the world function's last step)."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return [row for rank_rows in everyone for row in rank_rows]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images/batches (inf when identical)."""
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def refine_shares(
    shares: Sequence[float],
    token_sizes: Sequence[int],
    busy_s: Sequence[float],
    damping: float = 0.5,
) -> tuple[float, ...]:
    """New token shares from one (or an average of several) denoising steps' per-rank timings.

    token_sizes: tokens each rank held during the measured steps; busy_s: each rank's compute time in those steps,
    i.e. step time minus the time blocked in collectives (CommStats.wait_s summed over kinds) - the wait hides the
    imbalance, since a fast rank waits for the slow one at every collective. Each rank's speed is tokens / busy;
    the new shares move `damping` of the way from the old ones to speed-proportional shares (damping 1: jump).
    The speed estimate assumes cost proportional to tokens; iterating it converges to equal busy times when part of
    the cost is fixed (see the module note on Ulysses).
    """
    if not (len(shares) == len(token_sizes) == len(busy_s)):
        raise OpenDiTError(
            f"shares ({len(shares)}), token_sizes ({len(token_sizes)}) and busy_s ({len(busy_s)}) need one entry "
            "per sequence rank"
        )
    if any(t <= 0 for t in busy_s) or any(n <= 0 for n in token_sizes):
        raise OpenDiTError(f"busy times and token sizes must be positive, got {list(busy_s)}, {list(token_sizes)}")
    if not 0 < damping <= 1:
        raise OpenDiTError(f"damping must be in (0, 1], got {damping}")
    target = speed_shares([n / t for n, t in zip(token_sizes, busy_s)])
    old = speed_shares(shares)
    return speed_shares([(1 - damping) * o + damping * t for o, t in zip(old, target)])


def busy_times(step_s: Sequence[float], wait_s: Sequence[float]) -> list[float]:
    """Per-rank compute time: each rank's step time minus its time blocked waiting in collectives."""
    return [max(1e-9, s - w) for s, w in zip(step_s, wait_s)]


def unit_bytes(module: nn.Module) -> int:
    """Full bytes of one module's parameters (e.g. one block), whether or not the model is sharded."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def forward_peak(model_fn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, base: int) -> int:
    """Peak resident bytes above `base` during a forward, after a first forward that does the one-time work (FSDP2's
    lazy init, kernel workspaces)."""
    from opendit.observe.memory import peak_rss_bytes, reset_peak_rss

    with torch.no_grad():
        model_fn(x, t, y)
        gc.collect()
        reset_peak_rss()
        model_fn(x, t, y)
    return peak_rss_bytes() - base
