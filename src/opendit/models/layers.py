"""Building blocks shared by the DiT family: embeddings, adaLN modulation, patchify, fixed 2-D sin-cos positions.

Parameter names follow facebookresearch/DiT so that official checkpoints load with strict=True.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, S, C) scaled and shifted per sample by shift/scale (B, C)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), computed in fp32.

    Layout [cos | sin] as in the official DiT (it differs from some other codebases' [sin | cos]).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, hidden) through a 256-dim sinusoid and a 2-layer MLP (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) fp32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class ids (B,) -> (B, hidden). Row `num_classes` is the null (unconditional) class used by CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time label dropout: replace a random dropout_prob fraction of labels by the null class."""
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, hidden)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, hidden) tokens in row-major patch order (key proj.{weight,bias}).

    Split in two so sequence parallelism can shard the cheap raw patches (C*p*p values per token) and embed only
    this rank's tokens: `patchify` then `embed` equals the strided convolution `proj` (same weights, a matmul).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, q)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, q): conv weight order (C, p, q) per token
        return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, T, C*p*p)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # (hidden, C*p*p)
        return F.linear(patches, weight, self.proj.bias)  # (B, T, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.patchify(x))  # (B, T, hidden)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as timm's Mlp used by DiT."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, T, p*p*C) tokens -> (B, C, grid_h*p, grid_w*p) image; inverse of PatchEmbed's layout."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid_h, grid_w, patch, patch, channels)  # (B, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(b, channels, grid_h * patch, grid_w * patch)  # (B, C, H, W)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """positions (M,) -> (M, embed_dim) as [sin | cos] over embed_dim/2 frequencies (float64)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D positions (grid_h*grid_w, embed_dim), row-major; matches DiT's get_2d_sincos_pos_embed for squares.

    The first half of the channels encodes the column (w) coordinate, the second half the row (h), as in MAE/DiT.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for 2-D sin-cos positions")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # (h, w) each
    emb_w = sincos_1d(embed_dim // 2, cols)  # (h*w, D/2)
    emb_h = sincos_1d(embed_dim // 2, rows)  # (h*w, D/2)
    return np.concatenate([emb_w, emb_h], axis=1)  # (h*w, D)
