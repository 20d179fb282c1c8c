"""Tiny, randomly initialised image pipelines of the current families, built from configs alone (no downloads):
Qwen-Image (QwenImagePipeline), FLUX.2 (Flux2Pipeline) and Z-Image (ZImagePipeline), each with its own text encoder
(Qwen2.5-VL, Mistral3, Qwen3 at a few thin layers), tokenizer and chat template made locally, and its own VAE class.

    pipe = build_tiny_image_pipeline("zimage", seed=0)
    images = pipe(**tiny_image_call_kwargs("zimage"), generator=torch.Generator().manual_seed(0)).images
    save_tiny_image_pipeline("flux2", "/tmp/flux2")   # then: opendit sample --diffusers /tmp/flux2 --prompt "a cat"

Tokenizers are byte-level BPE (the Qwen and Mistral tokenizers are too) over every byte plus merges learnt on a
built-in word list and the words of each pipeline's templates, so a template word is one token:
- Qwen-Image drops the first 34 tokens of its encoded prompt template (`prompt_template_encode_start_idx`): the
  template prefix is exactly 34 tokens here, as with the released tokenizer (`qwen_template_prefix_tokens` checks);
- Z-Image applies the tokenizer's chat template (`enable_thinking`, `add_generation_prompt`): a Qwen3-style one;
- FLUX.2 calls `apply_chat_template` of its processor on system + user messages whose content is a list of text
  parts: here a tokenizer with a Mistral-style chat template ([SYSTEM_PROMPT] ... [INST] ... [/INST]) takes that
  call (the PixtralProcessor itself needs torchvision; the text path uses nothing else of it). Its Mistral3 encoder
  has 31 thin layers, so the pipeline's default `text_encoder_out_layers` (10, 20, 30) work as released.

Every folder saved by `save_tiny_image_pipeline` records small call defaults (size, steps, text length) in
`opendit_call_defaults.json` (read by opendit.api.pipelines), which `opendit sample --diffusers` applies where the
call does not set them, so running one without flags takes seconds (the pipelines' own defaults: 1024 px, 50 steps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from opendit.testing.tiny_pipelines import _seeded  # one seeding rule for every tiny component

__all__ = [
    "IMAGE_KINDS",
    "build_tiny_image_pipeline",
    "qwen_template_prefix_tokens",
    "save_tiny_image_pipeline",
    "tiny_image_call_kwargs",
]

IMAGE_KINDS: dict[str, str] = {
    "qwenimage": "QwenImagePipeline: MMDiT with a Qwen2.5-VL encoder, AutoencoderKLQwenImage, flow matching, true CFG",
    "flux2": "Flux2Pipeline: double- and single-stream blocks, Mistral3 encoder (31 thin layers), AutoencoderKLFlux2",
    "zimage": "ZImagePipeline: single-stream DiT over [image; text], Qwen3 encoder, AutoencoderKL, batched CFG",
}

# per kind: transformer sizes and the image size (pixels) of a fast default call
_DEFAULTS: dict[str, dict[str, int]] = {
    "qwenimage": {"num_heads": 2, "attention_head_dim": 16, "num_layers": 2, "image_size": 32},
    "flux2": {"num_heads": 2, "attention_head_dim": 16, "num_layers": 2, "image_size": 32},  # 2 joint blocks: fbcache
    "zimage": {"num_heads": 2, "attention_head_dim": 16, "num_layers": 2, "image_size": 32},
}
# pixels per transformer token side (VAE downsampling x the 2x2 packing or patch)
PIXELS_PER_TOKEN = {"qwenimage": 8, "flux2": 4, "zimage": 4}
_STEPS = 4
_TEXT_LEN = {"qwenimage": 64, "flux2": 96, "zimage": 64}  # max_sequence_length of the default call
_TEXT_HIDDEN = 32
_VOCAB = 1024  # embedding rows of every text encoder (the tokenizers use fewer ids)

QWEN_IMAGE_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:"
)
_WORDS = (
    "a an the of on in at to with and or by from under over near is are photo picture painting portrait landscape "
    "view image scene style cat dog bird fish horse fox owl man woman child robot astronaut tree flower garden forest "
    "mountain river lake sea beach sky sun moon star cloud rain snow house city street castle room window car boat "
    "red blue green yellow orange purple pink brown black white gray gold silver big small old young happy bright "
    "dark soft warm cold beautiful sitting standing running flying looking morning evening night sunset sunrise high "
    "quality detailed realistic blurry low sharp cinematic colorful system user assistant"
).split()
_PROMPT = "a photo of a red cat sitting in a garden at sunset"
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")  # fmt: skip
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]")  # fmt: skip

# Qwen3's chat template, shortened: Z-Image renders one user turn with add_generation_prompt and enable_thinking
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)
# Mistral's chat template, shortened: system and user turns whose content is a string or a list of text parts
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\n') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{%- else %}{{ text }}{{ eos_token }}{%- endif %}{%- endfor %}"
)


def build_tiny_image_pipeline(kind: str, seed: int = 0, **sizes: int):
    """A tiny random `kind` pipeline (see IMAGE_KINDS); the same seed and sizes give identical weights.
    sizes (optional): num_heads, attention_head_dim, num_layers, image_size (of the default call)."""
    s = _resolve(kind, sizes)
    return {"qwenimage": _build_qwenimage, "flux2": _build_flux2, "zimage": _build_zimage}[kind](s, seed)


def save_tiny_image_pipeline(kind: str, directory: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Build and save a tiny pipeline (diffusers' save_pretrained layout), its fast call defaults recorded."""
    directory = Path(directory)
    pipe = build_tiny_image_pipeline(kind, seed, **sizes)
    s = _resolve(kind, sizes)
    defaults = {"height": s["image_size"], "width": s["image_size"], "num_inference_steps": _STEPS,
                "max_sequence_length": _TEXT_LEN[kind]}  # fmt: skip
    pipe.save_pretrained(directory)
    (directory / "opendit_call_defaults.json").write_text(json.dumps(defaults, indent=1) + "\n")
    return directory


def tiny_image_call_kwargs(kind: str, **sizes: int) -> dict[str, Any]:
    """Arguments of a fast CPU call of `build_tiny_image_pipeline(kind, **sizes)`; add a `generator`."""
    s = _resolve(kind, sizes)
    size = s["image_size"]
    kwargs: dict[str, Any] = {"prompt": _PROMPT, "height": size, "width": size, "num_inference_steps": 2,
                              "max_sequence_length": _TEXT_LEN[kind], "output_type": "np"}  # fmt: skip
    if kind == "qwenimage":
        kwargs.update(negative_prompt="blurry low quality", true_cfg_scale=4.0)  # true CFG: one call per branch
    elif kind == "zimage":
        kwargs.update(guidance_scale=4.0)  # batched CFG against the empty negative prompt
    return kwargs


def _resolve(kind: str, sizes: dict[str, int]) -> dict[str, int]:
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown tiny image pipeline kind {kind!r}; choose from {sorted(IMAGE_KINDS)}")
    unknown = sorted(set(sizes) - set(_DEFAULTS[kind]))
    if unknown:
        raise TypeError(f"unknown size overrides {unknown}; known: {sorted(_DEFAULTS[kind])}")
    s = {**_DEFAULTS[kind], **sizes}
    if s["num_heads"] < 2 or s["attention_head_dim"] < 8 or s["attention_head_dim"] % 4:
        raise ValueError(f"need num_heads >= 2 and attention_head_dim a multiple of 4 >= 8, got {s}")
    step = PIXELS_PER_TOKEN[kind]
    if s["image_size"] < step or s["image_size"] % step:
        raise ValueError(f"{kind} needs image_size a positive multiple of {step}, got {s['image_size']}")
    return s


# ------------------------------------------------------------------------------------------------ tokenizers
def _byte_level_bpe(extra_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte symbol, plus merges learnt (deterministically) until each built-in word and each word of
    `extra_text` is one token, with and without its leading space ("Ġ")."""
    from tokenizers.pre_tokenizers import ByteLevel

    from opendit.testing.tiny_pipelines import learn_merges

    words = dict.fromkeys([*_WORDS, *re.findall(r"[A-Za-z]+", extra_text)])
    merges = learn_merges([[*w] for w in words] + [["Ġ", *w] for w in words])
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def _qwen_tokenizer(extra_text: str = ""):
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(extra_text)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.add_special_tokens({"pad_token": QWEN_SPECIALS[0], "eos_token": QWEN_SPECIALS[0]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _mistral_tokenizer(extra_text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe(extra_text)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4096, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIALS[4:])})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def qwen_template_prefix_tokens(pipe) -> int:
    """Tokens of Qwen-Image's prompt template before the prompt (the pipeline drops its first 34)."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    return len(pipe.tokenizer(prefix).input_ids)


# ------------------------------------------------------------------------------------------------ builders
def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # the released Qwen-Image / FLUX.2 / Z-Image schedulers shift with the image token count
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


def _build_qwenimage(s: dict[str, int], seed: int):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer(QWEN_IMAGE_SYSTEM)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    head = _TEXT_HIDDEN // 2
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": _TEXT_HIDDEN, "intermediate_size": 2 * _TEXT_HIDDEN, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": _VOCAB,
                     "max_position_embeddings": 4096, "rope_theta": 1000000.0, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"],
                     "rope_scaling": {"type": "mrope", "mrope_section": [head // 4, head // 8, head // 8]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": _TEXT_HIDDEN, "fullatt_block_indexes": [0]},
        vocab_size=_VOCAB, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    with _seeded(seed, 1):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    z_dim, head_dim = 4, s["attention_head_dim"]
    with _seeded(seed, 0):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=s["num_layers"],
            attention_head_dim=head_dim, num_attention_heads=s["num_heads"], joint_attention_dim=_TEXT_HIDDEN,
            axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
        ).eval()  # fmt: skip
    with _seeded(seed, 2):  # 3 levels: 4x spatial downsampling (time is one frame)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                     latents_std=[1.0] * z_dim).eval()  # fmt: skip
    return QwenImagePipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)  # fmt: skip


def _build_flux2(s: dict[str, int], seed: int):
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = _mistral_tokenizer(SYSTEM_MESSAGE)
    specials = {name: tokenizer.convert_tokens_to_ids(name) for name in MISTRAL_SPECIALS}
    hidden = 16  # 3 layers (10, 20, 30) are stacked: the transformer reads 3 x 16 channels
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": _VOCAB, "hidden_size": hidden, "intermediate_size": 32,
                     "max_position_embeddings": 4096, "num_attention_heads": 2, "num_hidden_layers": 31,
                     "num_key_value_heads": 1, "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0,
                     "sliding_window": None, "bos_token_id": specials["<s>"], "eos_token_id": specials["</s>"],
                     "pad_token_id": specials["<pad>"]},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "image_size": 32, "patch_size": 8, "num_channels": 3, "head_dim": 8},
        image_token_index=specials["[IMG]"], spatial_merge_size=1, vision_feature_layer=-1,
        bos_token_id=specials["<s>"], eos_token_id=specials["</s>"], pad_token_id=specials["<pad>"],
    )  # fmt: skip
    with _seeded(seed, 1):
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
    head_dim = s["attention_head_dim"]
    latent = 4
    with _seeded(seed, 0):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * latent, num_layers=s["num_layers"], num_single_layers=1,
            attention_head_dim=head_dim, num_attention_heads=s["num_heads"], joint_attention_dim=3 * hidden,
            timestep_guidance_channels=32, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=True,
        ).eval()  # fmt: skip
    with _seeded(seed, 2):  # 2 levels: 2x downsampling, then the pipeline's 2x2 packing
        vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent,
                                 norm_num_groups=4, sample_size=32, use_quant_conv=False,
                                 use_post_quant_conv=False).eval()  # fmt: skip
    return Flux2Pipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)  # fmt: skip


def _build_zimage(s: dict[str, int], seed: int):
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen_tokenizer()
    config = Qwen3Config(hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=_VOCAB,
                         max_position_embeddings=4096)  # fmt: skip
    with _seeded(seed, 1):
        text_encoder = Qwen3Model(config).eval()
    heads, head_dim = s["num_heads"], s["attention_head_dim"]
    with _seeded(seed, 0):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=heads * head_dim, n_layers=s["num_layers"],
            n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=_TEXT_HIDDEN,
            axes_dims=[head_dim // 2, head_dim // 4, head_dim // 4], axes_lens=[1024, 64, 64],
        ).eval()  # fmt: skip
    with _seeded(seed, 2):  # 2 levels: 2x downsampling, then the transformer's 2x2 patches
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=32, scaling_factor=0.3611, shift_factor=0.1159).eval()  # fmt: skip
    return ZImagePipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)  # fmt: skip
