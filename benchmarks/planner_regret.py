"""Regret of the planner on this machine: its choice, measured, vs the best plan found by measuring every plan.

    .venv/bin/opendit calibrate --threads 1 --nproc 2 --force      # once, when the machine is quiet
    .venv/bin/python benchmarks/planner_regret.py    # -> benchmarks/results/planner_regret.{json,md,png}

Per scenario (tokens, images, CFG on/off, world size, optional memory limit), every valid plan is run with the real
runtime (build_runtime + parallelize, one thread per rank) for `--reps` timed forwards after a warm-up; a forward of
the group's local batch IS one denoising step minus the scheduler update, which no plan changes. The step time of a
plan is the slowest rank's median. Regret = measured(planner's choice) / measured(best) - 1; acceptance: <= 10%.
The JSON also holds predicted vs measured step time for every plan (issue 5: within 25%).

Memory-bound scenarios (4 ranks) set a per-device limit below what the unsharded plans need, so the planner must
pick among the plans that fit; the exhaustive search is over the same fitting plans. The `-weights` scenarios set it
below every plan that holds all block weights on a rank, so only sharded weights, tensor parallelism and PipeFusion
remain. A PipeFusion plan's step is its request mean over STEPS steps: its synchronous warm-up step(s) and its
pipelined ones are timed apart (the stale plans are in the search: `opendit plan` ranks them too).
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import bar_plot, finish, markdown_table, render_only, report_args
from opendit.distributed.config import ParallelConfig
from opendit.models.dit import DiTConfig
from opendit.planning.planner import enumerate_plans, estimate, plan
from opendit.planning.speeds import load_speeds

GIB = 1 << 30
WIDTH = {"depth": 2, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}  # DiT-XL/2 width, reduced depth
# (name, tokens, images, guided, world, memory limit GiB or None)
SCENARIOS = [
    ("t256-i1-cfg-w1", 256, 1, True, 1, None),
    ("t256-i1-cfg-w2", 256, 1, True, 2, None),
    ("t1024-i1-cfg-w2", 1024, 1, True, 2, None),
    ("t1024-i1-nocfg-w2", 1024, 1, False, 2, None),
    ("t256-i2-nocfg-w2", 256, 2, False, 2, None),
    ("t64-i4-cfg-w2", 64, 4, True, 2, None),
    ("t4096-i1-nocfg-w2", 4096, 1, False, 2, None),
    ("t1024-i2-cfg-w2", 1024, 2, True, 2, None),
    ("t1024-i1-cfg-w4-mem", 1024, 1, True, 4, "tight"),
    ("t256-i4-nocfg-w4-mem", 256, 4, False, 4, "tight"),
    ("t256-i1-nocfg-w2-weights", 256, 1, False, 2, "weights"),
    ("t1024-i1-cfg-w2-weights", 1024, 1, True, 2, "weights"),
]
STEPS = 50  # the request a step time is averaged over (PipeFusion's warm-up steps are slower than its others)
QUICK = [("q-t64-i1-cfg-w2", 64, 1, True, 2, None), ("q-t64-i2-nocfg-w2", 64, 2, False, 2, None)]


def model_for(tokens: int) -> DiTConfig:
    side = int(round(tokens**0.5)) * WIDTH["patch_size"]
    return DiTConfig(**WIDTH, input_size=(side, side), num_classes=10)


def _measure_worker(config: DiTConfig, plans: list[ParallelConfig], images: int, guided: bool, reps: int):
    """Runs on every rank: time each plan's forward; returns (on every rank) the slowest rank's median per plan."""
    import torch.distributed as dist

    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import image_split
    from opendit.models.dit import build_dit
    from opendit.parallel.apply import parallelize

    init_from_env(torch.device("cpu"), "gloo")
    results = []
    try:
        for p in plans:
            runtime = build_runtime(p)
            torch.manual_seed(0)
            model = build_dit(config).eval()
            try:
                pmodel = parallelize(model, runtime)
            except Exception as exc:  # e.g. a kernel that is not in this build (sharding.py): reported, not measured
                results.append({"error": f"{type(exc).__name__}: {exc}"})
                dist.barrier()
                continue
            sizes, first = image_split(max(images, p.dp), runtime)
            n = sizes[runtime.coords["dp"]]
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, config.in_channels, *config.input_size, generator=gen)
            labels = torch.arange(first, first + n) % config.num_classes
            y = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
            x = torch.cat([x, x]) if guided else x
            t = torch.full((x.shape[0],), 500.0)
            with torch.no_grad():
                pmodel(x, t, y)  # warm-up (allocations, first collectives; PipeFusion: fills the K/V caches)
                warm = _timed(pmodel, x, t, y, reps) if p.pipefusion > 1 else None  # its synchronous steps
                if p.pipefusion > 1:
                    pmodel.step = p.warmup_steps  # from here on: pipelined steps over the stale K/V
                times = _timed(pmodel, x, t, y, reps)
            step = statistics.median(times)
            if warm is not None:  # the request's mean step: K synchronous + (STEPS - K) pipelined
                k = min(p.warmup_steps, STEPS)
                step = (k * statistics.median(warm) + (STEPS - k) * step) / STEPS
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, step)
            results.append({"step_s": max(everyone), "per_rank_s": everyone})
    finally:
        dist.destroy_process_group()
    return results


def _timed(pmodel, x, t, y, reps: int) -> list[float]:
    import torch.distributed as dist

    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        pmodel(x, t, y)
        times.append(time.perf_counter() - start)
    return times


def measure(config, plans, images, guided, reps, world):
    if world == 1:
        return _measure_single(config, plans[0], images, guided, reps)
    from opendit.distributed.launch import launch

    return launch(_measure_worker, world, (config, plans, images, guided, reps), threads_per_proc=1)


def _measure_single(config, p, images, guided, reps):
    from opendit.models.dit import build_dit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_dit(config).eval()
    b = images * (2 if guided else 1)
    x, t, y = torch.randn(b, config.in_channels, *config.input_size), torch.full((b,), 500.0), torch.zeros(b).long()
    times = []
    with torch.no_grad():
        model(x, t, y)
        for _ in range(reps):
            start = time.perf_counter()
            model(x, t, y)
            times.append(time.perf_counter() - start)
    return [{"step_s": statistics.median(times), "per_rank_s": [statistics.median(times)]}]


def run_scenario(scenario, speeds, reps: int) -> dict:
    name, tokens, images, guided, world, mem = scenario
    config = model_for(tokens)
    speeds = replace(speeds, reserved_bytes=0.0)  # CPU: no device context to reserve
    if mem == "tight":  # below every unsharded plan without sequence parallelism: forces sp and/or sharding
        unsharded = [
            estimate(config, tokens, images, guided, p, speeds, 1)
            for p in enumerate_plans(world, config.num_heads, tokens, images, guided, shard_options=(False,))
        ]
        lean = (
            min(e.memory.total for e in unsharded if e.config.sp_degree == 1)
            if any(e.config.sp_degree == 1 for e in unsharded)
            else max(e.memory.total for e in unsharded)
        )
        speeds = speeds.with_memory(lean * 0.99)
    elif mem == "weights":  # below every plan that holds all block weights: sharded, tp or PipeFusion must run
        whole = [
            e.memory.total
            for e in plan(config, world, speeds.with_memory(1e15), images=images, guided=guided).ranked
            if not e.config.shard_weights and e.config.tp == 1 and e.config.pipefusion == 1
        ]
        speeds = speeds.with_memory(min(whole) * 0.99)
    result = plan(config, world, speeds, images=images, guided=guided, steps=STEPS)
    candidates = [e.config for e in result.ranked]
    measured = measure(config, candidates, images, guided, reps, world)
    rows = []
    for est, m in zip(result.ranked, measured):
        rows.append({"plan": est.config.describe(), "predicted_s": est.request_s / STEPS, **m})
    ok = [r for r in rows if "step_s" in r]
    choice = next(r for r in rows if "step_s" in r)  # the planner's best that could run
    best = min(ok, key=lambda r: r["step_s"])
    for r in ok:
        r["prediction_error"] = r["predicted_s"] / r["step_s"] - 1
    return {
        "scenario": name,
        "tokens": tokens,
        "images": images,
        "guided": guided,
        "world": world,
        "memory_limit_gib": speeds.memory_bytes / GIB if mem else None,
        "auto": choice["plan"],
        "auto_step_s": choice["step_s"],
        "best": best["plan"],
        "best_step_s": best["step_s"],
        "regret": choice["step_s"] / best["step_s"] - 1,
        "plans": rows,
        "dropped_for_memory": [e.config.describe() for e in result.dropped],
    }


def markdown(result: dict) -> str:
    header = ["scenario", "auto plan", "auto s/step", "best measured plan", "best s/step", "regret"]
    cells = [
        [
            s["scenario"],
            s["auto"],
            f"{s['auto_step_s']:.3f}",
            s["best"],
            f"{s['best_step_s']:.3f}",
            f"{s['regret']:.1%}",
        ]
        for s in result["scenarios"]
    ]
    summary = result.get("summary", {})
    text = markdown_table(header, cells)
    if summary:
        text += (
            f"\n\nMax regret {summary['max_regret']:.1%}; {summary['within_10_percent']} of {summary['scenarios']} "
            f"scenarios within 10%; prediction error median {summary['median_abs_prediction_error']:.0%}, "
            f"max {summary['max_abs_prediction_error']:.0%}."
        )
    return text


def plot(result: dict, path: Path) -> None:
    rows = result["scenarios"]
    series = {"planner's plan": [s["auto_step_s"] for s in rows], "best measured": [s["best_step_s"] for s in rows]}
    bar_plot(path, [s["scenario"] for s in rows], series, "measured s per step", "planner regret on this machine")


def render(result: dict, out) -> dict[str, Path]:
    return finish(out, result, markdown(result), plot=lambda path: plot(result, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_args(parser, "planner_regret")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--speeds", default="auto", help="calibration JSON or hardware name (default: cached)")
    parser.add_argument("--quick", action="store_true", help="two tiny scenarios (development)")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    args = parser.parse_args()
    if render_only(args, render):
        return
    speeds = load_speeds(args.speeds, threads=1, nproc=2)
    scenarios = QUICK if args.quick else [s for s in SCENARIOS if not args.only or s[0] in args.only]
    out = {"speeds": speeds.to_dict(), "model": WIDTH, "scenarios": []}
    print(f"speeds: {speeds.name} ({speeds.source})")
    head = f"{'scenario':<22} {'auto plan':<40} {'auto s':>8} {'best plan':<40} {'best s':>8} {'regret':>7}"
    print(head + f" {'pred err':>8}")
    for scenario in scenarios:
        row = run_scenario(scenario, speeds, args.reps)
        out["scenarios"].append(row)
        err = next(r["prediction_error"] for r in row["plans"] if r["plan"] == row["auto"])
        print(
            f"{row['scenario']:<22} {row['auto']:<40} {row['auto_step_s']:>8.3f} {row['best']:<40} "
            f"{row['best_step_s']:>8.3f} {row['regret']:>7.1%} {err:>+8.1%}"
        )
    regrets = [r["regret"] for r in out["scenarios"]]
    errors = [abs(p["prediction_error"]) for r in out["scenarios"] for p in r["plans"] if "prediction_error" in p]
    out["summary"] = {
        "max_regret": max(regrets),
        "within_10_percent": sum(r <= 0.10 for r in regrets),
        "scenarios": len(regrets),
        "max_abs_prediction_error": max(errors),
        "median_abs_prediction_error": statistics.median(errors),
    }
    print(json.dumps(out["summary"]))
    render(out, args.out)


if __name__ == "__main__":
    main()
