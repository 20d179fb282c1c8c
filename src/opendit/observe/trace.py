"""Per-rank timelines of the sampling loop as Chrome trace JSON, and a busy / waiting utilisation summary.

    hook = TraceHook(runtime.stats, rank, align=dist.barrier)      # before the runtime's own hooks (CommAccounting)
    sample(pmodel, labels, shape, ..., hooks=[hook, *pmodel.step_hooks()])
    everyone = [None] * world; dist.all_gather_object(everyone, hook.events())
    write_chrome_trace("trace.json", everyone, metadata={...})     # open in ui.perfetto.dev or chrome://tracing

Format: the Trace Event Format's JSON object form, {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}.
Every timed entry is a complete event ("ph": "X") with "ts" and "dur" in microseconds since the rank's t0 (below);
"pid" is the global rank (a process row "rank R"), "tid" a lane inside it:

    tid 0           steps         "step i", args {step, timestep, model_calls[, device_ms on CUDA]}
    tid 1           model calls   "model", args {step, call}
    tid 10 * (k+1)  collectives   one lane per kind k (all_to_all, all_gather, p2p, broadcast, weight_gather, others)
        + sub-lane  "all_to_all" etc. from the op's issue to its wait's end, args {kind, bytes, blocked_us, waited};
                    a nested "wait" slice covers the time the rank was blocked in wait(). X events on one lane must
                    nest, so ops of one kind that are in flight at the same time (K/V and Q all-to-alls, prefetched
                    weight gathers) go to sub-lanes tid + 1, + 2, ... (at most 9).

`chrome_trace` prepends the metadata events ("ph": "M") that name the processes and lanes.

Clock alignment: the times are perf_counter readings of each process, whose origin is arbitrary per process (and per
host). At the loop's start every rank calls `align()` (the caller passes a barrier over all ranks) and takes t0 right
after it returns, so ts = 0 is the same moment on every rank to within the barrier's exit skew (tens of microseconds
on one host over gloo; about one network latency across hosts). Later drift between the clocks is negligible over a
sampling loop. Without `align` each rank's timeline still starts at its own loop start, but ranks are not comparable.

Utilisation: waiting = time blocked in the wait() of collectives (what CommStats measures), clipped to the loop;
busy = the loop's wall time minus waiting (compute, scheduler, Python, and issuing collectives). An async op waited
later counts only its blocked part. On NCCL, wait() only orders the GPU stream and returns at once on the host, so
there a wait's blocked time is the GPU's stall between two CUDA events around it (CommStats.device_timing, which the
engine turns on for CUDA), placed to end where the host's wait returned; the sampler synchronises each step, so the
loop's wall time is device time too. The CUDA events the hook records per step give each step's device span.

The hook reads its collectives from the CommStats event log (`enable_events()`), never from the per-step counters,
which CommAccounting closes and resets at every step's end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opendit.diffusion.hooks import LoopInfo, StepContext, StepHook
from opendit.distributed.comm import CommEvent, CommStats

STEP_TID, MODEL_TID = 0, 1
KIND_ORDER = ("all_to_all", "all_gather", "p2p", "broadcast", "weight_gather")
_SUB_LANES = 10  # lanes per kind: tid 10 * (k + 1) + sub, sub < 10
_US = 1e6

UTILISATION_NOTE = (
    "waiting = time blocked in wait() of collectives (CommStats), clipped to the sampling loop; busy = loop wall time "
    "- waiting (compute, scheduler, Python and issuing collectives); busy_fraction + waiting_fraction = 1. "
    "slowest_rank = the rank with the most busy time (the others wait for it). On CUDA, waiting is the GPU's stall "
    "in each wait (CUDA events) and the steps are synchronised, so both are device time."
)


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class TraceHook(StepHook):
    """Records this rank's steps, model calls and collectives over one sampling loop (see the module docstring).

    stats: the runtime's CommStats (its event log is switched on for the loop, and off again if this hook switched it
    on). rank: the global rank (the trace's pid). align: called at the loop's start before t0 is taken, a barrier over
    all ranks. device: the model's device; on CUDA each step is also timed with CUDA events (device time).
    A hook reused for a second loop keeps only the last loop.
    """

    def __init__(
        self, stats: CommStats, rank: int, align: Callable[[], None] | None = None, device: Any = None
    ) -> None:
        self.stats, self.rank, self.align = stats, int(rank), align
        self._cuda = _is_cuda(device)
        self._reset()

    def _reset(self) -> None:
        self.t0: float | None = None
        self.t_end: float | None = None
        self.loop: LoopInfo | None = None
        self.steps: list[dict] = []  # {index, timestep, start_s, end_s, calls: [(start_s, end_s)]}
        self._log: list[CommEvent] = []
        self._first = 0  # index in the log of the loop's first op
        self._ops: list[CommEvent] | None = None  # the loop's ops, fixed at on_loop_end
        self._enabled_here = False
        self._cuda_marks: list[tuple[Any, Any]] = []  # (start, end) CUDA events per step

    # ------------------------------------------------------------------------------------------------ hook methods
    def on_loop_start(self, loop: LoopInfo) -> None:
        self._reset()
        self.loop = loop
        self._enabled_here = self.stats.events is None
        self._log = self.stats.enable_events()
        if self.align is not None:
            self.align()
        self._first = len(self._log)  # after align: a collective inside align is not part of the loop
        self.t0 = time.perf_counter()

    def on_step_start(self, ctx: StepContext) -> None:
        if self._cuda:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._cuda_marks.append((start, None))

    def on_step_end(self, ctx: StepContext) -> None:
        end_s = ctx.end_s if ctx.end_s is not None else time.perf_counter()
        calls = [(call.start_s, call.end_s) for call in ctx.model_calls]
        self.steps.append(
            {"index": ctx.index, "timestep": ctx.timestep, "start_s": ctx.start_s, "end_s": end_s, "calls": calls}
        )
        if self._cuda and self._cuda_marks and self._cuda_marks[-1][1] is None:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_marks[-1] = (self._cuda_marks[-1][0], end)

    def on_loop_end(self, loop: LoopInfo) -> None:
        self.t_end = time.perf_counter()
        # ops issued after the loop (e.g. the dp gather of the samples) are not part of it
        self._ops = [op for op in self._log[self._first :] if op.issued_s <= self.t_end]
        if self._enabled_here:
            self.stats.disable_events()

    # ------------------------------------------------------------------------------------------------ reading
    def _window(self) -> tuple[float, float]:
        """(t0, end) of the loop; a loop that raised before on_loop_end ends at its last step (or now)."""
        if self.t_end is not None:
            return self.t0, self.t_end
        return self.t0, self.steps[-1]["end_s"] if self.steps else time.perf_counter()

    def ops(self) -> list[CommEvent]:
        """The collectives issued during the loop, in issue order."""
        if self.t0 is None:
            return []
        if self._ops is not None:
            return self._ops
        _, end = self._window()
        return [op for op in self._log[self._first :] if op.issued_s <= end]

    def _device_ms(self, step: int) -> float | None:
        if not self._cuda or step >= len(self._cuda_marks) or self._cuda_marks[step][1] is None:
            return None
        start, end = self._cuda_marks[step]
        end.synchronize()  # elapsed_time needs both events done on the device
        return float(start.elapsed_time(end))

    def _x(self, name: str, cat: str, tid: int, start_s: float, end_s: float, args: dict) -> dict:
        """One complete event; times in microseconds since t0."""
        return {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": round((start_s - self.t0) * _US, 3),
            "dur": round(max(0.0, end_s - start_s) * _US, 3),
            "pid": self.rank,
            "tid": tid,
            "args": args,
        }

    def events(self) -> list[dict]:
        """This rank's Chrome trace events (JSON-serialisable dicts), steps, model calls then collectives."""
        if self.t0 is None:
            return []
        out = []
        for n, step in enumerate(self.steps):
            args = {"step": step["index"], "timestep": step["timestep"], "model_calls": len(step["calls"])}
            device_ms = self._device_ms(n)
            if device_ms is not None:
                args["device_ms"] = round(device_ms, 3)
            out.append(self._x(f"step {step['index']}", "step", STEP_TID, step["start_s"], step["end_s"], args))
            for j, (start_s, end_s) in enumerate(step["calls"]):
                out.append(self._x("model", "model", MODEL_TID, start_s, end_s, {"step": step["index"], "call": j}))
        return out + self._comm_events()

    def _comm_events(self) -> list[dict]:
        """One event per op from issue to wait end (plus its nested blocked slice), on non-overlapping sub-lanes."""
        kinds = list(KIND_ORDER)
        lane_end: dict[int, float] = {}  # tid -> end of the last op placed there
        out = []
        for op in sorted(self.ops(), key=lambda op: op.issued_s):
            if op.kind not in kinds:
                kinds.append(op.kind)
            base = _SUB_LANES * (kinds.index(op.kind) + 1)
            end_s = op.wait_end_s if op.wait_end_s is not None else op.issued_s
            free = [base + s for s in range(_SUB_LANES) if lane_end.get(base + s, float("-inf")) <= op.issued_s]
            tid = free[0] if free else base + _SUB_LANES - 1  # > 9 ops of one kind in flight: the last lane overlaps
            lane_end[tid] = max(end_s, lane_end.get(tid, end_s))
            args = {"kind": op.kind, "bytes": op.bytes, "blocked_us": round(op.blocked_s * _US, 3), "waited": op.waited}
            if not op.linked:
                args["linked"] = False  # a wait with no recorded issue (no bytes known)
            out.append(self._x(op.kind, "comm", tid, op.issued_s, end_s, args))
            if op.waited and op.blocked_s > 0:
                start = max(op.wait_start_s, op.issued_s)  # nested inside the op's slice
                out.append(self._x("wait", "comm_wait", tid, start, op.wait_end_s, {"kind": op.kind}))
        return out

    def summary(self) -> dict:
        """This rank's utilisation over the loop: wall_s = busy_s + waiting_s (see UTILISATION_NOTE)."""
        if self.t0 is None:
            raise RuntimeError("TraceHook.summary() before the sampling loop started (pass the hook to sample())")
        t0, end = self._window()
        wall = max(0.0, end - t0)
        waiting_by_kind: dict[str, float] = {}
        calls: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for op in self.ops():
            calls[op.kind] = calls.get(op.kind, 0) + int(op.linked)
            nbytes[op.kind] = nbytes.get(op.kind, 0) + op.bytes
            if op.waited:
                inside = max(0.0, min(op.wait_end_s, end) - max(op.wait_start_s, t0))
                waiting_by_kind[op.kind] = waiting_by_kind.get(op.kind, 0.0) + min(op.blocked_s, inside)
        # waits are sequential on one thread, so their sum fits in the wall time; the clamp absorbs rounding
        waiting = min(wall, sum(waiting_by_kind.values()))
        busy = wall - waiting
        result = {
            "rank": self.rank,
            "steps": len(self.steps),
            "wall_s": wall,
            "busy_s": busy,
            "waiting_s": waiting,
            "waiting_by_kind": waiting_by_kind,
            "busy_fraction": busy / wall if wall > 0 else 1.0,
            "waiting_fraction": waiting / wall if wall > 0 else 0.0,
            "model_s": sum(e - s for step in self.steps for s, e in step["calls"]),
            "calls_by_kind": calls,
            "bytes_by_kind": nbytes,
        }
        if self._cuda:
            device = [self._device_ms(n) for n in range(len(self.steps))]
            result["device_s"] = sum(ms for ms in device if ms is not None) / 1e3
        return result


# ---------------------------------------------------------------------------------------------------- whole trace
def _lane_name(event: dict) -> str:
    if event.get("cat") == "step":
        return "steps"
    if event.get("cat") == "model":
        return "model calls"
    kind = event.get("args", {}).get("kind")
    if kind is None:
        return f"lane {event['tid']}"
    sub = int(event["tid"]) % _SUB_LANES
    return f"{kind}" + (f" ({sub + 1})" if sub else "")


def _meta(name: str, pid: Any, tid: Any, args: dict) -> dict:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "ts": 0, "args": args}


def chrome_trace(per_rank_events: list[list[dict]], metadata: dict | None = None) -> dict:
    """One Chrome trace of every rank's `TraceHook.events()` (list i = rank i's; pids come from the events), with
    the metadata events that name each process "rank R" and each of its lanes, in rank then lane order."""
    meta: list[dict] = []
    named: set[tuple[Any, Any]] = set()
    for index, events in enumerate(per_rank_events):
        pid = events[0]["pid"] if events else index
        meta += [
            _meta("process_name", pid, 0, {"name": f"rank {pid}"}),
            _meta("process_sort_index", pid, 0, {"sort_index": index}),
        ]
        lanes = {}
        for event in events:
            key = (event["pid"], event["tid"])
            if key not in named:
                named.add(key)
                lanes[key] = _lane_name(event)
        for (lane_pid, tid), name in sorted(lanes.items(), key=lambda item: item[0][1]):
            meta += [
                _meta("thread_name", lane_pid, tid, {"name": name}),
                _meta("thread_sort_index", lane_pid, tid, {"sort_index": tid}),
            ]
    body = [event for events in per_rank_events for event in events]
    return {"traceEvents": meta + body, "displayTimeUnit": "ms", "otherData": dict(metadata or {})}


def write_chrome_trace(path: str | Path, per_rank_events: list[list[dict]], metadata: dict | None = None) -> Path:
    """Write `chrome_trace(...)` as JSON to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(per_rank_events, metadata)))
    return path


def utilisation_summary(per_rank_summaries: list[dict]) -> dict:
    """Every rank's `TraceHook.summary()` and how evenly the ranks were busy (see UTILISATION_NOTE)."""
    ranks = list(per_rank_summaries)
    if not ranks:
        return {
            "per_rank": [],
            "mean_busy_fraction": None,
            "min_busy_fraction": None,
            "slowest_rank": None,
            "note": UTILISATION_NOTE,
        }
    fractions = [r["busy_fraction"] for r in ranks]
    slowest = max(ranks, key=lambda r: (r["busy_s"], -r["rank"]))  # ties: the lowest rank
    return {
        "per_rank": ranks,
        "mean_busy_fraction": sum(fractions) / len(fractions),
        "min_busy_fraction": min(fractions),
        "slowest_rank": slowest["rank"],
        "note": UTILISATION_NOTE,
    }
