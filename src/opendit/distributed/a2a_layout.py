"""Shapes and checks of the split-sizes collectives (Comm.all_to_all): which sizes are valid, and how T packed tensors
lay out in the flat send / receive buffers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opendit.errors import OpenDiTError


def check_sizes(sizes: Sequence[int], parts: int, what: str = "seq_sizes", minimum: int = 1) -> list[int]:
    """One size >= `minimum` per rank of a group of `parts` ranks (collectives take 0 for an empty chunk; kernels
    need >= 1 token per rank); returns them as a list of ints."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != parts or any(s < minimum for s in sizes):
        kind = "positive" if minimum >= 1 else "non-negative"
        raise OpenDiTError(
            f"{what} must give a {kind} size for each of the {parts} ranks of the group, got {sizes}; "
            f"compute them with opendit.parallel.sequence.split_sizes(total, {parts})"
        )
    return sizes


def a2a_check(xs, scatter_dim: int, gather_dim: int, scatter_sizes, gather_sizes, p: int, me: int):
    """all_to_all's input contract: tensors of one shape and dtype whose dims match the split sizes. Returns the
    normalised (scatter dim, gather dim, scatter sizes, gather sizes)."""
    if not xs or any(t.shape != xs[0].shape or t.dtype != xs[0].dtype for t in xs):
        raise OpenDiTError("all_to_all packs tensors of one shape and dtype; got " + str([t.shape for t in xs]))
    ndim = xs[0].dim()
    sd, gd = scatter_dim % ndim, gather_dim % ndim
    s_sizes = check_sizes(scatter_sizes, p, "scatter_sizes", minimum=0)
    g_sizes = check_sizes(gather_sizes, p, "gather_sizes", minimum=0)
    if xs[0].shape[sd] != sum(s_sizes):
        raise OpenDiTError(
            f"all_to_all: dim {sd} has {xs[0].shape[sd]} entries but scatter_sizes sum to {sum(s_sizes)} ({s_sizes})"
        )
    if sd != gd and xs[0].shape[gd] != g_sizes[me]:
        raise OpenDiTError(
            f"all_to_all: dim {gd} of this rank has {xs[0].shape[gd]} entries but "
            f"gather_sizes[{me}] = {g_sizes[me]} ({g_sizes})"
        )
    return sd, gd, s_sizes, g_sizes


def a2a_layout(xs: list[torch.Tensor], sd: int, gd: int, s_sizes: list[int], g_sizes: list[int], me: int):
    """How all_to_all lays out T tensors in its flat buffers: (moved views, chunked dim, send shapes, recv shapes).

    Same dim (sd == gd): per tensor x -> (N, *rest); chunk j is (s_j, T, *rest), so the pieces arriving from ranks
    0..P-1, each (g_j, T, *rest), concatenate into (G, T, *rest) = a plain view of the receive buffer.
    Different dims: per tensor (gather, scatter) move to the front, x -> (G_me, N_s, *other); chunk j is
    (G_me, T, s_j, *other), so the pieces, each (G_j, T, s_me, *other), concatenate into (G, T, s_me, *other)."""
    n_t = len(xs)
    if sd == gd:
        moved = [t.movedim(sd, 0) for t in xs]  # T x (N, *rest)
        other = tuple(moved[0].shape[1:])
        sends = [(s, n_t, *other) for s in s_sizes]
        recvs = [(g, n_t, *other) for g in g_sizes]
        return moved, 0, sends, recvs
    moved = [t.movedim((gd, sd), (0, 1)) for t in xs]  # T x (G_me, N_s, *other)
    g_me, other = moved[0].shape[0], tuple(moved[0].shape[2:])
    sends = [(g_me, n_t, s, *other) for s in s_sizes]
    recvs = [(g, n_t, s_sizes[me], *other) for g in g_sizes]
    return moved, 1, sends, recvs
