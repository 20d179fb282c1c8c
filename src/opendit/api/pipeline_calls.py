"""Call-level facts of a diffusers pipeline folder, read from its JSON files and its pipeline class (no weights):
- the multiple an image side must be: the VAE's downsampling times the latent packing the pipeline's image
  processor is built with (`VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)`: Flux, FLUX.2,
  Qwen-Image, Z-Image), refused before any process starts instead of resized or raised on the ranks;
- whether the pipeline runs classifier-free guidance at all (a pipeline that takes no negative prompt is
  guidance-distilled: FLUX.2, FLUX.1: no guidance branch, so no batch for --cfg-parallel to split);
- a cache's layout on the meta-device transformer (its block chain; for fbcache a span of like blocks).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from opendit.errors import OpenDiTError


def pipeline_source(pipeline: str, method: str) -> str | None:
    """The source of a method (`__init__`, `__call__`) of the diffusers pipeline class named `pipeline`; None where
    inspect cannot read it (a method without Python source, or no such class for a method even None has)."""
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    try:
        return inspect.getsource(getattr(cls, method))
    except (TypeError, OSError):
        return None


def image_size_multiple(folder: str | Path, pipeline: str) -> int | None:
    """What height and width must be a multiple of for this folder's pipeline; None where it is not read here."""
    source = pipeline_source(pipeline, "__init__")
    if source is None:
        return None
    packed = re.search(r"vae_scale_factor=self\.vae_scale_factor \* (\d+)", source)
    config_file = Path(folder) / "vae" / "config.json"
    if packed is None or not config_file.is_file():
        return None
    try:
        vae = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if "temperal_downsample" in vae:  # Qwen-Image's and Wan's VAEs: 2 ** len(temperal_downsample)
        scale = 2 ** len(vae["temperal_downsample"])
    elif "block_out_channels" in vae:
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        return None
    return scale * int(packed.group(1))


def check_image_size(info: dict, kwargs: dict) -> None:
    multiple = info.get("size_multiple")
    if not multiple:
        return
    for side in ("height", "width"):
        value = kwargs.get(side)
        if isinstance(value, int) and (value < multiple or value % multiple):
            fit = max(multiple, value // multiple * multiple)
            raise OpenDiTError(
                f"--image-size {value}: {info['pipeline_class']} needs sides that are multiples of {multiple} (its "
                f"VAE's downsampling times its latent packing); use --image-size {fit}"
            )


# where a pipeline's unconditional branch comes from: a negative prompt (text-to-image / video) or the null class
# (class-conditional: DiTPipeline's class_labels); a pipeline that takes neither is guidance-distilled
GUIDANCE_BRANCH_PARAMETERS = ("negative_prompt", "class_labels")


def check_guidance_batch(plan, info: dict) -> None:
    """--cfg-parallel on a pipeline with no guidance branch (neither a negative prompt nor class labels)."""
    if plan.cfg > 1 and not any(name in info["call"] for name in GUIDANCE_BRANCH_PARAMETERS):
        raise OpenDiTError(
            f"--cfg-parallel splits the [unconditional; conditional] batch of classifier-free guidance, but "
            f"{info['pipeline_class']} takes no negative prompt: it is guidance-distilled (guidance is an input of "
            "the transformer), so there is no second branch to split; use --ulysses/--ring or --dp instead"
        )


def check_cache_layout(module, cache) -> None:
    """The cache's layout on the (meta) transformer, found before any process starts: its block chain and attention
    modules, and for fbcache a span of blocks like the first one (cache/layout.py, cache/block_cache.py)."""
    if cache is None:
        return
    from opendit.cache.block_cache import span_end
    from opendit.cache.layout import cache_layout

    layout = cache_layout(module)
    if cache.kind == "fbcache":
        span_end(layout)
