"""Our DiT (facebookresearch/DiT layout) as diffusers' `DiTTransformer2DModel`, with the same weights and outputs.

Why: to run diffusers' own tools (its first-block cache, its context parallelism) on a model with trained weights,
side by side with ours, so that drift and speed compare like with like (benchmarks/cache.py).

Weight mapping (as diffusers' DiT conversion lays it out): each block's adaLN-Zero conditioning module holds its own
copy of the timestep and class embedders (`transformer_blocks.i.norm1.emb`); qkv splits into to_q / to_k / to_v;
the final layer's modulation is `proj_out_1`, its linear `proj_out_2`. Two settings make the outputs equal rather
than close: LayerNorm eps 1e-6 (facebook's) and a timestep frequency shift of 0 (diffusers' DiT embeds timesteps
with exponents over half - 1, facebook's over half); `to_diffusers_dit` sets both.
"""

from __future__ import annotations

import torch

from opendit.errors import OpenDiTError


def to_diffusers_dit(model) -> torch.nn.Module:
    """A DiTTransformer2DModel computing what `model` (our DiT) computes: model(x, t, y) ==
    converted(hidden_states=x, timestep=t, class_labels=y).sample (fp32: within float rounding)."""
    from diffusers import DiTTransformer2DModel

    config = model.config
    if config.input_size[0] != config.input_size[1]:
        raise OpenDiTError(f"diffusers' DiT is square; this model is {config.input_size[0]}x{config.input_size[1]}")
    heads = config.num_heads
    out = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=config.hidden_size // heads, in_channels=config.in_channels,
        out_channels=config.out_channels, num_layers=config.depth, sample_size=config.input_size[0],
        patch_size=config.patch_size, num_embeds_ada_norm=config.num_classes, norm_eps=1e-6,
    )  # fmt: skip
    out.config.opendit_note = "converted from OpenDiT's DiT (timestep frequency shift 0, as facebook's DiT)"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    mapped = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for i in range(config.depth):
        block, ours = f"transformer_blocks.{i}", f"blocks.{i}"
        emb = f"{block}.norm1.emb"
        for part in ("weight", "bias"):
            mapped[f"{emb}.timestep_embedder.linear_1.{part}"] = state[f"t_embedder.mlp.0.{part}"]
            mapped[f"{emb}.timestep_embedder.linear_2.{part}"] = state[f"t_embedder.mlp.2.{part}"]
            mapped[f"{block}.norm1.linear.{part}"] = state[f"{ours}.adaLN_modulation.1.{part}"]
            q, k, v = state[f"{ours}.attn.qkv.{part}"].chunk(3, dim=0)  # (3C, ...) -> 3 x (C, ...)
            mapped[f"{block}.attn1.to_q.{part}"], mapped[f"{block}.attn1.to_k.{part}"] = q, k
            mapped[f"{block}.attn1.to_v.{part}"] = v
            mapped[f"{block}.attn1.to_out.0.{part}"] = state[f"{ours}.attn.proj.{part}"]
            mapped[f"{block}.ff.net.0.proj.{part}"] = state[f"{ours}.mlp.fc1.{part}"]
            mapped[f"{block}.ff.net.2.{part}"] = state[f"{ours}.mlp.fc2.{part}"]
        mapped[f"{emb}.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    missing, unexpected = out.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]  # a buffer both compute the same way
    if missing or unexpected:
        raise OpenDiTError(f"DiT -> diffusers mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for module in out.modules():
        if type(module).__name__ == "Timesteps":
            module.downscale_freq_shift = 0  # facebook's exponent: -log(10000) * i / half
    dtype = next(model.parameters()).dtype
    return (out if dtype == torch.float32 else out.to(dtype)).eval()


class DiffusersDiTFn:
    """model_fn(x, t, y) for OpenDiT's sampler around a diffusers DiT transformer. Each call runs inside the module's
    `cache_context` (diffusers' caches need one: our sampler's one call per step is [cond; uncond], one context),
    and `reset()` (call it before each trajectory) clears diffusers' cache state."""

    def __init__(self, transformer):
        self.transformer = transformer

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # DiTTransformer2DModel has no CacheMixin.cache_context; set the context its cache hooks read directly
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.transformer, CacheContext("cond_uncond"))
        try:
            return self.transformer(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
        finally:
            _set_cache_context(self.transformer, None)
