"""TraceHook's Chrome trace events and utilisation summary, and the CommStats event log they read.

Single process: a hand-driven step flow over a plain CommStats (linked sync and async ops, a legacy unlinked wait,
ops before and after the loop that must stay out). Two gloo ranks (slow): a real Ulysses run of a tiny DiT for 3 steps,
its events checked against what CommStats counted, and the trace written and re-read as Chrome trace JSON.
"""

import json
import time

import pytest
import torch

from dist_utils import run_distributed
from opendit.diffusion.hooks import LoopInfo, ModelCall, StepContext
from opendit.distributed.comm import CommHandle, CommStats
from opendit.observe.trace import TraceHook, chrome_trace, utilisation_summary, write_chrome_trace
from opendit.parallel.hooks import CommAccounting
from opendit.parallel.sharding import _AllWorks

REQUIRED = ("name", "ph", "pid", "tid", "ts")


def _pause(seconds: float = 2e-3) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def check_well_formed(events: list[dict], wall_us: float) -> None:
    """Complete events with non-negative times inside the loop, and every lane properly nested (Chrome's rule)."""
    for e in events:
        assert all(k in e for k in REQUIRED) and e["ph"] == "X" and "dur" in e, e
        assert e["ts"] >= 0 and e["dur"] >= 0 and e["ts"] + e["dur"] <= wall_us + 1.0, (e, wall_us)
    lanes: dict = {}
    for e in events:
        lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    for lane in lanes.values():
        stack: list[float] = []  # ends of the open slices
        for e in sorted(lane, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            assert not stack or e["ts"] + e["dur"] <= stack[-1] + 1e-3, f"overlapping slices on one lane: {e}"
            stack.append(e["ts"] + e["dur"])


def check_chrome_json(trace: dict) -> None:
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list) and trace["displayTimeUnit"] == "ms"
    for e in trace["traceEvents"]:
        assert all(k in e for k in REQUIRED), e
    named = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["name"] == "thread_name"}
    used = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert used <= named, f"lanes without a thread_name: {used - named}"


def _fake_loop(stats: CommStats, hook: TraceHook, steps: int = 2) -> None:
    """What the sampler and Comm do, by hand: per step one sync all_to_all, one async p2p waited after the model call
    through a CommHandle, one legacy wait with no recorded issue; CommAccounting closes the step."""
    accounting = CommAccounting(stats)
    loop = LoopInfo(steps, 1, False, [1.0 - i / steps for i in range(steps)])
    hook.on_loop_start(loop)
    for i in range(steps):
        ctx = StepContext(i, steps, loop.timesteps[i], time.perf_counter())
        hook.on_step_start(ctx)
        call_start = time.perf_counter()
        a2a = stats.record("all_to_all", 100)
        start = time.perf_counter()
        _pause()
        stats.record_wait("all_to_all", time.perf_counter() - start, event=a2a)
        handle = CommHandle([], lambda: None, stats, "p2p", event=stats.record("p2p", 8))
        _pause()  # compute while the p2p is in flight
        handle.wait()
        stats.record_wait("broadcast", 1e-4)  # positional, unlinked: still logged (wait-only, no bytes)
        ctx.model_calls.append(ModelCall(call_start, time.perf_counter()))
        ctx.end_s = time.perf_counter()
        hook.on_step_end(ctx)
        accounting.on_step_end(ctx)
    hook.on_loop_end(loop)


def test_trace_events_and_summary_single_process(tmp_path):
    stats = CommStats()
    assert stats.record("all_to_all", 5) is None and stats.events is None  # off by default: nothing logged
    stats.record_wait("all_to_all", 0.0)
    stats.end_step()
    aligned = []
    hook = TraceHook(stats, rank=3, align=lambda: aligned.append(time.perf_counter()))
    _fake_loop(stats, hook)
    stats.record("all_gather", 64)  # after the loop: not in the trace
    assert len(aligned) == 1 and aligned[0] <= hook.t0
    assert stats.events is None, "the hook switched the log on, so it switches it off again"
    assert [h["all_to_all"]["bytes"] for h in stats.history] == [5, 100, 100]  # CommAccounting undisturbed

    events = hook.events()
    assert events == json.loads(json.dumps(events))
    wall_us = (hook.t_end - hook.t0) * 1e6
    check_well_formed(events, wall_us)
    assert {e["pid"] for e in events} == {3}
    by_cat: dict = {}
    for e in events:
        by_cat.setdefault(e["cat"], []).append(e)
    assert [e["args"]["step"] for e in by_cat["step"]] == [0, 1] and len(by_cat["model"]) == 2
    ops = by_cat["comm"]
    assert sorted(e["name"] for e in ops) == ["all_to_all"] * 2 + ["broadcast"] * 2 + ["p2p"] * 2
    assert sum(e["args"]["bytes"] for e in ops if e["name"] == "all_to_all") == 200
    assert all(e["args"]["waited"] for e in ops)
    assert [e["args"].get("linked", True) for e in ops] == [e["name"] != "broadcast" for e in ops]
    for e in (e for e in ops if e["args"]["blocked_us"] > 0):  # each op's blocked slice lies within it, on its lane
        waits = [w for w in by_cat["comm_wait"] if w["tid"] == e["tid"] and e["ts"] <= w["ts"] <= e["ts"] + e["dur"]]
        assert waits and waits[0]["dur"] == pytest.approx(e["args"]["blocked_us"], abs=1.0)
    p2p = [e for e in ops if e["name"] == "p2p"]
    assert all(e["dur"] > 1000 > e["args"]["blocked_us"] for e in p2p), "async: issue to wait end spans the compute"

    summary = hook.summary()
    assert summary["steps"] == 2 and summary["calls_by_kind"] == {"all_to_all": 2, "p2p": 2, "broadcast": 0}
    assert summary["busy_s"] + summary["waiting_s"] == pytest.approx(summary["wall_s"])
    assert summary["busy_fraction"] + summary["waiting_fraction"] == pytest.approx(1.0)
    assert 0.0 < summary["waiting_fraction"] < 1.0 and summary["waiting_by_kind"]["all_to_all"] >= 4e-3
    assert summary["waiting_by_kind"]["broadcast"] == pytest.approx(2e-4)
    util = utilisation_summary([summary, {**summary, "rank": 4, "busy_s": 0.0, "busy_fraction": 0.0}])
    assert util["slowest_rank"] == 3 and util["min_busy_fraction"] == 0.0 and "blocked" in util["note"]

    trace = chrome_trace([events], {"plan": "fake"})
    check_chrome_json(trace)
    assert trace["otherData"] == {"plan": "fake"}
    path = write_chrome_trace(tmp_path / "sub" / "trace.json", [events])
    check_chrome_json(json.loads(path.read_text()))


def test_event_log_links_repeated_and_external_waits():
    stats = CommStats()
    log = stats.enable_events()
    assert stats.enable_events() is log  # idempotent: a second consumer keeps the same log
    event = stats.record("weight_gather", 32)
    work = _AllWorks([], stats, "weight_gather", event)  # sharding's Work: FSDP2 may wait on it twice
    work.wait()
    first_end = event.wait_end_s
    work.wait()
    assert event.waited and event.wait_end_s >= first_end >= event.wait_start_s >= event.issued_s
    assert event.blocked_s == pytest.approx(stats.wait_s["weight_gather"])
    stats.trace = []
    stats.record_wait("p2p", 0.5, None, 10.0)  # positional form, explicit end
    assert stats.trace == [("p2p", 0.5)] and (log[-1].wait_start_s, log[-1].wait_end_s) == (9.5, 10.0)
    stats.end_step()
    assert len(log) == 2, "closing a step resets the counters, never the log"


def _trace_worker(rank: int, world: int, path: str) -> dict:
    import torch.distributed as dist

    from opendit.diffusion.sampler import sample
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime
    from opendit.models.dit import build_dit, pixel_config
    from opendit.parallel.apply import parallelize

    runtime = build_runtime(ParallelConfig(ulysses=2), "cpu")
    config = pixel_config("DiT-T/2", 16)
    torch.manual_seed(0)
    pmodel = parallelize(build_dit(config).eval(), runtime)
    hook = TraceHook(runtime.stats, rank, align=dist.barrier)
    kwargs = {"num_classes": config.num_classes, "prediction": config.prediction, "learn_sigma": False}
    labels = torch.tensor([1, 2])
    shape = (config.in_channels, *config.input_size)
    hooks = [hook, *pmodel.step_hooks()]
    sample(pmodel, labels, shape, scheduler_name="flow-euler", steps=3, cfg_scale=4.0, seed=0, hooks=hooks, **kwargs)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, hook.events())  # what the CLI does to write one file
    if rank == 0:
        write_chrome_trace(path, everyone, {"plan": runtime.plan.describe()})
    return {"events": hook.events(), "summary": hook.summary(), "history": runtime.stats.history}


@pytest.mark.slow
def test_trace_two_ranks_ulysses(tmp_path):
    path = tmp_path / "trace.json"
    results = run_distributed(_trace_worker, 2, str(path), timeout=180)
    for rank, res in enumerate(results):
        events, summary = res["events"], res["summary"]
        check_well_formed(events, summary["wall_s"] * 1e6)
        assert {e["pid"] for e in events} == {rank}
        assert [e["args"]["step"] for e in events if e["cat"] == "step"] == [0, 1, 2]
        ops = [e for e in events if e["cat"] == "comm"]
        assert {"all_to_all", "all_gather"} <= {e["name"] for e in ops}
        for kind in {e["name"] for e in ops}:  # the events carry exactly what CommStats counted, step by step
            counted = [step[kind] for step in res["history"] if kind in step]
            assert len([e for e in ops if e["name"] == kind]) == sum(c["calls"] for c in counted)
            assert sum(e["args"]["bytes"] for e in ops if e["name"] == kind) == sum(c["bytes"] for c in counted)
        assert all(e["args"]["waited"] and e["args"]["bytes"] > 0 for e in ops)
        for key in ("busy_fraction", "waiting_fraction"):
            assert 0.0 <= summary[key] <= 1.0
        assert summary["busy_fraction"] + summary["waiting_fraction"] == pytest.approx(1.0)
        assert summary["steps"] == 3 and summary["model_s"] <= summary["wall_s"]
    util = utilisation_summary([r["summary"] for r in results])
    assert util["slowest_rank"] in (0, 1) and 0.0 <= util["min_busy_fraction"] <= util["mean_busy_fraction"] <= 1.0
    trace = json.loads(path.read_text())
    check_chrome_json(trace)
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0, 1}
    assert trace["otherData"]["plan"]
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == sum(len(r["events"]) for r in results)
