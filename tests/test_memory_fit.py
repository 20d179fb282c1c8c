"""--memory-gib (issue 13): the plan must fit a per-rank budget of whole-run memory. Without degrees the planner takes
the fastest plan that fits (sharded weights included); nothing fitting fails before any process starts, saying how
many ranks or which dtype would fit; a job that fits runs, and its measured per-rank peak is within the budget."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from opendit.api.generation import GenerationRequest, prepare
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.observe.memory import rss_bytes

GIB = 1 << 30


def xl(**kw) -> GenerationRequest:
    """DiT-XL/2 at 512 px, random weights (planning reads no weights), one guided-off image."""
    values = {"classes": [207], "model": "DiT-XL/2", "image_size": 512, "cfg_scale": 1.0, "steps": 1, **kw}
    return GenerationRequest(**values)


def predicted(plan: ParallelConfig, dtype_bytes: int = 4) -> float:
    from dataclasses import replace

    from opendit.models.dit import preset
    from opendit.planning.cost import predict_memory
    from opendit.planning.speeds import resolve_speeds

    config = preset("DiT-XL/2").with_image_size(512)
    speeds = replace(resolve_speeds(), dtype_bytes=dtype_bytes)
    return predict_memory(config, config.num_tokens, 1, plan, speeds, guided=False).total / GIB


def test_planner_splits_the_weights_when_only_that_fits(tmp_path):
    one = predicted(ParallelConfig())
    sharded = predicted(ParallelConfig(ulysses=4, shard_weights=True))
    assert sharded < 0.5 * one  # XL fp32: weights dominate, 1/4 of them per rank
    budget = (sharded + one) / 2  # below the one-process (and the unsharded 4-rank) peak
    job = prepare(xl(nproc=4, memory_gib=budget), out=tmp_path / "out")
    # sharded weights over 4 sequence ranks, or tensor parallelism (block weights / tp) with sequence ranks
    assert (job.plan.shard_weights and job.plan.sp_degree == 4) or job.plan.tp > 1, job.plan
    assert predicted(job.plan) <= budget
    assert any(note.startswith("memory: fastest plan within") for note in job.plan_notes), job.plan_notes
    free = prepare(xl(nproc=4, memory_gib=4 * one), out=tmp_path / "free")  # room for everything
    assert free.plan.world_size == 4


def test_a_plan_that_does_not_fit_fails_fast_with_ranks_and_dtype_advice(tmp_path):
    one = predicted(ParallelConfig())
    budget = 0.8 * one
    with pytest.raises(OpenDiTError) as info:  # one process: says how many ranks (sharded) or bf16 would fit
        prepare(xl(memory_gib=budget), out=tmp_path / "a")
    text = str(info.value)
    assert f"more than --memory-gib {budget:g}" in text and "--dtype bf16" in text, text
    assert "--shard-weights" in text or "--tp" in text, text  # a plan that splits the weights
    with pytest.raises(OpenDiTError) as info:  # the user's own degrees, unsharded: the same advice
        prepare(xl(nproc=2, parallel=ParallelConfig(ulysses=2), memory_gib=budget), out=tmp_path / "b")
    assert "--nproc 2 --ulysses 2 needs" in str(info.value) and "fits with" in str(info.value), str(info.value)
    tiny = 0.3  # below what a process costs before any model: nothing fits at any size
    with pytest.raises(OpenDiTError) as info:
        prepare(xl(nproc=4, memory_gib=tiny), out=tmp_path / "c")
    assert "no plan for 4 ranks fits --memory-gib 0.3" in str(info.value), str(info.value)
    assert "more memory" in str(info.value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "2"])
def test_memory_gib_is_validated(tmp_path, value):
    with pytest.raises(OpenDiTError, match="--memory-gib"):
        prepare(xl(memory_gib=value), out=tmp_path / "out")


def weight_heavy_checkpoint(directory):
    """A pixel-space DiT whose weights dominate a process (hidden 768, 8 blocks: 324 MiB fp32), few tokens."""
    from opendit.io.checkpoint import save_safetensors
    from opendit.models.dit import pixel_config

    base = pixel_config("DiT-T/2", 16)
    values = {**base.to_dict(), "hidden_size": 768, "num_heads": 12, "depth": 8}
    config = type(base).from_dict(values)
    from opendit.models.dit import build_dit

    torch.manual_seed(0)
    model = build_dit(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.02)
    return str(save_safetensors(model, directory / "heavy.safetensors", {"steps": 2}))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the resident set")
def test_a_budget_below_one_process_runs_split_weights_and_stays_within_it(tmp_path):
    from opendit.cli import main
    from opendit.models.dit import DiTConfig
    from opendit.planning.cost import predict_memory
    from opendit.planning.speeds import resolve_speeds

    ckpt = weight_heavy_checkpoint(tmp_path)
    config = DiTConfig.from_dict(json.loads((tmp_path / "heavy.json").read_text())["model"])
    speeds = resolve_speeds()
    one = predict_memory(config, config.num_tokens, 2, ParallelConfig(), speeds, guided=True).total / GIB
    two = predict_memory(config, config.num_tokens, 2, ParallelConfig(ulysses=2, shard_weights=True), speeds).total
    budget = round((two / GIB + one) / 2, 3)
    out = tmp_path / "out"
    flags = ["sample", "--ckpt", ckpt, "--classes", "1", "--steps", "1", "--no-progress", "--nproc", "2"]
    assert main([*flags, "--memory-gib", str(budget), "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    chosen = record["parallel"]["config"]
    assert chosen["shard_weights"] or chosen["tp"] == 2, record["parallel"]  # FSDP-style shards, or tensor parallel
    peaks = [rank["memory"]["process_peak_bytes"] / GIB for rank in record["ranks"]]
    loads = [rank["loading"]["mode"] for rank in record["ranks"]]
    print(f"budget {budget:.3f} GiB (one process predicted {one:.3f}); measured whole-run peaks {peaks}; {loads}")
    assert loads == ["sharded", "sharded"]
    assert max(peaks) <= budget, (peaks, budget)  # the prediction the planner used holds on this machine
    assert rss_bytes() is not None
