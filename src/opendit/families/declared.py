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


# CogVideoX: one joint attention over [text; video] tokens (CogVideoXAttnProcessor2_0 concatenates them and calls
# F.scaled_dot_product_attention), so both streams are split, as SD3 / Flux's: at the first block's inputs, after
# the patch embedding has made both (B, T, C) / (B, N, C); the 3D rotary embedding the pipeline passes ((N, D) cos
# and sin, no batch dim) is split with the video tokens; the video tokens are gathered after the final projection.
ROWS_2D = ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)  # (N, D) rotary cos / sin
TOKENS_IN = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)  # (B, L, C) argument, split on L


def _joint_stream_plan(root: dict | None = None, every_block: dict | None = None) -> dict:
    """The plan of a joint attention over [text; video] tokens in `transformer_blocks`: both streams split at the first
    block's inputs, the video tokens gathered after `proj_out`; `root`: arguments of the model's call split too,
    `every_block`: arguments every block is given whole, split at each."""
    plan = {"": root} if root else {}
    plan["transformer_blocks.0"] = {"hidden_states": TOKENS_IN, "encoder_hidden_states": TOKENS_IN}
    if every_block:
        plan["transformer_blocks.*"] = every_block
    return {**plan, "proj_out": GATHER}


register_family(
    "CogVideoXTransformer3DModel",
    Family(
        name="diffusers CogVideoX",
        cp_plan=_joint_stream_plan(root={"image_rotary_emb": ROWS_2D}),
        attention=("transformer_blocks.*.attn1",),
    ),
)


def _latte_temporal_rows(module, state) -> list:
    """Latte's temporal blocks run on (B * N_r, F, C) rows (every frame of this rank's N_r tokens) with a timestep
    per row that the model builds for all (B * N) rows: narrow it to this rank's tokens of every batch row."""
    from opendit.parallel.sequence import offsets, split_sizes

    def hook(_block, args, kwargs):
        hidden, timestep = args[0], args[4] if len(args) > 4 else kwargs.get("timestep")
        if not state.active or timestep is None or timestep.shape[0] == hidden.shape[0]:
            return None
        tokens = state.lengths["pos_embed:0"]  # N: tokens of one frame, before the split
        sizes = split_sizes(tokens, state.size)
        batch = timestep.shape[0] // tokens
        # (B * N, D) -> (B, N, D) -> (B, N_r, D) -> (B * N_r, D): the rows of this rank's tokens, batch-major
        local = timestep.view(batch, tokens, -1).narrow(1, offsets(sizes)[state.rank], sizes[state.rank])
        local = local.reshape(batch * sizes[state.rank], -1)
        if len(args) > 4:
            return (*args[:4], local, *args[5:]), kwargs
        return args, {**kwargs, "timestep": local}

    return [block.register_forward_pre_hook(hook, with_kwargs=True) for block in module.temporal_transformer_blocks]


# Latte: spatial blocks attend over the N tokens of one frame ((B * F, N, C)), temporal blocks over the F frames of
# one token ((B * N, F, C)). The tokens of every frame are split (after the patch embedding, which adds their
# positions); a temporal block then holds every frame of this rank's tokens, so its attention is local and exact
# (only the spatial self-attention runs the strategy's kernel; cross-attention to the whole text stays local).
register_family(
    "LatteTransformer3DModel",
    Family(
        name="diffusers Latte",
        cp_plan={"pos_embed": {0: TOKENS_OUT}, "proj_out": GATHER},
        attention=("transformer_blocks.*.attn1",),
        install=_latte_temporal_rows,
    ),
)


# HunyuanVideo-1.5: one joint attention over [video; text] per block (the text: its Qwen tokens, ByT5 tokens and the
# image-condition tokens, reordered valid-first and padded, with a padding mask). Both streams are split at the first
# block's inputs (after the text refiner and the reordering); the text mask and the video rotary cos / sin rows
# ((N, D) each) are given whole to every block, so every block splits them; the video tokens are gathered after the
# final projection. The block's processor builds a (B, 1, S, S) mask = key mask x query mask from its split text
# mask; the attention site reads the key mask from it.
MASK_IN = ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)  # (B, T) text padding mask
register_family(
    "HunyuanVideo15Transformer3DModel",
    Family(
        name="diffusers HunyuanVideo-1.5",
        cp_plan=_joint_stream_plan(every_block={"attention_mask": MASK_IN, "freqs_cis": ROWS_2D}),
        cfg_batched=False,  # its guider calls the transformer once per branch
    ),
)

# Z-Image: one stream over [image; text] per sample (each padded to a multiple of 32 tokens inside the sample), built
# from lists of per-sample tensors: image tokens refined alone (noise_refiner), text tokens alone (context_refiner),
# both one device; then the unified (B, L, C) sequence through `layers` is split where the first layer takes it, its
# rotary table (B, L, D/2) and key padding mask (B, L) where every layer takes them (samples of a batch whose [image;
# text] lengths differ are padded to the longest and masked: CFG against a shorter negative prompt), and gathered
# after the final layer, before the per-sample unpatchify. The attention is ZSingleStreamAttnProcessor's call to
# dispatch_attention_fn (the dispatch route); the key mask travels with K (families/attention.py).
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
