"""Trainer: the loss falls, resume is bitwise, DDP matches one process, bad settings are refused with a fix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opendit.errors import OpenDiTError
from opendit.io.checkpoint import load_model, read_sidecar_config
from opendit.models.dit import DiT, DiTConfig, preset
from opendit.train import EMA, BatchSampler, DigitsDataset, ImageFolderDataset, TrainConfig, export_ema, read_log, train

TINY = {"model": "DiT-T/2", "image_size": 16, "batch_size": 32, "threads": 1, "progress": False, "log_every": 1}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "log.jsonl")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """30 uninterrupted steps of DiT-T, every loss logged: the curve other tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    train(TrainConfig(out=str(out), steps=30, ckpt_every=1000, **TINY))
    return out


def test_loss_falls(reference_run):
    curve = losses(reference_run)
    assert len(curve) == 30
    first, last = np.mean(curve[:5]), np.mean(curve[-5:])
    # seeded run: ~1.5 at the start (noise - x0 has variance ~1 + E[x0^2]), ~0.7 after 30 steps
    assert first > 1.2
    assert last < 0.7 * first, (first, last)


def test_resume_reproduces_the_uninterrupted_run_bitwise(reference_run, tmp_path):
    train(TrainConfig(out=str(tmp_path), steps=15, ckpt_every=15, **TINY))
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()
    # a stray record past the checkpoint (as if the first run died after step 15) must be dropped on resume
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 16, "loss": 123.0}) + "\n")
    train(TrainConfig(out=str(tmp_path), steps=30, ckpt_every=1000, resume=True, **TINY))
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 31))
    assert losses(tmp_path) == losses(reference_run)  # exact float equality, not a tolerance
    a = torch.load(reference_run / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_resume_refuses_changed_settings(reference_run):
    with pytest.raises(OpenDiTError, match="--batch-size was 32, now 16"):
        train(TrainConfig(out=str(reference_run), steps=40, resume=True, **{**TINY, "batch_size": 16}))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(OpenDiTError, match="drop --resume"):
        train(TrainConfig(out=str(tmp_path), steps=5, resume=True, **TINY))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prediction": "x0"}, "flow or epsilon"),
        ({"image_size": 15}, "multiple of DiT-T/2's patch 2"),
        ({"model": "DiT-Q/2"}, "unknown model"),
        ({"learn_sigma": True}, "epsilon prediction only"),
        ({"nproc": 64}, "--nproc"),
        ({"precision": "fp8"}, "fp32 or bf16"),
    ],
)
def test_bad_config_is_refused_with_a_fix(tmp_path, bad, message):
    with pytest.raises(OpenDiTError, match=message):
        train(TrainConfig(out=str(tmp_path), steps=5, **{**TINY, **bad}))


def test_gradient_checkpointing_changes_nothing_and_bf16_stays_close(reference_run, tmp_path):
    train(TrainConfig(out=str(tmp_path / "ckpt"), steps=10, grad_checkpointing=True, **TINY))
    np.testing.assert_allclose(losses(tmp_path / "ckpt"), losses(reference_run)[:10], rtol=1e-5)
    train(TrainConfig(out=str(tmp_path / "bf16"), steps=10, precision="bf16", **TINY))
    bf16, fp32 = losses(tmp_path / "bf16"), losses(reference_run)[:10]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)  # same weights, bf16 matmuls: ~3 significant digits
    assert np.mean(bf16[-3:]) == pytest.approx(np.mean(fp32[-3:]), rel=0.1)


def test_epsilon_prediction_trains(tmp_path):
    train(TrainConfig(out=str(tmp_path), steps=20, prediction="epsilon", learn_sigma=True, **TINY))
    curve = losses(tmp_path)
    assert np.isfinite(curve).all()
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5])  # epsilon MSE starts at ~1 and falls


def test_export_writes_ema_weights_the_loader_reads(reference_run, tmp_path):
    extra = {"scheduler": "flow-euler", "steps": 30, "cfg_scale": 3.0}
    path = export_ema(reference_run / "checkpoints" / "latest.pt", tmp_path / "digits", extra)
    meta = read_sidecar_config(path)
    assert meta["scheduler"] == "flow-euler" and meta["model"]["prediction"] == "flow"
    model = load_model(DiTConfig.from_dict(meta["model"]), path)
    ema = torch.load(reference_run / "checkpoints" / "latest.pt", weights_only=True)["ema"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name


def test_ema_update_is_the_exact_average():
    torch.manual_seed(0)
    model = DiT(DiTConfig(**{**preset("DiT-T/2").to_dict(), "input_size": (8, 8), "in_channels": 1, "num_classes": 3}))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    for name, param in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * param if param.requires_grad else param
        torch.testing.assert_close(ema.module.get_parameter(name), expected, rtol=0, atol=1e-6)
    with pytest.raises(OpenDiTError, match="decay"):
        EMA(model, decay=1.5)


def test_digits_dataset_and_batches():
    data = DigitsDataset(16)
    assert data.images.shape == (1797, 1, 16, 16) and data.num_classes == 10
    assert data.images.min() >= -1 and data.images.max() <= 1 and data.images.min() == -1
    assert torch.bincount(data.labels).tolist()[:3] == [178, 182, 177]
    sampler = BatchSampler(len(data), 64, seed=0)
    first_epoch = torch.cat([sampler.indices(s) for s in range(len(data) // 64)])  # 28 full batches
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no repeats within an epoch
    assert torch.equal(BatchSampler(len(data), 64, seed=0).indices(57), sampler.indices(57))  # stateless
    assert not torch.equal(BatchSampler(len(data), 64, seed=1).indices(0), sampler.indices(0))


def test_image_folder_dataset(tmp_path):
    for name, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = ImageFolderDataset(tmp_path, resolution=8, channels=3)
    assert data.class_names == ["cats", "dogs"] and data.images.shape == (6, 3, 8, 8)
    assert data.images[0].max() == -1 and data.images[-1].min() == 1 and data.labels.tolist() == [0] * 3 + [1] * 3
    with pytest.raises(OpenDiTError, match="class subfolders"):
        ImageFolderDataset(tmp_path / "cats", resolution=8)


@pytest.mark.slow
def test_two_processes_match_one(reference_run, tmp_path):
    """DDP over 2 gloo processes computes the same global batch: same curve up to all-reduce rounding."""
    train(TrainConfig(out=str(tmp_path), steps=10, nproc=2, ckpt_every=1000, **TINY))
    np.testing.assert_allclose(losses(tmp_path), losses(reference_run)[:10], rtol=1e-4)


@pytest.mark.slow
def test_a_dying_rank_ends_the_job(tmp_path):
    """SIGKILL one of 2 ranks mid-run: the launcher must exit non-zero promptly instead of hanging."""
    cmd = [sys.executable, "-m", "opendit.cli.train", "train", "--out", str(tmp_path), "--model", "DiT-T/2",
           "--steps", "100000", "--nproc", "2", "--threads", "1", "--log-every", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "log.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ranks = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "SIGKILL" in output or "signal" in output.lower(), output[-2000:]
