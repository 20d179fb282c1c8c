"""Same-host transport for CPU collectives: the bytes go through shared memory, gloo only rings a doorbell.

Why: over gloo, processes on one host move every byte through loopback TCP - a copy into the kernel, a copy out, the
TCP stack and gloo's I/O thread. On a machine whose cores all compute, that CPU time is taken from the compute
threads (benchmarks/scaling_speedup.py measures it per rank: "other_threads_cpu", "main_runqueue"). Here the sender
packs its message straight into its own shared outbox (the packing copy Comm makes anyway), a one-int64 gloo message
tells each receiver that op n is there, and the receiver copies its piece out: one user-space memcpy per byte, no
kernel, no I/O thread. NCCL does the same inside a node (its SHM/P2P transports); this is the CPU/gloo analogue.

Memory: memfd segments, mapped by peers through /proc/<pid>/fd/<fd> (same host, same user). Unlike /dev/shm files
they cannot leak when a process is killed and are not bounded by a small tmpfs. Each rank owns:
  control  int64 (P + MAX_SLOTS * (3 + 2P),): acks[P] (acks[j] = the last op this rank finished reading from rank j),
           then per slot a header [op, memfd number, capacity, offsets[P], sizes[P]] (bytes, per receiver)
  slots    outboxes, as many as ops are in flight at once (Ulysses: q, k, v; FastSeq: its chunks), each a memfd grown
           on demand (a new memfd; readers remap when the number changes)

Protocol of op n (every rank of the group issues a Comm's ops in the same order, as with any collective):
  reserve  a slot whose last op every reader has acked (else a new slot); the caller packs the data into it
  publish  header (op n last), one isend [n] to each receiver, one irecv from each sender (gloo, 8 bytes each)
  wait     the doorbells; find op n among each sender's headers; its size must equal what this rank expects;
           copy the piece out; ack (acks[sender] = n). A sender never waits for its own unwaited ops.
A doorbell carrying another op number means the ranks' op orders differ: an OpenDiTError, never silent corruption.
Switch it off with OPENDIT_CPU_TRANSPORT=gloo (every byte over gloo, as before).
"""

from __future__ import annotations

import mmap
import os
import socket
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from opendit.errors import OpenDiTError

MAX_SLOTS = 16  # outboxes per rank and Comm: at most this many ops in flight
DOORBELL_TAG = 0x0D17  # gloo P2P tag of the doorbells, apart from other point-to-point traffic
ACK_TIMEOUT_S = 600.0
_KINDS = ("all_to_all", "all_gather", "ring_exchange")  # what a doorbell says its op is
_ALIGN = 64  # byte alignment of each receiver's piece inside a slot


def transport_wanted() -> bool:
    """Shared memory unless OPENDIT_CPU_TRANSPORT=gloo, or the OS has no memfd / per-process fd directory."""
    if not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir():
        return False
    return os.environ.get("OPENDIT_CPU_TRANSPORT", "shm").lower() != "gloo"


def _host_key() -> tuple:
    boot = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname(), boot.read_text().strip() if boot.exists() else "", os.getuid()


class _Segment:
    """A memfd of `nbytes` mapped here: `.fd` (this process's descriptor), `.bytes` (uint8 tensor view)."""

    def __init__(self, nbytes: int, fd: int | None = None) -> None:
        self.owned = fd is None
        self.fd = os.memfd_create("opendit-shm") if fd is None else fd
        if self.owned:
            os.ftruncate(self.fd, nbytes)
        self.nbytes = nbytes
        self.map = mmap.mmap(self.fd, nbytes)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    @classmethod
    def open_peer(cls, pid: int, fd: int, nbytes: int) -> _Segment:
        try:
            mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        except OSError as exc:
            raise OpenDiTError(
                f"cannot map a peer's shared-memory segment (/proc/{pid}/fd/{fd}: {exc}); "
                "set OPENDIT_CPU_TRANSPORT=gloo to send every byte over gloo instead"
            ) from exc
        seg = cls(nbytes, fd=mine)
        os.close(mine)  # the mapping keeps the memory; the descriptor is not needed any more
        return seg

    def close(self) -> None:
        self.bytes = None
        try:
            self.map.close()
        except BufferError:  # a tensor view still alive: the mapping goes with it
            pass
        if self.owned:
            os.close(self.fd)


class ShmWork:
    """The in-flight part of one op: wait() completes the doorbells, copies the pieces in, acks."""

    def __init__(self, works: list, finish) -> None:
        self._works, self._finish = works, finish

    def wait(self) -> bool:
        for work in self._works:
            work.wait()
        if self._finish is not None:
            self._finish()
            self._finish = None
        return True


class ShmTransport:
    """The shared-memory path of one Comm's group (see the module docstring). Built lazily at the group's first op,
    collectively; `enabled` is False when the ranks are not all on one host (then Comm keeps using gloo)."""

    def __init__(self, group, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(size)]
        keys = [None] * size
        dist.all_gather_object(keys, _host_key(), group=group)
        self.enabled = all(k == keys[0] for k in keys)
        if not self.enabled:
            return
        self.op = 0
        self.ctrl_len = size + MAX_SLOTS * (3 + 2 * size)
        self.ctrl = _Segment(self.ctrl_len * 8)
        self.ctrl_i64 = self.ctrl.bytes.view(torch.int64)
        self.ctrl_i64.fill_(-1)
        self._segments: list[_Segment] = [self.ctrl]
        self.slots: list[_Segment | None] = []  # added as more ops are in flight at once (_pick_slot)
        self.slot_readers: list[tuple[int, list[int]]] = []  # per slot: (op, readers) of its last use
        ids = [None] * size
        dist.all_gather_object(ids, (os.getpid(), self.ctrl.fd), group=group)
        self.pids = [pid for pid, _ in ids]
        try:  # a host that forbids mapping a peer's memory (another user, a locked-down /proc): gloo, on every rank
            self.peer_ctrl = [
                self.ctrl_i64
                if j == rank
                else self._track(_Segment.open_peer(pid, fd, self.ctrl_len * 8)).bytes.view(torch.int64)
                for j, (pid, fd) in enumerate(ids)
            ]
            mapped = True
        except OpenDiTError:
            self.peer_ctrl, mapped = [], False
        every = [None] * size
        dist.all_gather_object(every, mapped, group=group)
        if not all(every):
            _drain_and_close(self._segments, [], [], rank)
            self.enabled = False
            return
        # at garbage collection or interpreter exit: let the readers of the last ops finish, then unmap everything
        # (a rank's op is done for it when its pieces arrived; a peer may not have copied this rank's piece yet)
        self._finalizer = weakref.finalize(
            self, _drain_and_close, self._segments, self.slot_readers, self.peer_ctrl, rank
        )
        self.unread: list[set[int]] = [set() for _ in range(size)]  # per sender: ops published, not yet read
        self.peer_slots: dict[tuple[int, int], tuple[int, _Segment]] = {}  # (rank, slot) -> (fd, mapping)
        dist.barrier(group=group)  # every control segment mapped before any op

    def _track(self, seg: _Segment) -> _Segment:
        self._segments.append(seg)
        return seg

    def _drop(self, seg: _Segment) -> None:
        if seg in self._segments:
            self._segments.remove(seg)
        seg.close()

    # ------------------------------------------------------------------------------------------------ layout
    def _header(self, ctrl: torch.Tensor, slot: int) -> torch.Tensor:
        """(3 + 2P,) int64 view of a slot's header: op, fd, capacity, offsets[P], sizes[P]."""
        base = self.size + slot * (3 + 2 * self.size)
        return ctrl[base : base + 3 + 2 * self.size]

    # ------------------------------------------------------------------------------------------------ sender
    def _free(self, slot: int) -> bool:
        last_op, readers = self.slot_readers[slot]
        return all(int(self.peer_ctrl[j][self.rank]) >= last_op for j in readers)

    def _pick_slot(self, total: int) -> int:
        """A slot every reader of its last op has acked: the smallest that holds `total` bytes, else the largest
        free one (grown), else a new one; only when MAX_SLOTS are all in use, wait for the oldest."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            free = [s for s in range(len(self.slots)) if self._free(s)]
            fits = [s for s in free if self.slots[s].nbytes >= total]
            if fits:
                return min(fits, key=lambda s: self.slots[s].nbytes)
            if len(self.slots) < MAX_SLOTS:
                self.slots.append(None)
                self.slot_readers.append((-1, []))
                return len(self.slots) - 1
            if free:
                return max(free, key=lambda s: self.slots[s].nbytes)
            if time.monotonic() > deadline:
                raise OpenDiTError(
                    f"no shared-memory slot was acknowledged by the peers within {ACK_TIMEOUT_S:.0f} s "
                    f"({MAX_SLOTS} in flight); a peer is stuck or dead"
                )
            time.sleep(1e-4)

    def reserve(self, piece_bytes: list[int], shared: bool = False) -> tuple[int, list[torch.Tensor]]:
        """Op number and one uint8 view per receiver (piece_bytes[j] long; 0 = nothing for j) in a slot of this
        rank. shared: every receiver reads the same bytes (an all-gather): one piece of piece_bytes[0] at offset 0."""
        offsets, total = [], 0
        for nbytes in piece_bytes:
            offsets.append(0 if shared else total)
            total = max(total, nbytes) if shared else total + -(-nbytes // _ALIGN) * _ALIGN
        n = self.op
        self.op += 1
        slot = self._pick_slot(total)
        seg = self.slots[slot]
        if seg is None or seg.nbytes < total:  # grow: a new memfd (readers remap when they see its number)
            old = seg.nbytes if seg is not None else 0
            if seg is not None:
                self._drop(seg)
            seg = self.slots[slot] = self._track(_Segment(max(total, 2 * old, 1 << 20)))
        self.slot_readers[slot] = (n, [])  # taken (no reader yet): not free until publish names the readers
        header = self._header(self.ctrl_i64, slot)
        header[1], header[2] = seg.fd, seg.nbytes
        header[3 : 3 + self.size] = torch.tensor(offsets)
        header[3 + self.size :] = torch.tensor(piece_bytes)
        header[0] = n  # last: a reader looking for op n finds a complete header
        self._reserved = slot
        return n, [seg.bytes[o : o + b] for o, b in zip(offsets, piece_bytes)]

    def publish(self, n: int, receivers: list[int], senders: list[int], on_arrival, what: str) -> ShmWork:
        """Ring the doorbells of op n (just reserved); ShmWork.wait() waits for the senders' doorbells and calls
        on_arrival(sender, piece) for each (a uint8 view of the sender's memory, to be copied out at once)."""
        self.slot_readers[self._reserved] = (n, [j for j in receivers if j != self.rank])
        if self.rank in senders:  # this rank's own piece now: once the peers ack, the slot may be reused
            on_arrival(self.rank, self._own_piece(self._reserved))
        works = []
        mine = torch.tensor([n, _KINDS.index(what)], dtype=torch.int64)  # the doorbell: (op, kind)
        for j in receivers:
            if j != self.rank:
                works.append(dist.isend(mine, self.global_ranks[j], group=self.group, tag=DOORBELL_TAG))
        incoming = [j for j in senders if j != self.rank]
        for j in incoming:
            self.unread[j].add(n)
        bells = {j: torch.empty(2, dtype=torch.int64) for j in incoming}  # one buffer per op: several in flight
        for j in incoming:
            works.append(dist.irecv(bells[j], self.global_ranks[j], group=self.group, tag=DOORBELL_TAG))

        def finish() -> None:
            try:
                for j in incoming:
                    their_n, their_kind = (int(v) for v in bells[j])
                    if (their_n, their_kind) != (n, _KINDS.index(what)):
                        raise OpenDiTError(
                            f"rank {self.global_ranks[j]} sent {_KINDS[their_kind]} op {their_n} where this rank "
                            f"expected {what} op {n}: the ranks issued their collectives in different orders"
                        )
                for j in incoming:
                    on_arrival(j, self._peer_piece(j, n))
            finally:  # ack, also after an error: a peer must not wait for a slot this rank will never read
                for j in incoming:  # every op up to the ack this rank reads from j is read (waits may be unordered)
                    self.unread[j].discard(n)
                    self.ctrl_i64[j] = min(self.unread[j]) - 1 if self.unread[j] else self.op - 1

        return ShmWork(works, finish)

    # ------------------------------------------------------------------------------------------------ receiver
    def _own_piece(self, slot: int) -> torch.Tensor:
        header = self._header(self.ctrl_i64, slot)
        offset, nbytes = int(header[3 + self.rank]), int(header[3 + self.size + self.rank])
        return self.slots[slot].bytes[offset : offset + nbytes]

    def _peer_piece(self, j: int, n: int) -> torch.Tensor:
        """Rank j's piece of op n for this rank (a uint8 view of j's memory; copy it before acking)."""
        ctrl = self.peer_ctrl[j]
        for slot in range(MAX_SLOTS):
            header = self._header(ctrl, slot)
            if int(header[0]) == n:
                break
        else:
            raise OpenDiTError(f"rank {self.global_ranks[j]} rang for op {n} but no slot of it holds that op")
        fd, cap = int(header[1]), int(header[2])
        offset, nbytes = int(header[3 + self.rank]), int(header[3 + self.size + self.rank])
        cached = self.peer_slots.get((j, slot))
        if cached is None or cached[0] != fd or cached[1].nbytes != cap:
            if cached is not None:
                self._drop(cached[1])
            cached = (fd, self._track(_Segment.open_peer(self.pids[j], fd, cap)))
            self.peer_slots[(j, slot)] = cached
        return cached[1].bytes[offset : offset + nbytes]


def _drain_and_close(segments: list, slot_readers: list, peer_ctrl: list, rank: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s  # a dead peer never acks: give up after timeout_s, unmap anyway
    for last_op, readers in slot_readers:
        for j in readers:
            while int(peer_ctrl[j][rank]) < last_op and time.monotonic() < deadline:
                time.sleep(1e-3)
    for seg in segments:
        seg.close()
    segments.clear()


def copy_piece(dst: torch.Tensor, piece: torch.Tensor, what: str) -> None:
    """dst (flat, any dtype) <- piece (uint8); sizes must agree (else the ranks disagree on the split)."""
    flat = dst.reshape(-1).view(torch.uint8) if dst.numel() else dst  # dst is contiguous: a view, no copy
    if piece.numel() != dst.numel() * dst.element_size():
        raise OpenDiTError(
            f"{what}: a peer sent {piece.numel()} bytes where this rank expects {dst.numel() * dst.element_size()}; "
            "the ranks disagree on the split sizes"
        )
    if piece.numel():
        flat.copy_(piece)
