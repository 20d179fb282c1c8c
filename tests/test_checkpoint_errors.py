"""Checkpoints are checked before any compute, with one message per cause, in `sample`, `eval` and `train --resume`;
every model source a user has (a run directory, its checkpoints, an export) just works, and every fix a message
suggests is run here and works."""

import json
import re
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from safetensors.torch import save_file

import opendit
from opendit.cli import main
from opendit.io.checkpoint import load_model, read_sidecar_config, save_safetensors
from opendit.models.dit import DiT, DiTConfig, build_dit, pixel_config, preset

# A tiny DiT on the digits data: 10 steps in a few seconds, checkpoints at steps 5 and 10 (and latest.pt).
TRAIN = ["--model", "DiT-T/2", "--image-size", "16", "--steps", "10", "--batch-size", "16", "--threads", "1",
         "--no-progress", "--ckpt-every", "5", "--log-every", "5"]  # fmt: skip


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    assert main(["train", "--out", str(out), *TRAIN]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest.pt",
        "step_0000005.pt",
        "step_0000010.pt",
    ]
    return out


def sample_args(ckpt, out, *extra):
    return ["sample", "--ckpt", ckpt, "--out", out, "--no-progress", "--classes", 0, 1, "--steps", 2, *extra]


def eval_args(ckpt):
    return ["eval", "--ckpt", ckpt, "--per-class", 1, "--steps", 1, "--batch-size", 10]


class RunsCode:
    """Pickles as a call of print(): stands for any code a checkpoint could carry (harmless, and visible if run)."""

    def __reduce__(self):
        return print, ("pickled code ran",)


# ---------------------------------------------------------------------------------------------- the bad files
def _cut(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def _export(tmp_path):
    return save_safetensors(DiT(pixel_config("DiT-T/2", 16)), tmp_path / "model", {"steps": 2})


def _damaged_header(tmp_path):
    path = _export(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # the JSON header's first bytes
    path.write_bytes(bytes(data))
    return path


def _sidecar(tmp_path, text):
    path = _export(tmp_path)
    path.with_suffix(".json").write_text(text)
    return path


BAD = {  # name -> (builder(tmp_path, run_dir), words of the message)
    "missing": (lambda t, r: t / "nowhere.pt", "does not exist"),
    "directory": (lambda t, r: (t / "empty").mkdir() or t / "empty", "is a directory, not a run directory"),
    "truncated .pt": (lambda t, r: _cut(r / "checkpoints/latest.pt", t / "half.pt"), "truncated, corrupt"),
    "truncated .safetensors": (lambda t, r: _cut(_export(t), t / "half.safetensors"), "truncated"),
    "damaged header": (lambda t, r: _damaged_header(t), "damaged header"),
    "pickled list": (lambda t, r: torch.save([1, 2], t / "list.pt") or t / "list.pt", "holds a list, not a state dict"),
    "pickled str": (lambda t, r: torch.save("weights", t / "s.pt") or t / "s.pt", "holds a str, not a state dict"),
    "pickled tensor": (lambda t, r: torch.save(torch.ones(3), t / "x.pt") or t / "x.pt", "holds a Tensor, not a"),
    "unrelated tensors": (
        lambda t, r: save_file({"fc.weight": torch.ones(2, 2)}, str(t / "u.safetensors")) or t / "u.safetensors",
        "holds 1 tensor(s) but no DiT weights",
    ),
    "pickled code": (
        lambda t, r: torch.save({"ema": {}, "x": RunsCode()}, t / "code.pt") or t / "code.pt",
        "contains pickled code (print), which OpenDiT will not execute",
    ),
    "sidecar not JSON": (lambda t, r: _sidecar(t, "{not json"), "is not valid JSON"),
    "sidecar not a config": (lambda t, r: _sidecar(t, '{"model": {"depth": 2}}'), "is not an OpenDiT model config"),
}


def named(cause, path):
    """The file a message names: the sidecar for the sidecar causes, else the checkpoint."""
    return path.with_suffix(".json") if cause.startswith("sidecar") else path


def one_error_line(code, err, *words):
    """Exit 2, and stderr is exactly one line: `error: ...` with every word of the cause."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("cause", list(BAD))
def test_sample_names_each_cause_before_any_compute(cause, tmp_path, run_dir, capsys):
    build, words = BAD[cause]
    path = build(tmp_path, run_dir)
    code, out, err = run(sample_args(path, tmp_path / "out"), capsys)
    one_error_line(code, err, words, str(named(cause, path)))
    assert not (tmp_path / "out").exists()  # nothing was sampled
    assert "pickled code ran" not in out  # the code in a checkpoint is never executed


@pytest.mark.parametrize("cause", [c for c in BAD if c != "missing"])
def test_eval_names_each_cause(cause, tmp_path, run_dir, capsys):
    build, words = BAD[cause]
    path = build(tmp_path, run_dir)
    code, out, err = run(eval_args(path), capsys)
    one_error_line(code, err, words, str(named(cause, path)))
    assert "pickled code ran" not in out


def test_eval_of_a_missing_file(tmp_path, capsys):
    one_error_line(*run(eval_args(tmp_path / "nowhere.pt"), capsys)[::2], "does not exist")


# ---------------------------------------------------------------------------------------------- train --resume
@pytest.fixture
def resumable(run_dir, tmp_path):
    """A copy of the run, to damage: (its --out, its latest.pt)."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out, out / "checkpoints" / "latest.pt"


def resume(out, capsys, *extra):
    return run(["train", "--out", out, *TRAIN, "--resume", *extra], capsys)


RESUME_BAD = {
    "truncated": (lambda p: _cut(p, p), "truncated, corrupt"),
    "pickled list": (lambda p: torch.save([1], p), "not a training checkpoint of opendit train (it holds a list)"),
    "pickled tensor": (lambda p: torch.save(torch.ones(1), p), "it holds a Tensor"),
    "a bare state dict": (
        lambda p: torch.save(torch.load(p, weights_only=True)["ema"], p),
        "not a training checkpoint of opendit train (no 'model'",
    ),
    "pickled code": (lambda p: torch.save({"x": RunsCode()}, p), "contains pickled code (print)"),
}


@pytest.mark.parametrize("cause", list(RESUME_BAD))
def test_resume_names_each_cause(cause, resumable, capsys):
    out, latest = resumable
    damage, words = RESUME_BAD[cause]
    damage(latest)
    log = (out / "log.jsonl").read_text()
    code, stdout, err = run(["train", "--out", out, *TRAIN, "--steps", 20, "--resume"], capsys)
    one_error_line(code, err, words, str(latest))
    assert (out / "log.jsonl").read_text() == log and "pickled code ran" not in stdout  # nothing ran


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code, _, err = resume(tmp_path / "new", capsys)
    one_error_line(code, err, "--resume but", "does not exist; drop --resume")


# ---------------------------------------------------------------------------------------------- sources that work
def test_a_run_directory_and_its_latest_checkpoint_sample_with_the_runs_config(run_dir, tmp_path, capsys):
    run_model = json.loads((run_dir / "config.json").read_text())["model"]
    for name, source in (("dir", run_dir), ("latest", run_dir / "checkpoints" / "latest.pt")):
        out = tmp_path / name
        code, _, err = run(["sample", "--ckpt", source, "--out", out, "--no-progress", "--classes", 0, 1], capsys)
        assert code == 0, err
        record = json.loads((out / "record.json").read_text())
        assert record["model"] == run_model and record["checkpoint"].endswith("checkpoints/latest.pt")
        # the defaults `opendit train --export` records for the same run
        assert record["resolved"]["steps"] == 30 and record["resolved"]["cfg_scale"] == 3.0
        assert record["resolved"]["scheduler"] == "flow-euler"
        assert (out / "samples.png").is_file() and (out / "000_class-0.png").is_file()


def test_the_engine_and_the_loader_take_a_run_directory_and_use_its_ema_weights(run_dir):
    meta = read_sidecar_config(run_dir)
    ema = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["ema"]
    model = load_model(DiTConfig.from_dict(meta["model"]), run_dir)
    assert all(torch.equal(t, ema[k]) for k, t in model.state_dict().items())
    with opendit.Engine(ckpt=run_dir) as engine:
        result = engine.generate(classes=[3], steps=2)
    assert result.images.shape == (1, 16, 16, 1) and result.record["model"] == meta["model"]


def test_eval_of_a_run_directory(run_dir, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, _, err = run([*eval_args(run_dir), "--out", report_path], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["samples"]["total"] == 10 and report["model"].endswith("checkpoints/latest.pt")
    assert main(["eval", "--ckpt", str(run_dir), "--per-class", "1", "--steps", "1", "--use-model", "model"]) == 0


def test_an_official_training_checkpoint_with_an_argparse_namespace_loads(tmp_path, capsys):
    """The official DiT train.py saves its args as an argparse.Namespace: plain data, allowed."""
    state = build_dit(preset("DiT-T/2").with_image_size(64)).state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "args": Namespace(model="DiT-T/2")}, tmp_path / "a.pt")
    config = preset("DiT-T/2").with_image_size(64)
    model = load_model(config, tmp_path / "a.pt")
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- the fixes work
def test_a_directory_holding_a_checkpoint_names_it_and_that_works(run_dir, tmp_path, capsys):
    folder = tmp_path / "exports"
    trained = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    model = load_model(DiTConfig.from_dict(trained["model_config"]), run_dir)
    save_safetensors(model, folder / "digits", {"steps": 2})
    code, _, err = run(sample_args(folder, tmp_path / "out"), capsys)
    one_error_line(code, err, f"pass --ckpt {folder / 'digits.safetensors'}")
    code, _, err = run(sample_args(folder / "digits.safetensors", tmp_path / "out"), capsys)
    assert code == 0, err


def test_a_damaged_latest_checkpoint_points_at_the_previous_one(resumable, tmp_path, capsys):
    out, latest = resumable
    _cut(latest, latest)
    code, _, err = run(sample_args(out, tmp_path / "a"), capsys)
    one_error_line(code, err, f"or pass --ckpt {out / 'checkpoints' / 'step_0000010.pt'}")
    assert run(sample_args(out / "checkpoints" / "step_0000010.pt", tmp_path / "a"), capsys)[0] == 0
    code, _, err = resume(out, capsys)
    fix = re.search(r"cp (\S+) (\S+)$", err.strip())
    assert code == 2 and fix, err
    shutil.copy(fix.group(1), fix.group(2))
    assert resume(out, capsys, "--steps", 12)[0] == 0
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())][-1] == 12


def _run_suggested(err: str) -> str:
    command = re.search(r'python -c "(.*?)", then', err)
    assert command, err
    done = subprocess.run([sys.executable, "-c", command.group(1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pickled_code_fix_keeps_the_tensors_of_a_trusted_file(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    torch.save({**state, "callback": RunsCode()}, tmp_path / "trusted.pt")
    code, _, err = run(sample_args(tmp_path / "trusted.pt", tmp_path / "out"), capsys)
    one_error_line(code, err, "contains pickled code", "then pass --ckpt")
    assert "pickled code ran" in _run_suggested(err)  # the user's explicit choice: now the code runs, once
    target = err.strip().rsplit("then pass --ckpt ", 1)[1]
    assert run(sample_args(target, tmp_path / "out"), capsys)[0] == 0


def test_pickled_code_fix_for_resume(resumable, capsys):
    out, latest = resumable
    torch.save({**torch.load(latest, weights_only=True), "callback": RunsCode()}, latest)
    code, _, err = resume(out, capsys)
    one_error_line(code, err, "contains pickled code", "then resume again")
    _run_suggested(err)
    assert resume(out, capsys, "--steps", 12)[0] == 0


def test_a_run_directory_without_a_checkpoint_yet(tmp_path, capsys):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run(sample_args(out, tmp_path / "o"), capsys)
    one_error_line(code, err, "has no checkpoint yet", f"opendit train --out {out} --ckpt-every K")
    assert main(["train", "--out", str(out), *TRAIN, "--steps", "2", "--ckpt-every", "1"]) == 0
    assert run(sample_args(out, tmp_path / "o"), capsys)[0] == 0


def test_a_broken_sidecar_is_fixed_by_restoring_it(tmp_path, capsys):
    path = _export(tmp_path)
    good = path.with_suffix(".json").read_text()
    path.with_suffix(".json").write_text("{not json")
    code, _, err = run(sample_args(path, tmp_path / "o"), capsys)
    one_error_line(code, err, "is not valid JSON", "restore the .json")
    path.with_suffix(".json").write_text(good)
    assert run(sample_args(path, tmp_path / "o"), capsys)[0] == 0
