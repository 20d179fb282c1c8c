"""PipeFusion in the cost model and the planner (planning/pipefusion_cost.py): pure functions, no processes.

The recorded bytes per step = pipefusion_step_comm is checked on real runs in tests/test_pipefusion.py."""

from __future__ import annotations

import pytest

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, preset
from opendit.planning.cost import predict_memory, predict_step_time
from opendit.planning.pipefusion_cost import (
    pipefusion_step_comm,
    predict_pipefusion_memory,
    predict_pipefusion_step,
    request_s,
)
from opendit.planning.planner import auto_plan, check_request, enumerate_plans, plan, plan_flags
from opendit.planning.speeds import DEFAULTS, resolve_speeds

GIB = 1 << 30


def xl(px: int = 512) -> DiTConfig:
    return preset("DiT-XL/2").with_image_size(px)


@pytest.mark.parametrize("stages,patches", [(2, 2), (2, 8), (4, 4), (4, 16), (3, 5)])
def test_pipelined_step_beats_one_device_and_warmup_does_not(stages, patches):
    # a long sequence (2048 px: 16384 tokens), where even 1/16 patches keep the matmuls near their peak rate
    model, speeds = xl(2048), DEFAULTS["a100-pcie"]
    one = predict_step_time(model, model.num_tokens, 2, ParallelConfig(), speeds).total_s
    pf = ParallelConfig(pipefusion=stages, patches=patches)
    step = predict_pipefusion_step(model, model.num_tokens, 2, pf, speeds)
    warm = step.detail["warmup_step_s"]
    assert warm >= one  # the whole sequence through the stages one after the other, plus the hops
    # the bubble: (M + N - 1) / (M N) of one device at best, never better than 1/N
    assert one / stages < step.total_s < warm
    assert step.total_s >= one * (patches + stages - 1) / (patches * stages) * 0.8
    assert step.detail["blocks_per_stage"] == [28 // stages + (i < 28 % stages) for i in range(stages)]


def test_request_time_counts_warmup_steps_apart():
    model, speeds = xl(), DEFAULTS["h100-nvlink"]
    step = predict_pipefusion_step(model, model.num_tokens, 2, ParallelConfig(pipefusion=2, warmup_steps=3), speeds)
    warm, pipe = step.detail["warmup_step_s"], step.total_s
    assert request_s(step, 50) == pytest.approx(3 * warm + 47 * pipe)
    assert request_s(step, 2) == pytest.approx(2 * warm)
    plain = predict_step_time(model, model.num_tokens, 2, ParallelConfig(cfg=2), speeds)
    assert request_s(plain, 10) == pytest.approx(10 * plain.total_s)


def test_memory_holds_own_blocks_and_the_kv_cache():
    model, speeds = xl(1024), DEFAULTS["a100-pcie"]
    tokens, s = model.num_tokens, speeds.dtype_bytes
    one = predict_memory(model, tokens, 2, ParallelConfig(), speeds)
    pf = predict_pipefusion_memory(model, tokens, 2, ParallelConfig(pipefusion=4), speeds)
    from opendit.models.dit import count_params

    params = count_params(model)
    own = (params["total"] - 21 * params["block"]) * s  # 28 blocks over 4 stages: stage 0 keeps 7
    kv = 7 * 2 * 2 * tokens * model.hidden_size * s  # K and V of the whole sequence per block, batch 2
    assert pf.weights == pytest.approx(own + kv)
    assert pf.loading < one.loading  # loading reads the stage's blocks only
    assert pf.total < one.total


def test_step_comm_formula_shapes():
    model = DiTConfig(depth=6, hidden_size=128, num_heads=4, patch_size=2, input_size=(16, 16), num_classes=10)
    plan_ = ParallelConfig(pipefusion=3, patches=5)
    t, c = model.num_tokens, model.hidden_size
    first = pipefusion_step_comm(model, t, 4, plan_, 0, pipelined=True)
    assert first == {"p2p": {"bytes": 4 * t * c * 4, "calls": 5}, "broadcast": {"bytes": 0, "calls": 1}}
    assert pipefusion_step_comm(model, t, 4, plan_, 1, pipelined=False)["p2p"]["calls"] == 1
    last = pipefusion_step_comm(model, t, 4, plan_, 2, pipelined=True)
    assert "p2p" not in last and last["broadcast"]["bytes"] == 4 * t * model.out_channels * 4 * 4 * 2


def test_cost_model_refuses_to_price_pipefusion_as_one_device():
    model = xl()
    with pytest.raises(OpenDiTError, match="pipefusion_cost"):
        predict_step_time(model, model.num_tokens, 2, ParallelConfig(pipefusion=2), DEFAULTS["a100-pcie"])
    with pytest.raises(OpenDiTError, match="pipefusion_cost"):
        predict_memory(model, model.num_tokens, 2, ParallelConfig(pipefusion=2), DEFAULTS["a100-pcie"])


def test_planner_enumerates_pipefusion_for_models_that_declare_it():
    plans = enumerate_plans(4, 16, 1024, 1, True, pipeline_depth=28)
    pf = [p for p in plans if p.pipefusion > 1]
    assert [p.patch_count for p in pf] == [4, 8, 16]
    assert not [p for p in enumerate_plans(4, 16, 1024, 1, True) if p.pipefusion > 1]
    assert not [p for p in enumerate_plans(8, 16, 1024, 1, True, pipeline_depth=4) if p.pipefusion > 1]  # depth < N


def test_planner_picks_pipefusion_on_pcie_when_weights_do_not_fit_and_says_it_is_stale():
    model = preset("DiT-XL/2").with_image_size(256)
    result = plan(model, 4, resolve_speeds("a100-pcie", 1, 2.0), images=1, guided=True)
    best = result.best
    assert best.config.pipefusion == 4, result.table()
    assert "stale K/V" in result.explain() and "--pipefusion 4" in plan_flags(best.config)
    # with room for the weights the exact plans win, and exact-only requests never get PipeFusion
    roomy = plan(model, 4, resolve_speeds("a100-pcie", 1, 80.0), images=1, guided=True)
    assert roomy.best.config.pipefusion == 1
    exact = plan(model, 4, resolve_speeds("a100-pcie", 1, 2.0), images=1, guided=True, stale=False)
    assert all(e.config.pipefusion == 1 for e in exact.ranked)
    config, _ = auto_plan(model, 4, 1, True, speeds=resolve_speeds("a100-pcie", 1, 2.0))
    assert config.pipefusion == 1


def test_a_wrong_pipefusion_request_names_pipefusion_plans():
    model = xl(256)
    with pytest.raises(OpenDiTError, match=r"Nearest valid plans for 8 rank\(s\): pipefusion=8"):
        check_request(ParallelConfig(pipefusion=4, cfg=2), model, 8, 1, True)
