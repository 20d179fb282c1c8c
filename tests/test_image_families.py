"""The current image families through the family registry: Qwen-Image and FLUX.2 (diffusers' own `_cp_plan` and
`_tp_plan`, no class-specific code in OpenDiT) and Z-Image (a declared plan: one stream over [image; text], with a
key padding mask when the samples of a batch differ in length).

On tiny random pipelines saved to disk (opendit.testing.tiny_image_families):
- one process through OpenDiT (its runner: folder call defaults, call arguments) = the pipeline's own diffusers call
  with the same generator (relative error <= 1e-6 on the float output);
- 2, 3 and 4 gloo processes = one process (fp32 max relative error <= 1e-5) for every strategy the pipeline allows,
  with prompts whose text lengths differ, so that Z-Image's and Qwen-Image's attention carry a key padding mask;
- bf16 against one bf16 process, and the CLI end to end (sharded weights, a cache);
- bad input: one `error:` line before any process starts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import opendit  # noqa: E402
import opendit.distributed.launch  # noqa: E402
from opendit.cli import main  # noqa: E402
from opendit.testing.tiny_image_families import (  # noqa: E402
    IMAGE_KINDS,
    build_tiny_image_pipeline,
    qwen_template_prefix_tokens,
    save_tiny_image_pipeline,
)

# a prompt longer than 32 tokens next to short ones: Z-Image pads each caption to a multiple of 32 tokens, so its
# samples then differ in length (a key padding mask); Qwen-Image pads the text to the longest prompt (a mask too)
LONG = " ".join(["a photo of a red cat sitting in a garden at sunset"] * 4)
PROMPTS = [LONG, "a dog"]
CALL = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
EXTRA = {  # each pipeline's guidance: Qwen-Image true CFG (two calls), Z-Image batched CFG, FLUX.2 distilled
    "qwenimage": {"negative_prompt": "blurry", "true_cfg_scale": 4.0, "max_sequence_length": 64},
    "zimage": {"guidance_scale": 4.0, "max_sequence_length": 64},
    "flux2": {"guidance_scale": 4.0, "max_sequence_length": 96},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-families")
    return {kind: save_tiny_image_pipeline(kind, root / kind, seed=0) for kind in IMAGE_KINDS}


def _load(folder):
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, kind: str, prompts=PROMPTS, seed: int = 3) -> np.ndarray:
    # a fresh prompt list: ZImagePipeline writes its chat template into the caller's list
    out = pipe(prompt=list(prompts), **CALL, **EXTRA[kind], generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images, dtype=np.float64)


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------------------------------------------ the families
def test_families_come_from_the_class_plans_or_one_declaration():
    import diffusers

    from opendit.families import family_for

    for name in ("QwenImageTransformer2DModel", "Flux2Transformer2DModel"):
        family = family_for(getattr(diffusers, name))
        assert family.source == "_cp_plan" and family.cp_plan is getattr(diffusers, name)._cp_plan, name
        assert family.tensor is not None, name  # read from the class's _tp_plan
    zimage = family_for(diffusers.ZImageTransformer2DModel)
    assert zimage.source == "declared" and zimage.cfg_batched is True and zimage.heads_attr == "n_heads"
    assert getattr(diffusers.ZImageTransformer2DModel, "_cp_plan", None) is None  # why it is declared


def test_no_line_of_opendit_names_the_cp_plan_classes():
    from pathlib import Path

    names = ("QwenImageTransformer2DModel", "Flux2Transformer2DModel", "QwenImagePipeline", "Flux2Pipeline")
    for path in Path(opendit.__file__).parent.rglob("*.py"):
        if "testing" in path.parts:
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], (path, [n for n in names if n in text])


def test_tiny_pipelines_are_built_offline_with_their_own_parts(folders):
    expected = {
        "qwenimage": ("QwenImagePipeline", "Qwen2_5_VLForConditionalGeneration", "AutoencoderKLQwenImage"),
        "flux2": ("Flux2Pipeline", "Mistral3ForConditionalGeneration", "AutoencoderKLFlux2"),
        "zimage": ("ZImagePipeline", "Qwen3Model", "AutoencoderKL"),
    }
    for kind, (pipeline, encoder, vae) in expected.items():
        index = json.loads((folders[kind] / "model_index.json").read_text())
        assert (index["_class_name"], index["text_encoder"][1], index["vae"][1]) == (pipeline, encoder, vae)
        defaults = json.loads((folders[kind] / "opendit_call_defaults.json").read_text())
        assert defaults["height"] <= 64 and defaults["num_inference_steps"] <= 4
    pipe = build_tiny_image_pipeline("qwenimage")
    assert qwen_template_prefix_tokens(pipe) == pipe.prompt_template_encode_start_idx == 34
    flux2 = build_tiny_image_pipeline("flux2")
    assert flux2.text_encoder.config.text_config.num_hidden_layers >= 31  # the default out layers (10, 20, 30)


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_one_process_through_opendit_equals_diffusers_own_call(kind, folders):
    """OpenDiT's runner on the folder (its recorded small defaults filling what the call leaves unset) against the
    pipeline called as diffusers documents it, with those arguments written out."""
    from opendit.api.generation import GenerationRequest, call_request, resolve_engine
    from opendit.engine.pipeline_runner import PipelineRunner

    negative = {"negative_prompt": "blurry"} if kind == "qwenimage" else {}
    request = GenerationRequest(diffusers=str(folders[kind]), prompt=PROMPTS, steps=2, seed=3, **negative)
    spec = resolve_engine(request)
    call = spec.resolve_call(call_request(request))
    runner = PipelineRunner(spec, torch.device("cpu"))
    ran = runner.run(call, [])
    got = np.asarray(ran.result.images, dtype=np.float64)
    assert call.kwargs["prompt"] == PROMPTS  # not edited by the pipeline
    defaults = json.loads((folders[kind] / "opendit_call_defaults.json").read_text())
    own = _load(folders[kind])(
        prompt=list(PROMPTS), num_inference_steps=2, height=defaults["height"], width=defaults["width"],
        max_sequence_length=defaults["max_sequence_length"], output_type="np",
        generator=torch.Generator().manual_seed(3), **negative,
    ).images  # fmt: skip
    assert got.shape == (2, defaults["height"], defaults["width"], 3)
    assert _relative(got, np.asarray(own, dtype=np.float64)) <= 1e-6


# ------------------------------------------------------------------------------------------------ processes
PLANS = {
    "qwenimage": {2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}, {"dp": 2}, {"tp": 2},
                      {"ulysses": 2, "shard_weights": True}], 4: [{"ulysses": 2, "ring": 2}]},
    "flux2": {2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}, {"dp": 2}, {"tp": 2},
                  {"ring": 2, "shard_weights": True}], 3: [{"ring": 3}]},
    "zimage": {2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}, {"cfg": 2}, {"dp": 2},
                   {"ulysses": 2, "shard_weights": True}], 3: [{"ring": 3}], 4: [{"ulysses": 2, "ring": 2}]},
}  # fmt: skip


def _worker(rank, world, folder, kind, plans, dtype):
    from opendit.distributed.config import ParallelConfig

    reference = _load(folder).to(dtype)
    masks = []  # whether the split attention met a key padding mask (Z-Image: the unified sequence's)
    if kind == "zimage":
        reference.transformer.layers[0].register_forward_pre_hook(lambda _m, args: masks.append(args[1] is not None))
    expected = _call(reference, kind)
    results = {}
    for plan in plans:
        pipe = _load(folder).to(dtype)
        opendit.parallelize(pipe.transformer, ParallelConfig(**plan))
        got, again = _call(pipe, kind), _call(pipe, kind)
        stats = pipe.transformer._opendit_runtime.stats.snapshot()
        calls = {k: v["calls"] for k, v in stats.items() if v["calls"]}
        error = (_relative(got, expected), float(np.abs(got - expected).max()))
        results[str(plan)] = (*error, bool(np.array_equal(got, again)), calls)
    return results, any(masks)


def _check(kind, world, results, masked):
    for rank, (found, mask) in enumerate(results):
        assert len(found) == len(PLANS[kind][world]), found
        for plan, (relative, _absolute, repeatable, calls) in found.items():
            assert relative <= 1e-5, f"{kind} {plan} world {world} rank {rank}: relative error {relative:.2e}"
            assert repeatable and calls, (kind, plan, calls)
        assert mask == masked, (kind, mask)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_two_processes_equal_one(kind, folders):
    from tests.dist_utils import run_distributed

    results = run_distributed(_worker, 2, folders[kind], kind, PLANS[kind][2], torch.float32, timeout=600)
    _check(kind, 2, results, kind == "zimage")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("zimage", 3), ("flux2", 3), ("zimage", 4), ("qwenimage", 4)])
def test_three_and_four_processes_with_uneven_tokens(kind, world, folders):
    """Uneven: Z-Image's 64 + 64 / 96 + 32 tokens, FLUX.2's 96 text + 64 image tokens, over 3 ranks; USP 2 x 2."""
    from tests.dist_utils import run_distributed

    results = run_distributed(_worker, world, folders[kind], kind, PLANS[kind][world], torch.float32, timeout=600)
    _check(kind, world, results, kind == "zimage")


BF16_PLANS = {"qwenimage": [{"ulysses": 2}], "flux2": [{"ring": 2}], "zimage": [{"ring": 2}]}  # ring: the fp32 merge


@pytest.mark.slow
def test_bf16_equals_one_bf16_process(folders):
    """bf16: a strategy against one bf16 process; rounding order differs, so within 8/255 per pixel."""
    from tests.dist_utils import run_distributed

    for kind, plans in BF16_PLANS.items():
        for found, _mask in run_distributed(_worker, 2, folders[kind], kind, plans, torch.bfloat16, timeout=600):
            for plan, (_relative_error, absolute, _repeatable, _calls) in found.items():
                print(f"bf16 {kind} {plan}: max abs error {absolute:.4f} of 1")  # shown with pytest -s
                assert absolute <= 8 / 255, (kind, plan, absolute)


# ------------------------------------------------------------------------------------------------ the CLI
def _sample(capsys, folder, out, *extra) -> tuple[int, str, str]:
    argv = ["sample", "--diffusers", str(folder), "--seed", "3", "--out", str(out), "--no-progress"]
    code = main([*argv, "--prompt", LONG, "--prompt", "a dog", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _pngs(out) -> np.ndarray:
    from PIL import Image

    files = sorted(out.glob("[0-9][0-9][0-9]_prompt-*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])


CACHED = ["--cache", "fbcache", "--steps", "6", "--cache-guard-steps", "1", "--cache-threshold", "0.5"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "flags"),
    [
        ("zimage", ["--ulysses", "2", "--shard-weights", *CACHED]),  # the cache on the sharded unified chain
        ("qwenimage", ["--ring", "2", "--shard-weights", *CACHED]),
        ("flux2", ["--ulysses", "2", *CACHED]),  # the span: its joint blocks (the single-stream ones always run)
    ],
)
def test_the_cli_on_two_processes_equals_one(kind, flags, folders, tmp_path, capsys):
    """`opendit sample --diffusers DIR` with the folder's own small defaults, on 2 processes vs 1."""
    cache = flags[flags.index("--cache") :] if "--cache" in flags else []
    code, _, err = _sample(capsys, folders[kind], tmp_path / "one", *cache)
    assert code == 0, err
    code, _, err = _sample(capsys, folders[kind], tmp_path / "two", "--nproc", "2", *flags)
    assert code == 0, err
    assert np.abs(_pngs(tmp_path / "two") - _pngs(tmp_path / "one")).max() <= 1
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["parallel"]["world_size"] == 2 and record["resolved"]["image_size"] == [32, 32]


def test_bad_input_is_one_error_line_before_any_process_starts(folders, tmp_path, capsys, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for a request that is refused")

    monkeypatch.setattr(opendit.distributed.launch.WorkerPool, "__init__", no_pool)
    cases = [
        ("flux2", ["--negative-prompt", "blurry"], "takes no negative_prompt argument; drop --negative-prompt"),
        ("zimage", ["--image-size", "30"], "needs sides that are multiples of 4"),
        ("qwenimage", ["--image-size", "36"], "needs sides that are multiples of 8"),
        ("flux2", ["--nproc", "2", "--cfg-parallel", "--cfg-scale", "4"], "it is guidance-distilled"),
        ("qwenimage", ["--nproc", "2", "--cfg-parallel", "--cfg-scale", "4"], "once per guidance branch"),
        ("zimage", ["--nproc", "2", "--tp", "2"], "declares no tensor split yet"),
        ("zimage", ["--nproc", "3", "--ulysses", "3"], "ulysses degree 3 exceeds ZImageTransformer2DModel's 2"),
        ("zimage", ["--frames", "5"], "takes no num_frames argument"),
    ]
    for kind, extra, message in cases:
        code, stdout, err = _sample(capsys, folders[kind], tmp_path / "out", *extra)
        assert code == 2 and message in err and not stdout, (kind, extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_key_padding_mask_travels_with_k_through_every_kernel():
    """families/attention.py's key bias: attention on the widened q, k, v, cut back, is the masked attention, also
    where a row's every key in one block is masked (a ring step), with no NaN."""
    import torch.nn.functional as F

    from opendit.families.attention import with_key_bias
    from opendit.parallel.attention.ring import attention_with_lse, merge_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 5:] = False  # sample 0: its last 4 keys are padding
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    wq, wk, wv = with_key_bias(q, k, v, mask)
    out = F.scaled_dot_product_attention(wq.transpose(1, 2), wk.transpose(1, 2), wv.transpose(1, 2))[..., :16]
    assert (out - expected).abs().max() <= 1e-6
    for blocks in ((slice(0, 5), slice(5, 9)), (slice(5, 9), slice(0, 5))):  # ring blocks, either one first
        merged = lse = None  # keys 5-8 are all masked for sample 0
        for block in blocks:
            parts = (t.transpose(1, 2) for t in (wq, wk[:, block], wv[:, block]))
            merged, lse = merge_attention(merged, lse, *attention_with_lse(*parts))
        assert torch.isfinite(merged).all() and (merged[..., :16] - expected).abs().max() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwenimage", "flux2"])
def test_serve_on_the_folder_equals_the_cli(kind, folders, tmp_path, capsys):
    """`opendit serve --diffusers DIR --nproc 2 --ulysses 2`: /v1/generate's image = `opendit sample`'s for the same
    prompt and seed (the server's loop is bounded: one request)."""
    from tests.serve_utils import decode_png, running_server

    code, _, err = _sample(capsys, folders[kind], tmp_path / "cli")
    assert code == 0, err
    cli = _pngs(tmp_path / "cli")
    with running_server("--diffusers", str(folders[kind]), "--nproc", "2", "--ulysses", "2") as server:
        response = server.client.post("/v1/generate", json={"prompt": [LONG, "a dog"], "seed": 3})
        assert response.status_code == 200, response.text[:300]
        images = np.stack([decode_png(b64) for b64 in response.json()["images"]]).astype(np.int16)
    assert images.shape == cli.shape and np.abs(images - cli).max() <= 1
