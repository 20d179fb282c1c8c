"""Load balancing: speed-proportional token shares (refined from timings) and requests spread over dp groups."""

import itertools
import random
import time

import pytest
import torch

from helpers import busy_times, refine_shares
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, build_dit, preset
from opendit.parallel.balance import assign_requests, lower_bound, optimal_makespan, request_costs, speed_shares
from opendit.parallel.sequence import split_sizes
from opendit.planning.speeds import named_hardware as hardware


def test_speed_shares_and_errors():
    assert speed_shares([2.0, 1.0, 1.0]) == (0.5, 0.25, 0.25)
    with pytest.raises(OpenDiTError, match="positive"):
        speed_shares([1.0, 0.0])
    with pytest.raises(OpenDiTError, match="one entry per sequence rank"):
        refine_shares([0.5, 0.5], [10, 10, 10], [1.0, 1.0])


def test_refinement_converges_with_a_fixed_cost_part():
    # Simulated ranks: busy = fixed + tokens / speed (a share-independent part, as Ulysses' attention is).
    speeds, fixed, tokens = [1.0, 0.4], [0.3, 0.3], 1000
    shares = (0.5, 0.5)
    for _ in range(12):
        sizes = split_sizes(tokens, 2, shares)
        busy = [f + n / (s * 1000) for f, n, s in zip(fixed, sizes, speeds)]
        shares = refine_shares(shares, sizes, busy, damping=0.7)
    sizes = split_sizes(tokens, 2, shares)
    busy = [f + n / (s * 1000) for f, n, s in zip(fixed, sizes, speeds)]
    even = max(f + 500 / (s * 1000) for f, s in zip(fixed, speeds))
    assert abs(busy[0] - busy[1]) < 0.01 * max(busy)
    assert max(busy) < 0.75 * even
    assert busy_times([1.0, 2.0], [0.25, 0.5]) == [0.75, 1.5]


def test_requests_of_unequal_size_over_two_dp_groups_within_10_percent_of_optimum():
    model = preset("DiT-XL/2")
    sizes = [(256, 1), (256, 4), (512, 1), (512, 2), (1024, 1), (256, 2), (512, 3), (1024, 2), (256, 8)]
    requests = [{"images": n, "tokens": (px // 16) ** 2, "guided": True} for px, n in sizes]
    costs = request_costs(model, requests, ParallelConfig(ulysses=2), hardware("h100-nvlink"), steps=50)
    result = assign_requests(costs, 2, exact_limit=0)  # the heuristic alone (no exact fallback)
    optimum = optimal_makespan(costs, [1.0, 1.0])
    assert sorted(itertools.chain(*result.groups)) == list(range(len(costs)))
    assert result.makespan <= 1.10 * optimum
    assert result.makespan >= optimum - 1e-12 and optimum >= lower_bound(costs, [1.0, 1.0]) - 1e-12
    exact = assign_requests(costs, 2)
    assert exact.makespan == pytest.approx(optimum) and exact.optimum == pytest.approx(optimum)


def test_lpt_local_search_on_random_sets_and_unequal_groups():
    rng = random.Random(0)
    for trial in range(30):
        costs = [rng.uniform(1, 10) for _ in range(rng.randint(3, 10))]
        speeds = [1.0, rng.choice([1.0, 0.5, 2.0]), 1.0][: rng.choice([2, 3])]
        result = assign_requests(costs, len(speeds), speeds, exact_limit=0)
        optimum = optimal_makespan(costs, speeds)
        assert result.makespan <= 1.10 * optimum, (trial, costs, speeds)


# ------------------------------------------------------------------------------------------------ slowed rank
CONFIG = DiTConfig(
    depth=2,
    hidden_size=256,
    num_heads=4,
    patch_size=2,
    input_size=(64, 64),
    in_channels=1,
    num_classes=10,
    learn_sigma=False,
    latent=False,
    prediction="flow",
)


def _reference():
    """One process, unsharded: the output every balanced split must reproduce."""
    x, t, y = _inputs()
    torch.manual_seed(0)
    with torch.no_grad():
        return build_dit(CONFIG).eval()(x, t, y)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 64, 64, generator=gen)
    return x, torch.tensor([500.0, 500.0]), torch.tensor([3, 10])  # a CFG pair: [cond; uncond]


NOMINAL_FLOPS = 4e10  # about one core of this machine (opendit calibrate), so the emulated slowdown is realistic


def _slow_down(model, factor):
    """Emulate a slower device on the local linear layers: after each Linear, sleep factor x its FLOPs at the
    nominal rate. Deterministic (proportional to the rank's tokens), unlike sleeping a multiple of a measured time
    that other processes on a shared machine inflate. The test builds the model itself, so no runtime hook is needed.
    """

    def hook(module, args, out):
        time.sleep(factor * 2 * out.shape[:-1].numel() * module.in_features * module.out_features / NOMINAL_FLOPS)

    for module in model.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook)


def _slowed_worker(slow_factor: float, steps: int):
    import torch.distributed as dist

    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize

    init_from_env(torch.device("cpu"), "gloo")
    x, t, y = _inputs()
    out = {}
    try:
        shares = None
        for phase in ("even", "balanced"):
            plan = ParallelConfig(ring=2, token_shares=shares)
            runtime = build_runtime(plan)
            torch.manual_seed(0)
            model = build_dit(CONFIG).eval()
            if dist.get_rank() == 1:
                _slow_down(model, slow_factor)
            pmodel = parallelize(model, runtime)
            times, waits, result = [], [], None
            with torch.no_grad():
                pmodel(x, t, y)  # warm-up
                runtime.stats.reset()
                for _ in range(steps):
                    dist.barrier()
                    start = time.perf_counter()
                    result = pmodel(x, t, y)
                    times.append(time.perf_counter() - start)
                    waits.append(sum(v["wait_s"] for v in runtime.stats.end_step().values()))
            everyone = [None] * 2
            dist.all_gather_object(everyone, (sorted(times)[steps // 2], sorted(waits)[steps // 2]))
            sizes = pmodel.token_sizes
            busy = busy_times([e[0] for e in everyone], [e[1] for e in everyone])
            out[phase] = {"step_s": max(e[0] for e in everyone), "sizes": sizes, "busy": busy, "out": result}
            shares = refine_shares(shares or (0.5, 0.5), sizes, busy, damping=1.0)  # speed-proportional
    finally:
        dist.destroy_process_group()
    return out


@pytest.mark.slow
def test_speed_proportional_shares_beat_an_even_split_on_a_slowed_rank():
    from opendit.distributed.launch import launch

    reference = _reference()
    result = launch(_slowed_worker, 2, (2.0, 5), threads_per_proc=1)
    even, balanced = result["even"], result["balanced"]
    assert balanced["sizes"][1] < 0.4 * CONFIG.num_tokens  # the slow rank got fewer tokens
    assert balanced["step_s"] <= 0.85 * even["step_s"], (even["step_s"], balanced["step_s"], balanced["sizes"])
    for phase in (even, balanced):
        assert (phase["out"] - reference).abs().max().item() <= 1e-5
