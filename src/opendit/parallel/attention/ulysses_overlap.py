"""Ulysses with its all-to-alls overlapped by compute: projection-ordered, head-group pipelined, exact.

`UlyssesAttention` receives q, k, v already projected, so its first all-to-all can only start after the whole QKV
matmul and the attention can only start after the whole exchange. This variant replaces the SelfAttention's forward
(like FastSeq: installed from outside, parameters and state_dict keys untouched) and orders the work so that every
message but the last travels while the rank computes something that does not need it.

Heads are processed in `chunks` head groups. Rank j owns T_j = head_sizes(H, P)[j] heads (the same counts as
Ulysses, so the bytes equal `ulysses_bytes`); its T_j heads are split ⌈⌉/⌊⌋ into the groups, Hg_j >= 1 per group.
Group g is one contiguous range of global heads [G_g, G_g + Hg), Hg = sum_j Hg_j, of which rank j owns the j-th
contiguous sub-range; so every message's weight rows are a plain row-slice (a view) of the fused qkv weight, whose
output dim is laid out (3, H, Dh): no weight is copied.

Per attention layer on rank r, x (B, S_r, C):
1. for each group g: project K and V of the group's heads, x @ W_k,g^T -> (B, S_r, Hg, Dh) (and V), and start their
   all-to-all (seq -> heads, one message); then project Q and start its all-to-all (`kv_first`; otherwise one
   message with q, k, v). Each message travels while the next projection runs.
   All-to-all: (B, S_r, Hg, Dh) -> (B, S, Hg_r, Dh), scatter the head dim by Hg_j, gather the seq dim by seq_sizes.
2. for each group g: wait for its q, k, v, attention (B, S, Hg_r, Dh) over the full sequence, and start the
   all-to-all back (heads -> seq): (B, S, Hg_r, Dh) -> (B, S_r, Hg, Dh). Group g+1's inputs arrive during group g's
   attention and group g's output leaves during group g+1's attention.
3. wait for the outputs, place group g at heads [G_g, G_g + Hg) of (B, S_r, H, Dh), and run the module's proj.
Only the last group's output message has no compute left to hide behind. Exact: heads are independent, so the
grouping changes which rank computes a head, never the arithmetic (fp32 equal to one process within rounding).

Calls per layer: chunks * (2 if kv_first else 1) in, chunks out. Same bytes as Ulysses (see `ulysses_bytes`).

    UlyssesOverlapAttention.install(block.attn, comm, seq_sizes, chunks=2)
    UlyssesOverlapAttention.uninstall(block.attn)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError
from opendit.models.attention import SelfAttention
from opendit.parallel.attention.override import AttentionOverride
from opendit.parallel.attention.ulysses import ulysses_buffers, ulysses_bytes
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import head_sizes, offsets, split_sizes


def overlap_head_groups(heads: int, parts: int, chunks: int) -> list[list[int]]:
    """groups[g][j] = heads of rank j in head group g: rank j's head_sizes(heads, parts)[j] heads split ⌈⌉/⌊⌋ into
    the groups. The number of groups is capped at the smallest per-rank head count, so every rank has >= 1 head in
    every group (a rank with an empty group would run attention on nothing)."""
    if chunks < 1:
        raise OpenDiTError(f"chunks must be >= 1 (head groups pipelined through the all-to-alls), got {chunks}")
    per_rank = head_sizes(heads, parts)
    n = min(int(chunks), min(per_rank))
    split = [split_sizes(t, n) for t in per_rank]  # (P, n)
    return [[split[j][g] for j in range(parts)] for g in range(n)]


def ulysses_overlap_calls(world: int, heads: int, chunks: int = 2, kv_first: bool = True) -> int:
    """All-to-all calls per layer on each rank (0 on one rank)."""
    if world == 1:
        return 0
    n = len(overlap_head_groups(heads, world, chunks))
    return n * (3 if kv_first else 2)


class UlyssesOverlapAttention(AttentionOverride):
    """Replaces a SelfAttention's forward: (B, S_rank, C) -> (B, S_rank, C), Ulysses with overlapped all-to-alls.

    module: the SelfAttention (its qkv, proj, heads); comm: the Ulysses group; seq_sizes: tokens per group rank
    (uneven allowed); chunks: head groups pipelined (capped at ⌊H/P⌋); kv_first: send K/V before projecting Q;
    attn: local attention on (B, S, Hg_r, Dh).
    """

    attribute = "ulysses_overlap"  # module.ulysses_overlap holds the installed kernel
    kernel = "UlyssesOverlapAttention"

    def __init__(
        self, module: SelfAttention, comm: Comm, seq_sizes: Sequence[int], chunks: int = 2, kv_first: bool = True, **kw
    ):
        super().__init__(module, comm, seq_sizes, **kw)
        self.kv_first = kv_first
        self.groups = overlap_head_groups(module.num_heads, comm.size, chunks)  # (n, P)
        self.group_start = offsets([sum(g) for g in self.groups])  # first global head of each group

    def _rows(self, part: int, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight rows (Hg*Dh, C) and bias of part (0 q, 1 k, 2 v) for group g: a view, no copy."""
        mod, dh = self.module, self.module.head_dim
        start = part * mod.num_heads * dh + self.group_start[g] * dh
        n = sum(self.groups[g]) * dh
        bias = mod.qkv.bias
        return mod.qkv.weight[start : start + n], None if bias is None else bias[start : start + n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        comm, me, mod = self.comm, self.comm.rank, self.module
        self.check_input(self.kernel, x, self.seq_sizes, me)
        dh = mod.head_dim
        b, s_r, c = x.shape[0], x.shape[1], mod.num_heads * dh  # c: H*Dh, the module's heads (tp: its H_r)
        messages = ((1, 2), (0,)) if self.kv_first else ((0, 1, 2),)

        # 1. project and send, group by group; every message travels while the next projection runs.
        inbound = []  # per group: [(parts, handle)]
        for g, sizes in enumerate(self.groups):
            hg = sum(sizes)
            sent = []
            for parts in messages:
                # x (B, S_r, C) @ rows^T -> (B, S_r, Hg*Dh) -> (B, S_r, Hg, Dh), one tensor per part
                ts = [F.linear(x, *self._rows(p, g)).view(b, s_r, hg, dh) for p in parts]
                # seq -> heads: scatter heads (dim 2) by Hg_j, gather seq (dim 1): (B, S, Hg_r, Dh) per tensor
                sent.append((parts, comm.all_to_all(ts, 2, 1, sizes, self.seq_sizes, async_op=True)))
            inbound.append(sent)

        # 2. attention per group as its inputs arrive; its output leaves while the next group computes.
        outbound = []
        for g, sizes in enumerate(self.groups):
            qkv: dict[int, torch.Tensor] = {}
            for parts, handle in inbound[g]:
                qkv.update(zip(parts, handle.wait()))
            out = self.attn(qkv[0], qkv[1], qkv[2])  # (B, S, Hg_r, Dh): every token, this rank's heads of group g
            # heads -> seq: scatter seq (dim 1) by seq sizes, gather heads (dim 2) by Hg_j -> (B, S_r, Hg, Dh)
            outbound.append(comm.all_to_all(out, 1, 2, self.seq_sizes, sizes, async_op=True))
            inbound[g] = None  # drop the group's inputs before the next attention

        # 3. heads of group g go to [G_g, G_g + Hg) of (B, S_r, H, Dh); then the module's own output projection.
        if len(self.groups) == 1:
            full = outbound[0].wait().reshape(b, s_r, c)  # (B, S_r, H*Dh)
        else:
            full = x.new_empty(b, s_r, mod.num_heads, dh)  # (B, S_r, H, Dh)
            for g, handle in enumerate(outbound):
                full[:, :, self.group_start[g] : self.group_start[g] + sum(self.groups[g])] = handle.wait()
            full = full.view(b, s_r, c)
        return mod.proj(full)  # (B, S_r, C)


class UlyssesOverlapStrategy(SequenceStrategy):
    """`--sp-impl ulysses-overlap` (the default on a --ulysses degree): Ulysses with K/V sent before Q is projected
    and head groups pipelined through the all-to-alls; same bytes as Ulysses, more (smaller) calls."""

    name = "ulysses-overlap"
    summary = "Ulysses with the all-to-alls under the projections and attention (K/V first, 2 head groups pipelined)"
    uses = ("ulysses",)
    auto = True

    def install(self, modules: list, runtime, sizes: list[int]) -> None:
        for module in modules:
            UlyssesOverlapAttention.install(module, runtime.comms["ulysses"], sizes)

    def core(self, runtime, sizes: list[int]):
        # on q, k, v projected by the module itself there is no projection to hide the messages under: the three
        # seq -> heads all-to-alls are all in flight at once, then one back (Ulysses' bytes, 4 calls)
        from opendit.parallel.attention.ulysses import UlyssesAttention

        return UlyssesAttention(runtime.comms["ulysses"], sizes, pack_qkv=False)

    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        heads = head_sizes(dims.num_heads, plan.ulysses)[rank]
        return AttentionWork(q_tokens=sum(sizes), heads=heads, qkv_rows=sizes[rank], dispatch_ops=0.3)

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        nbytes = ulysses_bytes(sizes, batch, dims.num_heads, dims.head_dim, rank=rank, itemsize=itemsize)
        calls = ulysses_overlap_calls(plan.ulysses, dims.num_heads)
        # what the link hides behind the projections and the other groups' attention: Speeds.overlap["ulysses"]
        # (0 unless a calibration measured it), so an uncalibrated plan never counts on it
        return [CommItem("all_to_all", nbytes, calls, plan.ulysses, hide_s=attn_s, overlap="ulysses")]

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        return ulysses_buffers(dims, plan, batch, sizes, itemsize)


register(UlyssesOverlapStrategy())
