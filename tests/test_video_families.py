"""The video families users run today through the family registry: Wan 2.2 (two experts switched at boundary_ratio),
LTX-Video (its own `_cp_plan`), CogVideoX and Latte (declared in families/declared.py), as tiny random pipelines
(opendit.testing.tiny_video_families) saved to folders.

- one process through OpenDiT (the folder, its call defaults, the pipeline's own call) = diffusers' own call of the
  same folder with the same generator (<= 1e-6 relative);
- 2, 3 and 4 gloo processes (3 heads, token and text counts no world divides at 3) = one process, fp32 max relative
  error <= 1e-5: Ulysses, ring, FastSeq, USP, cfg-parallel where the pipeline batches its guidance, dp, shard-weights
  (Wan 2.2: both experts run, each parallelised, the idle one stays sharded); bf16 within bf16 rounding;
- what a family cannot take is refused before any process starts, with the method's reason, in one error line.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.dist_utils import run_distributed  # noqa: E402

import opendit  # noqa: E402
import opendit.distributed.launch  # noqa: E402
from opendit.cli import main  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline, tiny_call_kwargs  # noqa: E402
from opendit.testing.tiny_video_families import CALL_DEFAULTS, VIDEO_KINDS  # noqa: E402

KINDS = tuple(VIDEO_KINDS)
NO_GUIDANCE_ARGUMENT = ("hunyuan15",)  # its guider holds the guidance scale; its __call__ takes none
NO_STEP_CALLBACK = ("hunyuan15",)
PROMPT = "a photo of a red cat sitting in a garden"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in KINDS}


def relative(got, expected) -> float:
    got, expected = (
        x.double() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x)).double() for x in (got, expected)
    )
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return ((got - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("kind", KINDS)
def test_one_process_equals_diffusers_own_call(kind, folders):
    """OpenDiT's runner on the folder (its call defaults: a few frames, small size) = the pipeline called as
    diffusers documents it with the same arguments and generator."""
    from diffusers import DiffusionPipeline

    from opendit.api.generation import GenerationRequest, call_request, resolve_engine
    from opendit.engine.pipeline_runner import PipelineRunner

    guidance = {} if kind in NO_GUIDANCE_ARGUMENT else {"cfg_scale": 4.0}
    request = GenerationRequest(diffusers=str(folders[kind]), prompt=[PROMPT], steps=2, seed=3, progress=False,
                                **guidance)  # fmt: skip
    spec = resolve_engine(request)
    call = spec.resolve_call(call_request(request))
    for name, value in CALL_DEFAULTS[kind].items():  # the folder's defaults reach the call
        assert call.kwargs[name] == (2 if name == "num_inference_steps" else value), (name, call.kwargs)
    ran = PipelineRunner(spec, torch.device("cpu")).run(call, [])
    assert len(ran.step_times) == (0 if kind in NO_STEP_CALLBACK else 2)  # the pipeline's step callback

    pipe = DiffusionPipeline.from_pretrained(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    defaults = {**CALL_DEFAULTS[kind], "num_inference_steps": 2}
    extra = {"clean_caption": False} if kind == "latte" else {}
    extra.update({} if kind in NO_GUIDANCE_ARGUMENT else {"guidance_scale": 4.0})
    own = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(3), **defaults, **extra).frames
    assert relative(ran.result.frames, own) <= 1e-6


def sample(capsys, folder, out, *extra) -> tuple[int, str, str]:
    argv = ["sample", "--diffusers", str(folder), "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--out", str(out),
            "--no-progress", *extra]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_frames_reach_the_pipelines_own_parameter(folders, tmp_path, capsys):
    """--frames is the pipeline's frame count: num_frames, or Latte's video_length; the record shows it."""
    code, _, err = sample(capsys, folders["wan22"], tmp_path / "wan", "--frames", "9", "--image-size", "32")
    assert code == 0, err
    record = json.loads((tmp_path / "wan" / "record.json").read_text())
    assert record["pipeline"]["call"]["num_frames"] == 9 and record["resolved"]["frames"] == 9
    assert record["resolved"]["image_size"] == [32, 32]
    assert record["pipeline"]["denoisers"] == ["transformer", "transformer_2"]
    code, _, err = sample(capsys, folders["latte"], tmp_path / "latte", "--frames", "4")
    assert code == 0, err
    record = json.loads((tmp_path / "latte" / "record.json").read_text())
    assert record["pipeline"]["call"]["video_length"] == 4 and record["resolved"]["frames"] == 4


# ------------------------------------------------------------------------------------------------ processes
# (frames per kind: LTX and CogVideoX at 5 frames = 2 latent frames x 16 tokens; Latte 64 tokens a frame; Wan 2.2
# 2 latent frames x 16 tokens; text 16 tokens: 3 ranks divide none of them)
SIZES = {"num_heads": 3}
FRAMES = {"ltx": 5, "cogvideox": 5}  # HunyuanVideo-1.5: 2 latent frames x 16 tokens, 1985 text tokens (padded)
CFG_BATCHED = ("ltx", "cogvideox", "latte")  # Wan calls the transformer once per guidance branch
PLANS = {
    2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}, {"cfg": 2}, {"dp": 2},
        {"ulysses": 2, "shard_weights": True}, {"ring": 2, "shard_weights": True}],
    3: [{"ulysses": 3}, {"ring": 3}],
    4: [{"ulysses": 2, "ring": 2}, {"cfg": 2, "ring": 2}],
}  # fmt: skip


def _pipeline(kind, dtype):
    from opendit.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind, seed=0, **SIZES).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, kind, prompts):
    sizes = {"num_frames": FRAMES[kind]} if kind in FRAMES else {}
    kwargs = {**tiny_call_kwargs(kind, **SIZES, **sizes), "prompt": prompts, "output_type": "latent"}
    kwargs.pop("negative_prompt")
    if kind == "wan22":
        kwargs["num_inference_steps"] = 3  # the boundary falls after step 1: both experts run
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def parallel_kinds() -> tuple[str, ...]:
    """HunyuanVideo-1.5 pads its text inside joint attention: split, that needs key padding masks carried by the
    sequence kernels (families/attention.py's `with_key_bias`, from the image families' work); until then its split
    attention refuses the mask with that reason."""
    from opendit.families import attention

    return KINDS if hasattr(attention, "with_key_bias") else tuple(k for k in KINDS if k != "hunyuan15")


def _video_worker(rank, world, dtype_name, plans):
    from opendit.distributed.config import ParallelConfig
    from opendit.parallel.sharding import parameter_bytes, sharded_parameter_bytes

    dtype = getattr(torch, dtype_name)
    results = {}
    for kind in parallel_kinds():
        reference = _pipeline(kind, dtype)
        for plan in plans:
            if plan.get("cfg", 1) > 1 and kind not in CFG_BATCHED:
                continue
            prompts = [PROMPT, "a dog"] if plan.get("dp", 1) > 1 else [PROMPT]
            expected = _call(reference, kind, prompts)
            pipe = copy.deepcopy(reference)
            runtime, experts = None, {}
            for name in ("transformer", "transformer_2"):
                module = getattr(pipe, name, None)
                if module is None:
                    continue
                opendit.parallelize(module, ParallelConfig(**plan), runtime=runtime)
                runtime = module._opendit_runtime
                experts[name] = [0]
                module.register_forward_hook(lambda _m, _a, _o, n=experts[name]: n.__setitem__(0, n[0] + 1))
            got = _call(pipe, kind, prompts)
            calls = {k: v["calls"] for k, v in runtime.stats.snapshot().items() if v["calls"]}
            sharded = {name: sharded_parameter_bytes(getattr(pipe, name)) < parameter_bytes(getattr(pipe, name))
                       for name in experts}  # fmt: skip
            results[(kind, str(plan))] = (relative(got, expected), calls, {n: c[0] for n, c in experts.items()},
                                          sharded)  # fmt: skip
    return results


def _check(results, world, rank, bound):
    for (kind, plan), (error, calls, experts, sharded) in results.items():
        print(f"world {world} rank {rank} {kind} {plan}: max relative error {error:.1e}")  # shown with pytest -s
        assert error <= bound, f"{kind} {plan} rank {rank}: relative error {error:.2e}"
        if "ulysses" in plan:
            assert calls.get("all_to_all", 0) > 0, (kind, plan, calls)
        elif "ring" in plan:
            assert calls.get("p2p", 0) > 0, (kind, plan, calls)
        if kind == "wan22":  # both experts ran, each parallelised the same way
            assert experts["transformer"] > 0 and experts["transformer_2"] > 0, experts
        if "shard_weights" in plan:  # after the call, both experts (the idle one too) hold only their shards
            assert all(sharded.values()), (kind, sharded)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_processes_equal_one_process(world):
    for rank, results in enumerate(run_distributed(_video_worker, world, "float32", PLANS[world], timeout=900)):
        expected = sum(1 for kind in parallel_kinds() for plan in PLANS[world]
                       if plan.get("cfg", 1) == 1 or kind in CFG_BATCHED)  # fmt: skip
        assert len(results) == expected
        _check(results, world, rank, 1e-5)


@pytest.mark.slow
def test_bf16_processes_equal_one_bf16_process():
    """bf16: the split reorders sums (ring's online softmax, the gathers), so within bf16 rounding of the output."""
    plans = [{"ulysses": 2}, {"ring": 2}]
    for rank, results in enumerate(run_distributed(_video_worker, 2, "bfloat16", plans, timeout=900)):
        _check(results, 2, rank, 3e-2)


def frames_of(out) -> np.ndarray:
    from PIL import Image

    files = sorted(f for f in out.rglob("*.png") if f.name != "samples.png")
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=int) for f in files])


def cache_saved(out) -> dict:
    """{denoiser: the record's cache savings} (one cache per expert where a pipeline has two)."""
    cache = json.loads((out / "record.json").read_text())["cache"]
    if "per_denoiser" not in cache:
        return {"transformer": cache["saved"]}
    return {name: entry["saved"] for name, entry in cache["per_denoiser"].items()}


@pytest.mark.slow
def test_a_cache_on_sharded_experts_equals_one_process(folders, tmp_path, capsys):
    """fbcache through `opendit sample` on Wan 2.2 with --shard-weights: both experts cached and sharded."""
    cache = ["--steps", "8", "--cache", "fbcache", "--cache-guard-steps", "1", "--cache-threshold", "0.5"]
    code, _, err = sample(capsys, folders["wan22"], tmp_path / "one", *cache)
    assert code == 0, err
    code, _, err = sample(capsys, folders["wan22"], tmp_path / "two", "--nproc", "2", "--ulysses", "2",
                          "--shard-weights", *cache)  # fmt: skip
    assert code == 0, err
    assert np.abs(frames_of(tmp_path / "one") - frames_of(tmp_path / "two")).max() <= 1
    saved = cache_saved(tmp_path / "two")  # one cache per expert, each reusing within its own steps
    assert set(saved) == {"transformer", "transformer_2"}
    assert all(entry["samples_reused"] > 0 for entry in saved.values()), saved


@pytest.mark.slow
def test_pab_on_spatial_and_temporal_attention_equals_one_process(folders, tmp_path, capsys):
    """PAB on Latte (spatial blocks split, temporal blocks local) on 2 processes = 1 process with PAB; it reuses."""
    pab = ["--steps", "6", "--cache", "pab"]
    code, _, err = sample(capsys, folders["latte"], tmp_path / "one", *pab)
    assert code == 0, err
    code, _, err = sample(capsys, folders["latte"], tmp_path / "two", "--nproc", "2", "--ulysses", "2", *pab)
    assert code == 0, err
    assert np.abs(frames_of(tmp_path / "one") - frames_of(tmp_path / "two")).max() <= 1
    assert cache_saved(tmp_path / "two")["transformer"]["attention_reused"] > 0


def test_a_vae_that_cannot_decode_a_batch_decodes_each_video(folders, tmp_path, capsys):
    """HunyuanVideo-1.5's VAE fails on a batch of 2 in diffusers 0.42.1 (its causal mask broadcasts over the batch
    twice); two prompts still give two videos, each decoded alone (found by a meta-device probe, recorded)."""
    code, _, err = sample(capsys, folders["hunyuan15"], tmp_path / "two", "--prompt", "a dog")
    assert code == 0, err
    assert frames_of(tmp_path / "two").shape[0] == 2  # frame 0 of each video as a PNG
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["loading"]["vae_decodes_per_sample"] is True


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_error_line_before_any_process_starts(folders, tmp_path, capsys, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for a request that is refused")

    monkeypatch.setattr(opendit.distributed.launch.WorkerPool, "__init__", no_pool)
    cases = [
        ("wan22", ["--frames", "6"], "VAE compresses time by 4"),
        ("ltx", ["--frames", "8"], "takes 4k + 1 frames: use --frames 5 or 9"),
        ("cogvideox", ["--frames", "10"], "use --frames 9 or 13"),
        # 4k + 1 but an even latent count: its VAE decodes 2 latent frames into 8 (read on the meta device)
        ("cogvideox", ["--frames", "13"], "decodes its 4 latent frames into 16 frames, not 13: use --frames 9 or 17"),
        ("latte", ["--frames", "5"], "temporal position table of 4 frames"),
        ("wan22", ["--image-size", "40"], "multiple of 16: use --image-size 32"),
        ("ltx", ["--image-size", "48"], "refuses the call: `height` and `width` have to be divisible by 32"),
        ("latte", ["--image-size", "30"], "multiple of 4"),
        ("wan22", ["--nproc", "2", "--cfg-parallel"], "calls the transformer once per guidance branch"),
        ("ltx", ["--nproc", "2", "--tp", "2"], "declares no tensor split yet: use --ulysses / --ring"),
        ("latte", ["--nproc", "2", "--pipefusion", "2"], "PipeFusion splits OpenDiT's DiT blocks"),
        ("cogvideox", ["--nproc", "2", "--ulysses", "2", "--sp-impl", "dsp"], "use --sp-impl ulysses, ring or usp"),
        ("cogvideox", ["--nproc", "2", "--ulysses", "4"], "exceeds CogVideoXTransformer3DModel's 2 attention heads"),
        ("latte", ["--nproc", "2", "--dp", "2"], "dp degree 2 exceeds the 1 prompt(s)"),
        ("hunyuan15", ["--cfg-scale", "5"], "HunyuanVideo15Pipeline takes no guidance_scale argument"),
        ("hunyuan15", ["--nproc", "2", "--cfg-parallel"], "call the transformer once per branch"),
        ("hunyuan15", ["--cache", "fbcache"], "takes no step callback, so a cache cannot follow its steps"),
        ("hunyuan15", ["--frames", "7"], "use --frames 5 or 9"),
    ]
    for kind, extra, message in cases:
        code, stdout, err = sample(capsys, folders[kind], tmp_path / "out", *extra)
        assert code == 2 and message in err and not stdout, (kind, extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_the_declared_families_and_the_class_plan():
    """LTX and Wan run from their classes' own `_cp_plan`; CogVideoX and Latte from a declaration (no class plan)."""
    import diffusers

    from opendit.families import family_for

    for name in ("WanTransformer3DModel", "LTXVideoTransformer3DModel"):
        family = family_for(getattr(diffusers, name))
        assert family.source == "_cp_plan" and family.cp_plan is getattr(diffusers, name)._cp_plan
    for name in ("CogVideoXTransformer3DModel", "LatteTransformer3DModel", "HunyuanVideo15Transformer3DModel"):
        assert getattr(getattr(diffusers, name), "_cp_plan", None) is None
        assert family_for(getattr(diffusers, name)).source == "declared"
