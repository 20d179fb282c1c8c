"""`--video`: resolving a video model (the bundled moving-digits model, our checkpoints, official Latte files),
turning classes and motions into labels, and decoding sampled videos into frames.

The video DiT (models/video_dit.py) runs through the same engine, sampler and parallel plans as the image DiT; what
differs is resolved here: the sample shape is (C, F, H, W), labels of a motion model are digit + 10 * direction, and
the output is frames (VAE-decoded frame by frame for latent models).
"""

from __future__ import annotations

import numpy as np
import torch

from opendit.digits import WEIGHTS_DIR  # noqa: E402
from opendit.errors import OpenDiTError
from opendit.models.video_dit import VideoDiTConfig
from opendit.models.video_dit import preset as video_preset

DEFAULT_VIDEO_CKPT = WEIGHTS_DIR / "digits_video.safetensors"
DIRECTIONS = ("right", "left", "down", "up")  # moving digits: label = digit + 10 * index (train/video_data.py)


def resolve_video_model(request) -> tuple[VideoDiTConfig, str | None, dict, str | None]:
    """(config, checkpoint, sampling defaults, note) of a --video request (a generation.GenerationRequest-like with
    model, ckpt, image_size): the bundled digits video model by default, a checkpoint with its own config (our
    .json / a training checkpoint), or an official Latte file with --model Latte-*/p (its sizes read from its tensor
    shapes: frames from temp_embed, the latent grid from pos_embed, classes from the label table)."""
    from opendit.io.checkpoint import check_fits, infer_config, inspect_checkpoint

    defaults = {"steps": 50, "scheduler": None, "cfg_scale": 4.0}
    ckpt, note = request.ckpt, None
    if request.model is None and ckpt is None:
        if not DEFAULT_VIDEO_CKPT.is_file():
            raise OpenDiTError(
                f"the bundled digits video model {DEFAULT_VIDEO_CKPT} is not installed; train one with "
                "`opendit train --video --export src/opendit/digits/digits/weights/digits_video` or pass --model/--ckpt"
            )
        ckpt = str(DEFAULT_VIDEO_CKPT)
    if request.model is not None and not request.model.startswith("Latte-"):
        raise OpenDiTError(f"--video needs a video model (a Latte-* preset); {request.model} is an image model")
    info = inspect_checkpoint(ckpt) if ckpt else None
    config = info.config if info is not None else None
    if config is not None:
        if not isinstance(config, VideoDiTConfig):
            raise OpenDiTError(f"--video needs a video model, but {ckpt} is an image DiT; drop --video for it")
        defaults.update({k: info.meta[k] for k in ("steps", "scheduler", "cfg_scale") if k in info.meta})
    elif info is not None:
        if request.model is None:
            raise OpenDiTError(
                f"checkpoint {ckpt} has no model config (a bare Latte state dict?); pass --model, e.g. Latte-XL/2"
            )
        found = infer_config(info.shapes)
        if found["frames"] is None:
            raise OpenDiTError(f"checkpoint {ckpt} has no temp_embed: it is an image DiT, not a video model")
        side = round(found["num_tokens"] ** 0.5)
        config = _latte_config(request.model, found, side)
    else:
        config = video_preset(request.model)
        note = f"no --ckpt: a randomly initialised {request.model} (videos are noise)"
    if request.image_size is not None:
        config = config.with_image_size(request.image_size)
    if info is not None:
        check_fits(info, config)
    if defaults["scheduler"] is None:
        defaults["scheduler"] = "flow-euler" if config.prediction == "flow" else "ddpm"
    return config, str(info.path) if info is not None else None, defaults, note


def _latte_config(model: str, found: dict, side: int) -> VideoDiTConfig:
    from dataclasses import replace

    base = video_preset(model)
    if side * side != found["num_tokens"]:
        raise OpenDiTError(f"the checkpoint's pos_embed has {found['num_tokens']} positions, not a square grid")
    rows = found["classes_rows"]
    return replace(
        base,
        frames=found["frames"],
        input_size=(side * base.patch_size, side * base.patch_size),
        in_channels=found["in_channels"],
        learn_sigma=found["learn_sigma"],
        num_classes=rows - 1 if base.class_dropout_prob > 0 else rows,  # the last row is the null class
    )


def motion_labels(classes: list[int], motion: list[str] | None, config) -> list[int]:
    """Labels of a request: with --motion (one per class, or one for all) digit + 10 * direction, for models trained
    with motion only; without it the class ids as given."""
    if motion is None:
        return list(classes)
    if not getattr(config, "motion", False):
        raise OpenDiTError(
            "--motion applies to the digits video model (trained with motion); this model takes --classes only"
        )
    unknown = [m for m in motion if m not in DIRECTIONS]
    if unknown:
        raise OpenDiTError(f"unknown motion {unknown[0]!r}; choose from {', '.join(DIRECTIONS)}")
    if len(motion) not in (1, len(classes)):
        raise OpenDiTError(
            f"--motion takes one direction for all classes or one per class ({len(classes)}), got {len(motion)}"
        )
    motions = motion * len(classes) if len(motion) == 1 else motion
    bad = [c for c in classes if not 0 <= c < 10]
    if bad:
        raise OpenDiTError(f"with --motion, --classes are digits 0..9; got {bad[0]}")
    return [c + 10 * DIRECTIONS.index(m) for c, m in zip(classes, motions)]


def label_names(config) -> list[str] | None:
    """Readable names of a motion model's labels ("3 left"), None otherwise."""
    if not getattr(config, "motion", False):
        return None
    return [f"{label % 10} {DIRECTIONS[label // 10]}" for label in range(config.num_classes)]


def decode_video(samples: torch.Tensor, config: VideoDiTConfig, vae, device: torch.device) -> np.ndarray:
    """Model-space videos (B, C, F, h, w) -> uint8 frames (B, F, H, W, C), latent models decoded frame by frame."""
    from opendit.io.outputs import decode

    b, _, f = samples.shape[:3]
    frames = samples.transpose(1, 2).flatten(0, 1)  # (B*F, C, h, w)
    pixels = decode(frames, config, vae, device)  # (B*F, H, W, C) uint8
    return pixels.reshape(b, f, *pixels.shape[1:])
