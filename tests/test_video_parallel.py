"""The video DiT under every sequence-parallel layout vs one process: DSP (frames <-> positions switches) and the
position-split strategies (Ulysses, ring, USP, FastSeq on the spatial blocks), at worlds 2, 3 and 4, with uneven
frame and position counts and a head count the degree does not divide; DSP's bytes per forward equal its formula
and are fewer than Ulysses'.

One 4-process world (opendit's launcher) runs every plan on ranks 0..n-1, as test_parallel_equivalence.py does.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import gather_rows
from opendit.distributed.config import ParallelConfig
from opendit.distributed.launch import launch
from opendit.errors import OpenDiTError
from opendit.models.dit import perturb_weights
from opendit.models.video_dit import VideoDiTConfig, build_video_dit

# 5 frames and a 5 x 5 grid: uneven over 2, 3 and 4 ranks; 4 heads: uneven over 3
CONFIG = VideoDiTConfig(
    depth=4, hidden_size=48, num_heads=4, patch_size=2, frames=5, input_size=(10, 10), in_channels=3, num_classes=7
)
PLANS = {
    2: [
        ParallelConfig(ulysses=2, sp_impl="dsp"),
        ParallelConfig(ulysses=2, sp_impl="ulysses"),
        ParallelConfig(ring=2),
        ParallelConfig(ulysses=2, sp_impl="fastseq"),
    ],
    3: [ParallelConfig(ulysses=3, sp_impl="dsp"), ParallelConfig(ulysses=3, sp_impl="ulysses")],
    4: [
        ParallelConfig(ulysses=4, sp_impl="dsp"),
        ParallelConfig(ulysses=4, sp_impl="ulysses"),
        ParallelConfig(cfg=2, ulysses=2, sp_impl="dsp"),
        ParallelConfig(ulysses=2, ring=2),
    ],
}
BATCH = 2  # guided: [cond; uncond] of one video each


def reference_model():
    torch.manual_seed(0)  # xavier init draws from the global generator: the same weights in every process
    return perturb_weights(build_video_dit(CONFIG), std=0.05, seed=3).eval()


def inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, CONFIG.in_channels, CONFIG.frames, *CONFIG.input_size, generator=gen)  # (B, C, F, H, W)
    return x, torch.full((BATCH,), 400.0), torch.tensor([3, CONFIG.num_classes])


def video_world() -> list[dict]:

    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize
    from opendit.planning.cost import predict_step_comm

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    reference = reference_model()
    x, t, y = inputs()
    with torch.no_grad():
        ref_out = reference(x, t, y)
    rows = []
    for world, plans in PLANS.items():
        for plan in plans:
            runtime = build_runtime(plan, "cpu", ranks=list(range(world)))
            if runtime is None:
                continue
            pmodel = parallelize(copy.deepcopy(reference), runtime)
            runtime.stats.reset()
            with torch.no_grad():
                out = pmodel(x, t, y)
            err = float((out - ref_out).abs().max() / ref_out.abs().max())
            rows.append(
                {
                    "world": world,
                    "plan": plan.describe(),
                    "impl": plan.impl,
                    "rank": runtime.index,
                    "sp_rank": runtime.coords["sp"],
                    "err": err,
                    "comm": {k: dict(v) for k, v in runtime.stats.snapshot().items()},
                    "notes": pmodel.notes,
                    "predicted": predict_step_comm(
                        CONFIG, CONFIG.positions, BATCH // plan.cfg, plan, runtime.coords["sp"]
                    ),
                }
            )
    return gather_rows(rows)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return launch(video_world, 4, threads_per_proc=1)


@pytest.mark.slow  # a 4-process job (the module's `rows`)
def test_every_plan_ran_on_every_rank(rows):
    for world, plans in PLANS.items():
        for plan in plans:
            ranks = sorted(r["rank"] for r in rows if r["world"] == world and r["plan"] == plan.describe())
            assert ranks == list(range(world)), (world, plan.describe())


@pytest.mark.slow  # a 4-process job (the module's `rows`)
def test_video_output_matches_single_process(rows):
    worst = max(rows, key=lambda r: r["err"])
    assert worst["err"] <= 1e-5, worst
    assert {r["impl"] for r in rows} >= {"dsp", "ulysses", "ring", "usp", "fastseq"}


@pytest.mark.slow  # a 4-process job (the module's `rows`)
def test_dsp_bytes_equal_formula_and_are_fewer_than_ulysses(rows):
    from opendit.parallel.attention.ulysses import ulysses_bytes
    from opendit.parallel.dsp import dsp_bytes, dsp_sizes
    from opendit.parallel.sequence import split_sizes

    pairs, c = CONFIG.depth // 2, CONFIG.hidden_size
    for world in (2, 3, 4):
        frames, positions = dsp_sizes(CONFIG.frames, CONFIG.positions, world)
        pos = split_sizes(CONFIG.positions, world)
        for row in rows:
            if row["world"] != world or "cfg" in row["plan"]:
                continue
            sent = sum(v["bytes"] for k, v in row["comm"].items() if k == "all_to_all")
            r = row["sp_rank"]
            if row["impl"] == "dsp":
                assert sent == pairs * dsp_bytes(frames, positions, BATCH, c, r, 4), row
                assert row["comm"]["all_to_all"]["calls"] == 2 * pairs
            elif row["impl"] == "ulysses":
                # spatial blocks only, on B * F sequences of the positions
                expected = pairs * ulysses_bytes(pos, BATCH * CONFIG.frames, CONFIG.num_heads, c // 4, r, 4)
                assert sent == expected, row
        dsp_rows = [x for x in rows if x["world"] == world and x["impl"] == "dsp" and "cfg" not in x["plan"]]
        uly_rows = [x for x in rows if x["world"] == world and x["impl"] == "ulysses"]
        total = lambda rs: sum(sum(v["bytes"] for v in x["comm"].values()) for x in rs)  # noqa: E731
        assert dsp_rows and uly_rows and total(dsp_rows) < total(uly_rows)


@pytest.mark.slow  # a 4-process job (the module's `rows`)
def test_cost_model_predicts_the_recorded_bytes_and_calls(rows):
    for row in rows:
        recorded = {k: {"bytes": v["bytes"], "calls": v["calls"]} for k, v in row["comm"].items() if v["calls"]}
        predicted = {k: {"bytes": round(v["bytes"]), "calls": round(v["calls"])} for k, v in row["predicted"].items()}
        assert predicted == recorded, row["plan"]


def test_dsp_refuses_more_ranks_than_frames_naming_the_valid_degrees():
    from opendit.parallel.dsp import dsp_sizes

    with pytest.raises(OpenDiTError, match=r"at most 5 \(valid: 2, 3, 4, 5\).*ulysses"):
        dsp_sizes(5, 25, 6)
    plan = ParallelConfig(ulysses=6, sp_impl="dsp")
    with pytest.raises(OpenDiTError, match="dsp degree 6 exceeds the model's 5 frames"):
        plan.validate(6, CONFIG.num_heads, CONFIG.positions, 1, False, frames=CONFIG.frames)


def test_dsp_on_an_image_model_names_the_alternatives():
    from opendit.models.dit import DiT, preset
    from opendit.models.spec import spec_for
    from opendit.parallel.dsp import DSPStrategy

    model = DiT(preset("DiT-T/2"))
    with pytest.raises(OpenDiTError, match="spatial and temporal blocks.*ulysses, ring"):
        DSPStrategy().install_model(model, spec_for(model), runtime=None)


def test_planner_knows_dsp_for_video_models_only():
    from opendit.models.dit import preset as image_preset
    from opendit.planning.planner import enumerate_plans, plan
    from opendit.planning.speeds import DEFAULTS

    result = plan(CONFIG, 2, DEFAULTS["cpu-gloo"], images=1, guided=True)
    impls = {e.config.sp_impl for e in result.ranked}
    assert "dsp" in impls and "ulysses" in impls
    dsp = next(e for e in result.ranked if e.config.sp_impl == "dsp" and not e.config.shard_weights)
    uly = next(e for e in result.ranked if e.config.sp_impl == "ulysses" and not e.config.shard_weights)
    assert dsp.step.bytes_per_rank < uly.step.bytes_per_rank  # the cost model sees DSP's smaller volume
    image = image_preset("DiT-S/2")
    assert all(p.sp_impl != "dsp" for p in enumerate_plans(2, image.num_heads, image.num_tokens, 1, True))
