"""The files `opendit sample --video` writes: lossless PNG frames, a GIF per video, a labelled grid, the record."""

import json
import re

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from opendit.errors import OpenDiTError
from opendit.io.outputs import read_video_frames, save_video_outputs


def videos(n=2, frames=8, height=12, width=10, channels=3, seed=0):
    # random pixels: every frame differs from the last, so the GIF writer merges none of them
    return np.random.default_rng(seed).integers(0, 256, (n, frames, height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_frames_round_trip_exactly(tmp_path, channels):
    clips = videos(channels=channels)
    written = save_video_outputs(clips, [3, 7], tmp_path)
    assert [p.name for p in written["gifs"]] == ["000_class-3.gif", "001_class-7.gif"]
    assert [p.name for p in written["frames"][0]] == [f"frame-{f:02d}.png" for f in range(8)]
    for index, clip in enumerate(clips):
        np.testing.assert_array_equal(read_video_frames(written["frames"][index][0].parent), clip)
        np.testing.assert_array_equal(read_video_frames(written["gifs"][index]), clip)  # the folder beside it
    if channels == 1:
        assert Image.open(written["frames"][0][0]).mode == "L"  # grey stays grey, not RGB
    assert not (tmp_path / "record.json").exists()


def test_gif_has_every_frame_and_grey_values(tmp_path):
    clips = videos(n=1, frames=5, channels=1)
    gif = save_video_outputs(clips, [0], tmp_path, fps=4.0)["gifs"][0]
    read = iio.imread(gif, index=None, plugin="pillow")
    assert read.shape[0] == 5
    first = read[0] if read.ndim == 3 else read[0, ..., :3].mean(axis=-1).round().astype(np.uint8)
    np.testing.assert_array_equal(first, clips[0, 0, ..., 0])  # a grey GIF's palette holds all 256 levels
    meta = iio.immeta(gif, index=0, plugin="pillow")
    assert meta["duration"] == 250 and meta["loop"] == 0


def test_rgb_gif_frame_count(tmp_path):
    gif = save_video_outputs(videos(n=1, frames=6), [1], tmp_path)["gifs"][0]
    read = iio.imread(gif, index=None, plugin="pillow")
    assert read.shape[:3] == (6, 12, 10)


def test_grid_grows_with_videos_and_frames(tmp_path):
    def size(n, frames):
        out = tmp_path / f"{n}x{frames}"
        return Image.open(save_video_outputs(videos(n=n, frames=frames), list(range(n)), out)["grid"]).size

    base_w, base_h = size(1, 2)
    assert base_h >= 64  # 12 px frames are upscaled to be visible
    assert size(3, 2)[1] > base_h and size(3, 2)[0] == base_w
    assert size(1, 5)[0] > base_w and size(1, 5)[1] == base_h
    grid = Image.open(tmp_path / "1x2" / "samples.png")
    assert grid.mode == "RGB" and grid.getpixel((0, 0)) == (255, 255, 255)


def test_names_are_safe_and_record_written(tmp_path):
    names = [f"name {k}" for k in range(13)] + ["3 / Left: turn", "***"]
    record = {"model": "DiT-T/2", "steps": 4, "path": tmp_path}
    written = save_video_outputs(videos(frames=2), [13, 14], tmp_path, label_names=names, record=record)
    stems = [p.stem for p in written["gifs"]]
    assert stems == ["000_class-13-3-left-turn", "001_class-14"]
    for path in [*written["gifs"], *(p for frames in written["frames"] for p in frames)]:
        assert re.fullmatch(r"[a-z0-9_\-.]+", path.name)
        assert len(path.relative_to(tmp_path).parts) <= 2  # the slash made no folder of its own
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == stems
    assert json.loads((tmp_path / "record.json").read_text())["path"] == str(tmp_path)


@pytest.mark.parametrize(
    "clips, labels",
    [
        (videos()[0], [0]),  # one video, no N axis
        (videos().astype(np.float32), [0, 1]),
        (videos(channels=4), [0, 1]),
        (videos(frames=0), [0, 1]),
        (videos(), [0]),
        ([[0]], [0]),
    ],
)
def test_bad_input_raises(tmp_path, clips, labels):
    with pytest.raises(OpenDiTError, match=r"\(N, F, H, W, C\)|one label per video"):
        save_video_outputs(clips, labels, tmp_path)


def test_bad_label_name_fps_and_folder_raise(tmp_path):
    with pytest.raises(OpenDiTError, match="label_names"):
        save_video_outputs(videos(), [0, 5], tmp_path, label_names=["a", "b"])
    with pytest.raises(OpenDiTError, match="fps"):
        save_video_outputs(videos(), [0, 1], tmp_path, fps=0)
    with pytest.raises(OpenDiTError, match="frame-"):
        read_video_frames(tmp_path)
