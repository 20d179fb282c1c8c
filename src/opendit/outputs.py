"""Model-space samples -> uint8 images (VAE for latent models), and the files `opendit sample` writes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from opendit.errors import OpenDiTError

if TYPE_CHECKING:
    from opendit.models.dit import DiTConfig

VAE_SCALE = 0.18215  # stabilityai/sd-vae-ft-* latent scaling used by DiT
GIF_FRAME_MS = 62  # videos (frames of a diffusers video pipeline) play at 16 frames per second, Wan's rate
VAE_MISSING = "this is a latent model: pass --vae DIR (a local diffusers AutoencoderKL, e.g. sd-vae-ft-ema)"


@dataclass
class GenerationResult:
    images: np.ndarray  # (B, H, W, C) uint8
    labels: list[int] | list[str]  # class ids (DiT) or prompts (a diffusers pipeline)
    record: dict = field(default_factory=dict)
    frames: np.ndarray | None = None  # (B, F, H, W, C) uint8 of a video pipeline (images: frame 0 of each)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in self.images]


def load_vae(vae_path: str, device: torch.device):
    """A local diffusers AutoencoderKL in eval mode (loaded once per engine, on the rank that decodes)."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    except Exception as exc:
        raise OpenDiTError(f"cannot load the VAE from {vae_path}: {exc}; pass a local AutoencoderKL folder") from exc


# Live (B, C, H, W) fp32 maps of the VAE decoder at its widest level (resnet input, norm, activation, conv output,
# residual, upsample output): measured peak of a decode / (images x C x H x W x 4 bytes) on CPU, benchmarks/memory.py
DECODE_LIVE_MAPS = 6


def vae_memory_bytes(vae_path: str | Path | None, image_size: tuple[int, int], images: int) -> float:
    """Predicted peak bytes the VAE adds on the decoding rank: max(loading: about 2x its weights, since diffusers
    without `accelerate` initialises it and then loads the file; decoding: its weights + the decoder's widest
    feature maps for `images` images). From the folder's config.json, building the model on meta (nothing read);
    0 when there is no VAE or its config cannot be read (then the VAE is checked when it loads)."""
    import json

    if vae_path is None:
        return 0.0
    try:
        from diffusers import AutoencoderKL

        config = json.loads((Path(vae_path) / "config.json").read_text())
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(config)
    except Exception:  # noqa: BLE001 - a bad VAE folder is reported by load_vae, with its own message
        return 0.0
    weights = sum(p.numel() for p in vae.parameters()) * 4
    channels = list(config.get("block_out_channels", [128]))
    h, w = image_size
    levels = len(channels)  # level k (0 = full resolution) has channels[k] at (H / 2^k) x (W / 2^k)
    widest = max(channels[k] * (h >> k) * (w >> k) for k in range(levels))
    decode = weights + images * widest * 4 * DECODE_LIVE_MAPS
    return float(max(2 * weights, decode))


def decode(samples: torch.Tensor, config: DiTConfig, vae, device: torch.device) -> np.ndarray:
    """Model-space samples (B, C, h, w) -> uint8 images (B, H, W, C). `vae`: a loaded AutoencoderKL or a local
    folder to load one from (latent models only; pixel models ignore it)."""
    if config.latent:
        if vae is None:
            raise OpenDiTError(VAE_MISSING)
        if isinstance(vae, (str, Path)):
            vae = load_vae(str(vae), device)
        with torch.no_grad():
            samples = vae.decode(samples.to(device) / VAE_SCALE).sample  # (B, 3, H, W) in [-1, 1]
    pixels = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def save_outputs(result: GenerationResult, out_dir: str | Path, label_names: list[str] | None = None) -> Path:
    """Write DIR/samples.png (a labelled grid), DIR/NNN_class-K.png (NNN_prompt-WORDS.png for a prompt) per image,
    DIR/NNN_....gif per video (all its frames) and DIR/record.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = result.pil_images()
    for index, (img, label) in enumerate(zip(images, result.labels)):
        img.save(out / f"{file_stem(index, label)}.png")
    for index, (video, label) in enumerate(zip(result.frames if result.frames is not None else [], result.labels)):
        frames = [Image.fromarray(frame) for frame in video]
        gif = out / f"{file_stem(index, label)}.gif"
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    labelled_grid(images, result.labels, label_names).save(out / "samples.png")
    (out / "record.json").write_text(json.dumps(result.record, indent=2, default=str))
    return out / "samples.png"


def file_stem(index: int, label: int | str) -> str:
    """NNN_class-K for a class id, NNN_prompt-SOME-WORDS (up to 40 characters of [a-z0-9-]) for a prompt."""
    if isinstance(label, str):
        words = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40].strip("-")
        return f"{index:03d}_prompt-{words}" if words else f"{index:03d}_prompt"
    return f"{index:03d}_class-{label}"


def prepare_output_dir(
    path: str | Path, flag: str = "--out", fix: str = "a folder you can write, e.g. --out ./outputs"
) -> Path:
    """Create the folder `path` (and its parents), or refuse it with one line naming why and the fix: a file in the
    way, no permission, a read-only place. Called before any model is loaded, so a run never computes for minutes and
    then fails to save. Writing is proven by creating (and at once removing) an unnamed file, not inferred from the
    permission bits: root ignores them, and ACLs or a read-only mount do not show in them."""
    folder = Path(path)
    try:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            where = f"{flag} {path}" if blocker == folder else f"{flag} {path}: {blocker}"
            raise OpenDiTError(f"{where} is a file, not a folder; remove the file or pass another {flag}")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".opendit-write-check-"):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__  # e.g. "Permission denied", "Read-only file system"
        raise OpenDiTError(f"cannot write to {flag} {path} ({why}); pass {fix}") from None
    return folder


def prepare_trace_file(path: str | Path) -> Path:
    """The trace file `path`, its folder created (or refused, as prepare_output_dir) before anything runs."""
    trace = Path(path)
    try:
        if trace.is_dir():
            raise OpenDiTError(f"--trace {path} is a folder; pass a file name, e.g. --trace {trace / 'trace.json'}")
        exists_read_only = trace.exists() and not os.access(trace, os.W_OK)
    except OSError as exc:
        raise OpenDiTError(f"cannot write the trace {path} ({exc.strerror}); pass e.g. --trace trace.json") from None
    if exists_read_only:
        raise OpenDiTError(f"cannot write the trace {path} (the file is read-only); pass another --trace file")
    prepare_output_dir(
        trace.parent, "--trace folder", "a trace file in a folder you can write, e.g. --trace trace.json"
    )
    return trace


def labelled_grid(images: list[Image.Image], labels: list, names: list[str] | None = None) -> Image.Image:
    """Images (upscaled to at least 96 px, nearest) in a grid of up to 10 columns, each with its class (or the start
    of its prompt) printed above."""
    scale = max(1, -(-96 // max(images[0].size)))
    tile_w, tile_h = images[0].size[0] * scale, images[0].size[1] * scale
    caption, pad = 14, 4
    cols = min(10, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, (img, label) in enumerate(zip(images, labels)):
        x = pad + (index % cols) * (tile_w + pad)
        y = pad + (index // cols) * (tile_h + caption + pad)
        if isinstance(label, str):  # a prompt: as much as fits (~6 px a character), ASCII (any font draws it)
            fits = max(4, tile_w // 6)
            text = label.encode("ascii", "replace").decode()
            caption_text = text if len(text) <= fits else text[: fits - 3] + "..."
        else:
            caption_text = names[label] if names else f"class {label}"
        draw.text((x, y), caption_text, fill="black")
        grid.paste(img.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y + caption))
    return grid
