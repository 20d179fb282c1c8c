"""Families for diffusers classes that declare no `_cp_plan`: their split/gather points written in diffusers'
vocabulary, their attention modules (processors that call F.scaled_dot_product_attention themselves), and the
tensor-parallel split where declared. Cross-attention to the text (PixArt's attn2) is not listed: local queries
against every text token is exact and needs no exchange."""

from __future__ import annotations

from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from opendit.families.registry import Family, register_family
from opendit.models.spec import TensorSplit

TOKENS_OUT = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)  # (B, L, C) output, split on L
GATHER = ContextParallelOutput(gather_dim=1, expected_dims=3)
ROPE_OUT = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)  # (B, L, D) cos or sin

register_family(
    "DiTTransformer2DModel",
    Family(
        name="diffusers DiT",
        cp_plan={"pos_embed": {0: TOKENS_OUT}, "proj_out_2": GATHER},  # gather before unpatchify (grid from count)
        attention=("transformer_blocks.*.attn1",),
        cfg_batched=True,
        shard_in_root=("transformer_blocks.0",),  # its norm1.emb also conditions the final layer
        tensor=TensorSplit(  # each block's own adaLN-Zero (norm1.linear: 6 x C) split per chunk and gathered
            attention=("transformer_blocks.*.attn1",),
            attention_kind="separate_qkv",
            column=("transformer_blocks.*.ff.net.0.proj",),
            row=("transformer_blocks.*.ff.net.2",),
            gathered=(("transformer_blocks.*.norm1.linear", 6),),
        ),
    ),
)
register_family(
    "PixArtTransformer2DModel",
    Family(
        name="diffusers PixArt",
        cp_plan={"pos_embed": {0: TOKENS_OUT}, "proj_out": GATHER},
        attention=("transformer_blocks.*.attn1",),  # attn2: cross-attention to the text, local
        cfg_batched=True,
        tensor=TensorSplit(  # adaLN-single: the per-block scale_shift_table (6, C) is tiny and stays whole
            attention=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2"),
            attention_kind="separate_qkv",
            column=("transformer_blocks.*.ff.net.0.proj",),
            row=("transformer_blocks.*.ff.net.2",),
        ),
    ),
)
register_family(
    "SD3Transformer2DModel",
    Family(
        name="diffusers SD3 (MMDiT)",
        # image patches (positions inside pos_embed) and the projected text tokens are both split
        cp_plan={"pos_embed": {0: TOKENS_OUT}, "context_embedder": {0: TOKENS_OUT}, "proj_out": GATHER},
        attention=("transformer_blocks.*.attn", "transformer_blocks.*.attn2"),  # joint; SD3.5's image-only attn2
        cfg_batched=True,
    ),
)


def _class_plan_with(class_name: str, extra: dict) -> dict:
    """A diffusers class's own `_cp_plan` with entries it lacks (the class's plan stays the source of the rest)."""
    import diffusers

    return {**getattr(diffusers, class_name)._cp_plan, **extra}


# LTX-2's own plan splits the video tokens and `rope`, but not `cross_attn_rope`, the rotary embedding of the video
# side of its audio<->video cross-attention, computed from the same video coordinates: without this entry the split
# video queries meet a whole rotary embedding (13 vs 27 tokens on 2 ranks). The audio stream stays whole.
register_family(
    "LTX2VideoTransformer3DModel",
    Family(
        name="diffusers LTX2VideoTransformer3DModel",
        cp_plan=_class_plan_with("LTX2VideoTransformer3DModel", {"cross_attn_rope": {0: ROPE_OUT, 1: ROPE_OUT}}),
        source="_cp_plan + declared",
    ),
)

# Z-Image: one stream over [image; text] per sample (each padded to a multiple of 32 tokens inside the sample), built
# from lists of per-sample tensors: image tokens refined alone (noise_refiner), text tokens alone (context_refiner),
# both one device; then the unified (B, L, C) sequence through `layers` is split where the first layer takes it, its
# rotary table (B, L, D/2) and key padding mask (B, L) where every layer takes them (samples of a batch whose [image;
# text] lengths differ are padded to the longest and masked: CFG against a shorter negative prompt), and gathered
# after the final layer, before the per-sample unpatchify. The attention is ZSingleStreamAttnProcessor's call to
# dispatch_attention_fn (the dispatch route); the key mask travels with K (families/attention.py).
TOKENS_IN = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)  # (B, L, C) argument, split on L
MASK_IN = ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)  # (B, L) key padding mask
register_family(
    "ZImageTransformer2DModel",
    Family(
        name="diffusers Z-Image (single stream)",
        cp_plan={
            "layers.0": {"x": TOKENS_IN},
            "layers.*": {"attn_mask": MASK_IN, "freqs_cis": TOKENS_IN},
            "all_final_layer.*": GATHER,
        },
        cfg_batched=True,  # [cond; uncond] in one call (lists of per-sample tensors)
        heads_attr="n_heads",
    ),
)
