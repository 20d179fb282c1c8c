"""Tiny diffusers transformers (random weights from a seed) and inputs for them, for the parallel equivalence tests.

Sizes are chosen to be awkward: 3 heads (not divisible by 2 or 4), token counts that 2, 3 and 4 do not divide
(25 image tokens, 7 text tokens, 27 video tokens)."""

from __future__ import annotations

import torch

HEADS, HEAD_DIM, TEXT, CHANNELS = 3, 12, 7, 16


def build(kind: str, seed: int = 0, heads: int = HEADS):
    import diffusers

    torch.manual_seed(seed)
    if kind == "dit":
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
            sample_size=10, patch_size=2, num_embeds_ada_norm=10,
        )  # fmt: skip
    elif kind == "pixart":
        model = diffusers.PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=heads * HEAD_DIM, sample_size=10, patch_size=2, caption_channels=CHANNELS,
            use_additional_conditions=False,
        )  # fmt: skip
    elif kind == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=10, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=CHANNELS, caption_projection_dim=heads * HEAD_DIM,
            pooled_projection_dim=CHANNELS, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )  # fmt: skip
    elif kind == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=CHANNELS, pooled_projection_dim=CHANNELS,
            axes_dims_rope=(4, 4, 4),
        )  # fmt: skip
    elif kind == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4,
            out_channels=4, text_dim=CHANNELS, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        )  # fmt: skip
    else:
        raise ValueError(kind)
    return perturbed(model)


def perturbed(model):
    """The model with every weight moved by N(0, 0.02) noise (zero-initialised gates, adaLN-Zero, would make every
    block the identity), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def inputs(kind: str, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.rand(batch, generator=g) * 900 + 50
    if kind == "dit":
        return {"hidden_states": randn(batch, 4, 10, 10), "timestep": t.long(),
                "class_labels": torch.arange(batch) % 10}  # fmt: skip
    if kind == "pixart":
        mask = torch.ones(batch, TEXT)
        mask[0, -2:] = 0  # padded text tokens: the cross-attention mask must still hold
        return {"hidden_states": randn(batch, 4, 10, 10), "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "timestep": t, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                "encoder_attention_mask": mask}  # fmt: skip
    if kind == "sd3":
        return {"hidden_states": randn(batch, 4, 10, 10), "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "pooled_projections": randn(batch, CHANNELS), "timestep": t}  # fmt: skip
    if kind == "flux":
        side = 5  # 25 packed image tokens
        axes = (torch.zeros(1), torch.arange(side).float(), torch.arange(side).float())
        img_ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        return {"hidden_states": randn(batch, side * side, CHANNELS), "encoder_hidden_states": randn(batch, TEXT,
                CHANNELS), "pooled_projections": randn(batch, CHANNELS), "timestep": t / 1000,
                "img_ids": img_ids.reshape(-1, 3).float(), "txt_ids": torch.zeros(TEXT, 3)}  # fmt: skip
    if kind == "wan":
        return {"hidden_states": randn(batch, 4, 3, 6, 6), "timestep": t,
                "encoder_hidden_states": randn(batch, TEXT, CHANNELS)}  # fmt: skip
    raise ValueError(kind)


KINDS = ("dit", "pixart", "sd3", "flux", "wan")
