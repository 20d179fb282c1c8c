"""A Latte-style video DiT: alternating spatial blocks (attention within a frame) and temporal blocks (attention
across the frames at one position), adaLN-Zero, class conditioning, fixed sin-cos spatial and temporal positions.

Plain single-device PyTorch. Parameter names and shapes follow Vchitect/Latte `models/latte.py` (class-conditional,
`extras=2`), so its checkpoints load with strict=True: `blocks` holds `depth` DiT blocks, even indices spatial, odd
temporal; `pos_embed` (1, H*W/p^2, C) and `temp_embed` (1, F, C) are fixed sin-cos tables stored in the checkpoint;
`temp_embed` is added once, before the first temporal block; both kinds of block are conditioned on t + y.

Layout difference to Latte (documented, weights unaffected): videos are channel-first, x (B, C, F, H, W), as
diffusers' video models take them, so the sampler's per-channel guidance and learned-sigma split (dim 1) work for
images and videos alike. Latte's forward takes (B, F, C, H, W).

Split points where parallelism plugs in from outside (identities here; see the spec at the end and
parallel/dsp.py): between blocks the hidden state is (B, F, T, C) (F frames, T positions per frame):
- `position_shard` / `position_gather` (dim 2): position-split strategies (Ulysses, ring, USP, FastSeq) shard the
  positions; spatial attention then runs the strategy's kernel, temporal attention stays local (every rank holds
  every frame of its positions);
- `frame_shard` / `frame_gather` (dim 1) and `to_temporal` / `to_spatial` (the switches before and after each
  temporal block): DSP shards frames for spatial blocks and positions for temporal blocks, one all-to-all per switch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.models.dit import (
    ARCHS,
    DIT_SHARD_UNITS,
    DIT_TENSOR_SPLIT,
    DiTBlock,
    DiTParts,
    build_on,
)
from opendit.models.grid_config import DiTFamilyConfig, build_presets, pick_preset, pixel_space
from opendit.models.layers import sincos_1d, unpatchify
from opendit.models.precision import check_finite, residual_dtype
from opendit.models.spec import FrameSplit, ModelDims, ModelSpec, cost_fields, register_spec


@dataclass(frozen=True)
class VideoDiTConfig(DiTFamilyConfig):
    """Everything needed to build a video DiT. `depth` counts both kinds of block (even); `input_size` is one frame's
    model-space (H, W) (latent or pixel)."""

    label = "video DiT"

    num_classes: int = 101
    frames: int = 16
    motion: bool = False  # labels are digit + 10 * direction (the moving-digits model): `--motion` applies

    def __post_init__(self):
        if self.depth < 2 or self.depth % 2:
            raise OpenDiTError(f"video DiT depth {self.depth} must be even (spatial + temporal pairs) and >= 2")
        if self.frames < 1:
            raise OpenDiTError(f"frames must be >= 1, got {self.frames}")

    @property
    def positions(self) -> int:
        """Tokens per frame."""
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Tokens of one video (frames x positions)."""
        return self.frames * self.positions

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one model-space video: what the sampler draws noise for."""
        return (self.in_channels, self.frames, *self.input_size)

    def with_frames(self, frames: int | None) -> VideoDiTConfig:
        """`frames` must be the model's own: temporal positions are trained for that count (OpenDiTError)."""
        if frames is not None and frames != self.frames:
            raise OpenDiTError(
                f"this video model makes {self.frames}-frame videos (its temporal positions and training are for "
                f"{self.frames}); drop --frames or pass --frames {self.frames}"
            )
        return self


# Latte's architectures are DiT's (depth counts both kinds of block); T, the tiny test model, has 2 pairs, D is the
# moving-digits model's
LATTE_ARCHS = {**ARCHS, "T": (4, 64, 4)}
PRESETS: dict[str, VideoDiTConfig] = build_presets(VideoDiTConfig, "Latte", LATTE_ARCHS)


def preset(name: str) -> VideoDiTConfig:
    return pick_preset(PRESETS, name, "video model")


class VideoDiT(DiTParts, nn.Module):
    """f(x, t, y) -> prediction. x (B, C_in, F, H, W), t (B,) in [0, 1000), y (B,) class ids (num_classes = null)."""

    def __init__(self, config: VideoDiTConfig):
        super().__init__()
        self.build_parts(config)  # embedders, pos_embed (1, T, C), blocks (spatial and temporal in turn), final layer
        # the fixed 1-D sin-cos table over frames, stored in checkpoints (as Latte does) but never trained
        self.temp_embed = nn.Parameter(torch.zeros(1, config.frames, config.hidden_size), requires_grad=False)
        # split points (identities on one device; the module docstring says who replaces what)
        self.frame_shard: nn.Module = nn.Identity()  # (B, F, T, *) -> (B, F_r, T, *)
        self.position_shard: nn.Module = nn.Identity()  # (B, F, T, *) -> (B, F, T_r, *)
        self.to_temporal: nn.Module = nn.Identity()  # DSP: (B, F_r, T, C) -> (B, F, T_r, C)
        self.to_spatial: nn.Module = nn.Identity()  # DSP: (B, F, T_r, C) -> (B, F_r, T, C)
        self.frame_gather: nn.Module = nn.Identity()  # (B, F_r, T, *) -> (B, F, T, *)
        self.position_gather: nn.Module = nn.Identity()  # (B, F, T_r, *) -> (B, F, T, *)
        self.initialize_unless_meta()

    def sincos_frames(self) -> torch.Tensor:
        """(1, F, C) float64: the temporal table (1-D sin-cos over frame indices, sin half first, as Latte)."""
        import numpy as np

        frames = np.arange(self.config.frames, dtype=np.float64)
        return torch.from_numpy(sincos_1d(self.config.hidden_size, frames)).unsqueeze(0)

    @torch.no_grad()
    def reset_fixed_embeddings(self) -> None:
        self.reset_pos_embed()
        if not self.temp_embed.is_meta:
            self.temp_embed.copy_(self.sincos_frames().to(self.temp_embed.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.frames:
            raise OpenDiTError(
                f"video DiT input must be (B, C, F={cfg.frames}, H, W) (the frame count it was built for); "
                f"got {tuple(x.shape)}"
            )
        dtype = self.pos_embed.dtype  # the compute dtype (weights and branch activations)
        b, f = x.shape[0], x.shape[2]
        frames = x.to(dtype).transpose(1, 2).flatten(0, 1)  # (B*F, C_in, H, W)
        patches = self.x_embedder.patchify(frames).unflatten(0, (b, f))  # (B, F, T, C_in*p*p)
        # shard the raw patches (never a full (B, F, T, hidden) tensor on a rank); one of the two is active
        patches = self.position_shard(self.frame_shard(patches))  # (B, F_r, T_r, C_in*p*p)
        positions = self.position_shard(self.pos_embed.unsqueeze(1))  # (1, 1, T_r, C)
        tokens = self.x_embedder.embed(patches) + positions  # (B, F_r, T_r, C)
        tokens = tokens.to(residual_dtype(dtype))  # fp16 -> fp32 residual stream (precision.py)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, C) compute dtype
        for i in range(0, len(self.blocks), 2):
            tokens = self._spatial(self.blocks[i], tokens, c)  # (B, F_r, T_r, C)
            tokens = self.to_temporal(tokens)  # DSP: (B, F, T_r', C); otherwise unchanged
            if i == 0:
                tokens = tokens + self.temp_embed.unsqueeze(2).to(tokens.dtype)  # (1, F, 1, C): every frame here
            tokens = self._temporal(self.blocks[i + 1], tokens, c)
            tokens = self.to_spatial(tokens)  # DSP: back to (B, F_r, T, C)
        bl, fl, tl, _ = tokens.shape
        out = self.final_layer(tokens.reshape(bl, fl * tl, -1), c)  # (B, F_r*T_r, p*p*out)
        out = out.reshape(bl, fl, tl, -1)  # (B, F_r, T_r, p*p*out)
        out = self.position_gather(self.frame_gather(out))  # (B, F, T, p*p*out)
        if dtype == torch.float16:
            check_finite(out, "video DiT output")
        images = unpatchify(out.flatten(0, 1), *cfg.grid, cfg.patch_size, cfg.out_channels)  # (B*F, out, H, W)
        return images.unflatten(0, (b, f)).transpose(1, 2)  # (B, out, F, H, W)

    @staticmethod
    def _spatial(block: DiTBlock, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Attention within each frame: (B, F_r, T_r, C) -> (B*F_r, T_r, C) sequences, c repeated per frame."""
        b, f, t, ch = tokens.shape
        out = block(tokens.reshape(b * f, t, ch), c.repeat_interleave(f, dim=0))  # (B*F_r, T_r, C)
        return out.reshape(b, f, t, ch)

    @staticmethod
    def _temporal(block: DiTBlock, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Attention across the frames at each position: (B, F, T_r, C) -> (B*T_r, F, C) sequences."""
        b, f, t, ch = tokens.shape
        seq = tokens.transpose(1, 2).reshape(b * t, f, ch)  # (B*T_r, F, C)
        out = block(seq, c.repeat_interleave(t, dim=0))  # (B*T_r, F, C)
        return out.reshape(b, t, f, ch).transpose(1, 2)  # (B, F, T_r, C)


def build_video_dit(
    config: VideoDiTConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VideoDiT:
    return build_on(VideoDiT, config, device, dtype)


def pixel_video_config(name: str, size: int, frames: int, channels: int = 1, num_classes: int = 40, **kw):
    """A preset's architecture as a pixel-space flow model on size x size x channels videos of `frames` frames."""
    return pixel_space(preset(name), size, channels, num_classes, "flow", frames=frames, **kw)


# ------------------------------------------------------------------------------------------------ the parallel spec
def as_dit_config(config: VideoDiTConfig):
    """The image DiT with the same blocks and embedders (one frame's grid): its exact counts are reused below."""
    from opendit.models.dit import DiTConfig

    shared = {f.name for f in fields(DiTConfig)}
    return DiTConfig(**{k: v for k, v in asdict(config).items() if k in shared})


def count_params(config: VideoDiTConfig, tokens: int | None = None) -> dict[str, int]:
    """Parameters (equal to build_video_dit(...).parameters(), both fixed tables included). `tokens`: positions."""
    from opendit.models import dit

    counts = dit.count_params(as_dit_config(config), config.positions if tokens is None else tokens)
    table = config.frames * config.hidden_size  # temp_embed
    return {**counts, "total": counts["total"] + table, "largest_tensor": max(counts["largest_tensor"], table)}


def block_flops(config: VideoDiTConfig, batch: float, rows: float, q_tokens: float, k_tokens: float, heads: float):
    """FLOPs of one block on one rank, averaged over a spatial + temporal pair (depth counts both). `rows`: positions
    this rank holds (every frame of them); spatial attention is `heads` heads of q_tokens x k_tokens in each of the F
    frames (the strategy's view: DSP passes heads scaled by its frame share), temporal attention is every head over
    F x F at each of the rank's positions."""
    c, f = config.hidden_size, config.frames
    m, d = config.mlp_ratio * c, c // config.num_heads
    linear = 2 * batch * rows * f * c * (3 * c + c + 2 * m)  # qkv, proj, fc1, fc2 on every (frame, position) token
    adaln = 2 * 6 * c * c * batch * (f + rows) / 2  # c is repeated per frame (spatial) or per position (temporal)
    spatial = 4 * batch * f * heads * q_tokens * k_tokens * d
    temporal = 4 * batch * rows * config.num_heads * f * f * d
    return {"linear": linear + adaln, "attention": (spatial + temporal) / 2}


def edge_flops(config: VideoDiTConfig, tokens: int, batch: float) -> float:
    """Patch embedding and final linear on every (frame, position) token, timestep MLP, final adaLN."""
    from opendit.models import dit

    return dit.edge_flops(as_dit_config(config), tokens * config.frames, batch)


def token_values(config: VideoDiTConfig) -> tuple[int, int]:
    """Values per position (all frames) where positions are split (raw patches) and gathered (final output)."""
    from opendit.models import dit

    split, gathered = dit.token_values(as_dit_config(config))  # one frame's
    return config.frames * split, config.frames * gathered


def video_dims(config: VideoDiTConfig, tokens: int | None = None) -> ModelDims:
    """DiT's dims over one frame's positions, attention split in every frame (sequences) of the spatial half."""
    from opendit.models import dit

    return replace(dit.dit_dims(as_dit_config(config), tokens), sequences=config.frames, split_blocks=0.5)


def _spatial_block(path: str) -> bool:
    """blocks.{i}.attn with i even: Latte's layout puts the spatial block of pair i // 2 at index i."""
    return int(path.split(".")[1]) % 2 == 0


VIDEO_DIT_SPEC = register_spec(
    ModelSpec(
        name="VideoDiT",
        config_type=VideoDiTConfig,
        token_split={"position_shard": 2},  # applied to the raw patches and to pos_embed (forward above)
        token_gather={"position_gather": 2},
        attention=("blocks.*.attn",),
        attention_kind="fused_qkv",
        attention_filter=_spatial_block,
        tensor_split=DIT_TENSOR_SPLIT,  # the same DiTBlock in every spatial and temporal slot
        root_used_after_embedding=True,  # temp_embed, added after the first spatial block
        shard_units=DIT_SHARD_UNITS,
        **cost_fields(video_dims, count_params, block_flops, edge_flops, token_values),
        derived={
            "pos_embed": lambda model: model.sincos_positions(),
            "temp_embed": lambda model: model.sincos_frames(),
        },
        frame_split=FrameSplit(
            frame_split={"frame_shard": 1},
            frame_gather={"frame_gather": 1},
            to_temporal=("to_temporal",),
            to_spatial=("to_spatial",),
            frames=lambda config: config.frames,
            positions=lambda config: config.positions,
        ),
    )
)
