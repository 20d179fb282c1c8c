"""Tiny, randomly initialised diffusers pipelines built from configs alone: no downloads, no weights on disk.

They exist so that tests and demos can drive the real diffusers pipeline code (tokenizers, text encoders, VAEs,
schedulers, transformers) in a second on a CPU. Every component is real but tiny: 2+ attention heads of head dim
>= 8, 1-2 blocks, 16-64 image tokens, text encoders of hidden size 32 with 2 layers and a 1000-entry vocabulary.
Tokenizers are assembled locally from a built-in word list, so `save_pretrained` / `from_pretrained` round-trip
offline and without `sentencepiece`.

    pipe = build_tiny_pipeline("flux", seed=0)
    images = pipe(**tiny_call_kwargs("flux"), generator=torch.Generator().manual_seed(0)).images
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = ["TINY_KINDS", "build_tiny_pipeline", "save_tiny_pipeline", "tiny_call_kwargs"]

TINY_KINDS: dict[str, str] = {
    "pixart": "PixArtAlphaPipeline: PixArt transformer, T5 encoder, 4-channel AutoencoderKL, DPM-Solver++",
    "sd3": "StableDiffusion3Pipeline: MMDiT, 2x CLIP-with-projection + T5, 16-channel AutoencoderKL, flow matching",
    "flux": "FluxPipeline: double- and single-stream blocks, CLIP + T5, 16-channel AutoencoderKL, flow matching",
    "wan": "WanPipeline: 3D video transformer, UMT5 encoder, AutoencoderKLWan, UniPC with flow sigmas",
    "dit": "DiTPipeline: class-conditional DiT, 4-channel AutoencoderKL, DDIM",
}  # and the video families of tiny_video_families.py (registered at the end of this file)

# Shared defaults; `_KIND_DEFAULTS` overrides them where a model family needs other sizes.
_DEFAULT_SIZES: dict[str, int] = {
    "num_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 1,
    "image_size": 32,
    "num_frames": 5,
    "text_len": 16,
}
_KIND_DEFAULTS: dict[str, dict[str, int]] = {
    "flux": {"num_layers": 1},  # 1 double-stream + 1 single-stream block
    "wan": {"image_size": 64},  # the Wan VAE downsamples by 8: 64 px -> 8x8 latents -> 4x4 tokens a frame
}
# Pixels per transformer token side: VAE downsampling times patch (or Flux's 2x2 latent packing).
_PIXELS_PER_TOKEN = {"pixart": 4, "sd3": 4, "flux": 4, "wan": 16, "dit": 4}

_TEXT_HIDDEN = 32
_VOCAB_SIZE = 1000
_VAE_CHANNELS = (16, 32)  # two levels: the VAE downsamples by 2, keeping images (and decode time) small
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
_WORDS = tuple(
    dict.fromkeys(
        """a an the of on in at to with and or by from under over near behind under above is are
        photo picture painting drawing sketch portrait landscape close up view shot render image scene style
        cat dog bird fish horse cow sheep lion tiger bear fox wolf rabbit mouse owl duck frog snake whale
        man woman child boy girl person people family friend king queen robot astronaut knight wizard
        tree flower grass forest garden park field mountain hill river lake sea ocean beach island desert
        sky sun moon star cloud rain snow storm fog wind fire water stone sand ice light shadow
        house city street road bridge tower castle church room kitchen window door table chair bed car
        train boat ship plane bike book cup bottle lamp clock hat coat shoe bag ball box
        red blue green yellow orange purple pink brown black white gray gold silver
        big small tall short old young new happy sad bright dark soft warm cold wet dry beautiful
        sitting standing running walking flying swimming eating sleeping playing reading looking holding
        morning evening night day summer winter spring autumn sunset sunrise
        high quality detailed realistic blurry low worst best sharp cinematic colorful""".split()
    )
)
_PROMPT = "a photo of a red cat sitting in a garden at sunset"
_NEGATIVE_PROMPT = "blurry low quality"
_DIT_LABELS = {i: name for i, name in enumerate("cat dog bird fish horse lion tiger bear fox wolf".split())}


def build_tiny_pipeline(kind: str, seed: int = 0, **sizes: int) -> DiffusionPipeline:
    """A tiny random `kind` pipeline (see `TINY_KINDS`); the same seed and sizes give identical weights.

    sizes (all optional): num_heads, attention_head_dim, num_layers, num_single_layers (Flux), image_size (pixels),
    num_frames (Wan), text_len (tokenizer and encoder length).
    """
    resolved = _resolve_sizes(kind, sizes)
    return _BUILDERS[kind](resolved, seed)


def save_tiny_pipeline(kind: str, directory: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Build a tiny pipeline and save it so that `DiffusionPipeline.from_pretrained(directory)` loads it offline."""
    directory = Path(directory)
    build_tiny_pipeline(kind, seed, **sizes).save_pretrained(directory)
    defaults = _CALL_DEFAULTS.get(kind)
    if defaults:  # a few frames at a small size when a call gives none (opendit.api.pipelines reads them)
        (directory / "opendit_call_defaults.json").write_text(json.dumps(defaults, indent=2, sort_keys=True))
    return directory


def tiny_call_kwargs(kind: str, **sizes: int) -> dict[str, Any]:
    """Pipeline call arguments for a fast CPU run of `build_tiny_pipeline(kind, **sizes)`; add a `generator`."""
    s = _resolve_sizes(kind, sizes)
    if kind in _VIDEO_CALLS:
        return _VIDEO_CALLS[kind](kind, s, sizes)
    if kind == "dit":
        return {"class_labels": [1], "guidance_scale": 4.0, "num_inference_steps": 2, "output_type": "np"}
    kwargs: dict[str, Any] = {
        "prompt": _PROMPT,
        "height": s["image_size"],
        "width": s["image_size"],
        "num_inference_steps": 2,
        "max_sequence_length": s["text_len"],
        "output_type": "np",
    }
    if kind == "pixart":
        # Binning snaps sizes to the 256/512/1024 px aspect-ratio tables; caption cleaning needs bs4 and ftfy.
        kwargs.update(guidance_scale=4.5, use_resolution_binning=False, clean_caption=False)
    elif kind == "sd3":
        kwargs.update(guidance_scale=5.0, negative_prompt=_NEGATIVE_PROMPT)
    elif kind == "wan":
        kwargs.update(guidance_scale=5.0, negative_prompt=_NEGATIVE_PROMPT, num_frames=s["num_frames"])
    # flux: guidance_embeds=False (as FLUX.1-schnell), so guidance_scale is ignored and there is no CFG pass.
    return kwargs


def _resolve_sizes(kind: str, sizes: dict[str, int]) -> dict[str, int]:
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose from {sorted(TINY_KINDS)}")
    unknown = sorted(set(sizes) - set(_DEFAULT_SIZES))
    if unknown:
        raise TypeError(f"unknown size overrides {unknown}; known: {sorted(_DEFAULT_SIZES)}")
    s = {**_DEFAULT_SIZES, **_KIND_DEFAULTS.get(kind, {}), **sizes}
    if s["num_heads"] < 2 or s["attention_head_dim"] < 8:
        raise ValueError(
            f"need num_heads >= 2 and attention_head_dim >= 8, got {s['num_heads']}, {s['attention_head_dim']}"
        )
    if kind in ("flux", "wan", "wan22", "ltx", "cogvideox", "hunyuan15") and s["attention_head_dim"] % 2:
        raise ValueError(f"{kind} uses rotary embeddings, which need an even attention_head_dim")
    if kind in ("cogvideox", "hunyuan15") and s["attention_head_dim"] % 16:
        raise ValueError(f"{kind}'s 3D rotary embedding splits the head dim into 1/4 + 3/8 + 3/8, each even: "
                         f"attention_head_dim a multiple of 16, got {s['attention_head_dim']}")  # fmt: skip
    step = _PIXELS_PER_TOKEN[kind]
    if s["image_size"] < step or s["image_size"] % step:
        raise ValueError(f"{kind} needs image_size a positive multiple of {step}, got {s['image_size']}")
    if kind in ("wan", "wan22", "ltx", "cogvideox", "hunyuan15") and (s["num_frames"] < 1 or (s["num_frames"] - 1) % 4):
        raise ValueError(f"wan needs num_frames = 4k + 1 (the VAE compresses time by 4), got {s['num_frames']}")
    if s["num_layers"] < 1 or s["num_single_layers"] < 1 or s["text_len"] < 4:
        raise ValueError(f"need num_layers, num_single_layers >= 1 and text_len >= 4, got {s}")
    return s


@contextlib.contextmanager
def _seeded(seed: int, component: int) -> Iterator[None]:
    # fork_rng leaves the caller's global RNG stream untouched; a seed per component keeps, say, the VAE's
    # weights unchanged when only the transformer's sizes change.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 101 + component)
        yield


def _clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer in which every built-in word is one token (other words fall to letters)."""
    vocab, merges = _clip_bpe()
    # pad == eos == "<|endoftext|>", as in the released CLIP tokenizers.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


@functools.cache
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Learn BPE merges on the built-in words until each is a single symbol.

    Hand-written left-to-right merges conflict ("c a" vs "a t</w>" splits "cat"); merges learned this way replay
    exactly on their training words. The trainer of `tokenizers` is not used because its vocabulary ids vary from
    run to run; ties here break by the pair itself, so the result is fixed.
    """
    # CLIP marks the last symbol of a word with "</w>".
    merges = learn_merges([[*word[:-1], word[-1] + "</w>"] for word in _WORDS])
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [t for ch in _CHARS for t in (ch, ch + "</w>")] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def learn_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """BPE merges, most frequent adjacent pair first (ties broken by the pair itself, so the result is fixed), until
    every word of `words` (each a list of symbols) is a single symbol."""
    merges: list[tuple[str, str]] = []
    while True:
        counts = collections.Counter(pair for symbols in words for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge_pair(symbols, best) for symbols in words]


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _t5_tokenizer(max_length: int) -> T5Tokenizer:
    """A Unigram T5 tokenizer: whole built-in words score higher than spelling them out letter by letter."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in _WORDS]
    pieces += [(ch, -6.0) for ch in _CHARS]
    # extra_ids=0: the 100 sentinel tokens only matter for span-corruption pre-training.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(umt5: bool, d_model: int, seed: int, component: int) -> T5EncoderModel | UMT5EncoderModel:
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=_VOCAB_SIZE,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / UMT5, as the real PixArt, SD3, Flux and Wan encoders
        dropout_rate=0.0,  # so that a train-mode forward is deterministic too
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed, component):
        return model_cls(config).eval()


def _clip_encoder(with_projection: bool, seed: int, component: int, max_length: int):
    config = CLIPTextConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=_TEXT_HIDDEN,
        # The pooled output is taken at the first eos; eos_token_id == 2 would select the legacy argmax path.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with _seeded(seed, component):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae(latent_channels: int, image_size: int, seed: int, component: int, **extra: Any) -> AutoencoderKL:
    with _seeded(seed, component):
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
            block_out_channels=_VAE_CHANNELS,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=image_size,
            **extra,
        ).eval()


def _build_pixart(s: dict[str, int], seed: int) -> PixArtAlphaPipeline:
    heads, head_dim = s["num_heads"], s["attention_head_dim"]
    with _seeded(seed, 0):
        transformer = PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=4,
            out_channels=8,  # learned sigma, as PixArt-alpha
            num_layers=s["num_layers"],
            cross_attention_dim=heads * head_dim,
            caption_channels=_TEXT_HIDDEN,
            sample_size=s["image_size"] // 2,
            patch_size=2,
        ).eval()
    return PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(s["text_len"]),
        text_encoder=_t5_encoder(False, _TEXT_HIDDEN, seed, 1),
        vae=_vae(4, s["image_size"], seed, 2),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


# The released SD3 and Flux VAEs: no quant convs, and latents shifted and scaled before the transformer.
_SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
_FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def _build_sd3(s: dict[str, int], seed: int) -> StableDiffusion3Pipeline:
    heads, head_dim, latent = s["num_heads"], s["attention_head_dim"], s["image_size"] // 2
    # SD3 zero-pads the concatenated CLIP embeddings (2 x 32) to the T5 width, so T5 gets 64 to avoid cropping.
    t5_dim = 2 * _TEXT_HIDDEN
    with _seeded(seed, 0):
        transformer = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=s["num_layers"],
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_dim,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * _TEXT_HIDDEN,  # both CLIP projections, concatenated
            pos_embed_max_size=latent,  # twice the token grid, leaving room for larger calls
        ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, s["image_size"], seed, 1, **_SD3_VAE),
        text_encoder=_clip_encoder(True, seed, 2, s["text_len"]),
        tokenizer=_clip_tokenizer(s["text_len"]),
        text_encoder_2=_clip_encoder(True, seed, 3, s["text_len"]),
        tokenizer_2=_clip_tokenizer(s["text_len"]),
        text_encoder_3=_t5_encoder(False, t5_dim, seed, 4),
        tokenizer_3=_t5_tokenizer(s["text_len"]),
    )


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split an even head dim into Flux's (text/time, height, width) rotary axes, each even."""
    first = 2 * max(1, head_dim // 8)
    height = 2 * ((head_dim - first) // 4)
    return first, height, head_dim - first - height


def _build_flux(s: dict[str, int], seed: int) -> FluxPipeline:
    heads, head_dim = s["num_heads"], s["attention_head_dim"]
    with _seeded(seed, 0):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=s["num_layers"],
            num_single_layers=s["num_single_layers"],
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_TEXT_HIDDEN,
            pooled_projection_dim=_TEXT_HIDDEN,
            guidance_embeds=False,
            axes_dims_rope=_rope_axes(head_dim),
        ).eval()
    # FLUX.1-dev's scheduler: the shift grows with the image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(16, s["image_size"], seed, 1, **_FLUX_VAE),
        text_encoder=_clip_encoder(False, seed, 2, s["text_len"]),
        tokenizer=_clip_tokenizer(s["text_len"]),
        text_encoder_2=_t5_encoder(False, _TEXT_HIDDEN, seed, 3),
        tokenizer_2=_t5_tokenizer(s["text_len"]),
        transformer=transformer,
    )


def _build_wan(s: dict[str, int], seed: int) -> WanPipeline:
    heads, head_dim = s["num_heads"], s["attention_head_dim"]
    with _seeded(seed, 0):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=_TEXT_HIDDEN,
            freq_dim=64,
            ffn_dim=2 * heads * head_dim,
            num_layers=s["num_layers"],
        ).eval()
    with _seeded(seed, 1):
        # Four levels as the real Wan VAE (8x spatial, 4x temporal compression), but 8 base channels, not 96.
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    # The scheduler of the released Wan2.1 diffusers checkpoints.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=_t5_tokenizer(s["text_len"]),
        text_encoder=_t5_encoder(True, _TEXT_HIDDEN, seed, 2),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )


def _build_dit(s: dict[str, int], seed: int) -> DiTPipeline:
    with _seeded(seed, 0):
        transformer = DiTTransformer2DModel(
            num_attention_heads=s["num_heads"],
            attention_head_dim=s["attention_head_dim"],
            in_channels=4,
            out_channels=8,  # learned sigma, as the released DiT-XL/2
            num_layers=s["num_layers"],
            sample_size=s["image_size"] // 2,
            patch_size=2,
            # DiTPipeline hard-codes class id 1000 as the CFG null class, so the table needs 1000 (+1) rows.
            num_embeds_ada_norm=1000,
        ).eval()
    pipe = DiTPipeline(
        transformer=transformer, vae=_vae(4, s["image_size"], seed, 1), scheduler=DDIMScheduler(), id2label=_DIT_LABELS
    )
    # DiTPipeline does not record id2label itself; in the config it reaches model_index.json and comes back on load.
    pipe.register_to_config(id2label=_DIT_LABELS)
    return pipe


_BUILDERS = {"pixart": _build_pixart, "sd3": _build_sd3, "flux": _build_flux, "wan": _build_wan, "dit": _build_dit}


def register_kinds(
    kinds: dict[str, str], builders: dict, pixels_per_token: dict[str, int], call_defaults: dict[str, dict], call_kwargs
) -> None:
    """Add kinds built elsewhere (a module of FAMILY_MODULES calls this when imported): their descriptions,
    builders ((sizes, seed) -> pipeline), pixels per token side, folder call defaults and call arguments
    ((kind, resolved sizes, given sizes) -> kwargs)."""
    TINY_KINDS.update(kinds)
    _BUILDERS.update(builders)
    _PIXELS_PER_TOKEN.update(pixels_per_token)
    _CALL_DEFAULTS.update(call_defaults)
    _VIDEO_CALLS.update(dict.fromkeys(kinds, call_kwargs))


# folder call defaults: the wan folder samples 5 frames at 64 px, not the pipeline's 81 frames at 480x832
_CALL_DEFAULTS: dict[str, dict[str, int]] = {"wan": {"height": 64, "width": 64, "num_frames": 5}}
_VIDEO_CALLS: dict[str, Any] = {}
# the modules of more kinds (each imports this one for its parts and calls register_kinds): named, not imported
# statically, so that this module does not import them back
FAMILY_MODULES = ("opendit.testing.tiny_video_families",)
for _module in FAMILY_MODULES:
    importlib.import_module(_module)
