"""Every diffusers 0.42 transformer class that declares its own `_cp_plan` (and can be built from a small config:
tests/cp_plan_models.py) runs exact under OpenDiT's Ulysses, ring and USP at worlds 2-4 (fp32, max relative error
<= 1e-5 against the same module in one process), from the class's plan alone: OpenDiT holds no code for them.
Token counts are chosen so that no world divides them (3 heads, 25/27/35/41/50 tokens, 7 text tokens). LTX-2 also
checks a stream the plan leaves whole inside the split region (its audio): attention over it stays local."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.cp_plan_models import KINDS, build, inputs, run
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow

# LTX-2's own plan lacks one split (its audio<->video cross-attention's video rotary embedding): families/declared.py
# adds that entry to the class's plan; every other class runs from its plan alone
EXACT = KINDS
DECLARED_EXTENSION = ("ltx2",)

PLANS = {
    2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}],
    3: [{"ulysses": 3}, {"ring": 3}],
    4: [{"ulysses": 2, "ring": 2}, {"ring": 4}],
}


def _worker(rank, world, kinds):
    import opendit
    from opendit.distributed.config import ParallelConfig

    results = {}
    for kind in kinds:
        reference = build(kind)
        expected = run(reference, inputs(kind))
        for plan in PLANS[world]:
            model = copy.deepcopy(reference)
            opendit.parallelize(model, ParallelConfig(**plan))
            got, again = run(model, inputs(kind)), run(model, inputs(kind))
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            calls = {k: v["calls"] for k, v in model._opendit_runtime.stats.snapshot().items() if v["calls"]}
            results[(kind, str(plan))] = (error, torch.equal(got, again), calls)
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_classes_with_a_cp_plan_run_exact_from_their_own_plan(world):
    for rank, results in enumerate(run_distributed(_worker, world, EXACT, timeout=500)):
        assert len(results) == len(EXACT) * len(PLANS[world])
        for (kind, plan), (error, repeatable, calls) in results.items():
            assert error <= 1e-5, f"{kind} {plan} rank {rank}: relative error {error:.2e}"
            assert repeatable, (kind, plan, rank)
            kernel = "p2p" if "ring" in plan and "ulysses" not in plan else "all_to_all"
            assert calls.get(kernel, 0) > 0 and calls.get("all_gather", 0) > 0, (kind, plan, calls)


def test_the_families_are_read_from_the_classes():
    from opendit.families import family_for

    for kind in KINDS:
        family, plan = family_for(build(kind)), type(build(kind))._cp_plan
        if kind in DECLARED_EXTENSION:
            assert family.source == "_cp_plan + declared" and all(family.cp_plan[k] is v for k, v in plan.items())
            continue
        assert family is not None and family.source == "_cp_plan", kind
        assert family.cp_plan is plan  # the class's own plan, not a copy


def test_no_line_of_opendit_names_a_cp_plan_class():
    from pathlib import Path

    import opendit

    names = {type(build(kind)).__name__ for kind in KINDS if kind not in ("flux", "wan", *DECLARED_EXTENSION)}
    names |= {"FluxTransformer2DModel", "WanTransformer3DModel"}
    for path in Path(opendit.__file__).parent.rglob("*.py"):
        if "testing" in path.parts:
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], (path, [n for n in names if n in text])


TP_KINDS = ("flux", "flux2", "qwenimage")  # the classes with a _tp_plan (and a _cp_plan)
TP_PLANS = {2: [{"tp": 2}], 4: [{"tp": 2, "ulysses": 2}, {"tp": 2, "ring": 2}]}


def _tp_worker(rank, world):
    import opendit
    from opendit.distributed.config import ParallelConfig

    results = {}
    for kind in TP_KINDS:
        reference = build(kind, heads=4)  # 4 heads: tp 2 x ulysses 2 leaves each rank one
        expected = run(reference, inputs(kind))
        for plan in TP_PLANS[world]:
            model = copy.deepcopy(reference)
            opendit.parallelize(model, ParallelConfig(**plan))
            got = run(model, inputs(kind))
            calls = {k: v["calls"] for k, v in model._opendit_runtime.stats.snapshot().items() if v["calls"]}
            results[(kind, str(plan))] = (((got - expected).abs().max() / expected.abs().max()).item(), calls)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_classes_with_a_tp_plan_run_tensor_parallel_from_it(world):
    """`--tp 2` read from the class's `_tp_plan` (families/tp_plan.py), alone and under Ulysses / ring."""
    for rank, results in enumerate(run_distributed(_tp_worker, world, timeout=400)):
        assert len(results) == len(TP_KINDS) * len(TP_PLANS[world])
        for (kind, plan), (error, calls) in results.items():
            assert error <= 1e-5, f"{kind} {plan} rank {rank}: relative error {error:.2e}"
            assert calls.get("tp_all_reduce", 0) > 0, (kind, plan, calls)
