"""diffusers transformers parallelised as they are (`opendit.parallelize`): every rank's output equals the same
module's in one process (fp32, max relative error <= 1e-5), for DiT, PixArt, SD3, Flux and Wan, under Ulysses,
ring, USP and cfg x sequence parallel, with 3 heads and token counts that the degrees do not divide."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.diffusers_models import KINDS, build, inputs
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _run(module, kwargs):
    with torch.no_grad():
        out = module(**kwargs, return_dict=False)
    return out[0]


def _one(kind, plan_kwargs, heads=None):
    import opendit
    from opendit.distributed.config import ParallelConfig

    reference = build(kind) if heads is None else build(kind, heads=heads)
    model = copy.deepcopy(reference)
    expected = _run(reference, inputs(kind))
    parallel = opendit.parallelize(model, ParallelConfig(**plan_kwargs))
    assert parallel is model and parallel.config == reference.config and parallel.dtype == reference.dtype
    got = _run(parallel, inputs(kind))
    again = _run(parallel, inputs(kind))  # a second call: hooks and kernels reused
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    counts = parallel._opendit_runtime.stats.snapshot()  # the collectives really ran: {kind: {calls, bytes}}
    calls = {kind: entry["calls"] for kind, entry in counts.items() if entry["calls"]}
    return error, torch.equal(got, again), tuple(got.shape) == tuple(expected.shape), calls


def _one_ours(plan_kwargs):
    """OpenDiT's own DiT through the same public entry point (positional x, t, y; cfg/dp via the batch hooks)."""
    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.models.dit import DiTConfig, build_dit, preset

    torch.manual_seed(0)
    config = DiTConfig(**{**preset("DiT-S/2").to_dict(), "hidden_size": 72, "num_heads": 3, "depth": 2,
                          "input_size": (10, 10)})  # fmt: skip
    reference = build_dit(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    x, t, y = (
        torch.randn(4, 4, 10, 10, generator=g),
        torch.tensor([10.0, 500.0, 10.0, 500.0]),
        torch.tensor([1, 2, 3, 4]),
    )
    with torch.no_grad():
        expected = reference(x, t, y)
        got = opendit.parallelize(model, ParallelConfig(**plan_kwargs))(x, t, y)
    return ((got - expected).abs().max() / expected.abs().max()).item()


def plans_for(world: int, kind: str) -> list[dict]:
    plans = {2: [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "sp_impl": "fastseq"}],
             3: [{"ulysses": 3}, {"ring": 3}, {"ulysses": 3, "sp_impl": "fastseq"}]}.get(world)  # fmt: skip
    if world == 4:  # USP 2x2, and cfg x Ulysses where the pipeline batches cond and uncond (else dp x Ulysses)
        plans = [{"ulysses": 2, "ring": 2}, {"cfg": 2, "ulysses": 2} if kind not in ("flux", "wan") else {"dp": 2,
                 "ulysses": 2}]  # fmt: skip
    return plans


def _worker(rank, world):
    """Every class under every plan of this world, in one process group (one launch per world); at world 2 also
    the plans that must be refused."""
    results = {(kind, str(plan)): _one(kind, plan) for kind in KINDS for plan in plans_for(world, kind)}
    ours = {str(plan): _one_ours(plan) for plan in plans_for(world, "dit")}
    return results, ours, _refusals() if world == 2 else None


@pytest.mark.parametrize("world", [2, 3, 4])
def test_diffusers_modules_equal_one_process(world):
    for rank, (results, ours, refusals) in enumerate(run_distributed(_worker, world, timeout=400)):
        if refusals is not None:
            check_refusals(refusals)
        assert all(error <= 1e-5 for error in ours.values()), ours  # our DiT through opendit.parallelize
        assert len(results) == len(plans_for(world, "dit")) * len(KINDS)
        for (kind, plan), (error, repeatable, shaped, calls) in results.items():
            assert shaped and repeatable, (kind, plan, rank)
            assert error <= 1e-5, f"{kind} {plan} rank {rank}: relative error {error:.2e}"
            sequence = "all_to_all" if "ulysses" in plan else "p2p"
            assert calls.get(sequence, 0) > 0 and calls.get("all_gather", 0) > 0, (kind, plan, calls)


def _refusals() -> list[str]:
    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.errors import OpenDiTError

    messages = []
    for kind, plan in (("flux", {"ulysses": 2, "sp_impl": "dsp"}), ("sd3", {"tp": 2})):
        try:
            opendit.parallelize(build(kind), ParallelConfig(**plan))
        except OpenDiTError as exc:
            messages.append(str(exc))
    try:
        opendit.parallelize(torch.nn.Linear(2, 2), ParallelConfig(ulysses=2))
    except OpenDiTError as exc:
        messages.append(str(exc))
    return messages


def check_refusals(messages: list[str]) -> None:
    """Plans a module cannot take are refused with the fix (run inside the world-2 launch)."""
    assert len(messages) == 3, messages
    assert "attends over one token sequence" in messages[0] and "--sp-impl ulysses" in messages[0]
    assert "declares no tensor split yet" in messages[1] and "--ulysses" in messages[1]
    assert "Linear has no OpenDiT plan; supported:" in messages[2] and "_cp_plan" in messages[2]


TP_PLANS = {2: [{"tp": 2}], 4: [{"tp": 2, "ulysses": 2}, {"tp": 2, "ring": 2}, {"tp": 2, "dp": 2}]}
TP_KINDS = ("dit", "pixart")  # the classes that declare a tensor-parallel split (DiffusersSpec.tensor)


def _block_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n.startswith("transformer_blocks"))


def _tp_worker(rank, world):
    """diffusers' DiT and PixArt under --tp: at world 2 with 3 heads (split 2, 1), at world 4 with 4 heads (tp 2 x
    ulysses 2 needs 2 heads per tp rank) with Ulysses / ring / dp."""
    import opendit
    from opendit.distributed.config import ParallelConfig

    out = {}
    for kind in TP_KINDS:
        for plan in TP_PLANS[world]:
            heads = 3 if world == 2 else 4
            error, repeatable, shaped, calls = _one(kind, plan, heads)
            whole = build(kind, heads=heads)
            split = opendit.parallelize(copy.deepcopy(whole), ParallelConfig(**plan))
            out[(kind, str(plan))] = (error, repeatable, shaped, calls, _block_bytes(split) / _block_bytes(whole))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_diffusers_tensor_parallel_equals_one_process(world):
    for rank, results in enumerate(run_distributed(_tp_worker, world, timeout=400)):
        assert len(results) == len(TP_KINDS) * len(TP_PLANS[world])
        for (kind, plan), (error, repeatable, shaped, calls, share) in results.items():
            assert shaped and repeatable, (kind, plan, rank)
            assert error <= 1e-5, f"{kind} {plan} rank {rank}: relative error {error:.2e}"
            assert calls.get("tp_all_reduce", 0) > 0, (kind, plan, calls)
            assert (calls.get("tp_all_gather", 0) > 0) == (kind == "dit"), (kind, plan, calls)  # adaLN-Zero only
            # 3 heads over 2 tp ranks: 2 and 1 (attention), the MLP and adaLN split evenly
            assert share < 0.7, (kind, plan, rank, share)
