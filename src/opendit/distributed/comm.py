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
broadcast -> N * (P - 1) on the source, 0 elsewhere; all_reduce -> 2 * N * (P - 1) / P (the reduce-scatter +
all-gather that bandwidth-optimal all-reduces send, `all_reduce_bytes`).

Event log (`CommStats.enable_events()`, off by default: `events` is None and nothing is timed beyond the counters):
one `CommEvent` per op, {kind, bytes, issued_s, wait_start_s, wait_end_s} in perf_counter seconds. `record()` returns
the op's event and the code that waits for the op hands it back, `record_wait(kind, seconds, event=...)`, so an op
issued async and waited later is one event from issue to wait end (CommHandle and sharding's _AllWorks do this).
parallel/trace.py turns the log into Chrome trace events and a busy/waiting summary.

Device time (`CommStats.device_timing`, set by the engine's replica on CUDA): on NCCL a wait() only makes the compute
stream wait for the collective and returns at once, so host clocks measure nothing. With device timing on, every wait
is bracketed by two CUDA events on the compute stream (no host synchronisation); the stall between them, the time the
GPU waited for the transfer, is what `wait_s` and the event's blocked time get when the stats settle (`settle()`:
at every snapshot / step end, once the sampler has synchronised the step). Off, or on CPU, waits are host-timed.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from opendit.distributed.a2a_layout import a2a_check, a2a_layout, check_sizes
from opendit.distributed.shm import ShmTransport, copy_piece, transport_wanted
from opendit.errors import OpenDiTError

# torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; same semantics. The one shim.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(eq=False, slots=True)
class CommEvent:
    """One collective in the event log (perf_counter seconds on this process's clock): issued at `issued_s`, blocked
    in wait() from `wait_start_s` to `wait_end_s` (None until waited). `blocked_s` sums the op's waits: FSDP2 may wait
    on a Work more than once, and only the first wait blocks. `linked` is False for a wait nobody issued through
    `record` (its event starts at the wait and carries no bytes), so that no blocked time escapes the log."""

    kind: str
    bytes: int
    issued_s: float
    wait_start_s: float | None = None
    wait_end_s: float | None = None
    blocked_s: float = 0.0
    linked: bool = True

    def complete(self, start_s: float, end_s: float) -> None:
        if self.wait_start_s is None:
            self.wait_start_s = start_s
        self.wait_end_s = end_s
        self.blocked_s += end_s - start_s

    @property
    def waited(self) -> bool:
        return self.wait_end_s is not None


class CommStats:
    """Calls, bytes (see the module docstring for the convention) and blocked wait time per op kind.

    `end_step()` closes a denoising step: it appends a snapshot to `history` and resets the counters. The optional
    event log (`enable_events()`) is independent of the counters: resets and `end_step()` leave it alone.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.wait_s: dict[str, float] = defaultdict(float)
        self.history: list[dict[str, dict[str, float]]] = []
        # Set to a list to also log (kind, seconds) per wait, in call order (benchmarks pair the same op across ranks:
        # the rank that arrived last waited only for the transfer, the other one also for its peer's compute).
        self.trace: list[tuple[str, float]] | None = None
        # None = off: record() then costs exactly the two counter updates (no clock read, no allocation).
        self.events: list[CommEvent] | None = None
        # CUDA: time waits with CUDA events on the compute stream (module docstring); pending until settle()
        self.device_timing = False
        self._pending: list[tuple] = []

    def wait_begin(self) -> Any:
        """Before blocking on an op: a CUDA event recorded on the current stream when device timing is on, else
        the host clock. Pass what it returns to `wait_end`."""
        if self.device_timing:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def wait_end(self, kind: str, begun: Any, event: CommEvent | None = None) -> None:
        """After the op's wait returned: count the blocked time (device time, settled later, or host time)."""
        end_s = time.perf_counter()
        if isinstance(begun, float):
            self.record_wait(kind, end_s - begun, event=event, end_s=end_s)
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()  # runs on the compute stream once the collective is done: stop - start = the GPU's stall
        self._pending.append((kind, begun, stop, event, end_s))

    def settle(self) -> None:
        """Turn the pending device-timed waits into counts (waits for their end events on the device)."""
        pending, self._pending = self._pending, []
        for kind, start, stop, event, end_s in pending:
            stop.synchronize()
            self.record_wait(kind, start.elapsed_time(stop) / 1e3, event=event, end_s=end_s)

    def waited_s(self) -> float:
        """Total blocked time counted so far (after settling the device-timed waits)."""
        self.settle()
        return sum(self.wait_s.values())

    def enable_events(self) -> list[CommEvent]:
        """Start (or keep) logging one CommEvent per op; returns the log. Idempotent: an existing log is kept."""
        if self.events is None:
            self.events = []
        return self.events

    def disable_events(self) -> None:
        """Stop logging. Events already handed out are still completed by their waits."""
        self.events = None

    def record(self, kind: str, nbytes: int) -> CommEvent | None:
        """Count one op issued now; with the event log on, returns its event (pass it to `record_wait`)."""
        self.calls[kind] += 1
        self.bytes[kind] += int(nbytes)
        if self.events is None:
            return None
        event = CommEvent(kind, int(nbytes), time.perf_counter())
        self.events.append(event)
        return event

    def record_wait(
        self, kind: str, seconds: float, event: CommEvent | None = None, end_s: float | None = None
    ) -> None:
        """Count `seconds` blocked waiting for an op of `kind` that ended at `end_s` (default: now); `event` (what
        `record` returned for that op) gets the wait. With the log on and no event, a wait-only event is logged."""
        self.wait_s[kind] += seconds
        if self.trace is not None:
            self.trace.append((kind, seconds))
        if event is None and self.events is None:
            return
        end = time.perf_counter() if end_s is None else end_s
        if event is None:
            event = CommEvent(kind, 0, end - seconds, linked=False)
            self.events.append(event)
        event.complete(end - seconds, end)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{kind: {"calls", "bytes", "wait_s"}} for the counters since the last reset."""
        self.settle()
        kinds = sorted(set(self.calls) | set(self.wait_s))
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k], "wait_s": self.wait_s[k]} for k in kinds}

    def reset(self) -> None:
        self._pending.clear()
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
    """An in-flight collective. `wait()` blocks until it is done and returns its result (once; later calls reuse it).
    `event`: what `stats.record` returned when the op was issued (None with the event log off); its wait completes it.
    """

    def __init__(
        self,
        works: list[Any],
        finish: Callable[[], Any],
        stats: CommStats,
        kind: str,
        keep: tuple = (),
        event: CommEvent | None = None,
    ) -> None:
        self._works, self._finish, self._stats, self._kind = works, finish, stats, kind
        self._keep = keep  # buffers that must outlive the transfer (dropped after wait)
        self._event = event
        self._done, self._result = False, None

    def wait(self) -> Any:
        if not self._done:
            begun = self._stats.wait_begin()
            for work in self._works:
                work.wait()
            self._stats.wait_end(self._kind, begun, event=self._event)
            self._result, self._done = self._finish(), True
            self._works, self._keep, self._event = [], (), None
        return self._result


def collective_device(backend: str) -> torch.device:
    """The device a process group of `backend` moves tensors on: NCCL -> the current CUDA device (the rank's own
    GPU once torch.cuda.set_device ran), anything else -> CPU."""
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _done_handle(result: Any, stats: CommStats, kind: str) -> CommHandle:
    return CommHandle([], lambda: result, stats, kind)


def all_reduce_bytes(nbytes: int, size: int) -> int:
    """What one rank sends in an all-reduce of `nbytes` over `size` ranks: 2 (P - 1) / P of it (reduce-scatter then
    all-gather; NCCL's ring sends exactly this, gloo's algorithms no more). Rounded down to whole bytes."""
    return 2 * nbytes * (size - 1) // size if size > 1 else 0


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
        # same-host CPU ranks: bytes through shared memory, gloo only for doorbells (distributed/shm.py); built at
        # the first all-to-all / all-gather / ring exchange (a collective), None = not built yet, False = gloo
        self._shm: Any = None if (self.backend == "gloo" and transport_wanted()) else False

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, backend={self.backend}, comm_dtype={self.comm_dtype})"

    @property
    def device(self) -> torch.device:
        """Where this group's tensors must live: the current CUDA device on NCCL (which takes CUDA tensors only;
        init_from_env made it this rank's GPU), the CPU on gloo."""
        return collective_device(self.backend)

    def all_gather_values(self, values: Sequence[float], dtype: torch.dtype = torch.float64) -> list[list]:
        """Every rank's few numbers (the same count on each), in group-rank order: [[rank 0's], [rank 1's], ...].
        The (1, n) message is made on the group's device (NCCL refuses CPU tensors), the answer read back on the
        host. For the small exchanges that decide something (balancer busy times, token counts), never for data."""
        mine = torch.tensor([list(values)], dtype=dtype, device=self.device)  # (1, n) on the group's device
        return self.all_gather(mine, 0, [1] * self.size).tolist()  # (P, n)

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

    def _transport(self, x: torch.Tensor) -> ShmTransport | None:
        """The shared-memory transport for CPU tensors when every rank of the group is on this host, else None."""
        if self._shm is False or x.device.type != "cpu":
            return None
        if self._shm is None:
            transport = ShmTransport(self.group, self.rank, self.size)
            self._shm = transport if transport.enabled else False
        return self._shm or None

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
        p, me = self.size, self.rank
        sd, gd, s_sizes, g_sizes = a2a_check(xs, scatter_dim, gather_dim, scatter_sizes, gather_sizes, p, me)
        kind = "all_to_all"
        if p == 1:
            result = xs if many else x
            return _done_handle(result, self.stats, kind) if async_op else result
        n_t = len(xs)
        dtype, wire = xs[0].dtype, self._wire_dtype(xs[0].dtype)
        moved, cdim, send_shapes, recv_shapes = a2a_layout(xs, sd, gd, s_sizes, g_sizes, me)
        other = send_shapes[0][2 if sd == gd else 3 :]
        starts = [sum(s_sizes[:j]) for j in range(p)]
        send_numel = [math.prod(shape) for shape in send_shapes]
        recv_numel = [math.prod(shape) for shape in recv_shapes]
        send, recv, work = self._a2a_transfer(moved, cdim, starts, s_sizes, send_shapes, recv_numel, wire)
        event = self.stats.record(kind, (sum(send_numel) - send_numel[me]) * wire.itemsize)

        def finish() -> Any:
            buf = recv if wire == dtype else recv.to(dtype)
            if sd == gd:
                full = buf.view(sum(g_sizes), n_t, *other)  # (G, T, *rest)
                outs = [full[:, t].movedim(0, sd) for t in range(n_t)]
            else:
                full = buf.view(sum(g_sizes), n_t, s_sizes[me], *other)  # (G, T, s_me, *other)
                outs = [full[:, t].movedim((0, 1), (gd, sd)) for t in range(n_t)]
            return outs if many else outs[0]

        handle = CommHandle([work], finish, self.stats, kind, keep=(send,), event=event)
        return self._complete(handle, async_op)

    def _a2a_transfer(self, moved, cdim, starts, s_sizes, send_shapes, recv_numel, wire):
        """Pack chunk j of every moved tensor (the one copy of the data, cast to the wire dtype on the way) and start
        the exchange: over shared memory (chunks packed straight into this rank's outbox, where rank j reads
        chunk j) or gloo's all_to_all_single on one flat send buffer. -> (send buffer or None, recv, work)."""
        p, kind, device = self.size, "all_to_all", moved[0].device
        send_numel = [math.prod(shape) for shape in send_shapes]
        shm = self._transport(moved[0])
        if shm is not None:
            op, pieces = shm.reserve([n * wire.itemsize for n in send_numel])
            chunks = [piece.view(wire).view(send_shapes[j]) for j, piece in enumerate(pieces)]
            send = None
        else:
            send = torch.empty(sum(send_numel), dtype=wire, device=device)  # flat, chunk j at its offset
            chunks = [v.view(s) for v, s in zip(send.split(send_numel), send_shapes)]
        for j in range(p):
            for t in range(len(moved)):  # chunk j: (.., T, s_j, ..) with tensor t at index t of dim 1
                chunks[j].select(1, t).copy_(moved[t].narrow(cdim, starts[j], s_sizes[j]))
        recv = torch.empty(sum(recv_numel), dtype=wire, device=device)
        if shm is None:
            return (
                send,
                recv,
                dist.all_to_all_single(recv, send, recv_numel, send_numel, group=self.group, async_op=True),
            )
        parts, ranks = recv.split(recv_numel), list(range(p))  # the piece from rank j -> parts[j]
        return None, recv, shm.publish(op, ranks, ranks, lambda j, piece: copy_piece(parts[j], piece, kind), kind)

    # ------------------------------------------------------------------------------------------------ all-gather
    def all_gather(
        self, x: torch.Tensor, dim: int, sizes: Sequence[int], async_op: bool = False, kind: str = "all_gather"
    ) -> Any:
        """Concatenate every rank's x along `dim`; rank j contributes sizes[j] entries (uneven allowed).

        x (..., sizes[rank], ...) -> (..., sum(sizes), ...). Equal sizes use the backend's all_gather; uneven sizes
        use one split-sizes all-to-all whose send buffer repeats x once per rank (gloo has no uneven all_gather).
        `kind`: the counter it is recorded under (tensor parallelism's gathers are "tp_all_gather").
        """
        p, me = self.size, self.rank
        dim = dim % x.dim()
        sizes = check_sizes(sizes, p, "sizes", minimum=0)
        if x.shape[dim] != sizes[me]:
            raise OpenDiTError(
                f"all_gather: this rank (rank {me}) holds {x.shape[dim]} entries along dim {dim} "
                f"but sizes[{me}] = {sizes[me]} (sizes {sizes}); shard with the same sizes"
            )
        if p == 1:
            return _done_handle(x, self.stats, kind) if async_op else x
        dtype, wire = x.dtype, self._wire_dtype(x.dtype)
        moved = x.movedim(dim, 0)  # (n_me, *rest): rank pieces stack along dim 0 in rank order
        rest = tuple(moved.shape[1:])
        row = math.prod(rest)
        numel = [s * row for s in sizes]
        recv = torch.empty(sum(numel), dtype=wire, device=x.device)  # flat (N, *rest) in rank order
        shm = self._transport(x)
        if shm is not None:  # x once into the shared outbox; every rank copies every piece (uneven sizes too)
            op, pieces = shm.reserve([numel[me] * wire.itemsize] * p, shared=True)
            pieces[0].view(wire).view(moved.shape).copy_(moved)
            parts, ranks = recv.split(numel), list(range(p))
            work = shm.publish(op, ranks, ranks, lambda j, piece: copy_piece(parts[j], piece, kind), "all_gather")
        elif len(set(sizes)) == 1:
            send = moved.to(wire).contiguous().view(-1)  # (n_me * rest,)
            work = all_gather_single(recv, send, group=self.group, async_op=True)
        else:
            send = torch.empty(numel[me] * p, dtype=wire, device=x.device)
            send.view(p, *moved.shape).copy_(moved.unsqueeze(0).expand(p, *moved.shape))  # (P, n_me, *rest)
            work = dist.all_to_all_single(recv, send, numel, [numel[me]] * p, group=self.group, async_op=True)
        event = self.stats.record(kind, numel[me] * (p - 1) * wire.itemsize)

        def finish() -> torch.Tensor:
            buf = recv if wire == dtype else recv.to(dtype)
            return buf.view(sum(sizes), *rest).movedim(0, dim)  # (..., N, ...)

        handle = CommHandle([work], finish, self.stats, kind, event=event)
        return self._complete(handle, async_op)

    # ------------------------------------------------------------------------------------------------ ring P2P
    def ring_exchange(
        self, x: torch.Tensor | Sequence[torch.Tensor], recv_shape: Sequence[int], shift: int = 1
    ) -> CommHandle:
        """Send x to rank (r + shift) % P and receive a `recv_shape` tensor (x's dtype) from rank (r - shift) % P.
        x may be a sequence of same-shape tensors: they travel as one message, torch.stack(x) (K and V of a ring
        block), packed straight into the message buffer.

        Always async (P2P via dist.batch_isend_irecv): start it, compute on the current block, then `wait()`.
        Shapes may differ per rank (uneven ring blocks): each receiver states what it expects.
        """
        p, me, kind = self.size, self.rank, "p2p"
        parts = (x,) if isinstance(x, torch.Tensor) else tuple(x)  # the message is torch.stack(parts) for a sequence
        if p == 1:
            return _done_handle(x if isinstance(x, torch.Tensor) else torch.stack(parts), self.stats, kind)
        shape = parts[0].shape if isinstance(x, torch.Tensor) else (len(parts), *parts[0].shape)
        dtype, wire, device = parts[0].dtype, self._wire_dtype(parts[0].dtype), parts[0].device
        nbytes = math.prod(shape) * wire.itemsize
        dst, src = (me + shift) % p, (me - shift) % p
        recv = torch.empty(tuple(recv_shape), dtype=wire, device=device)
        finish = (lambda: recv) if wire == dtype else (lambda: recv.to(dtype))
        shm = self._transport(parts[0])
        if shm is not None:  # the message straight into the shared outbox for dst; src's piece is copied at wait()
            sizes = [0] * p
            sizes[dst] = nbytes
            op, pieces = shm.reserve(sizes)
            message = pieces[dst].view(wire).view(shape)
            if isinstance(x, torch.Tensor):
                message.copy_(x)
            else:
                for i, part in enumerate(parts):  # (len(parts), *part.shape): each part into its slice
                    message[i].copy_(part)
            work = shm.publish(
                op, [dst], [src], lambda _j, piece: copy_piece(recv, piece, "ring_exchange"), "ring_exchange"
            )
            event = self.stats.record(kind, nbytes)
            return self._complete(CommHandle([work], finish, self.stats, kind, event=event), True)
        send = (x if isinstance(x, torch.Tensor) else torch.stack(parts)).to(wire).contiguous()
        ops = [
            dist.P2POp(dist.isend, send, self._global(dst), self.group),
            dist.P2POp(dist.irecv, recv, self._global(src), self.group),
        ]
        works = dist.batch_isend_irecv(ops)
        event = self.stats.record(kind, nbytes)
        return self._complete(CommHandle(works, finish, self.stats, kind, keep=(send,), event=event), True)

    def send(self, x: torch.Tensor, dst: int) -> CommHandle:
        """Send a contiguous x to group rank `dst` (async; `wait()` before reusing x). Counted as "p2p"."""
        work = dist.isend(x, self._global(dst), group=self.group)
        event = self.stats.record("p2p", x.numel() * x.element_size())
        return CommHandle([work], lambda: x, self.stats, "p2p", keep=(x,), event=event)

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int, device=None) -> torch.Tensor:
        """Receive a `shape` tensor of `dtype` from group rank `src` (blocking; the sender counts the bytes)."""
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        begun = self.stats.wait_begin()
        dist.recv(out, self._global(src), group=self.group)
        self.stats.wait_end("p2p", begun)
        return out

    def exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, tuple[Sequence[int], torch.dtype]], kind: str = "p2p"
    ) -> CommHandle:
        """Point-to-point with a few peers at once (async, one batch_isend_irecv): sends[j] goes to group rank j, a
        tensor of recvs[j] = (shape, dtype) comes from group rank j; `wait()` gives {j: received}. Used for halos
        (the VAE's row bands, parallel/vae.py). Counted under `kind` (the bytes this rank sends)."""
        if not sends and not recvs:
            return _done_handle({}, self.stats, kind)
        device = next(iter(sends.values())).device if sends else None
        out = {j: torch.empty(tuple(shape), dtype=dtype, device=device) for j, (shape, dtype) in recvs.items()}
        keep = tuple(x.contiguous() for x in sends.values())
        ops = [dist.P2POp(dist.isend, x, self._global(j), self.group) for j, x in zip(sends, keep)]
        ops += [dist.P2POp(dist.irecv, x, self._global(j), self.group) for j, x in out.items()]
        works = dist.batch_isend_irecv(ops)
        event = self.stats.record(kind, sum(x.numel() * x.element_size() for x in keep))
        return self._complete(CommHandle(works, lambda: out, self.stats, kind, keep=keep, event=event), True)

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
        event = self.stats.record(kind, buf.numel() * wire.itemsize * (p - 1) if me == src else 0)

        def finish() -> torch.Tensor:
            if buf is not x:
                x.copy_(buf)
            return x

        handle = CommHandle([work], finish, self.stats, kind, event=event)
        return self._complete(handle, async_op)

    # ------------------------------------------------------------------------------------------------ all-reduce
    def all_reduce(self, x: torch.Tensor, kind: str = "all_reduce", inplace: bool = False) -> torch.Tensor:
        """The elementwise sum of every rank's x (same shape everywhere); blocking. A new tensor, or x itself with
        `inplace` (the caller owns it, e.g. a fresh matmul output). Always in x's dtype (a sum of partial results is
        a result: comm_dtype never rounds it). `kind` names the counter ("cache_metric" for a cache's decision)."""
        if self.size == 1:
            return x
        if not x.is_contiguous():
            out = x.contiguous()
        else:
            out = x if inplace else x.clone()
        event = self.stats.record(kind, all_reduce_bytes(out.numel() * out.element_size(), self.size))
        begun = self.stats.wait_begin()
        dist.all_reduce(out, group=self.group)
        self.stats.wait_end(kind, begun, event=event)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
