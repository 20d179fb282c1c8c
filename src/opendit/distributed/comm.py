"""The one communication layer of OpenDiT: every collective goes through a `Comm`.

A `Comm` wraps ONE process group that the runtime hands it (never the implicit world) and offers the few collectives
that sequence parallelism needs, each with split sizes so that uneven shards are first-class:

- `all_to_all`   scatter one dim, gather another (Ulysses, FastSeq), or split/concat the same dim;
- `all_gather`   concat every rank's shard along a dim, shards may differ in size;
- `ring_exchange` send to the next rank, receive from the previous one (ring attention), async for overlap;
- `broadcast`    one rank's tensor to all (e.g. initial noise).

Every op has an async form returning a `CommHandle` whose `wait()` gives the result, so callers overlap compute.
`Comm.sync = True` (measurement only) completes every async op before returning its handle: the same messages, no
overlap, so the summed `wait_s` is the whole communication time; benchmarks compare it with the overlapped run's
`wait_s` (what stays exposed) to report the fraction of communication hidden behind compute.
`comm_dtype` (off by default) casts what goes on the wire (e.g. fp32 -> bf16) and casts back on arrival.

Byte accounting (`CommStats`), one convention for every op: **bytes = the payload this rank sends to OTHER ranks**, i.e.
the sum over destinations d != self of the bytes d receives from this rank, in the wire dtype (after `comm_dtype`). The
part a rank keeps for itself is excluded. It is algorithm-independent (NCCL's ring or tree may route differently), and
summing it over ranks gives the total volume that crosses links. Examples for a tensor of N bytes on P ranks:
all_gather of this rank's shard -> N * (P - 1); ring_exchange -> N; all_to_all -> N minus the chunk kept locally;
broadcast -> N * (P - 1) on the source, 0 elsewhere.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from opendit.errors import OpenDiTError

# torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; same semantics.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CommStats:
    """Calls, bytes (see the module docstring for the convention) and blocked wait time per op kind.

    `end_step()` closes a denoising step: it appends a snapshot to `history` and resets the counters.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.wait_s: dict[str, float] = defaultdict(float)
        self.history: list[dict[str, dict[str, float]]] = []
        # Set to a list to also log (kind, seconds) per wait, in call order (benchmarks pair the same op across ranks:
        # the rank that arrived last waited only for the transfer, the other one also for its peer's compute).
        self.trace: list[tuple[str, float]] | None = None

    def record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += int(nbytes)

    def record_wait(self, kind: str, seconds: float) -> None:
        self.wait_s[kind] += seconds
        if self.trace is not None:
            self.trace.append((kind, seconds))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{kind: {"calls", "bytes", "wait_s"}} for the counters since the last reset."""
        kinds = sorted(set(self.calls) | set(self.wait_s))
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k], "wait_s": self.wait_s[k]} for k in kinds}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.wait_s.clear()

    def end_step(self) -> dict[str, dict[str, float]]:
        """Snapshot, store in `history`, reset; returns the step's snapshot."""
        snap = self.snapshot()
        self.history.append(snap)
        self.reset()
        return snap

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class CommHandle:
    """An in-flight collective. `wait()` blocks until it is done and returns its result (once; later calls reuse it)."""

    def __init__(
        self, works: list[Any], finish: Callable[[], Any], stats: CommStats, kind: str, keep: tuple = ()
    ) -> None:
        self._works, self._finish, self._stats, self._kind = works, finish, stats, kind
        self._keep = keep  # buffers that must outlive the transfer (dropped after wait)
        self._done, self._result = False, None

    def wait(self) -> Any:
        if not self._done:
            start = time.perf_counter()
            for work in self._works:
                work.wait()
            self._stats.record_wait(self._kind, time.perf_counter() - start)
            self._result, self._done = self._finish(), True
            self._works, self._keep = [], ()
        return self._result


def _done_handle(result: Any, stats: CommStats, kind: str) -> CommHandle:
    return CommHandle([], lambda: result, stats, kind)


def _check_sizes(name: str, sizes: Sequence[int], parts: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != parts or any(s < 0 for s in sizes):
        raise OpenDiTError(
            f"{name} must list one non-negative size per rank of the group ({parts} ranks), got {sizes}; "
            "compute them with opendit.parallel.sequence.split_sizes(length, group_size)"
        )
    return sizes


class Comm:
    """Collectives over one process group, with split sizes, async handles, optional wire dtype and accounting.

    group: the process group (from a DeviceMesh dimension or dist.new_group); the default world is never assumed.
    comm_dtype: e.g. torch.bfloat16 to halve the bytes of fp32 activations; applied only to floating tensors whose
    element size is larger than comm_dtype's (so bf16/fp16 data is never re-rounded). Off (None) by default.
    stats: a CommStats to record into; share one between the Comms of a mesh to get per-step totals.
    """

    def __init__(self, group: Any, comm_dtype: torch.dtype | None = None, stats: CommStats | None = None):
        if group is None:
            raise OpenDiTError(
                "Comm needs an explicit process group (e.g. mesh.get_group('ulysses') or dist.new_group(ranks)); "
                "OpenDiT code never assumes the default world group"
            )
        if not dist.is_initialized():
            raise OpenDiTError(
                "torch.distributed is not initialized; call dist.init_process_group (gloo or nccl) first"
            )
        if comm_dtype is not None and not comm_dtype.is_floating_point:
            raise OpenDiTError(f"comm_dtype must be a floating dtype such as torch.bfloat16, got {comm_dtype}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.comm_dtype = comm_dtype
        self.stats = stats if stats is not None else CommStats()
        self.backend = dist.get_backend(group)
        self.sync = False  # measurement switch: async ops complete before returning (see the module docstring)

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, backend={self.backend}, comm_dtype={self.comm_dtype})"

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        cd = self.comm_dtype
        if cd is not None and dtype.is_floating_point and cd.itemsize < dtype.itemsize:
            return cd
        return dtype

    def _complete(self, handle: CommHandle, async_op: bool) -> Any:
        """What an op returns: its result (blocking), or its handle (completed first when `sync` is on)."""
        result = handle.wait() if not async_op or self.sync else None
        return handle if async_op else result

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    # ------------------------------------------------------------------------------------------------ all-to-all
    def all_to_all(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        scatter_dim: int,
        gather_dim: int,
        scatter_sizes: Sequence[int],
        gather_sizes: Sequence[int],
        async_op: bool = False,
    ) -> Any:
        """Split x along `scatter_dim` (chunk j, of size scatter_sizes[j], goes to rank j) and concatenate what
        arrives from every rank j (gather_sizes[j] long) along `gather_dim`.

        Ulysses, seq -> heads: q (B, S_r, H, D), scatter_dim=2 by head sizes, gather_dim=1 by seq sizes
        -> (B, S, H_r, D). With scatter_dim == gather_dim it is the plain split-sizes all-to-all along that dim.
        A list of tensors of one shape is packed into ONE message (one call) and a list is returned.
        Inputs may be non-contiguous. The result is a strided view of the receive buffer (no extra copy).
        """
        many = not isinstance(x, torch.Tensor)
        xs = list(x) if many else [x]
        if not xs or any(t.shape != xs[0].shape or t.dtype != xs[0].dtype for t in xs):
            raise OpenDiTError("all_to_all packs tensors of one shape and dtype; got " + str([t.shape for t in xs]))
        p, me = self.size, self.rank
        ndim = xs[0].dim()
        sd, gd = scatter_dim % ndim, gather_dim % ndim
        s_sizes = _check_sizes("scatter_sizes", scatter_sizes, p)
        g_sizes = _check_sizes("gather_sizes", gather_sizes, p)
        if xs[0].shape[sd] != sum(s_sizes):
            raise OpenDiTError(
                f"all_to_all: dim {sd} has {xs[0].shape[sd]} entries but scatter_sizes sum to "
                f"{sum(s_sizes)} ({s_sizes})"
            )
        if sd != gd and xs[0].shape[gd] != g_sizes[me]:
            raise OpenDiTError(
                f"all_to_all: dim {gd} of this rank has {xs[0].shape[gd]} entries but "
                f"gather_sizes[{me}] = {g_sizes[me]} ({g_sizes})"
            )
        kind = "all_to_all"
        if p == 1:
            result = xs if many else x
            return _done_handle(result, self.stats, kind) if async_op else result
        n_t = len(xs)
        dtype, wire = xs[0].dtype, self._wire_dtype(xs[0].dtype)
        if sd == gd:
            # Same dim: per tensor x -> (N, *rest). Chunk j is laid out (s_j, T, *rest), so the pieces arriving from
            # ranks 0..P-1, each (g_j, T, *rest), concatenate into (G, T, *rest) = a plain view of the buffer.
            moved = [t.movedim(sd, 0) for t in xs]  # T x (N, *rest)
            other = tuple(moved[0].shape[1:])
            cdim = 0  # dim of `moved` that is chunked
        else:
            # Different dims: per tensor, move (gather, scatter) to the front, x -> (G_me, N_s, *other).
            # Chunk j is laid out (G_me, T, s_j, *other) so that the pieces arriving from ranks 0..P-1,
            # each (G_j, T, s_me, *other), concatenate into (G, T, s_me, *other) = a plain view of the buffer.
            moved = [t.movedim((gd, sd), (0, 1)) for t in xs]  # T x (G_me, N_s, *other)
            g_me = moved[0].shape[0]
            other = tuple(moved[0].shape[2:])
            cdim = 1

        def send_shape(j: int) -> tuple[int, ...]:
            return (s_sizes[j], n_t, *other) if sd == gd else (g_me, n_t, s_sizes[j], *other)

        def recv_shape(j: int) -> tuple[int, ...]:
            return (g_sizes[j], n_t, *other) if sd == gd else (g_sizes[j], n_t, s_sizes[me], *other)

        starts = [sum(s_sizes[:j]) for j in range(p)]
        send_numel = [math.prod(send_shape(j)) for j in range(p)]
        recv_numel = [math.prod(recv_shape(j)) for j in range(p)]
        send = torch.empty(sum(send_numel), dtype=wire, device=xs[0].device)  # flat send buffer, chunk j at offset
        offset = 0
        for j in range(p):
            view = send[offset : offset + send_numel[j]].view(send_shape(j))
            for t in range(n_t):  # the one copy of the data (casts to the wire dtype on the way)
                view.select(1, t).copy_(moved[t].narrow(cdim, starts[j], s_sizes[j]))
            offset += send_numel[j]
        recv = torch.empty(sum(recv_numel), dtype=wire, device=xs[0].device)
        work = dist.all_to_all_single(recv, send, recv_numel, send_numel, group=self.group, async_op=True)
        self.stats.record(kind, (sum(send_numel) - send_numel[me]) * wire.itemsize)

        def finish() -> Any:
            buf = recv if wire == dtype else recv.to(dtype)
            if sd == gd:
                full = buf.view(sum(g_sizes), n_t, *other)  # (G, T, *rest)
                outs = [full[:, t].movedim(0, sd) for t in range(n_t)]
            else:
                full = buf.view(sum(g_sizes), n_t, s_sizes[me], *other)  # (G, T, s_me, *other)
                outs = [full[:, t].movedim((0, 1), (gd, sd)) for t in range(n_t)]
            return outs if many else outs[0]

        handle = CommHandle([work], finish, self.stats, kind, keep=(send,))
        return self._complete(handle, async_op)

    # ------------------------------------------------------------------------------------------------ all-gather
    def all_gather(self, x: torch.Tensor, dim: int, sizes: Sequence[int], async_op: bool = False) -> Any:
        """Concatenate every rank's x along `dim`; rank j contributes sizes[j] entries (uneven allowed).

        x (..., sizes[rank], ...) -> (..., sum(sizes), ...). Equal sizes use the backend's all_gather; uneven sizes
        use one split-sizes all-to-all whose send buffer repeats x once per rank (gloo has no uneven all_gather).
        """
        p, me = self.size, self.rank
        dim = dim % x.dim()
        sizes = _check_sizes("sizes", sizes, p)
        if x.shape[dim] != sizes[me]:
            raise OpenDiTError(
                f"all_gather: this rank (rank {me}) holds {x.shape[dim]} entries along dim {dim} "
                f"but sizes[{me}] = {sizes[me]} (sizes {sizes}); shard with the same sizes"
            )
        kind = "all_gather"
        if p == 1:
            return _done_handle(x, self.stats, kind) if async_op else x
        dtype, wire = x.dtype, self._wire_dtype(x.dtype)
        moved = x.movedim(dim, 0)  # (n_me, *rest): rank pieces stack along dim 0 in rank order
        rest = tuple(moved.shape[1:])
        row = math.prod(rest)
        numel = [s * row for s in sizes]
        recv = torch.empty(sum(numel), dtype=wire, device=x.device)  # flat (N, *rest) in rank order
        if len(set(sizes)) == 1:
            send = moved.to(wire).contiguous().view(-1)  # (n_me * rest,)
            work = _all_gather_single(recv, send, group=self.group, async_op=True)
        else:
            send = torch.empty(numel[me] * p, dtype=wire, device=x.device)
            send.view(p, *moved.shape).copy_(moved.unsqueeze(0).expand(p, *moved.shape))  # (P, n_me, *rest)
            work = dist.all_to_all_single(recv, send, numel, [numel[me]] * p, group=self.group, async_op=True)
        self.stats.record(kind, numel[me] * (p - 1) * wire.itemsize)

        def finish() -> torch.Tensor:
            buf = recv if wire == dtype else recv.to(dtype)
            return buf.view(sum(sizes), *rest).movedim(0, dim)  # (..., N, ...)

        handle = CommHandle([work], finish, self.stats, kind)
        return self._complete(handle, async_op)

    # ------------------------------------------------------------------------------------------------ ring P2P
    def ring_exchange(self, x: torch.Tensor, recv_shape: Sequence[int], shift: int = 1) -> CommHandle:
        """Send x to rank (r + shift) % P and receive a `recv_shape` tensor (x's dtype) from rank (r - shift) % P.

        Always async (P2P via dist.batch_isend_irecv): start it, compute on the current block, then `wait()`.
        Shapes may differ per rank (uneven ring blocks): each receiver states what it expects.
        """
        p, me = self.size, self.rank
        kind = "p2p"
        if p == 1:
            return _done_handle(x, self.stats, kind)
        dtype, wire = x.dtype, self._wire_dtype(x.dtype)
        send = x.to(wire).contiguous()
        recv = torch.empty(tuple(recv_shape), dtype=wire, device=x.device)
        ops = [
            dist.P2POp(dist.isend, send, self._global((me + shift) % p), self.group),
            dist.P2POp(dist.irecv, recv, self._global((me - shift) % p), self.group),
        ]
        works = dist.batch_isend_irecv(ops)
        self.stats.record(kind, send.numel() * wire.itemsize)
        finish = (lambda: recv) if wire == dtype else (lambda: recv.to(dtype))
        return self._complete(CommHandle(works, finish, self.stats, kind, keep=(send,)), True)

    # ------------------------------------------------------------------------------------------------ broadcast
    def broadcast(self, x: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Rank `src`'s x (group rank) to every rank, in place on a contiguous x; returns x (or a handle).
        With comm_dtype, src's x is overwritten by its wire-rounded value too, so that every rank holds the same."""
        p, me = self.size, self.rank
        kind = "broadcast"
        if p == 1:
            return _done_handle(x, self.stats, kind) if async_op else x
        if not x.is_contiguous():
            raise OpenDiTError("broadcast works in place: pass a contiguous tensor (x.contiguous())")
        dtype, wire = x.dtype, self._wire_dtype(x.dtype)
        buf = x if wire == dtype else x.to(wire)
        work = dist.broadcast(buf, self._global(src), group=self.group, async_op=True)
        self.stats.record(kind, buf.numel() * wire.itemsize * (p - 1) if me == src else 0)

        def finish() -> torch.Tensor:
            if buf is not x:
                x.copy_(buf)
            return x

        handle = CommHandle([work], finish, self.stats, kind)
        return self._complete(handle, async_op)

    def barrier(self) -> None:
        dist.barrier(group=self.group)
