"""The cost view of diffusers transformers (integrations/diffusers_cost.py): counts from the module itself, text
tokens of joint attention in the sequence, and plans the planner picks only with kernels that run on diffusers
attention (no cfg where the pipelines call the transformer once per branch)."""

from __future__ import annotations

import functools

import pytest
from tests.diffusers_models import KINDS
from tests.diffusers_models import build as build_model

from opendit.families.apply import PLANNED_STRATEGIES as CORE_STRATEGIES
from opendit.planning.diffusers_cost import cost_config, diffusers_auto_plan
from opendit.planning.planner import enumerate_plans, estimate
from opendit.planning.speeds import DEFAULTS

build = functools.lru_cache(maxsize=None)(build_model)  # read-only here: one instance per kind


@pytest.mark.parametrize("kind", KINDS)
def test_counts_come_from_the_module(kind):
    model = build(kind)
    config = cost_config(model, image_tokens=25, text_tokens=7)
    assert config.total_params == sum(p.numel() for p in model.parameters())
    assert config.num_heads == 3 and config.hidden_size == 36 and config.depth >= 2
    joint = kind in ("sd3", "flux")  # text tokens run through the blocks with the image tokens
    assert config.num_tokens == 25 + (7 if joint else 0)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_plan_uses_core_kernels_and_respects_true_cfg(kind):
    model = build(kind)
    best, why = diffusers_auto_plan(model, 4, images=1, guided=True, image_tokens=1024, text_tokens=256,
                                    speeds=DEFAULTS["h100-nvlink"])  # fmt: skip
    assert best.world_size == 4 and best.impl in (*CORE_STRATEGIES, "none"), best
    assert best.cfg == 1 or kind not in ("flux", "wan"), best
    assert why.startswith("best (latency)")


def test_joint_text_tokens_cost_communication():
    flux = build("flux")
    speeds = DEFAULTS["h100-nvlink"]
    plans = [p for p in enumerate_plans(2, 3, 1024 + 256, 1, False, CORE_STRATEGIES) if p.ulysses == 2]
    with_text = estimate(cost_config(flux, 1024, 256), 1280, 1, False, plans[0], speeds, 1)
    without = estimate(cost_config(flux, 1024, 0), 1024, 1, False, plans[0], speeds, 1)
    assert with_text.step.bytes_per_rank > 1.2 * without.step.bytes_per_rank
