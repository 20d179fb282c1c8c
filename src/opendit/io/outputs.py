"""Model-space samples -> uint8 images (VAE for latent models), and the files `opendit sample` writes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw

from opendit.errors import OpenDiTError

# The files `opendit sample --video` writes: a GIF to watch, lossless PNG frames to compare, a labelled grid.
GRID_MIN_HEIGHT = 64  # frames are often 8-32 px: upscaled (nearest) so a row is visible without zooming
CAPTION, PAD = 14, 4  # as outputs.labelled_grid: one line of PIL's default font above each row
VIDEO_SHAPE = "uint8 (N, F, H, W, C) with C = 1 (grey) or 3 (RGB)"


def save_video_outputs(
    videos: np.ndarray,
    labels: list[int],
    out_dir: str | Path,
    label_names: list[str] | None = None,
    record: dict | None = None,
    fps: float = 8.0,
) -> dict:
    """Write into out_dir, per video NNN_<stem>.gif (looping, 1/fps s a frame) and NNN_<stem>/frame-XX.png (the
    exact uint8 frames: a GIF quantises colour to a palette and merges repeated frames, so comparisons read the
    PNGs), then samples.png (one labelled row of frames per video) and record.json if `record` is given.
    Returns {"gifs": [path per video], "frames": [[frame paths] per video], "grid": path}."""
    _check_videos(videos, labels)
    if not fps > 0:
        raise OpenDiTError(f"fps must be > 0, got {fps}; pass e.g. fps=8")
    captions = [_caption(label, label_names) for label in labels]
    out = prepare_output_dir(out_dir)
    frame_ms = max(10, round(1000 / fps))  # GIF stores delays in 10 ms units; 0 would mean "as fast as possible"
    digits = max(2, len(str(videos.shape[1] - 1)))
    gifs, frames = [], []
    for index, (video, label) in enumerate(zip(videos, labels)):
        stem = _stem(index, label, label_names)
        gif = out / f"{stem}.gif"
        grey = video.shape[-1] == 1
        # is_batch/mode given explicitly: imageio guesses the axes otherwise, and an (F, H, W) grey stack whose W
        # is 3 would be taken for one RGB image
        iio.imwrite(
            gif,
            video[..., 0] if grey else video,
            plugin="pillow",
            mode="L" if grey else "RGB",
            is_batch=True,
            duration=frame_ms,
            loop=0,
        )
        folder = out / stem
        folder.mkdir(exist_ok=True)
        paths = []
        for f, frame in enumerate(video):
            path = folder / f"frame-{f:0{digits}d}.png"
            _pil(frame).save(path)
            paths.append(path)
        gifs.append(gif)
        frames.append(paths)
    grid = out / "samples.png"
    video_grid(videos, captions).save(grid)
    if record is not None:
        (out / "record.json").write_text(json.dumps(record, indent=2, default=str))
    return {"gifs": gifs, "frames": frames, "grid": grid}


def read_video_frames(folder_or_gif: str | Path) -> np.ndarray:
    """The lossless frames (F, H, W, C) uint8 of one video written by save_video_outputs, from its frame folder
    (NNN_<stem>/) or its GIF (the folder of the same name beside it is read, not the palette-quantised GIF)."""
    path = Path(folder_or_gif)
    folder = path.with_suffix("") if path.suffix.lower() == ".gif" else path
    files = sorted(folder.glob("frame-*.png"), key=_frame_index) if folder.is_dir() else []
    if not files:
        raise OpenDiTError(
            f"no frame-*.png in {folder}; pass the NNN_<stem> folder (or .gif) that save_video_outputs wrote"
        )
    frames = []
    for file in files:
        with Image.open(file) as img:
            if img.mode not in ("L", "RGB"):  # only frames not written here: read them as RGB
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8)
        frames.append(array[..., None] if array.ndim == 2 else array)
    if len({frame.shape for frame in frames}) != 1:
        shapes = sorted({frame.shape for frame in frames})
        raise OpenDiTError(f"frames in {folder} differ in shape {shapes}; write the video again with one frame size")
    return np.stack(frames)


def video_grid(videos: np.ndarray, captions: list[str]) -> Image.Image:
    """One row of frames per video (upscaled nearest to >= 64 px tall), its caption printed above, on white."""
    _, count, height, width, _ = videos.shape
    scale = max(1, -(-GRID_MIN_HEIGHT // height))
    tile_w, tile_h = width * scale, height * scale
    row_h = CAPTION + tile_h + PAD
    grid = Image.new("RGB", (PAD + count * (tile_w + PAD), PAD + len(videos) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for row, (video, caption) in enumerate(zip(videos, captions)):
        y = PAD + row * row_h
        draw.text((PAD, y), caption, fill="black")
        for f, frame in enumerate(video):
            tile = _pil(frame).convert("RGB").resize((tile_w, tile_h), Image.NEAREST)
            grid.paste(tile, (PAD + f * (tile_w + PAD), y + CAPTION))
    return grid


def _check_videos(videos, labels) -> None:
    got = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, np.ndarray) else type(videos).__name__
    if not isinstance(videos, np.ndarray) or videos.dtype != np.uint8 or videos.ndim != 5:
        raise OpenDiTError(f"videos must be a numpy array {VIDEO_SHAPE}, got {got}; stack the frames of each video")
    if videos.shape[-1] not in (1, 3) or 0 in videos.shape:
        raise OpenDiTError(f"videos must be {VIDEO_SHAPE} with no empty axis, got {got}; drop alpha or fix the axes")
    if len(labels) != len(videos):
        raise OpenDiTError(f"got {len(videos)} videos but {len(labels)} labels; pass one label per video (N)")


def _caption(label, names: list[str] | None) -> str:
    if isinstance(label, str):  # a prompt: ASCII, since any font draws it
        return label.encode("ascii", "replace").decode()[:60]
    label = int(label)
    if names is None:
        return f"class {label}"
    if not 0 <= label < len(names):
        raise OpenDiTError(f"label {label} has no name in label_names ({len(names)} names); pass one per class")
    return names[label].encode("ascii", "replace").decode()


def _stem(index: int, label, names: list[str] | None) -> str:
    """outputs.file_stem, plus the class name in [a-z0-9-] when there are names (`000_class-13-3-left`)."""
    if isinstance(label, str) or names is None:
        return file_stem(index, label if isinstance(label, str) else int(label))
    words = re.sub(r"[^a-z0-9]+", "-", names[int(label)].lower()).strip("-")[:40].strip("-")
    stem = file_stem(index, int(label))
    return f"{stem}-{words}" if words else stem


def _pil(frame: np.ndarray) -> Image.Image:
    return Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)


def _frame_index(path: Path) -> int:
    # numeric, not lexical: a folder written with other digit counts still reads in playing order
    digits = path.stem.removeprefix("frame-")
    return int(digits) if digits.isdigit() else -1


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


def vae_memory_bytes(vae_path: str | Path | None, image_size: tuple[int, int], images: int, bands: int = 1) -> float:
    """Predicted peak bytes the VAE adds on a decoding rank: max(loading: about 2x its weights, since diffusers
    without `accelerate` initialises it and then loads the file; decoding: its weights + the decoder's widest
    feature maps for `images` images, a 1/`bands` row band of them when the decode is split over `bands` ranks).
    From the folder's config.json, building the model on meta (nothing read); 0 when there is no VAE or its config
    cannot be read (then the VAE is checked when it loads)."""
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
    rows = -(-h // bands)  # the tallest band (split_sizes: the first ranks take the remainder)
    widest = max(channels[k] * (rows >> k) * (w >> k) for k in range(levels))
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
