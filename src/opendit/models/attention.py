"""The single attention entry point of every OpenDiT model.

Every transformer block calls `self.attn.core(q, k, v)` with q, k, v laid out (batch, seq, heads, head_dim), the
flash-attn convention. On one device `core` is `local_attention` (torch SDPA). Sequence parallelism installs another
callable with the same signature (Ulysses, ring, hybrid) from outside, per module, so the model file never changes and
no global state is involved. FastSeq, which also changes how q/k/v are projected, replaces the whole `SelfAttention`
module's forward from outside instead.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionCore(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) x3 -> (B, S, H, D)."""


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention on one device; never materialises the full (S, S) matrix on fused backends."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D)
    return out.transpose(1, 2)  # (B, S, H, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys qkv, proj), as timm's Attention used by DiT."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.core: AttentionCore = local_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # (B, S, C)
        qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, self.head_dim)  # (B, S, 3, H, Dh)
        q, k, v = qkv.unbind(dim=2)  # (B, S, H, Dh) each
        out = self.core(q, k, v)  # (B, S, H, Dh)
        # H * Dh = C on one device; under tensor parallelism this module holds its rank's H_r heads (proj's input)
        return self.proj(out.reshape(b, s, self.num_heads * self.head_dim))  # (B, S, C)
