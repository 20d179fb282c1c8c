"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie), class-conditional, adaLN-Zero.

Plain single-device PyTorch. Parameter names and shapes match facebookresearch/DiT, so the official checkpoints
(`DiT-XL-2-256x256.pt`, ...) load with strict=True. Sequence parallelism plugs in from outside through three points:
`blocks[i].attn.core` (the attention entry point), `token_shard` (on the raw patches and positions) and `token_gather`
(before un-patchify); both of the latter are identities here.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opendit.errors import OpenDiTError
from opendit.models.attention import SelfAttention
from opendit.models.grid_config import LATENT_DOWNSCALE, DiTFamilyConfig, build_presets, pick_preset, pixel_space
from opendit.models.layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    unpatchify,
)
from opendit.models.precision import check_finite, residual_dtype
from opendit.models.spec import ModelDims, ModelSpec, TensorSplit, cost_fields, register_spec

__all__ = ["LATENT_DOWNSCALE", "DiT", "DiTConfig", "build_dit", "preset"]  # LATENT_DOWNSCALE: re-exported


@dataclass(frozen=True)
class DiTConfig(DiTFamilyConfig):
    """Everything needed to build a DiT. `input_size` is the model's spatial input (latent or pixel) as (H, W)."""

    label = "DiT"

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


# Architectures (depth, hidden, heads) of the paper; DiT-T is a tiny model for tests, DiT-D is the digits model's.
ARCHS = {
    "T": (2, 64, 4),
    "D": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PRESETS: dict[str, DiTConfig] = build_presets(DiTConfig, "DiT", ARCHS)


def preset(name: str) -> DiTConfig:
    return pick_preset(PRESETS, name, hint=" (see `opendit models`)")


def pixel_config(name: str, size: int, channels: int = 1, num_classes: int = 10, prediction: str = "flow") -> DiTConfig:
    """A preset's architecture as a pixel-space model (no VAE, no learned sigma) on size x size x channels images."""
    return pixel_space(preset(name), size, channels, num_classes, prediction)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning c regresses shift/scale/gate for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, S, C) residual stream (S may be this rank's shard; fp32 under fp16, see precision.py),
        # c (B, C) conditioning in the compute dtype, which the branches run in.
        mods = self.adaLN_modulation(c).float().chunk(6, dim=1)  # 6 x (B, C), fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + (gate_msa.unsqueeze(1) * self.attn(norm_modulate(x, shift_msa, scale_msa, c.dtype))).to(x.dtype)
        x = x + (gate_mlp.unsqueeze(1) * self.mlp(norm_modulate(x, shift_mlp, scale_mlp, c.dtype))).to(x.dtype)
        return x  # (B, S, C)


@torch.no_grad()
def adaln_zero_init(model: nn.Module) -> None:
    """DiT's (and Latte's) initialisation of a model with DiT's module names: xavier linears and patch embedding,
    N(0, 0.02) label table and timestep MLP, zeroed adaLN and output layers (adaLN-Zero). Fixed tables are the
    caller's."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then adaLN modulation, both in fp32; result in `dtype` (default x's).

    x (B, S, C); shift, scale (B, C) fp32. `dtype` is the compute dtype of the branch that consumes the result.
    """
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)  # (B, S, C) fp32
    return (normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).to(dtype or x.dtype)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from hidden to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).float().chunk(2, dim=1)  # 2 x (B, C) fp32
        return self.linear(norm_modulate(x, shift, scale, c.dtype))  # (B, S, p*p*out), compute dtype


class DiTParts:
    """What DiT and the video DiT share: the patch, timestep and label embedders, the blocks, the final layer and the
    fixed 2-D sin-cos table `pos_embed` (1, T, C) over the patch grid of `self.config` (stored in checkpoints but never
    trained, so another input size recomputes it exactly as a model built at that size has it)."""

    def build_parts(self, config) -> None:
        self.config = config
        h, w = config.input_size
        if h % config.patch_size or w % config.patch_size:
            raise OpenDiTError(f"input size {config.input_size} must be divisible by patch size {config.patch_size}")
        c = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.y_embedder = LabelEmbedder(config.num_classes, c, config.class_dropout_prob)
        # Fixed sin-cos positions, stored in checkpoints (as the official DiT and Latte do) but never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(config.grid), c), requires_grad=False)  # (1, T, C)
        self.blocks = nn.ModuleList(DiTBlock(c, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(c, config.patch_size, config.out_channels)

    def sincos_positions(self) -> torch.Tensor:
        """The fixed positions of this size, (1, T, C) float64 on the CPU."""
        return torch.from_numpy(sincos_2d(self.config.hidden_size, *self.config.grid)).unsqueeze(0)

    def initialize_unless_meta(self) -> None:
        """Initialise, unless built on meta (sharded loading: the weights come from the file)."""
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official DiT initialisation (Latte's is the same): xavier linears, zeroed adaLN and output layers
        (adaLN-Zero), and the fixed sin-cos tables."""
        adaln_zero_init(self)
        self.reset_fixed_embeddings()

    def reset_fixed_embeddings(self) -> None:
        self.reset_pos_embed()

    @torch.no_grad()
    def reset_pos_embed(self) -> None:
        if not self.pos_embed.is_meta:  # on meta (sharded loading) the positions are filled after materialising
            self.pos_embed.copy_(self.sincos_positions().to(self.pos_embed.dtype))

    @torch.no_grad()
    def set_input_size(self, config) -> None:
        """Run at another input size, same architecture (and frames): only the positions change."""
        if replace(config, input_size=self.config.input_size) != self.config:
            raise OpenDiTError(f"set_input_size changes only the input size; got another architecture: {config}")
        if config.input_size == self.config.input_size:
            return
        self.config = config
        tokens = math.prod(config.grid)  # T: patches per image (per frame for the video DiT)
        self.pos_embed = nn.Parameter(self.pos_embed.new_zeros(1, tokens, config.hidden_size), requires_grad=False)
        self.reset_pos_embed()


class DiT(DiTParts, nn.Module):
    """f(x, t, y) -> prediction. x (B, C_in, H, W), t (B,) in [0, 1000), y (B,) class ids (num_classes = null)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.build_parts(config)
        self.token_shard: nn.Module = nn.Identity()  # sequence parallel: (B, T, D) -> (B, T_rank, D)
        self.token_gather: nn.Module = nn.Identity()  # sequence parallel: (B, T_rank, D) -> (B, T, D)
        self.gradient_checkpointing = False
        self.initialize_unless_meta()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        dtype = self.pos_embed.dtype  # the compute dtype (weights and branch activations)
        # Shard the raw patches (C_in*p*p values per token), not the embedded tokens (hidden values), so no rank
        # ever holds a full-sequence (B, T, hidden) tensor; each rank embeds and positions only its own tokens.
        patches = self.token_shard(self.x_embedder.patchify(x.to(dtype)))  # (B, T_rank, C_in*p*p)
        positions = self.token_shard(self.pos_embed)  # (1, T_rank, C); T_rank = T on one device
        tokens = self.x_embedder.embed(patches) + positions  # (B, T_rank, C)
        tokens = tokens.to(residual_dtype(dtype))  # fp16 -> fp32 residual stream (overflow guard, precision.py)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, C) compute dtype
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)  # (B, T_rank, C)
        tokens = self.final_layer(tokens, c)  # (B, T_rank, p*p*out)
        tokens = self.token_gather(tokens)  # (B, T, p*p*out)
        if dtype == torch.float16:
            check_finite(tokens, "DiT output")  # a branch overflowed fp16: fail with the fix, never NaN images
        return unpatchify(tokens, *cfg.grid, cfg.patch_size, cfg.out_channels)  # (B, out, H, W)


@torch.no_grad()
def perturb_weights(model: DiT, std: float, seed: int = 0) -> DiT:
    """Add N(0, std) to every trained parameter (not the fixed sin-cos tables), for tests and benchmarks on random
    weights: adaLN-Zero makes a freshly initialised DiT's output exactly zero, which would make every comparison
    trivial."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:  # not the fixed sin-cos tables (pos_embed; a video DiT's temp_embed)
            param.add_((torch.randn(param.shape, generator=generator) * std).to(param))
    return model


def build_dit(config: DiTConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiT:
    """Build on `device` in `dtype`; on "meta" no memory is allocated and no init runs (weights come from a load)."""
    return build_on(DiT, config, device, dtype)


def build_on(model_class: type, config, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.device(device):
        model = model_class(config)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------ the parallel spec
# Exact counts for the cost model and the planner (tests check them against the model and torch's FLOP counter).
def count_params(config: DiTConfig, tokens: int | None = None) -> dict[str, int]:
    """Parameters of a DiT (equal to build_dit(...).parameters(), pos_embed included): {"block", "total",
    "largest_tensor"} (the largest single tensor: what a loader holds in flight)."""
    c, p = config.hidden_size, config.patch_size
    m = int(c * config.mlp_ratio)
    tokens = config.num_tokens if tokens is None else tokens
    block = (3 * c * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c) + (6 * c * c + 6 * c)
    embed = config.in_channels * p * p * c + c + (256 * c + c) + (c * c + c)
    embed += (config.num_classes + int(config.class_dropout_prob > 0)) * c + tokens * c
    final = (2 * c * c + 2 * c) + (c * p * p * config.out_channels + p * p * config.out_channels)
    largest = max(6 * c * c, c * m, tokens * c, (config.num_classes + 1) * c)  # adaLN, fc1/fc2, pos_embed, labels
    return {"block": block, "total": embed + config.depth * block + final, "largest_tensor": largest}


def block_flops(config: DiTConfig, batch: float, rows: float, q_tokens: float, k_tokens: float, heads: float) -> dict:
    """FLOPs of one block on one rank: linear layers on `rows` tokens per sample, attention of q_tokens x k_tokens
    over `heads` heads (2 FLOPs per multiply-add; QK^T and PV are 2 * Sq * Sk * D each)."""
    c = config.hidden_size
    m = config.mlp_ratio * c
    d = c // config.num_heads
    linear = 2 * batch * rows * c * (3 * c + c + 2 * m) + 2 * batch * c * 6 * c  # qkv, proj, fc1, fc2; adaLN
    attention = 4 * batch * heads * q_tokens * k_tokens * d
    return {"linear": linear, "attention": attention}


def edge_flops(config: DiTConfig, tokens: int, batch: float) -> float:
    """FLOPs outside the blocks: patch embedding, final linear, timestep MLP and the final adaLN."""
    c, p = config.hidden_size, config.patch_size
    return 2 * batch * tokens * c * p * p * (config.in_channels + config.out_channels) + 2 * batch * (
        256 * c + c * c + 2 * c * c
    )


def token_values(config: DiTConfig) -> tuple[int, int]:
    """Values per token where the sequence is split (raw patches) and where it is gathered (final layer output)."""
    p2 = config.patch_size**2
    return config.in_channels * p2, config.out_channels * p2


def dit_dims(config: DiTConfig, tokens: int | None = None) -> ModelDims:
    return ModelDims(
        depth=config.depth,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        num_tokens=config.num_tokens if tokens is None else tokens,
        mlp_ratio=config.mlp_ratio,
    )


class DiTStageView:
    """DiT's forward in the pieces PipeFusion (parallel/pipefusion.py) runs on different stages; the same operations
    and dtypes as DiT.forward, so the synchronous steps equal it."""

    @staticmethod
    def compute_dtype(model: DiT) -> torch.dtype:
        return model.pos_embed.dtype

    @staticmethod
    def residual_dtype(model: DiT) -> torch.dtype:
        return residual_dtype(model.pos_embed.dtype)

    @staticmethod
    def num_tokens(model: DiT) -> int:
        return model.config.num_tokens

    @staticmethod
    def embed(model: DiT, x: torch.Tensor) -> torch.Tensor:
        dtype = model.pos_embed.dtype
        tokens = model.x_embedder.embed(model.x_embedder.patchify(x.to(dtype))) + model.pos_embed  # (B, T, C)
        return tokens.to(residual_dtype(dtype))

    @staticmethod
    def condition(model: DiT, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model.t_embedder(t) + model.y_embedder(y)  # (B, C)

    @staticmethod
    def blocks(model: DiT) -> nn.ModuleList:
        return model.blocks

    @staticmethod
    def attention(block: DiTBlock) -> nn.Module:
        return block.attn

    @staticmethod
    def block(model: DiT, index: int, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model.blocks[index](tokens, c)  # (B, T_m, C)

    @staticmethod
    def final(model: DiT, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model.final_layer(tokens, c)  # (B, T_m, p*p*out)

    @staticmethod
    def unpatchify(model: DiT, tokens: torch.Tensor) -> torch.Tensor:
        cfg = model.config
        return unpatchify(tokens, *cfg.grid, cfg.patch_size, cfg.out_channels)  # (B, out, H, W)

    @staticmethod
    def output_shape(model: DiT, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], model.config.out_channels, *model.config.input_size)


# Megatron's split of a DiT block: attention by heads, fc1 by columns and fc2 by rows (2 all-reduces per block), the
# adaLN modulation (6 x C outputs, a third of the block's weights) per chunk, gathered for the elementwise ops
DIT_TENSOR_SPLIT = TensorSplit(
    attention=("blocks.*.attn",),
    attention_kind="fused_qkv",
    column=("blocks.*.mlp.fc1",),
    row=("blocks.*.mlp.fc2",),
    gathered=(("blocks.*.adaLN_modulation.1", 6),),
)

# a block is four units, not one: FSDP2 briefly holds a gathered unit twice while copying it out, so small units keep
# that transient small (parallel/sharding.py); attn stays whole because FastSeq reads qkv's weight directly (a hook on
# qkv alone would not fire). The video DiT's blocks are the same DiTBlock.
DIT_SHARD_UNITS = (
    "t_embedder",
    "y_embedder",
    "blocks.*.adaLN_modulation",
    "blocks.*.attn",
    "blocks.*.mlp.fc1",
    "blocks.*.mlp.fc2",
    "final_layer",
)

DIT_SPEC = register_spec(
    ModelSpec(
        name="DiT",
        config_type=DiTConfig,
        # token_shard is applied to the raw patches and to pos_embed (forward above); token_gather before unpatchify
        token_split={"token_shard": 1},
        token_gather={"token_gather": 1},
        attention=("blocks.*.attn",),
        attention_kind="fused_qkv",
        shard_units=DIT_SHARD_UNITS,
        **cost_fields(dit_dims, count_params, block_flops, edge_flops, token_values),
        derived={"pos_embed": lambda model: model.sincos_positions()},
        tensor_split=DIT_TENSOR_SPLIT,
        stage_view=DiTStageView,
        bf16_drift="digits model samples 55.2 dB PSNR vs fp32, class accuracy unchanged (tests/test_precision.py)",
    )
)
# FLOPs of one whole forward on one device (blocks + patch embedding + final layer + timestep MLP)
model_flops = DIT_SPEC.model_flops
