"""Every parallel strategy at world sizes 2, 3 and 4 gives the single-process output (fp32, gloo on CPU).

One 4-process world (started by opendit's own launcher) checks every plan: a plan for n ranks runs on a runtime built
over ranks 0..n-1 (the kernels below the runtime only see their groups, never the world). Two models:
- "T16": DiT-T/2 on 16x16x1 pixels (64 tokens, 4 heads), flow matching + Euler, guidance 4;
- "T32": DiT-T/2 on 32x32x3 pixels (256 tokens), learned sigma + DDPM (fresh noise per step from per-image seeds).
At 3 ranks neither 64 nor 256 tokens divide by 3 and Ulysses-3 splits 4 heads 2, 1, 1. Weights are random and
non-zero everywhere (adaLN-Zero would otherwise make the output exactly zero and every comparison trivial).

The CLI tests run the real `opendit sample` with --nproc 2/4 against --nproc 1 and check record.json's bytes per step
against the kernels' analytic formulas.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers import (
    EQUIVALENCE_MODELS,
    equivalence_config,
    equivalence_reference,
    gather_rows,
    hybrid_bytes,
    random_model,
    rel_err,
)
from opendit.distributed.config import ParallelConfig
from opendit.distributed.launch import launch

pytestmark = pytest.mark.slow

STEPS = 3
NUM_IMAGES = 4  # helpers.equivalence_reference's batch
P = ParallelConfig
# Every registered sequence-parallel strategy at every world size it runs on: ulysses-overlap is the default on a
# ulysses degree, the plain one is asked for by name.
PLANS = {
    2: [P(cfg=2), P(dp=2), P(ulysses=2), P(ulysses=2, sp_impl="ulysses"), P(ring=2), P(ulysses=2, sp_impl="fastseq")],
    3: [P(dp=3), P(ulysses=3), P(ulysses=3, sp_impl="ulysses"), P(ring=3), P(ulysses=3, sp_impl="fastseq")],
    4: [
        P(ulysses=2, ring=2),
        P(ulysses=4),
        P(ulysses=4, sp_impl="ulysses"),
        P(ring=4),
        P(ulysses=4, sp_impl="fastseq"),
        P(cfg=2, ulysses=2),
        P(cfg=2, ring=2),
        P(dp=2, ulysses=2),
        P(dp=2, cfg=2),
    ],
}
# Not exact by design (activations cross the wire in bf16): checked for closeness and for halved kernel bytes only.
BF16_PLANS = {2: [P(ulysses=2, comm_dtype="bf16"), P(ring=2, comm_dtype="bf16")]}


def expected_step_bytes(plan: ParallelConfig, config, coords: dict, sizes: list[int] | None, group_images: int) -> int:
    """Analytic bytes this rank sends per denoising step (CommStats convention), from the kernels' formulas."""
    from opendit.parallel.attention.fastseq import fastseq_bytes
    from opendit.parallel.attention.ring import ring_bytes
    from opendit.parallel.attention.ulysses import ulysses_bytes

    wire = 2 if plan.comm_dtype else 4  # kernel activations in bf16; outputs (cfg and token gathers) always fp32
    batch = 2 * group_images // plan.cfg  # the guided batch [cond; uncond] of this dp group, halved by cfg
    heads, dh = config.num_heads, config.hidden_size // config.num_heads
    out_pixels = config.out_channels * config.input_size[0] * config.input_size[1]  # per image, fp32
    total = 0
    if plan.cfg == 2:  # cfg all-gather of the model output: my half goes to the other cfg rank
        total += batch * out_pixels * 4
    if sizes is not None:
        r, p = coords["sp"], plan.sp_degree
        per_layer = {
            "ulysses": lambda: ulysses_bytes(sizes, batch, heads, dh, rank=r, itemsize=wire),
            "ulysses-overlap": lambda: ulysses_bytes(sizes, batch, heads, dh, rank=r, itemsize=wire),
            "ring": lambda: ring_bytes(sizes, batch, heads, dh, rank=r, itemsize=wire),
            "usp": lambda: hybrid_bytes(sizes, plan.ulysses, plan.ring, batch, heads, dh, rank=r, itemsize=wire),
            "fastseq": lambda: fastseq_bytes(sizes, batch, heads, dh, rank=r, itemsize=wire),
        }[plan.impl]()
        per_token_out = config.patch_size**2 * config.out_channels
        total += config.depth * per_layer + sizes[r] * batch * per_token_out * 4 * (p - 1)  # + token gather
    return total


def equivalence_world() -> list[dict]:
    """Runs in each of 4 workers: every (model, plan) on ranks 0..n-1; returns every rank's measurements."""
    from opendit.api.generation import decode
    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import image_split, sample_images
    from opendit.parallel.apply import parallelize
    from opendit.planning.cost import predict_step_comm

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    rows = []
    for name in EQUIVALENCE_MODELS:
        case = equivalence_reference(name, STEPS)  # NUM_IMAGES images, [cond; uncond]
        config = case.config
        for world, plan in [(w, p) for table in (PLANS, BF16_PLANS) for w, ps in table.items() for p in ps]:
            runtime = build_runtime(plan, "cpu", ranks=list(range(world)))  # collective over all 4 processes
            if runtime is None:
                continue
            pmodel = parallelize(copy.deepcopy(case.reference), runtime)
            with torch.no_grad():
                out = pmodel(case.x, case.t, case.y)  # (2B, C_out, H, W)
            runtime.stats.reset()
            samples = sample_images(pmodel, case.labels, case.shape, **case.kwargs).samples
            img = decode(samples, config, None, torch.device("cpu"))
            group_sizes, _ = image_split(NUM_IMAGES, runtime)
            rows.append(
                {
                    "model": name,
                    "world": world,
                    "plan": plan.describe(),
                    "exact": plan.comm_dtype is None,
                    "rank": runtime.index,
                    "out_err": rel_err(out, case.ref_out),
                    "ref_max": float(case.ref_out.abs().max()),
                    "img_diff": int(np.abs(img.astype(int) - case.ref_img.astype(int)).max()),
                    "img_std": float(case.ref_img.std()),
                    "notes": pmodel.notes,
                    "token_sizes": pmodel.token_sizes,
                    "step_bytes": [sum(k["bytes"] for k in step.values()) for step in runtime.stats.history],
                    "step_comm": [
                        {kind: {"bytes": c["bytes"], "calls": c["calls"]} for kind, c in step.items()}
                        for step in runtime.stats.history
                    ],
                    "predicted_comm": predict_step_comm(
                        config,
                        config.num_tokens,
                        2 * group_sizes[runtime.coords["dp"]] // plan.cfg,
                        plan,
                        runtime.coords["sp"],
                    ),
                    "expected_bytes": expected_step_bytes(
                        plan, config, runtime.coords, pmodel.token_sizes, group_sizes[runtime.coords["dp"]]
                    ),
                }
            )
    return gather_rows(rows)


@pytest.fixture(scope="module")
def world_rows() -> list[dict]:
    return launch(equivalence_world, 4, threads_per_proc=1)


def test_every_plan_ran_on_every_rank(world_rows):
    ran = {(r["model"], r["world"], r["plan"], r["rank"]) for r in world_rows}
    tables = (PLANS, BF16_PLANS)
    expected = {
        (m, w, p.describe(), k)
        for m in EQUIVALENCE_MODELS
        for t in tables
        for w, ps in t.items()
        for p in ps
        for k in range(w)
    }
    assert ran == expected


@pytest.mark.parametrize("model", list(EQUIVALENCE_MODELS))
def test_model_output_matches_single_process(world_rows, model):
    rows = [r for r in world_rows if r["model"] == model and r["exact"]]
    assert min(r["ref_max"] for r in rows) > 0.5  # a non-trivial output (adaLN-Zero would give exactly 0)
    worst = max(rows, key=lambda r: r["out_err"])
    assert worst["out_err"] <= 1e-5, worst


@pytest.mark.parametrize("model", list(EQUIVALENCE_MODELS))
def test_images_match_single_process(world_rows, model):
    rows = [r for r in world_rows if r["model"] == model and r["exact"]]
    assert min(r["img_std"] for r in rows) > 10  # images with content, not a flat field
    worst = max(rows, key=lambda r: r["img_diff"])
    assert worst["img_diff"] <= 1, worst  # <= 1/255 on 8-bit images


def test_bf16_comm_is_close_not_exact(world_rows):
    rows = [r for r in world_rows if not r["exact"]]
    assert len(rows) == 2 * 2 * 2  # 2 models x 2 plans x 2 ranks
    assert all(1e-6 < r["out_err"] < 2e-2 for r in rows), [(r["plan"], r["out_err"]) for r in rows]


def test_uneven_tokens_and_heads_at_three_ranks(world_rows):
    rows = {(r["model"], r["plan"]): r for r in world_rows if r["world"] == 3 and r["rank"] == 0}
    assert rows[("T16", "ulysses=3 (sequence parallel: ulysses-overlap)")]["token_sizes"] == [22, 21, 21]
    assert rows[("T32", "ring=3 (sequence parallel: ring)")]["token_sizes"] == [86, 85, 85]
    notes = " ".join(rows[("T16", "ulysses=3 (sequence parallel: ulysses)")]["notes"])
    assert "does not divide 4 heads" in notes and "2, 1, 1" in notes


def test_recorded_bytes_per_step_equal_analytic_volume(world_rows):
    for row in world_rows:
        assert len(row["step_bytes"]) == STEPS, row
        assert row["step_bytes"] == [row["expected_bytes"]] * STEPS, row
    ulysses = [r for r in world_rows if r["plan"].startswith("ulysses=3 (") and r["model"] == "T32"]
    assert [r["expected_bytes"] for r in sorted(ulysses, key=lambda r: r["rank"])][0] > 0


def test_cost_model_predicts_the_recorded_calls_and_bytes_of_every_strategy(world_rows):
    """The cost model's per-kind calls and bytes (from each registered strategy's declaration) equal what every
    rank recorded in every step, for every strategy at every world size above."""
    from opendit.parallel.registry import get_strategy, strategies

    # Strategies laid out over frames (DSP) need a video model; tests/test_video_parallel.py checks them the same way.
    token_strategies = {name for name in strategies() if get_strategy(name).layout == "tokens"}
    assert token_strategies, "no token-layout strategy is registered"
    seen = {r["plan"].split("sequence parallel: ")[-1].rstrip(")") for r in world_rows if "sequence" in r["plan"]}
    assert token_strategies <= seen, f"strategies never run here: {token_strategies - seen}"
    for row in world_rows:
        for step in row["step_comm"]:
            assert step == row["predicted_comm"], (row["plan"], row["world"], row["rank"])


# ------------------------------------------------------------------------------------------------ the real CLI
@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    """The shipped digits model if it is installed, else a random non-zero checkpoint of the same kind."""
    from opendit.api.generation import DEFAULT_CKPT
    from opendit.io.checkpoint import save_safetensors

    if DEFAULT_CKPT.is_file():
        return []
    path = tmp_path_factory.mktemp("ckpt") / "random-digits.safetensors"
    save_safetensors(
        random_model(equivalence_config("T16")), path, {"steps": 4, "scheduler": "flow-euler", "cfg_scale": 2.0}
    )
    return ["--ckpt", str(path)]


def run_cli(out, extra, ckpt):
    from PIL import Image

    from opendit.cli import main

    base = ["sample", "--classes", "0", "3", "7", "--steps", "4", "--seed", "5", "--out", str(out), "--no-progress"]
    assert main(base + ckpt + extra) == 0
    images = [np.asarray(Image.open(out / f"{i:03d}_class-{c}.png")) for i, c in enumerate((0, 3, 7))]
    return np.stack(images).astype(int), json.loads((out / "record.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, cli_ckpt):
    return run_cli(tmp_path_factory.mktemp("single"), ["--nproc", "1"], cli_ckpt)


CLI_PLANS = {
    "ulysses2": ["--nproc", "2", "--ulysses", "2"],
    "ring2": ["--nproc", "2", "--ring", "2"],
    "cfg2": ["--nproc", "2", "--cfg-parallel"],
    "usp2x2": ["--nproc", "4", "--ulysses", "2", "--ring", "2"],
    "fastseq2-sharded": ["--nproc", "2", "--ulysses", "2", "--sp-impl", "fastseq", "--shard-weights"],
    "ulysses2-balanced": ["--nproc", "2", "--ulysses", "2", "--balance-tokens"],
}


@pytest.mark.parametrize("flags", list(CLI_PLANS.values()), ids=list(CLI_PLANS))
def test_cli_parallel_images_equal_single_process(tmp_path, cli_ckpt, single, flags):
    from opendit.parallel.attention.ring import ring_bytes
    from opendit.parallel.attention.ulysses import ulysses_bytes

    ref_images, _ = single
    images, record = run_cli(tmp_path, flags, cli_ckpt)
    assert images.std() > 10 and np.abs(images - ref_images).max() <= 1  # <= 1/255
    nproc = int(flags[1])
    assert record["parallel"]["world_size"] == nproc and len(record["ranks"]) == nproc
    assert all(r["peak_memory_bytes"] > 0 and len(r["per_step_s"]) == 4 for r in record["ranks"])
    for rank in record["ranks"]:  # per-phase peaks (opendit/observe/memory.py); only the output rank decodes
        mem = rank["memory"]
        phases = [mem[f"{name}_peak_bytes"] for name in ("load", "sampling")]
        assert 0 < max(phases) <= mem["process_peak_bytes"], mem
        assert ("decode_peak_bytes" in mem) == (rank["rank"] == 0), mem
        assert rank["loading"]["mode"] == ("sharded" if "--shard-weights" in flags else "whole"), rank["loading"]
    assert record["memory"] == record["ranks"][0]["memory"]
    cfg = record["model"]
    if "--shard-weights" in flags:  # each of the 2 ranks keeps about half of the parameters
        resident = [r["parameter_bytes"] for r in record["ranks"]]
        assert max(resident) < 0.6 * sum(resident)
        for rank in record["ranks"]:  # each step all-gathers every unit once: this rank sends its half of the model
            for step in rank["comm_per_step"]:
                assert abs(step["weight_gather"]["bytes"] - sum(resident) / 2) <= 0.01 * sum(resident)
    if "--balance-tokens" in flags:  # equal ranks: measured, and re-split only if one was >= 5% slower
        balance, split = record["parallel"]["token_balance"], record["parallel"]["token_split"]
        assert balance and len(balance[0]["busy_s"]) == 2 and min(balance[0]["busy_s"]) > 0
        assert split == (balance[-1]["new_sizes"] if balance[-1]["adopted"] else balance[-1]["sizes"])
        assert sum(split) == cfg["input_size"][0] * cfg["input_size"][1] // cfg["patch_size"] ** 2
    if flags[2:] in (["--ulysses", "2"], ["--ring", "2"]):  # recorded bytes per step == analytic volume, per rank
        heads, dh = cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"]
        tokens = cfg["input_size"][0] * cfg["input_size"][1] // cfg["patch_size"] ** 2
        out_channels = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
        sizes = [tokens - tokens // 2, tokens // 2]
        batch = 3 * (2 if record["resolved"]["cfg_scale"] != 1 else 1)  # 3 images, [cond; uncond] when guided
        kernel = ulysses_bytes if flags[2] == "--ulysses" else ring_bytes
        kind = "all_to_all" if flags[2] == "--ulysses" else "p2p"
        for rank in record["ranks"]:
            for step in rank["comm_per_step"]:
                assert step[kind]["bytes"] == cfg["depth"] * kernel(sizes, batch, heads, dh, rank=rank["rank"])
                gather = sizes[rank["rank"]] * batch * cfg["patch_size"] ** 2 * out_channels * 4  # token gather
                assert step["all_gather"]["bytes"] == gather
