"""The files `opendit sample --video` writes: a GIF to watch, lossless PNG frames to compare, a labelled grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw

from opendit.errors import OpenDiTError
from opendit.outputs import file_stem, prepare_output_dir

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
