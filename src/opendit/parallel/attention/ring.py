"""Ring attention: K/V blocks travel around the ring, partial outputs merged exactly by log-sum-exp.

Rank r holds the query block Q_r and, at step t = 0..P-1, the K/V block that started on rank (r - t) mod P. While it
attends to that block, the next one is already in flight (send to r+1, receive from r-1, async P2P), so the transfer
hides behind the compute. Blocks may differ in size: every rank knows all `seq_sizes` and so the shape it will receive.

The merge is exact softmax algebra, done in fp32 whatever the input dtype: for partial results (O_a, lse_a) and
(O_b, lse_b) over disjoint key sets, lse = logaddexp(lse_a, lse_b) and
O = O_a * exp(lse_a - lse) + O_b * exp(lse_b - lse).

Attention with log-sum-exp (`attention_with_lse`): torch's public SDPA does not return it, so per backend:
- CPU: aten._scaled_dot_product_flash_attention_for_cpu -> (out, lse), any float dtype;
- CUDA: a fallback chain, tried in order on the first call of each (dtype, head dim), the first kernel that runs kept:
  flash (aten._scaled_dot_product_flash_attention: fp16/bf16, head dim a multiple of 8 up to 256, compute capability
  >= 8.0, a build with flash attention) -> efficient (aten._scaled_dot_product_efficient_attention with
  compute_log_sumexp: fp32 too, pre-Ampere GPUs, lse padded to x32) -> math. The choice and why the kernels before
  it were passed over are recorded (`attention_kernels()`, record.json's parallel.attention_kernels);
- anything else: explicit fp32 scores and torch.logsumexp (math).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from opendit.distributed.comm import Comm
from opendit.parallel.registry import AttentionWork, CommItem, SequenceStrategy, register
from opendit.parallel.sequence import check_qkv, check_sizes

LseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def attention_math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path. q (B, H, Sq, D), k/v (B, H, Sk, D) -> out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk) fp32
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())  # (B, H, Sq, D)
    return out.to(q.dtype), lse


class KernelUnusable(RuntimeError):
    """A fused kernel's own precondition does not hold for these inputs (said before launching it)."""


def _cuda_flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with lse: q (B, H, Sq, D) fp16/bf16 -> (out (B, H, Sq, D), lse (B, H, Sq) fp32)."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise KernelUnusable(f"takes fp16/bf16, not {q.dtype}")
    if d % 8 or d > 256:
        raise KernelUnusable(f"head dim {d} is not a multiple of 8 up to 256")
    if not torch.backends.cuda.is_flash_attention_available():
        raise KernelUnusable("this torch build has no flash attention")
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        raise KernelUnusable(f"compute capability {major}.{minor} < 8.0 (flash needs Ampere or newer)")
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    return res[0], res[1].float()  # lse (B, H, Sq) fp32


def _cuda_efficient_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-efficient attention with lse: q (B, H, Sq, D) -> (out (B, H, Sq, D), lse (B, H, Sq) fp32)."""
    d = q.shape[-1]
    if d % 4 or d > 256:
        raise KernelUnusable(f"head dim {d} is not a multiple of 4 up to 256")
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return res[0], res[1][..., : q.shape[2]].float()  # lse (B, H, Sq_pad32) -> (B, H, Sq)


_CUDA_CHAIN = ("flash", "efficient")  # then math
KERNEL_CHOICES: dict[tuple, dict] = {}  # (device type, dtype, head dim) -> {"kernel", "reason"}, this process


def _kernel(name: str) -> LseAttention:
    return attention_math_lse if name == "math" else globals()[f"_cuda_{name}_lse"]  # looked up per call (tests)


def lse_chain(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA fallback chain flash -> efficient -> math (module docstring): the kernel chosen for this (dtype,
    head dim) runs, or on the first call each is tried in turn. q (B, H, Sq, D) -> (out, lse (B, H, Sq) fp32)."""
    key = (device_type or q.device.type, str(q.dtype).removeprefix("torch."), q.shape[-1])
    chosen = KERNEL_CHOICES.get(key)
    if chosen is not None:
        return _kernel(chosen["kernel"])(q, k, v)
    passed = []
    for name in _CUDA_CHAIN:
        try:
            result = _kernel(name)(q, k, v)
        except (RuntimeError, NotImplementedError) as exc:  # KernelUnusable, or the kernel's own refusal
            passed.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        KERNEL_CHOICES[key] = {"kernel": name, "reason": "; ".join(passed) or "first in the chain, it runs"}
        return result
    KERNEL_CHOICES[key] = {"kernel": "math", "reason": "; ".join(passed)}
    return attention_math_lse(q, k, v)


def attention_kernels() -> list[dict]:
    """The kernels the CUDA chain chose in this process and why: [{device, dtype, head_dim, kernel, reason}]."""
    return [{"device": d, "dtype": t, "head_dim": h, **choice} for (d, t, h), choice in KERNEL_CHOICES.items()]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the natural-log sum of exp(scores) per query row.

    q (B, H, Sq, D), k/v (B, H, Sk, D) -> out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32. Scale 1/sqrt(D).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    if q.device.type == "cuda":
        return lse_chain(q, k, v)
    return attention_math_lse(q, k, v)


def merge_attention(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's partial attention into the running one, exactly, in fp32.

    out (B, H, S, D) fp32 or None (first block), lse (B, H, S) fp32; block_out (B, H, S, D), block_lse (B, H, S).
    Returns the new (out fp32, lse fp32). `out` is updated IN PLACE (the running output belongs to the merge; the
    first block's is returned as the running one, after a cast if it is not fp32): two passes over the (B, H, S, D)
    output per merge instead of five, and a half-precision block is read as it is, never copied to fp32 first.
    """
    block_lse = block_lse.float()
    if out is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))  # (B, H, S, D) *= (B, H, S, 1)
    out.addcmul_(block_out, torch.exp(block_lse - new_lse).unsqueeze(-1))  # += block (its dtype) * weight, in fp32
    return out, new_lse


class RingAttention:
    """AttentionCore over ring P2P: (B, S_rank, H, D) x3 -> (B, S_rank, H, D), exact for uneven blocks.

    comm: the ring group (rank r's neighbours are r +- 1 mod P in group ranks); seq_sizes: tokens per group rank.
    attn: attention with lse, (B, H, Sq, D) x3 -> (out, lse); default `attention_with_lse`.
    K and V of a block travel together in one (2, B, S_blk, H, D) message: P - 1 exchanges per call.
    """

    def __init__(self, comm: Comm, seq_sizes: Sequence[int], attn: LseAttention = attention_with_lse):
        self.comm = comm
        self.seq_sizes = check_sizes(seq_sizes, comm.size)
        self.attn = attn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, me = self.comm.size, self.comm.rank
        check_qkv("RingAttention", q, k, v, self.seq_sizes, me)
        b, _, h, d = q.shape
        qt = q.transpose(1, 2)  # (B, H, S_r, D) view
        kv = (k, v)  # this rank's block; the next ones arrive as one (2, B, S_src, H, D) message per step
        out = lse = None
        for step in range(p):
            handle = None
            if step < p - 1:
                # start the next block's transfer first, so it overlaps this block's attention; (k, v) are packed
                # into the one message by ring_exchange (straight into the shared outbox on one host: no stack copy)
                src = (me - step - 1) % p  # origin of the block we will receive
                handle = self.comm.ring_exchange(kv, (2, b, self.seq_sizes[src], h, d))
            block_out, block_lse = self.attn(qt, kv[0].transpose(1, 2), kv[1].transpose(1, 2))  # (B,H,S_r,D),(B,H,S_r)
            out, lse = merge_attention(out, lse, block_out, block_lse)
            if handle is not None:
                kv = handle.wait()  # (2, B, S_src, H, D)
        return out.transpose(1, 2).to(q.dtype)  # (B, S_r, H, D)


def ring_bytes(
    seq_sizes: Sequence[int], batch: int, heads: int, head_dim: int, rank: int | None = None, itemsize: int = 4
) -> int:
    """Bytes RingAttention sends per call (CommStats convention): rank r sends, at steps t = 0..P-2, the K/V block
    that started on rank (r - t) mod P: sum_t 2 * B * S_{(r-t) mod P} * H * D * itemsize. rank=None -> all ranks,
    which is (P - 1) * 2 * B * S * H * D * itemsize."""
    p = len(seq_sizes)
    per_token = 2 * batch * heads * head_dim * itemsize
    if rank is None:
        return (p - 1) * sum(seq_sizes) * per_token
    return sum(seq_sizes[(rank - t) % p] for t in range(p - 1)) * per_token


def ring_comm_items(
    blocks: Sequence[int], me: int, batch: float, heads: int, head_dim: int, itemsize: int, attn_s: float, stride: int
) -> list[CommItem]:
    """RingAttention's P2P per call on ring rank `me`: at step t it sends the K/V block that started on rank
    (me - t) mod P (2 x (B, S_src, H, D)) while attending to it, so each message can hide behind that block's share
    of the attention time. The bytes sum to ring_bytes(blocks, ..., rank=me)."""
    p, total = len(blocks), sum(blocks)
    items = []
    for step in range(p - 1):
        src = blocks[(me - step) % p]
        nbytes = 2 * batch * src * heads * head_dim * itemsize
        items.append(CommItem("p2p", nbytes, 1, p, stride, hide_s=attn_s * src / total, overlap="ring"))
    return items


def ring_merge_elements(batch: float, q_tokens: float, heads: float, head_dim: int, steps: int, itemsize: int) -> float:
    """Elements (in the compute dtype's units) the fp32 log-sum-exp merges touch per call: ~6 passes over the
    (B, S_q, H, D) fp32 running output per merged block."""
    return 6 * batch * q_tokens * heads * head_dim * steps * 4 / itemsize


def ring_buffers(batch: float, tokens_r: int, hidden: int, itemsize: int) -> float:
    """K/V stack, the block in flight and the fp32 running output of one ring attention, for (B, S_r, C) inputs."""
    unit = batch * tokens_r * hidden * itemsize
    return 4 * unit + unit * 4 / itemsize


class RingStrategy(SequenceStrategy):
    """`--sp-impl ring`: K/V blocks around the ring with the next one in flight, exact log-sum-exp merge."""

    name = "ring"
    summary = "K/V blocks travel around the ring (P2P, next block in flight), exact fp32 log-sum-exp merge"
    uses = ("ring",)
    auto = True

    def core(self, runtime, sizes: list[int]):
        return RingAttention(runtime.comms["ring"], sizes)

    def block_work(self, dims, plan, batch, sizes, rank) -> AttentionWork:
        p = plan.ring
        merge = ring_merge_elements(batch, sizes[rank], dims.num_heads, dims.head_dim, p - 1, 4)
        return AttentionWork(
            q_tokens=sizes[rank],
            heads=dims.num_heads,
            qkv_rows=sizes[rank],
            key_blocks=p,
            extra_elementwise=merge,
            dispatch_ops=0.3 * (p - 1),
        )

    def block_comm(self, dims, plan, batch, sizes, rank, itemsize, attn_s) -> list[CommItem]:
        return ring_comm_items(sizes, rank, batch, dims.num_heads, dims.head_dim, itemsize, attn_s, 1)

    def buffers(self, dims, plan, batch, sizes, itemsize) -> float:
        return ring_buffers(batch, max(sizes), dims.hidden_size, itemsize)


register(RingStrategy())
