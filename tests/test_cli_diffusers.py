"""`opendit sample --diffusers DIR`: a local diffusers pipeline folder on OpenDiT's engine.

On tiny random pipelines saved to disk (opendit.testing.tiny_pipelines): the one-process run equals diffusers'
own call of the same pipeline (same prompt, steps, guidance, generator), the parallel runs (Ulysses, cfg parallel on
2 processes) equal the one-process run of the same command (uint8 images, <= 1 of 255), record.json names the
pipeline, scheduler and plan, and bad input is one "error: ..." line with exit status 2, before any process starts.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

import opendit  # noqa: E402
import opendit.distributed.launch  # noqa: E402
from opendit.api.generation import GenerationRequest, resolve_engine  # noqa: E402
from opendit.api.pipelines import inspect_pipeline, label_ids  # noqa: E402
from opendit.cli import main  # noqa: E402
from opendit.io.outputs import file_stem  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402

PROMPTS = ["a photo of a red cat sitting in a garden", "a dog"]
# per kind: the flags of every run (Flux at 32 px: its default, 256 px, takes ~30 s on a CPU) and the guidance
KINDS = {"pixart": ([], 4.5), "flux": (["--image-size", "32"], 3.5)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in KINDS}


def sample(capsys, folder, out, prompts, *extra) -> tuple[int, str, str]:
    """`opendit sample --diffusers folder` with the kind's flags, 2 steps, seed 3, in this process."""
    flags, guidance = KINDS.get(folder.name, ([], 4.5))  # edited copies: PixArt's
    argv = ["sample", "--diffusers", str(folder), "--steps", "2", "--seed", "3", "--cfg-scale", str(guidance)]
    for prompt in prompts:
        argv += ["--prompt", prompt]  # the flag given once per prompt
    code = main([*argv, *flags, "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def images(out) -> np.ndarray:
    files = sorted(out.glob("[0-9][0-9][0-9]_prompt-*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def diffusers_own(folder, prompt: str) -> np.ndarray:
    """The pipeline called as diffusers' documentation does, converted as numpy_to_pil does."""
    from diffusers import DiffusionPipeline

    flags, guidance = KINDS[folder.name]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if folder.name == "pixart" else {"height": 32, "width": 32}
    generator = torch.Generator().manual_seed(3)
    out = pipe(prompt, num_inference_steps=2, guidance_scale=guidance, generator=generator, output_type="np", **extra)
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_process_equals_diffusers_own_call(kind, folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = sample(capsys, folders[kind], out, PROMPTS[:1])
    assert code == 0 and "samples.png" in stdout
    assert max_diff(images(out), diffusers_own(folders[kind], PROMPTS[0])) <= 1
    assert (out / "samples.png").is_file() and (out / f"{file_stem(0, PROMPTS[0])}.png").is_file()
    record = json.loads((out / "record.json").read_text())
    pipeline = {"pixart": "PixArtAlphaPipeline", "flux": "FluxPipeline"}[kind]
    scheduler = {"pixart": "DPMSolverMultistepScheduler", "flux": "FlowMatchEulerDiscreteScheduler"}[kind]
    assert record["pipeline"]["class"] == pipeline and record["pipeline"]["scheduler"]["class"] == scheduler
    assert "own denoising loop" in record["pipeline"]["loop"] and "one torch.Generator" in record["pipeline"]["seeding"]
    assert record["parallel"]["world_size"] == 1 and record["parallel"]["describe"] == "single device"
    assert record["resolved"]["steps"] == 2 and record["resolved"]["image_size"] == [32, 32]
    assert len(record["timing"]["per_step_s"]) == 2 and record["memory"]["process_peak_bytes"] > 0


def test_engine_api_takes_prompts(folders, tmp_path, capsys):
    """Engine(diffusers=DIR).generate(prompt=...) is the CLI's call: the same images."""
    code, _, _ = sample(capsys, folders["pixart"], tmp_path / "cli", PROMPTS)
    assert code == 0
    with opendit.Engine(diffusers=str(folders["pixart"])) as engine:
        result = engine.generate(prompt=PROMPTS, steps=2, seed=3, cfg_scale=4.5)
    assert result.labels == PROMPTS and result.images.dtype == np.uint8
    assert max_diff(result.images, images(tmp_path / "cli")) == 0


_REFERENCES: dict[str, np.ndarray] = {}


def one_process(capsys, folder, root) -> np.ndarray:
    """The one-process run of the parallel tests' command (both prompts), once per kind."""
    if folder.name not in _REFERENCES:
        code, _, err = sample(capsys, folder, root / f"one-{folder.name}", PROMPTS)
        assert code == 0, err
        _REFERENCES[folder.name] = images(root / f"one-{folder.name}")
    return _REFERENCES[folder.name]


PARALLEL = [
    ("pixart", ["--ulysses", "2"], "all_to_all"),
    ("pixart", ["--cfg-parallel"], "all_gather"),
    ("flux", ["--ulysses", "2"], "all_to_all"),
    ("flux", ["--ring", "2", "--shard-weights"], "weight_gather"),  # FSDP2 over the ring group: blocks as units
    ("pixart", ["--ulysses", "2", "--sp-impl", "fastseq"], "all_gather"),  # FastSeq on projected q, k, v
]


@pytest.mark.slow
def test_a_pipeline_writes_every_ranks_trace(folders, tmp_path, capsys):
    """--trace on a pipeline's own loop: every rank's steps (ended by the pipeline's callback), model calls (timed
    by the transformer's hooks) and collectives on one time axis; the record has both ranks' utilisation."""
    trace_file = tmp_path / "trace.json"
    code, _, err = sample(capsys, folders["pixart"], tmp_path / "out", PROMPTS, "--nproc", "2", "--ulysses", "2",
                          "--trace", str(trace_file))  # fmt: skip
    assert code == 0, err
    events = [e for e in json.loads(trace_file.read_text())["traceEvents"] if e.get("ph") == "X"]
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank]
        assert sum(e["name"].startswith("step") for e in mine) == 2, rank  # --steps 2
        assert sum(e["name"] == "model" for e in mine) >= 2 and any(e["cat"] == "comm" for e in mine), rank
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert len(record["utilisation"]["per_rank"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "plan", "collective"), PARALLEL)
def test_two_processes_equal_one(kind, plan, collective, folders, tmp_path_factory, capsys):
    root = tmp_path_factory.getbasetemp()
    expected = one_process(capsys, folders[kind], root)
    out = tmp_path_factory.mktemp("parallel")
    code, _, err = sample(capsys, folders[kind], out, PROMPTS, "--nproc", "2", *plan)
    assert code == 0, err
    assert max_diff(images(out), expected) <= 1
    record = json.loads((out / "record.json").read_text())
    assert record["parallel"]["world_size"] == 2
    degree = "ulysses" if "--ulysses" in plan else "ring" if "--ring" in plan else "cfg"
    assert record["parallel"]["config"][degree] == 2
    steps = record["pipeline"]["call"]["num_inference_steps"]
    for rank in record["ranks"]:  # the plan really ran, in every step (the pipeline's callback closes each step)
        assert len(rank["comm_per_step"]) == steps
        assert all(step[collective]["calls"] > 0 for step in rank["comm_per_step"]), rank["comm_per_step"]


# ------------------------------------------------------------------------------------------------ bad input
def edited_copy(source, target, model_index=None, config_class=None):
    """The pipeline's JSON files (no weights: they are refused before loading), with edits."""
    (target / "transformer").mkdir(parents=True)
    index = json.loads((source / "model_index.json").read_text())
    index.update(model_index or {})
    (target / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    shutil.copy(source / "transformer" / "config.json", target / "transformer" / "config.json")
    if config_class is not None:
        config = json.loads((target / "transformer" / "config.json").read_text())
        (target / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": config_class}))
    return target


def test_bad_input_is_one_error_line_before_any_process_starts(folders, tmp_path, capsys, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for a request that is refused")

    monkeypatch.setattr(opendit.distributed.launch.WorkerPool, "__init__", no_pool)
    pixart, flux = folders["pixart"], folders["flux"]
    (tmp_path / "empty").mkdir()
    unet = {"transformer": ["diffusers", "UNet2DConditionModel"]}
    cases = [
        (tmp_path / "empty", [], "not a diffusers pipeline folder (save_pretrained layout): no model_index.json"),
        (tmp_path / "missing", [], "does not exist"),
        (edited_copy(pixart, tmp_path / "unet", unet), [], "UNet2DConditionModel is not supported"),
        (edited_copy(pixart, tmp_path / "cls", config_class="MyModel"), [], "MyModel is not supported"),
        (edited_copy(pixart, tmp_path / "none", {"transformer": None}), [], "has no transformer"),
        (flux, ["--nproc", "2", "--cfg-parallel"], "calls the transformer once per guidance branch"),
        (pixart, ["--nproc", "2", "--dp", "2"], "dp degree 2 exceeds the 1 prompt(s)"),
        (pixart, ["--nproc", "2", "--memory-gib", "0.0001"], "besides the transformer, a rank holds"),
        (pixart, ["--frames", "5"], "PixArtAlphaPipeline takes no num_frames argument; drop --frames"),
        (pixart, ["--nproc", "2", "--ring", "2", "--balance-tokens"], "--balance-tokens re-splits the tokens"),
        (pixart, ["--classes", "1"], "pass --classes (OpenDiT's class-conditional DiT) or --prompt"),
        (pixart, ["--scheduler", "ddim"], "runs its own (DPMSolverMultistepScheduler): drop --scheduler"),
        (pixart, ["--model", "DiT-T/2"], "drop --model"),
    ]
    for folder, extra, message in cases:
        code, stdout, err = sample(capsys, folder, tmp_path / "out", ["a cat"], *extra)
        assert code == 2 and message in err and not stdout, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_prompts_and_classes_belong_to_their_paths(folders, tmp_path, capsys):
    pixart = ["--diffusers", str(folders["pixart"])]
    cases = [
        (["--prompt", "a cat"], "--prompt needs --diffusers DIR"),
        (["--negative-prompt", "blurry"], "--negative-prompt needs --diffusers DIR"),
        ([*pixart, "--classes", "1"], "--classes is for OpenDiT's class-conditional DiT models"),
        (pixart, "prompt (--prompt) is required with --diffusers"),
    ]
    for argv, message in cases:
        code = main(["sample", *argv, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_inspect_reads_the_folder_without_weights(folders):
    info = inspect_pipeline(folders["flux"])
    assert info["pipeline_class"] == "FluxPipeline" and info["transformer_class"] == "FluxTransformer2DModel"
    assert info["num_heads"] == 2 and info["cfg_batched"] is False and info["weight_bytes"] > 0
    assert "negative_prompt" in info["call"] and info["call"]["num_inference_steps"] == 28
    dit = {"pipeline_class": "DiTPipeline", "id2label": {"0": "tabby, tabby cat", "1": "dog"}}
    assert label_ids(dit, ["tabby cat", "dog", "tabby"]) == [0, 1, 0]
    with pytest.raises(opendit.OpenDiTError, match="'cow' is not a class label"):
        label_ids(dit, ["cow"])


def test_default_plans_for_nproc(folders):
    """No degrees: every rank on one sequence dimension (ulysses when the heads divide), said in a note."""
    spec = resolve_engine(GenerationRequest(diffusers=str(folders["pixart"]), nproc=2))
    assert spec.plan.ulysses == 2 and "plan chosen automatically: ulysses=2" in spec.plan_notes[0]
    spec = resolve_engine(GenerationRequest(diffusers=str(folders["flux"]), nproc=3))
    assert spec.plan.ring == 3 and "does not divide 2 heads" in spec.plan_notes[0]
    # --parallel auto: the planner on the transformer's cost view; Flux's pipeline calls it once per branch: no cfg
    spec = resolve_engine(GenerationRequest(diffusers=str(folders["flux"]), nproc=2, parallel_auto=True))
    assert spec.plan.world_size == 2 and spec.plan.cfg == 1 and spec.plan.impl in ("ulysses", "ring", "usp")
    assert "plan chosen by the planner" in spec.plan_notes[0], spec.plan_notes


@pytest.mark.slow
def test_a_cache_on_sharded_joint_blocks_equals_one_process(tmp_path, capsys):
    """fbcache on SD3 with --shard-weights: FSDP2 makes each block a subclass of its own class, whose joint
    (text, image) outputs the cache must still find in diffusers' block registry; reuse really happens."""
    cache = ["--steps", "10", "--cache", "fbcache", "--cache-guard-steps", "1", "--cache-threshold", "0.5"]
    sd3 = save_tiny_pipeline("sd3", tmp_path / "sd3", seed=0)
    code, _, err = sample(capsys, sd3, tmp_path / "one", PROMPTS, *cache)
    assert code == 0, err
    code, _, err = sample(capsys, sd3, tmp_path / "two", PROMPTS, "--nproc", "2", "--ulysses", "2",
                          "--shard-weights", *cache)  # fmt: skip
    assert code == 0, err
    assert max_diff(images(tmp_path / "two"), images(tmp_path / "one")) <= 1
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["cache"]["saved"]["samples_reused"] > 0, record["cache"]["saved"]


@pytest.mark.parametrize(
    ("pipeline", "branch"),
    [("DiTPipeline", True), ("PixArtAlphaPipeline", True), ("QwenImagePipeline", True), ("Flux2Pipeline", False)],
)
def test_cfg_parallel_finds_the_guidance_branch_in_the_pipeline_call(pipeline, branch):
    """A pipeline has an unconditional branch to split when its call takes a negative prompt or class labels (the
    null class: DiTPipeline, whose --cfg-parallel was once refused as guidance-distilled); FLUX.2 takes neither."""
    from opendit.api.pipeline_calls import check_guidance_batch
    from opendit.api.pipelines import _call_parameters
    from opendit.distributed.config import ParallelConfig

    info = {"call": _call_parameters(pipeline, "folder"), "pipeline_class": pipeline}
    if branch:
        check_guidance_batch(ParallelConfig(cfg=2), info)
    else:
        with pytest.raises(opendit.OpenDiTError, match=f"{pipeline} takes no negative prompt: it is guidance"):
            check_guidance_batch(ParallelConfig(cfg=2), info)
