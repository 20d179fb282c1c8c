"""FastSeq, OpenDiT's own sequence parallelism, re-done exact for any world size, uneven tokens and heads.

Per attention layer on rank r of P, with x (B, S_r, C) and this rank's heads [h0, h0 + H_r):
1. all-gather x -> (B, S, C), in `chunks` pieces; every piece is in flight before the first is used, so piece i+1
   arrives while piece i goes through the QKV matmul (overlap for any P, not only P = 2);
2. QKV for this rank's heads only: x @ W_r^T + b_r with W_r the (3, H_r, Dh) rows of the fused (3C, C) qkv weight
   (its output dim is laid out (3, H, Dh)), sliced once and re-sliced only if the weight changes;
3. local attention (B, S, H_r, Dh) over the full sequence;
4. ONE all-to-all back: (B, S, H_r, Dh) -> (B, S_r, H, Dh); then the module's own proj.
Two kinds of collective per layer (Ulysses: 2 all-to-alls packed, 4 classic). Bytes: see `fastseq_bytes`.

Install from outside; the module, its parameters and state_dict keys are untouched:
    FastSeqAttention.install(block.attn, comm, seq_sizes)   # block.attn(x) now runs FastSeq
    FastSeqAttention.uninstall(block.attn)                    # back to the single-device forward
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from opendit.distributed.comm import Comm
from opendit.errors import OpenDiTError
from opendit.models.attention import SelfAttention
from opendit.parallel.attention.override import AttentionOverride
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import head_sizes, offsets


def qkv_head_slice(
    weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, head_dim: int, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a fused qkv Linear for heads [start, start + count).

    weight (3*H*Dh, C), output dim laid out (3, H, Dh) -> (3*count*Dh, C) laid out (3, count, Dh); bias likewise.
    """
    c_in = weight.shape[1]
    w = weight.view(3, num_heads, head_dim, c_in)[:, start : start + count].reshape(3 * count * head_dim, c_in)
    b = None if bias is None else bias.view(3, num_heads, head_dim)[:, start : start + count].reshape(-1)
    return w.contiguous(), None if b is None else b.contiguous()


def chunk_plan(seq_sizes: Sequence[int], chunks: int) -> list[list[int]]:
    """plan[c][j] = tokens of rank j that travel in all-gather chunk c (rank j's shard split ⌈⌉/⌊⌋ into chunks;
    some entries may be 0). The number of chunks is capped at max(seq_sizes) so no chunk is empty overall."""
    n = max(1, min(int(chunks), max(seq_sizes)))
    per_rank = []
    for s in seq_sizes:
        base, extra = divmod(s, n)
        per_rank.append([base + 1 if c < extra else base for c in range(n)])
    return [[per_rank[j][c] for j in range(len(seq_sizes))] for c in range(n)]


def _version(t: torch.Tensor) -> int:
    """In-place modification counter; inference tensors have none (they cannot be modified outside inference mode)."""
    return -1 if t.is_inference() else t._version


class FastSeqAttention(AttentionOverride):
    """Replaces a SelfAttention's forward: (B, S_rank, C) -> (B, S_rank, C).

    module: the SelfAttention (its qkv, proj and head count are used, not copied except this rank's qkv rows);
    comm: the sequence-parallel group; seq_sizes: tokens per group rank; chunks: all-gather pieces for overlap;
    attn: local attention on (B, S, H_r, Dh) (default SDPA).
    """

    attribute = "fastseq"  # module.fastseq holds the installed kernel
    kernel = "FastSeq"

    def __init__(self, module: SelfAttention, comm: Comm, seq_sizes: Sequence[int], chunks: int = 2, **kwargs):
        if chunks < 1:
            raise OpenDiTError(f"chunks must be >= 1 (all-gather pieces for overlap), got {chunks}")
        super().__init__(module, comm, seq_sizes, **kwargs)
        self.head_sizes = head_sizes(module.num_heads, comm.size)
        self.head_start = offsets(self.head_sizes)[comm.rank]
        self.plan = chunk_plan(self.seq_sizes, chunks)
        self._key: tuple | None = None
        self._w = self._b = None

    # ---------------------------------------------------------------------------------------------- weights
    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's qkv rows (3*H_r*Dh, C) and bias, sliced once and cached; re-sliced only if the weight was
        replaced, moved, cast or modified in place. (Inference only: the collectives are not differentiable.)"""
        w, b = self.module.qkv.weight, self.module.qkv.bias
        args = (self.module.num_heads, self.module.head_dim, self.head_start, self.head_sizes[self.comm.rank])
        key = (w.data_ptr(), w.dtype, w.device, _version(w), None if b is None else (b.data_ptr(), _version(b)))
        if key != self._key:
            with torch.no_grad():
                self._w, self._b = qkv_head_slice(w, b, *args)
            self._key = key
        return self._w, self._b

    # ---------------------------------------------------------------------------------------------- forward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        comm, me, mod = self.comm, self.comm.rank, self.module
        self.check_input(self.kernel, x, self.seq_sizes, me)
        w_r, b_r = self._weights()  # (3*H_r*Dh, C), (3*H_r*Dh,)
        b, s_r, c = x.shape[0], x.shape[1], self.module.num_heads * self.module.head_dim  # c: H*Dh (tp: H_r*Dh)
        h_r, dh = self.head_sizes[me], mod.head_dim
        total = sum(self.seq_sizes)
        starts = offsets(self.seq_sizes)  # global start of each rank's shard

        # 1. Launch every all-gather piece now: piece i is (B, sum_j plan[i][j], C), rank j's tokens in rank order.
        handles, local_off = [], 0
        for piece in self.plan:
            part = x.narrow(1, local_off, piece[me])  # (B, plan[i][me], C)
            handles.append(comm.all_gather(part, 1, piece, async_op=True))
            local_off += piece[me]

        # 2. QKV of this rank's heads, piece by piece as they arrive (the rest keep arriving meanwhile).
        qkv = x.new_empty(b, total, 3 * h_r * dh)  # (B, S, 3*H_r*Dh), tokens in global order
        done = [0] * comm.size  # tokens of rank j already placed
        for piece, handle in zip(self.plan, handles):
            gathered = handle.wait()  # (B, sum_j piece[j], C)
            proj = F.linear(gathered, w_r, b_r)  # (B, sum_j piece[j], 3*H_r*Dh)
            off = 0
            for j, n in enumerate(piece):  # scatter rank j's rows to their global positions
                if n:
                    qkv[:, starts[j] + done[j] : starts[j] + done[j] + n] = proj[:, off : off + n]
                    done[j] += n
                    off += n
        q, k, v = qkv.view(b, total, 3, h_r, dh).unbind(dim=2)  # (B, S, H_r, Dh) each

        # 3. attention over the full sequence for this rank's heads
        out = self.attn(q, k, v)  # (B, S, H_r, Dh)

        # 4. one all-to-all: scatter seq (dim 1) by seq sizes, gather heads (dim 2) by head sizes -> (B, S_r, H, Dh)
        out = comm.all_to_all(out, 1, 2, self.seq_sizes, self.head_sizes)
        return mod.proj(out.reshape(b, s_r, c))  # (B, S_r, C)


def fastseq_bytes(
    seq_sizes: Sequence[int], batch: int, heads: int, head_dim: int, rank: int | None = None, itemsize: int = 4
) -> int:
    """Bytes FastSeqAttention sends per call (CommStats convention), for rank r or all ranks (rank=None):
    all-gather of x: (P - 1) * B * S_r * C, plus the all-to-all back: B * (S - S_r) * H_r * Dh (C = H * Dh).
    Even split, per rank: B*S*C*((P-1)/P + (P-1)/P^2) vs Ulysses' 4*B*S*C*(P-1)/P^2 (0.75x at P=2, 1.25x at P=4)."""
    p = len(seq_sizes)
    hs = head_sizes(heads, p)
    total_s, c = sum(seq_sizes), heads * head_dim

    def one(r: int) -> int:
        return itemsize * batch * ((p - 1) * seq_sizes[r] * c + (total_s - seq_sizes[r]) * hs[r] * head_dim)

    return sum(one(r) for r in range(p)) if rank is None else one(rank)


def fastseq_calls(seq_sizes: Sequence[int], chunks: int = 2) -> dict[str, int]:
    """Calls per FastSeqAttention call on each rank, by CommStats kind."""
    if len(seq_sizes) == 1:
        return {}
    return {"all_gather": len(chunk_plan(seq_sizes, chunks)), "all_to_all": 1}


class FastSeqStrategy(SequenceStrategy):
    """`--sp-impl fastseq` (on the --ulysses degree): all-gather x, QKV for this rank's heads, one all-to-all back."""

    name = "fastseq"
    summary = "all-gather x (chunked, under the QKV matmul), QKV of this rank's heads, local attention, 1 all-to-all"
    uses = ("ulysses",)

    def check(self, plan, dims) -> list[str]:
        if plan.ring > 1:
            raise OpenDiTError("fastseq does not combine with ring; use --sp-impl usp for ulysses x ring")
        return []

    def install(self, modules: list, runtime, sizes: list[int]) -> None:
        for module in modules:
            FastSeqAttention.install(module, runtime.comms["sp"], sizes)

    def core(self, runtime, sizes: list[int]):
        return FastSeqCore(runtime.comms["sp"], sizes)

    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        tokens, c = sum(sizes), dims.hidden_size
        heads = head_sizes(dims.num_heads, plan.ulysses)[rank]
        # QKV for every token but only this rank's heads: 3 * H_r * Dh outputs instead of 3C on its own tokens
        extra = 2 * batch * c * 3 * (tokens * heads * dims.head_dim - sizes[rank] * c)
        return AttentionWork(
            q_tokens=tokens,
            heads=heads,
            qkv_rows=tokens,
            extra_linear_flops=extra,
            elementwise_rows=tokens,
            dispatch_ops=0.3,
        )

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        p, tokens = len(sizes), sum(sizes)
        heads = head_sizes(dims.num_heads, p)[rank]
        calls = fastseq_calls(sizes)
        gather = itemsize * batch * (p - 1) * sizes[rank] * dims.hidden_size  # the first term of fastseq_bytes
        back = itemsize * batch * (tokens - sizes[rank]) * heads * dims.head_dim  # its second term
        return [CommItem("all_gather", gather, calls["all_gather"], p), CommItem("all_to_all", back, 1, p)]

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        h_u = max(head_sizes(dims.num_heads, plan.ulysses))
        full_heads = batch * sum(sizes) * h_u * dims.head_dim * itemsize  # one (B, S, H_r, D) tensor
        return batch * sum(sizes) * dims.hidden_size * itemsize + 5 * full_heads  # gathered x, qkv of my heads, a2a


register(FastSeqStrategy())


class FastSeqCore:
    """AttentionCore: FastSeq's two collectives on q, k, v that a module has already projected (diffusers' attention
    processors project, normalise and rotate q, k, v themselves, so the block input x cannot be gathered instead).

    (B, S_r, H, D) x3 -> (B, S_r, H, D): one all-gather of q, k, v packed as (B, S_r, 3, H, D) -> (B, S, 3, H, D);
    this rank keeps its heads (B, S, H_r, D) and attends locally over the full sequence; ONE all-to-all back (scatter
    seq by seq sizes, gather heads by head sizes). Bytes: the all-gather carries 3C values per token where FastSeq on
    a fused-qkv module carries C, so here it sends more than Ulysses (see `fastseq_core_bytes`); it exists so that
    every strategy runs on every family, and the planner does not pick it for them.
    """

    def __init__(self, comm: Comm, seq_sizes: Sequence[int]):
        self.comm, self.seq_sizes = comm, list(seq_sizes)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from opendit.models.attention import local_attention
        from opendit.parallel.sequence import check_qkv

        comm, me = self.comm, self.comm.rank
        check_qkv("FastSeqCore", q, k, v, self.seq_sizes, me)
        heads = head_sizes(q.shape[2], comm.size)
        start = offsets(heads)[me]
        packed = torch.stack([q, k, v], dim=2)  # (B, S_r, 3, H, D)
        full = comm.all_gather(packed, 1, self.seq_sizes)  # (B, S, 3, H, D), tokens in rank order
        q, k, v = full.narrow(3, start, heads[me]).unbind(dim=2)  # (B, S, H_r, D) each
        out = local_attention(q, k, v)  # (B, S, H_r, D)
        return comm.all_to_all(out.contiguous(), 1, 2, self.seq_sizes, heads)  # (B, S_r, H, D)


def fastseq_core_bytes(seq_sizes: Sequence[int], batch: int, heads: int, head_dim: int, rank: int, itemsize: int = 4):
    """Bytes FastSeqCore sends per call on `rank`: the packed q, k, v all-gather (P - 1) * 3 * B * S_r * C plus the
    all-to-all back B * (S - S_r) * H_r * D."""
    p, c = len(seq_sizes), heads * head_dim
    h_r = head_sizes(heads, p)[rank]
    gather = (p - 1) * 3 * batch * seq_sizes[rank] * c
    return itemsize * (gather + batch * (sum(seq_sizes) - seq_sizes[rank]) * h_r * head_dim)
