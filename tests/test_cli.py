"""The CLI: outputs on good input, one clear line and exit status 2 on each kind of bad input."""

import json
import subprocess
import sys

import pytest
import torch

from opendit.cli import main
from opendit.models.dit import build_dit, preset


@pytest.fixture
def t2_ckpt(tmp_path):
    """An official-format raw state dict of DiT-T/2 at 64 px (8x8 latents)."""
    path = tmp_path / "dit-t2.pt"
    torch.save(build_dit(preset("DiT-T/2").with_image_size(64)).state_dict(), path)
    return path


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_grid_images_and_record(tmp_path, capsys, t2_ckpt):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["sample", "--classes", "1", "2", "--steps", "3", "--out", str(out), "--no-progress"], capsys
    )
    assert code == 0 and "samples.png" in stdout
    assert (out / "samples.png").is_file() and (out / "000_class-1.png").is_file()
    record = json.loads((out / "record.json").read_text())
    assert record["resolved"]["steps"] == 3 and len(record["timing"]["per_step_s"]) == 3
    assert record["peak_memory_bytes"] > 0


BAD_INPUTS = [
    (["--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'; choose one of"),
    (["--model", "DiT-T/2", "--image-size", "100"], "image size 100 must be a positive multiple of 16"),
    (["--classes", "10"], "class id 10 is outside this model's range 0..9"),
    (["--model", "DiT-T/2", "--ckpt", "/nonexistent/x.pt"], "does not exist"),
    (["--steps", "0"], "steps must be an integer from 1 to 1000, got 0"),
    (["--steps", "-3"], "steps must be an integer from 1 to 1000, got -3"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_messages(tmp_path, capsys, extra, message):
    code, _, err = run_cli(["sample", "--out", str(tmp_path), "--no-progress", *extra], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    code, _, err = run_cli(["sample", "--model", "DiT-T/2", "--image-size", "64", "--ckpt", str(bad)], capsys)
    assert code == 2 and "cannot read checkpoint" in err and "intact DiT" in err


def test_checkpoint_of_another_model(tmp_path, capsys, t2_ckpt):
    code, _, err = run_cli(["sample", "--model", "DiT-S/2", "--image-size", "64", "--ckpt", str(t2_ckpt)], capsys)
    assert code == 2 and "checkpoint is for another model" in err and "--model DiT-T/2" in err


def test_latent_model_needs_vae(tmp_path, capsys, t2_ckpt):
    args = ["sample", "--model", "DiT-T/2", "--image-size", "64", "--ckpt", str(t2_ckpt), "--steps", "2"]
    code, _, err = run_cli([*args, "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "pass --vae DIR" in err


@pytest.mark.slow  # fresh interpreters: `python -m opendit` per bad input
def test_module_entry_point_exits_cleanly_on_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "opendit", "sample", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'nope'") and "Traceback" not in proc.stderr


def test_models_lists_presets(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "DiT-XL/2" in out and "675,129,632" in out


def test_latent_model_decodes_with_local_vae(tmp_path, capsys, t2_ckpt):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
    )
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    args = [
        "sample",
        "--model",
        "DiT-T/2",
        "--image-size",
        "64",
        "--ckpt",
        str(t2_ckpt),
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--vae",
        str(tmp_path / "vae"),
        "--classes",
        "5",
        "999",
        "--out",
        str(out),
    ]
    code, _, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 0, err
    from PIL import Image

    image = Image.open(out / "001_class-999.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    assert json.loads((out / "record.json").read_text())["checkpoint_sha256"]
