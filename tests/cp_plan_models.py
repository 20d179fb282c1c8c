"""Tiny diffusers transformers that declare a `_cp_plan` (random weights from a seed) and inputs for them, for the
context-parallel equivalence tests.

Sizes are chosen to be awkward: 3 heads (not divisible by 2 or 4), head dim 12, 7 text tokens and token counts that
2, 3 and 4 do not divide wherever the model allows it. Every tensor a `_cp_plan` splits has at least 4 entries along
its split dim, so splitting over up to 4 ranks always leaves each rank something.

Left out: Cosmos3OmniTransformer (transformer_cosmos3.py) declares no `_cp_plan`; its context parallelism lives
outside the model (`_cp_shard_fn` / `_cp_gather_fn` seams).
"""

from __future__ import annotations

import torch

HEADS, HEAD_DIM, TEXT, CHANNELS = 3, 12, 7, 16

KINDS = ("flux", "flux2", "qwenimage", "wan", "ltx", "ltx2", "chronoedit", "helios", "minimax_h3")


def _wan_like(heads: int) -> dict:
    """The config the Wan-derived classes (ChronoEdit, Helios) share with the tiny Wan."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4,
                out_channels=4, text_dim=CHANNELS, freq_dim=16, ffn_dim=32, num_layers=2)  # fmt: skip


def build(kind: str, seed: int = 0, heads: int = HEADS):
    """The tiny `kind` model in eval mode, its weights fixed by `seed`."""
    import diffusers

    inner = heads * HEAD_DIM
    torch.manual_seed(seed)
    if kind in ("flux", "wan"):  # the same tiny configs as the five-class equivalence tests
        from tests.diffusers_models import build as build_known

        return build_known(kind, seed, heads)
    if kind == "flux2":
        model = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=CHANNELS, timestep_guidance_channels=32,
            axes_dims_rope=(2, 2, 4, 4), guidance_embeds=True,
        )  # fmt: skip
    elif kind == "qwenimage":
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=CHANNELS, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=CHANNELS, axes_dims_rope=(4, 4, 4),
        )  # fmt: skip
    elif kind == "ltx":
        # cross_attention_dim must equal the inner dim (the caption projection maps the text to it)
        model = diffusers.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=HEAD_DIM,
            cross_attention_dim=inner, num_layers=2, caption_channels=CHANNELS,
        )  # fmt: skip
    elif kind == "ltx2":
        # the audio stream gets its own 3 heads; both cross-attention dims equal the matching inner dims
        model = diffusers.LTX2VideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=HEAD_DIM,
            cross_attention_dim=inner, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=heads,
            audio_attention_head_dim=HEAD_DIM, audio_cross_attention_dim=inner, num_layers=2,
            caption_channels=CHANNELS,
        )  # fmt: skip
    elif kind == "chronoedit":
        model = diffusers.ChronoEditTransformer3DModel(**_wan_like(heads), rope_max_seq_len=32)
    elif kind == "helios":
        model = diffusers.HeliosTransformer3DModel(**_wan_like(heads), rope_dim=(4, 4, 4))
    elif kind == "minimax_h3":
        # rope_freq_dim=2 rotates 2 * 3 * 2 = 12 channels, i.e. the whole head
        model = diffusers.MiniMaxH3Transformer3DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, hidden_size=24, num_layers=2, num_refiner_layers=1,
            ffn_dim=32, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=CHANNELS, freq_dim=16,
            time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2,
        )  # fmt: skip
    else:
        raise ValueError(kind)
    from tests.diffusers_models import perturbed

    return perturbed(model)


def _grid(*sizes: int) -> torch.Tensor:
    """(prod(sizes), len(sizes)) float coordinates of a row-major grid."""
    axes = [torch.arange(s).float() for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(sizes))


def inputs(kind: str, batch: int = 2, seed: int = 1) -> dict:
    """Keyword arguments for `model(**inputs, return_dict=False)`; random tensors drawn from `seed`."""
    if kind in ("flux", "wan"):
        from tests.diffusers_models import inputs as inputs_known

        return inputs_known(kind, batch, seed)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.rand(batch, generator=g) * 0.9 + 0.05  # in (0.05, 0.95); scaled to 0..1000 where a model wants that
    ones = torch.ones(batch, TEXT)
    if kind == "flux2":  # 25 packed image tokens (5x5), 7 text tokens; ids are (batch, tokens, 4) (t, h, w, l)
        img_ids = torch.cat([torch.zeros(25, 1), _grid(5, 5), torch.zeros(25, 1)], -1).repeat(batch, 1, 1)
        txt_ids = torch.cat([torch.zeros(TEXT, 3), torch.arange(TEXT).float()[:, None]], -1).repeat(batch, 1, 1)
        return {"hidden_states": randn(batch, 25, CHANNELS), "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "timestep": t, "img_ids": img_ids, "txt_ids": txt_ids,
                "guidance": torch.full((batch,), 4.0)}  # fmt: skip
    if kind == "qwenimage":  # 25 packed image tokens (5x5 after 2x2 patches), 7 text tokens
        return {"hidden_states": randn(batch, 25, CHANNELS), "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "encoder_hidden_states_mask": ones, "timestep": t, "img_shapes": [[(1, 5, 5)]] * batch}  # fmt: skip
    if kind == "chronoedit":
        # 2 latent frames (input + edited image) take ChronoEdit's own temporal RoPE path; any other count matches
        # Wan exactly. (2, 10, 10) latents -> 50 tokens, which 3 and 4 do not divide (2 always does).
        return {"hidden_states": randn(batch, 4, 2, 10, 10), "timestep": t * 1000,
                "encoder_hidden_states": randn(batch, TEXT, CHANNELS)}  # fmt: skip
    if kind == "ltx":  # 27 video tokens (3 frames of 3x3), 7 text tokens
        return {"hidden_states": randn(batch, 27, 8), "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "timestep": (t * 1000).long(), "encoder_attention_mask": ones, "num_frames": 3, "height": 3,
                "width": 3}  # fmt: skip
    if kind == "ltx2":  # 27 video tokens (3 frames of 3x3), 7 audio tokens, 7 text tokens per stream
        return {"hidden_states": randn(batch, 27, 8), "audio_hidden_states": randn(batch, 7, 8),
                "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "audio_encoder_hidden_states": randn(batch, TEXT, CHANNELS), "timestep": t * 1000,
                "encoder_attention_mask": ones, "audio_encoder_attention_mask": ones.clone(), "num_frames": 3,
                "height": 3, "width": 3, "audio_num_frames": 7}  # fmt: skip
    if kind == "helios":
        # 5 frames of 1x5 patches (25 tokens) after 2 short-history frames (10 tokens): self-attention and the
        # feed-forward see 35 tokens, cross-attention only the 25 current ones
        return {"hidden_states": randn(batch, 4, 5, 2, 10), "timestep": t * 1000,
                "encoder_hidden_states": randn(batch, TEXT, CHANNELS),
                "indices_hidden_states": torch.arange(2, 7).repeat(batch, 1),
                "latents_history_short": randn(batch, 4, 2, 2, 10),
                "indices_latents_history_short": torch.arange(2).repeat(batch, 1)}  # fmt: skip
    if kind == "minimax_h3":
        # One packed sequence of 41 rows: 7 text, 7 audio, then 27 video rows (3 frames of 3x3 patches).
        # `timestep` holds the distinct noise levels [0, t]: text rows use index 0, audio and video rows index 1.
        # Modality tags: 0 video, 1 text, 2 audio. The batch axis only replicates this one packed layout.
        n_text, n_audio, n_video = TEXT, 7, 27
        text_idx = torch.arange(n_text)
        audio_idx = torch.arange(n_text, n_text + n_audio)
        video_idx = torch.arange(n_text + n_audio, n_text + n_audio + n_video)
        tags = torch.cat([torch.ones(n_text), torch.full((n_audio,), 2), torch.zeros(n_video)]).long()
        t_idx = torch.cat([torch.zeros(n_text), torch.ones(n_audio + n_video)]).long()
        line = torch.arange(n_text + n_audio).float()[:, None]
        pos = torch.cat([torch.cat([line, torch.zeros(n_text + n_audio, 2)], -1), _grid(3, 3, 3)])
        return {"hidden_states": randn(batch, n_video, 16), "audio_hidden_states": randn(batch, n_audio, 8),
                "encoder_hidden_states": randn(batch, n_text, CHANNELS), "timestep": torch.stack([t[0] * 0, t[0]]),
                "timestep_indices": t_idx, "token_tags": tags, "position_ids": pos, "video_indices": video_idx,
                "audio_indices": audio_idx, "text_indices": text_idx}  # fmt: skip
    raise ValueError(kind)


def run(model, kwargs: dict) -> torch.Tensor:
    """The main output tensor (the video / image sample; LTX-2 and MiniMax-H3 also return an audio sample)."""
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]
