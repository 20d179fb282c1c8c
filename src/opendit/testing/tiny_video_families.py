"""Tiny random video pipelines of the families users run today: Wan 2.2 (two experts), LTX-Video, CogVideoX, Latte.

Built from configs alone (no downloads), each with its own VAE class, text encoder (T5 / UMT5 at 2 layers) and a
tokenizer made locally (tiny_pipelines.py's). Each folder saved by `save_tiny_pipeline` carries small call
defaults (`opendit_call_defaults.json` beside model_index.json, read by opendit.api.pipelines), so
`opendit sample --diffusers DIR --prompt "a cat"` runs a few frames at a small size in seconds instead of the
pipeline's own defaults (81-161 frames at 480-512 px).

    pipe = build_tiny_pipeline("wan22", seed=0)   # transformer + transformer_2, boundary_ratio 0.875
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    ClassifierFreeGuidance,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    LattePipeline,
    LatteTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
)

from opendit.testing import tiny_pipelines as tiny

VIDEO_KINDS: dict[str, str] = {
    "wan22": "WanPipeline (Wan 2.2): a high-noise and a low-noise expert (transformer, transformer_2), boundary_ratio",
    "ltx": "LTXPipeline: LTXVideoTransformer3DModel (its own _cp_plan), T5 encoder, AutoencoderKLLTXVideo",
    "cogvideox": "CogVideoXPipeline: joint text+video blocks with 3D RoPE, T5 encoder, AutoencoderKLCogVideoX",
    "latte": "LattePipeline: spatial and temporal blocks, T5 encoder, 2D AutoencoderKL per frame",
    "hunyuan15": "HunyuanVideo15Pipeline: joint text+video blocks over a padded text, Qwen2.5-VL text model with its "
    "chat template + ByT5, AutoencoderKLHunyuanVideo15, a CFG guider",
}
# what a folder's call runs without flags: a few frames at a small size (pixels), 4 steps
CALL_DEFAULTS: dict[str, dict[str, int]] = {
    "wan22": {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 4},
    "ltx": {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4},
    "cogvideox": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4},
    "latte": {"height": 32, "width": 32, "video_length": 4, "num_inference_steps": 4},
    "hunyuan15": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4},
}
# (pixels per token side, frames rule) per kind: the sizes a call can take
PIXELS_PER_TOKEN = {"wan22": 16, "ltx": 32, "cogvideox": 8, "latte": 4, "hunyuan15": 8}
FRAMES_PARAMETER = {"latte": "video_length"}  # the others: num_frames
BOUNDARY_RATIO = 0.875  # with flow_shift 3: the first step(s) on the high-noise expert, the rest on the low-noise one


def call_kwargs(kind: str, s: dict[str, int], given: dict[str, int]) -> dict[str, Any]:
    """Arguments of a fast CPU call of the tiny `kind` pipeline: its folder defaults (but 2 steps), the sizes
    `given` (image_size, num_frames) where given, guidance with a negative prompt."""
    kwargs = {"prompt": tiny._PROMPT, "negative_prompt": tiny._NEGATIVE_PROMPT, "guidance_scale": 4.0,
              "output_type": "np", **CALL_DEFAULTS[kind], "num_inference_steps": 2}  # fmt: skip
    if "image_size" in given:
        kwargs.update(height=s["image_size"], width=s["image_size"])
    if "num_frames" in given:
        kwargs[FRAMES_PARAMETER.get(kind, "num_frames")] = s["num_frames"]
    if kind == "latte":  # Latte's T5 length is fixed at 120 in its encode_prompt; captions cleaned only with bs4
        kwargs.update(clean_caption=False)
    elif kind == "hunyuan15":  # its text lengths are fixed (1000 + 256 tokens); guidance is its guider's
        del kwargs["guidance_scale"]
    else:
        kwargs["max_sequence_length"] = s["text_len"]
    return kwargs


def _transformer(cls: type, s: dict[str, int], seed: int, component: int = 0, **config):
    """`cls` with the sizes' heads, head dim and blocks (num_attention_heads, attention_head_dim, num_layers) and the
    rest of its `config`, built under the component's seed (tiny_pipelines' seeding rule), in eval mode."""
    with tiny._seeded(seed, component):
        return cls(num_attention_heads=s["num_heads"], attention_head_dim=s["attention_head_dim"],
                   num_layers=s["num_layers"], **config).eval()  # fmt: skip


def _wan_expert(s: dict[str, int], seed: int, component: int) -> WanTransformer3DModel:
    return _transformer(WanTransformer3DModel, s, seed, component, patch_size=(1, 2, 2), in_channels=16,
                        out_channels=16, text_dim=tiny._TEXT_HIDDEN, freq_dim=64,
                        ffn_dim=2 * s["num_heads"] * s["attention_head_dim"])  # fmt: skip


def _build_wan22(s: dict[str, int], seed: int) -> WanPipeline:
    """Wan 2.2 A14B's layout: two experts of one config, the Wan 2.1 VAE, the switch at boundary_ratio."""
    base = tiny._build_wan(s, seed)
    return WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=base.transformer, transformer_2=_wan_expert(s, seed, 5), boundary_ratio=BOUNDARY_RATIO,
    )  # fmt: skip


def _build_ltx(s: dict[str, int], seed: int) -> LTXPipeline:
    heads, head_dim, latent = s["num_heads"], s["attention_head_dim"], 8
    transformer = _transformer(LTXVideoTransformer3DModel, s, seed, in_channels=latent, out_channels=latent,
                               cross_attention_dim=heads * head_dim, caption_channels=tiny._TEXT_HIDDEN)  # fmt: skip
    with tiny._seeded(seed, 1):
        # two levels that scale space and time (as the released VAE's first three): 4 (patch) x 2 x 2 = 16 px and
        # 2 x 2 = 4 frames per latent
        vae = AutoencoderKLLTXVideo(
            latent_channels=latent, block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
            down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
            decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
            downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1),
        ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1,
    )  # fmt: skip
    return LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=tiny._t5_encoder(False, tiny._TEXT_HIDDEN, seed, 2),
        tokenizer=tiny._t5_tokenizer(s["text_len"]), transformer=transformer,
    )  # fmt: skip


def _build_cogvideox(s: dict[str, int], seed: int) -> CogVideoXPipeline:
    # CogVideoX-5B's layout: 3D rotary embeddings (computed by the pipeline), no learned positions
    transformer = _transformer(
        CogVideoXTransformer3DModel, s, seed, in_channels=8, out_channels=8, time_embed_dim=32,
        text_embed_dim=tiny._TEXT_HIDDEN, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=s["text_len"], use_rotary_positional_embeddings=True,
    )  # fmt: skip
    with tiny._seeded(seed, 1):
        # three levels: space by 4, time by 4 (the first two down blocks compress both)
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 16, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=8, layers_per_block=1, norm_num_groups=8,
            sample_height=32, sample_width=32,
        ).eval()  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False,
    )  # fmt: skip
    return CogVideoXPipeline(
        tokenizer=tiny._t5_tokenizer(s["text_len"]), text_encoder=tiny._t5_encoder(False, tiny._TEXT_HIDDEN, seed, 2),
        vae=vae, transformer=transformer, scheduler=scheduler,
    )  # fmt: skip


def _build_latte(s: dict[str, int], seed: int) -> LattePipeline:
    transformer = _transformer(
        LatteTransformer3DModel, s, seed, in_channels=4, out_channels=8,
        cross_attention_dim=s["num_heads"] * s["attention_head_dim"], sample_size=16, patch_size=2,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, caption_channels=tiny._TEXT_HIDDEN,
        video_length=CALL_DEFAULTS["latte"]["video_length"],
    )  # fmt: skip
    return LattePipeline(
        # Latte encodes prompts at 120 tokens (hard-coded in its encode_prompt)
        tokenizer=tiny._t5_tokenizer(120), text_encoder=tiny._t5_encoder(False, tiny._TEXT_HIDDEN, seed, 2),
        vae=tiny._vae(4, 32, seed, 1), transformer=transformer,
        scheduler=DDIMScheduler(beta_schedule="linear", beta_end=0.02, clip_sample=False),
    )  # fmt: skip


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer with no merges (every byte one token) and the chat markers as special tokens,
    with a ChatML template: what HunyuanVideo-1.5's prompt encoding (apply_chat_template) needs."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _build_hunyuan15(s: dict[str, int], seed: int) -> HunyuanVideo15Pipeline:
    head_dim, latent = s["attention_head_dim"], 8
    # t2v input: the latents, the (zero) image-condition latents and a mask channel; rotary axes (t, h, w) sum to the
    # head dim
    rope = (head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8)
    transformer = _transformer(
        HunyuanVideo15Transformer3DModel, s, seed, in_channels=2 * latent + 1, out_channels=latent,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=tiny._TEXT_HIDDEN,
        text_embed_2_dim=tiny._TEXT_HIDDEN, image_embed_dim=16, rope_axes_dim=rope, target_size=32, task_type="t2v",
    )  # fmt: skip
    with tiny._seeded(seed, 1):
        vae = AutoencoderKLHunyuanVideo15(latent_channels=latent, block_out_channels=(8, 16, 16), layers_per_block=1,
                                          spatial_compression_ratio=4, temporal_compression_ratio=4).eval()  # fmt: skip
    tokenizer = _qwen_tokenizer()
    with tiny._seeded(seed, 2):  # 3 layers: the pipeline reads the third hidden state from the end
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=tiny._TEXT_HIDDEN, intermediate_size=2 * tiny._TEXT_HIDDEN,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        )).eval()  # fmt: skip
    with tiny._seeded(seed, 3):  # ByT5: bytes + 3 specials (+ 125 extra ids)
        byt5 = T5EncoderModel(T5Config(
            vocab_size=384, d_model=tiny._TEXT_HIDDEN, d_kv=16, d_ff=2 * tiny._TEXT_HIDDEN, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )).eval()  # fmt: skip
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )  # fmt: skip


BUILDERS = {
    "hunyuan15": _build_hunyuan15,
    "wan22": _build_wan22,
    "ltx": _build_ltx,
    "cogvideox": _build_cogvideox,
    "latte": _build_latte,
}

tiny.register_kinds(VIDEO_KINDS, BUILDERS, PIXELS_PER_TOKEN, CALL_DEFAULTS, call_kwargs)
