"""What the cost model and the planner read of a diffusers transformer: sizes and counts taken from the module
itself (its config and parameters), registered as a model spec, so `opendit plan` and `--parallel auto` rank plans
for diffusers classes with the same formulas as for our DiT.

Counted: the blocks' parameters (every one used once per token: 2 FLOPs per parameter per token), attention over
the sequence the blocks attend over — image tokens, plus the text tokens in joint attention (SD3, Flux), which are
split over the sequence group with the image tokens, so their bytes are in the strategies' all-to-all / ring volumes.
Not counted: cross-attention to text (PixArt, Wan: local, no communication; its FLOPs are < 10% of a block at
typical sizes), embeddings and the text encoders (outside the transformer).
"""

from __future__ import annotations

from dataclasses import dataclass

from opendit.models.spec import ModelDims, ModelSpec, register_spec

BLOCK_CONTAINERS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


@dataclass(frozen=True)
class DiffusersCostConfig:
    """A diffusers transformer as the cost model sees it (see the module docstring)."""

    name: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    image_tokens: int
    text_tokens: int  # tokens of the text stream that the blocks attend over jointly (0: cross-attention models)
    block_params: int
    total_params: int
    split_values: int  # values per token where tokens are split (the hidden states)
    gather_values: int  # values per token where they are gathered (proj_out's output)
    mlp_ratio: float = 4.0

    @property
    def num_tokens(self) -> int:
        return self.image_tokens + self.text_tokens


def cost_config(module, image_tokens: int, text_tokens: int = 0) -> DiffusersCostConfig:
    """The cost view of a diffusers transformer (any device, meta included) at this many image / text tokens."""
    from opendit.families import require_family

    family = require_family(module)
    config = module.config
    heads = family.num_heads(module)
    head_dim = config.get("attention_head_dim")  # Z-Image's config names its width `dim` instead
    hidden = heads * int(head_dim) if head_dim is not None else int(config.get("dim") or config["hidden_size"])
    blocks = [child for name in BLOCK_CONTAINERS for child in getattr(module, name, [])]
    block_params = sum(p.numel() for block in blocks for p in block.parameters()) // max(len(blocks), 1)
    joint = family.splits_text
    patch = config.get("patch_size", 1)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    proj_out = getattr(module, "proj_out", None) or getattr(module, "proj_out_2", None)
    return DiffusersCostConfig(
        name=type(module).__name__,
        depth=len(blocks),
        hidden_size=hidden,
        num_heads=heads,
        patch_size=int(patch or 1),
        image_tokens=image_tokens,
        text_tokens=text_tokens if joint else 0,
        block_params=block_params,
        total_params=sum(p.numel() for p in module.parameters()),
        split_values=hidden,
        gather_values=int(proj_out.out_features) if proj_out is not None else hidden,
    )


def _dims(config: DiffusersCostConfig, tokens: int | None = None) -> ModelDims:
    return ModelDims(config.depth, config.hidden_size, config.num_heads, tokens or config.num_tokens, config.mlp_ratio)


def _count_params(config: DiffusersCostConfig, tokens: int | None = None) -> dict[str, int]:
    largest = max(config.block_params // 6, config.hidden_size * config.hidden_size)  # a block's largest matrix
    return {"block": config.block_params, "total": config.total_params, "largest_tensor": largest}


def _block_flops(config: DiffusersCostConfig, batch, rows, q_tokens, k_tokens, heads) -> dict:
    head_dim = config.hidden_size // config.num_heads
    return {
        "linear": 2 * batch * rows * config.block_params,
        "attention": 4 * batch * heads * q_tokens * k_tokens * head_dim,
    }


def _model_flops(config: DiffusersCostConfig, tokens: int, batch: int) -> float:
    blk = _block_flops(config, batch, tokens, tokens, tokens, config.num_heads)
    return config.depth * (blk["linear"] + blk["attention"])


register_spec(
    ModelSpec(
        name="diffusers transformer (cost view)",
        config_type=DiffusersCostConfig,
        token_split={},
        token_gather={},
        attention=(),
        attention_kind="qkv_core",
        shard_units=(),
        dims=_dims,
        count_params=_count_params,
        block_flops=_block_flops,
        model_flops=_model_flops,
        edge_flops=lambda config, tokens, batch: 0.0,
        token_values=lambda config: (config.split_values, config.gather_values),
    )
)


def diffusers_auto_plan(module, world: int, images: int, guided: bool, image_tokens: int, text_tokens: int = 0,
                        speeds=None, memory_bytes: float | None = None):  # fmt: skip
    """The planner's fastest plan for a diffusers transformer (kernels that run on diffusers attention only; cfg
    only where its pipelines batch cond and uncond), and its explanation; with `memory_bytes`, the fastest whose
    predicted per-rank peak of the transformer fits it."""
    from opendit.families import require_family
    from opendit.families.apply import PLANNED_STRATEGIES
    from opendit.planning.planner import plan
    from opendit.planning.speeds import resolve_speeds

    config = cost_config(module, image_tokens, text_tokens)
    # cfg is planned only where the family's pipelines batch [uncond; cond] in one call (unknown: not planned)
    cfg_batched = require_family(module).cfg_batched is True
    result = plan(config, world, speeds or resolve_speeds(), images=images, guided=guided and cfg_batched,
                  impls=PLANNED_STRATEGIES, shard_options=(False,), memory_bytes=memory_bytes)  # fmt: skip
    return result.best.config, result.explain(others=2)
