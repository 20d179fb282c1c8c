"""`opendit sample --video` end to end: the saved frames of DSP (worlds 2 and 3), Ulysses and cfg x DSP runs equal
the one-process run of the same checkpoint (<= 1/255), and the record says which plan ran."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from opendit.api.video import DEFAULT_VIDEO_CKPT
from opendit.cli import main

pytestmark = pytest.mark.slow
CLASSES, MOTIONS = ["3", "7"], ["right", "up"]
STEMS = ["000_class-3-3-right", "001_class-37-7-up"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The bundled digits video model if it is installed, else a random non-zero one of the same kind (5 frames:
    uneven over 2 and 3 ranks)."""
    from opendit.io.checkpoint import save_safetensors
    from opendit.models.dit import perturb_weights
    from opendit.models.video_dit import build_video_dit, pixel_video_config

    if DEFAULT_VIDEO_CKPT.is_file():
        return []
    config = replace(pixel_video_config("Latte-T/4", 16, 5), motion=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "video.safetensors"
    save_safetensors(perturb_weights(build_video_dit(config), 0.05), path, {"steps": 3, "cfg_scale": 3.0})
    return ["--ckpt", str(path)]


def run_cli(out, extra, ckpt):
    from opendit.io.outputs import read_video_frames

    args = ["sample", "--video", "--classes", *CLASSES, "--motion", *MOTIONS, "--steps", "3", "--seed", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args + ckpt + extra) == 0
    frames = np.stack([read_video_frames(out / stem) for stem in STEMS]).astype(int)
    return frames, json.loads((out / "record.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, ckpt):
    return run_cli(tmp_path_factory.mktemp("single"), [], ckpt)


PLANS = {
    "dsp2": ["--nproc", "2", "--sp-impl", "dsp"],
    "dsp3": ["--nproc", "3", "--ulysses", "3", "--sp-impl", "dsp"],
    "ulysses2": ["--nproc", "2", "--ulysses", "2", "--sp-impl", "ulysses"],
    "cfg-dsp4": ["--nproc", "4", "--cfg-parallel", "--ulysses", "2", "--sp-impl", "dsp"],
    "dsp2-sharded": ["--nproc", "2", "--sp-impl", "dsp", "--shard-weights"],
}


@pytest.mark.parametrize("flags", list(PLANS.values()), ids=list(PLANS))
def test_cli_video_frames_equal_single_process(tmp_path, ckpt, single, flags):
    ref, _ = single
    frames, record = run_cli(tmp_path, flags, ckpt)
    assert ref.std() > 10 and np.abs(frames - ref).max() <= 1  # <= 1/255
    assert record["parallel"]["world_size"] == int(flags[1])
    assert record["parallel"]["impl"] == flags[flags.index("--sp-impl") + 1]
