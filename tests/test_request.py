"""The request schema (request.py): strict types, bounds, finiteness, cross-field rules, one OpenDiTError per bad
input with a one-line message naming the field and the fix, and output folders created or refused before anything
is loaded."""

from __future__ import annotations

import errno
import os
import pathlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import opendit
from opendit.api.generation import ENGINE_FIELDS, GenerationRequest, call_fields, prepare, request_field_names
from opendit.api.request import SEED_MAX, CallRequest, EngineRequest
from opendit.cli import main
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError

T2 = {"model": "DiT-T/2", "image_size": 64}  # a latent preset: 1000 classes, epsilon prediction; no weights read


def test_the_schema_covers_generation_request_exactly():
    assert set(request_field_names()) == {*ENGINE_FIELDS, *call_fields()}
    assert set(GenerationRequest(classes=[1]).to_dict()) == set(request_field_names())
    with pytest.raises(OpenDiTError, match="unknown field 'stpes' for opendit.generate"):
        GenerationRequest(classes=[1], stpes=3)


def test_valid_fields_are_kept_exactly_as_passed():
    plan = ParallelConfig(ulysses=2, ring=2, sp_impl="usp", comm_dtype="bf16", token_shares=(1.0, 2.0, 1.5, 1.0))
    engine = EngineRequest.build(
        {"model": "DiT-XL/2", "ckpt": Path("a/b.pt"), "vae": "vae", "dtype": "bf16", "device": "cpu", "nproc": 4}
        | {"parallel": plan, "parallel_auto": False, "image_size": 512, "progress": False}
    )
    assert engine.ckpt == "a/b.pt" and engine.nproc == 4 and engine.image_size == 512 and engine.progress is False
    assert engine.plan() == plan and engine.world_size() == 4
    call = CallRequest.build(
        {"classes": (3, 1, 2), "seed": SEED_MAX - 2, "steps": 1000, "cfg_scale": 4, "scheduler": "ddim"}
        | {"image_size": 1, "out": "o", "trace": Path("t.json")}
    )
    assert call.classes == [3, 1, 2] and call.seed == SEED_MAX - 2 and call.steps == 1000
    assert call.cfg_scale == 4.0 and call.trace == "t.json" and call.out == "o"
    numpy = CallRequest.build({"classes": np.arange(4), "seed": np.int64(7), "cfg_scale": np.float32(1.5)})
    assert numpy.classes == [0, 1, 2, 3] and type(numpy.classes[0]) is int and numpy.seed == 7
    assert CallRequest.build({"classes": range(3)}).classes == [0, 1, 2]


BAD_CALLS = [
    ({"classes": [1], "steps": "3"}, "steps must be an integer from 1 to 1000, got '3' (a str); try --steps 30"),
    ({"classes": [1], "steps": 3.0}, "steps must be an integer from 1 to 1000, got 3.0 (a float)"),
    ({"classes": [1], "steps": True}, "steps must be an integer from 1 to 1000, got True (a bool)"),
    ({"classes": [1], "steps": 0}, "steps must be an integer from 1 to 1000, got 0"),
    ({"classes": [1], "steps": 1001}, "steps must be an integer from 1 to 1000, got 1001"),
    ({"classes": 1.5}, "classes must be a list of 1 to 1024 integer class ids, got 1.5 (a float)"),
    ({"classes": "012"}, "classes must be a list of 1 to 1024 integer class ids, got '012' (a str)"),
    ({"classes": {1, 2}}, "classes must be a list of 1 to 1024 integer class ids, got {1, 2} (a set)"),
    ({"classes": [1, 2.0]}, "classes[1] (--classes) must be an integer class id (0 or more), got 2.0 (a float)"),
    ({"classes": [True]}, "classes[0] (--classes) must be an integer class id (0 or more), got True (a bool)"),
    ({"classes": [-1]}, "classes[0] (--classes) must be an integer class id (0 or more), got -1"),
    ({"classes": []}, "classes is empty (no classes given); e.g. --classes 0 1 2"),
    ({"classes": [0] * 1025}, "classes has 1025 entries, more than 1024 per call; split them over calls"),
    ({"classes": range(10**12)}, "has 1000000000000 entries, more than 1024 per call"),
    ({"classes": np.zeros((2, 2), int)}, "got an array of shape (2, 2) and dtype int64"),
    ({"classes": [1], "seed": True}, "seed must be an integer from 0 to 2**64 - 1 (image i uses seed + i), got True"),
    ({"classes": [1], "seed": -1}, "seed must be an integer from 0 to 2**64 - 1 (image i uses seed + i), got -1"),
    ({"classes": [1], "seed": 2**64}, "seed must be an integer from 0 to 2**64 - 1 (image i uses seed + i), got 1844"),
    ({"classes": [1], "seed": 10**5000}, "got an integer of 16610 bits"),
    (
        {"classes": [1, 2, 3], "seed": SEED_MAX - 1},
        "exceeds 2**64 - 1, the largest seed torch.Generator takes; use --seed",
    ),
    ({"classes": [1], "cfg_scale": float("nan")}, "cfg_scale (--cfg-scale) must be a finite number from 1 to 100"),
    ({"classes": [1], "cfg_scale": float("inf")}, "(1 disables guidance), got inf; e.g. --cfg-scale 4"),
    ({"classes": [1], "cfg_scale": 0.5}, "cfg_scale (--cfg-scale) must be a finite number from 1 to 100"),
    ({"classes": [1], "cfg_scale": 101.0}, "from 1 to 100 (1 disables guidance), got 101.0"),
    ({"classes": [1], "cfg_scale": "4"}, "got '4' (a str)"),
    ({"classes": [1], "cfg_scale": True}, "got True (a bool)"),
    (
        {"classes": [1], "image_size": -16},
        "image_size (--image-size) must be an integer from 1 to 8192 (pixels), got -16",
    ),
    ({"classes": [1], "image_size": 16384}, "image_size (--image-size) must be an integer from 1 to 8192"),
    ({"classes": [1], "scheduler": "heun"}, "unknown scheduler 'heun'; choose one of: ddpm, ddim, dpm-solver"),
    ({"classes": [1], "scheduler": 3}, "scheduler must be one of ddpm, ddim, dpm-solver, flow-euler, got 3 (an int)"),
    ({"classes": [1], "trace": "a\0b"}, "trace must not contain a NUL character; e.g. --trace trace.json"),
    ({"classes": [1], "trace": "x" * 300}, "trace has a 300-byte component, more than the 255 a file name may have"),
    ({"classes": [1], "trace": "/"}, "trace must name a file, got '/'"),
    ({"classes": [1], "trace": "\ud800.json"}, "trace must be encodable as a file name"),
    ({"classes": [1], "out": ""}, "out must be a non-empty path; e.g. --out outputs"),
    ({"classes": [1], "out": 3}, "out must be a folder path, got 3 (an int)"),
    ({"classes": [1], "camera": "pan"}, "unknown field 'camera'; the fields are: classes, seed, steps"),
    ({"classes": [1], "prompt": "a cat"}, "pass --classes (OpenDiT's class-conditional DiT) or --prompt"),
    ({"prompt": []}, "prompt is empty (no prompts given)"),
    ({"prompt": ["a cat", 3]}, "prompt[1] (--prompt) must be a text of at most 65536 characters, got 3 (an int)"),
]


BAD_ENGINES = [
    ({"nproc": True}, "nproc must be an integer from 1 to 256 (local processes), got True (a bool); e.g. --nproc 2"),
    ({"nproc": 0}, "nproc must be an integer from 1 to 256 (local processes), got 0"),
    ({"nproc": 257}, "nproc must be an integer from 1 to 256 (local processes), got 257"),
    ({"parallel": ParallelConfig(dp=64, ring=32)}, "need 2048 processes, more than 1024; use smaller degrees"),
    ({"nproc": "2"}, "got '2' (a str)"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'; choose one of fp32, bf16, fp16"),
    ({"dtype": torch.float16}, "dtype must be one of fp32, bf16, fp16, auto, got torch.float16 (a dtype)"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'; e.g. --device cpu"),
    ({"device": "cuda:7"}, "device cuda:7 asks for GPU 7, but this machine has"),
    ({"model": "DiT-Q/2"}, "unknown model 'DiT-Q/2'; choose one of"),
    ({"model": 2}, "model must be a preset name (`opendit models` lists them), got 2 (an int)"),
    ({"ckpt": b"x.pt"}, "ckpt must be a path to a .pt or .safetensors file, got b'x.pt' (a bytes)"),
    ({"ckpt": "."}, "ckpt must name a file, got '.'"),
    ({"vae": "v\0ae"}, "vae must not contain a NUL character; e.g. --vae ./sd-vae-ft-ema"),
    ({"parallel": ParallelConfig(ulysses=0)}, "parallel.ulysses (--ulysses) must be an integer from 1 to 1024, got 0"),
    ({"parallel": ParallelConfig(dp=True)}, "parallel.dp (--dp) must be an integer from 1 to 1024, got True (a bool)"),
    ({"parallel": ParallelConfig(cfg=3)}, "parallel.cfg (--cfg-parallel) must be 1 or 2, got 3"),
    ({"parallel": ParallelConfig(ring=2.0)}, "parallel.ring (--ring) must be an integer from 1 to 1024, got 2.0"),
    ({"parallel": ParallelConfig(sp_impl="warp")}, "unknown sp-impl 'warp'; choose one of"),
    ({"parallel": ParallelConfig(comm_dtype="fp8")}, "parallel.comm_dtype (--comm-dtype) must be bf16, fp16 or None"),
    ({"parallel": ParallelConfig(token_shares=(1.0, float("nan")))}, "parallel.token_shares[1] must be a finite"),
    ({"parallel": ParallelConfig(shard_weights=1)}, "parallel.shard_weights (--shard-weights) must be True or False"),
    ({"parallel": "ulysses"}, "parallel (--dp/--ulysses/--ring/--tp) must be an opendit ParallelConfig, got 'ulysses'"),
    ({"parallel_auto": 1}, "parallel_auto (--parallel) must be True or False, got 1 (an int)"),
    ({"progress": "no"}, "progress (--no-progress) must be True or False, got 'no' (a str)"),
    ({"parallel_auto": True, "parallel": ParallelConfig(ulysses=2)}, "--parallel auto chooses the degrees itself"),
]


def assert_one_error(build, message: str) -> str:
    with pytest.raises(OpenDiTError) as caught:
        build()
    text = str(caught.value)
    assert type(caught.value) is OpenDiTError and not isinstance(caught.value.__cause__, ValidationError)
    assert message in text and len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize(("values", "message"), BAD_CALLS)
def test_bad_call_fields_get_one_message_naming_the_field_and_the_fix(values, message):
    assert_one_error(lambda: CallRequest.build(values), message)


@pytest.mark.parametrize(("values", "message"), BAD_ENGINES)
def test_bad_engine_fields_get_one_message_naming_the_field_and_the_fix(values, message):
    assert_one_error(lambda: EngineRequest.build(values), message)


@pytest.mark.parametrize(
    ("fields_", "message"),
    [
        ({"classes": [1000]}, "class id 1000 is outside this model's range 0..999"),
        ({"classes": [1], "scheduler": "flow-euler"}, "scheduler flow-euler needs a model that predicts flow"),
        ({"classes": [1], "image_size": 100}, "image size 100 must be a positive multiple of 16"),
        ({"classes": [1], "nproc": 2, "parallel": ParallelConfig(cfg=2), "cfg_scale": 1.0}, "cfg parallel needs"),
        ({"classes": [1], "nproc": 3, "parallel": ParallelConfig(ulysses=2)}, "must equal the number of processes 3"),
        ({"classes": [1], "nproc": 2, "parallel": ParallelConfig(dp=2)}, "dp degree 2 exceeds the 1 images"),
        ({"classes": [1], "parallel": ParallelConfig(shard_weights=True)}, "--shard-weights shards over the seq"),
    ],
)
def test_cross_field_rules_run_against_the_resolved_model_and_plan(fields_, message):
    assert_one_error(lambda: prepare(GenerationRequest(**{**T2, **fields_})), message)


def test_python_api_wrong_shapes_are_opendit_errors():
    assert_one_error(lambda: opendit.generate(classes=[1], sead=3), "unknown field 'sead' for opendit.generate")
    assert_one_error(lambda: opendit.generate(seed=3), "classes is required")
    assert_one_error(lambda: opendit.generate(GenerationRequest(classes=[1]), seed=3), "not both (got seed)")
    assert_one_error(lambda: opendit.generate({"classes": [1]}), "expected an opendit.GenerationRequest, got dict")
    assert_one_error(lambda: opendit.generate(classes=1.5), "classes must be a list of 1 to 1024")
    assert_one_error(
        lambda: opendit.Engine(nproc=True), "nproc must be an integer from 1 to 256 (local processes), got True"
    )
    assert_one_error(lambda: opendit.Engine(parallel=ParallelConfig(shard_weights=True)), "--shard-weights shards")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model is loaded or a process started; yields a clock to show how early the refusal came."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a process started")

    import opendit.distributed.launch
    import opendit.engine.replica
    import opendit.engine.sampler_runner

    monkeypatch.setattr(opendit.engine.replica.Replica, "__init__", refuse)
    monkeypatch.setattr(opendit.engine.sampler_runner, "load_model", refuse)
    monkeypatch.setattr(opendit.distributed.launch.WorkerPool, "__init__", refuse)
    return time.perf_counter()


def refused(capsys, args: list[str], message: str, started: float) -> None:
    code = main(["sample", "--no-progress", "--steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert time.perf_counter() - started < 30  # refused while validating, not after a run


def test_out_blocked_by_a_file_is_refused_before_loading(tmp_path, capsys, nothing_loads):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["--out", str(tmp_path / "file")], "file is a file, not a folder; remove the file", nothing_loads)
    deeper = str(tmp_path / "file" / "sub")
    refused(capsys, ["--out", deeper], f"--out {deeper}: {tmp_path / 'file'} is a file, not a folder", nothing_loads)


def test_out_without_permission_is_refused_before_loading(tmp_path, capsys, nothing_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root: permission bits do not stop writes, so there is nothing to refuse
            pytest.skip("running as a user whom permission bits do not stop (root)")
        refused(
            capsys, ["--out", str(locked / "out")], "(Permission denied); pass a folder you can write", nothing_loads
        )
    finally:
        locked.chmod(0o700)


def test_a_folder_that_cannot_be_written_is_refused_even_as_root(tmp_path, capsys, monkeypatch, nothing_loads):
    """The write check itself (an unnamed file), failing as it does without permission: runs as any user."""

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.TemporaryFile", denied)
    refused(capsys, ["--out", str(tmp_path / "o")], "(Permission denied); pass a folder you can write", nothing_loads)


def test_out_in_a_read_only_place_is_refused_before_loading(tmp_path, capsys, monkeypatch, nothing_loads):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    with monkeypatch.context() as patch:  # a read-only mount, simulated: mkdir fails as it does there
        patch.setattr(pathlib.Path, "mkdir", read_only)
        refused(
            capsys,
            ["--out", str(tmp_path / "ro")],
            "(Read-only file system); pass a folder you can write",
            nothing_loads,
        )
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        refused(
            capsys, ["--out", "/sys/opendit-test-out"], "cannot write to --out /sys/opendit-test-out (", nothing_loads
        )


def test_trace_folder_is_created_or_refused_before_loading(tmp_path, capsys, nothing_loads):
    (tmp_path / "file").write_text("x")
    out = ["--out", str(tmp_path / "out")]
    refused(capsys, [*out, "--trace", str(tmp_path)], "is a folder; pass a file name", nothing_loads)
    trace = str(tmp_path / "file" / "t.json")
    refused(capsys, [*out, "--trace", trace], f"--trace folder {tmp_path / 'file'} is a file", nothing_loads)


def test_a_valid_out_exists_before_the_model_loads(tmp_path, capsys, monkeypatch):
    seen = {}

    def record(args, job):
        seen["out"] = Path(args.out).is_dir()
        seen["trace_folder"] = (tmp_path / "traces").is_dir()
        return 0

    monkeypatch.setattr("opendit.cli.execute_sample", record)
    trace = tmp_path / "traces" / "t.json"
    assert main(["sample", "--out", str(tmp_path / "a" / "b"), "--trace", str(trace), "--steps", "2"]) == 0
    assert seen == {"out": True, "trace_folder": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "3.5"], "error: argument --steps: invalid int value: '3.5'; see `opendit sample --help`"),
        (["--classes"], "error: argument --classes: expected at least one argument"),
        (["--cfg-scale", "nan"], "error: cfg_scale (--cfg-scale) must be a finite number from 1 to 100"),
        (["--seed", "-1"], "error: seed must be an integer from 0 to 2**64 - 1"),
        (["--frobnicate"], "error: unrecognized arguments: --frobnicate; see `opendit --help`"),
    ],
)
def test_cli_flag_errors_are_one_line(tmp_path, capsys, args, message):
    refused(capsys, ["--out", str(tmp_path), *args], message, time.perf_counter())


def test_patches_zero_is_refused_and_public_names_import():
    """--patches 0 was silently the default; now one line naming the field. The names a user needs import from
    opendit itself (Engine(parallel=ParallelConfig(...)) and opendit.parallelize need ParallelConfig)."""
    from opendit import Engine, ParallelConfig, generate, parallelize  # noqa: F401
    from opendit.cli import main

    assert main(["sample", "--nproc", "2", "--pipefusion", "2", "--patches", "0", "--out", "/tmp/never"]) == 2
    assert ParallelConfig(pipefusion=2).patch_count == 2  # the default: one patch per stage
