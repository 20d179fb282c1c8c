"""Load balancing: token shares proportional to per-rank speed, and many requests spread over dp groups.

Token shares (`ParallelConfig.token_shares`) only change how the sequence is split, so output stays exact. What they
can balance depends on the kernel: with ring attention every per-rank cost (linear layers, attention on T_r x T) is
proportional to the rank's tokens, so speed-proportional shares equalise the ranks; with Ulysses / FastSeq the
attention runs on a fixed head split over ALL tokens, so only the linear part (~2/3 of a DiT block at 1k tokens)
moves with the shares and a slow rank can be compensated only partly.

Requests over dp groups: each group runs its requests one after another, so the finish time of the job (makespan)
is the largest group total. `assign_requests` uses LPT (longest processing time first onto the group that would
finish earliest, which also handles groups of different speeds) followed by pairwise move/swap improvement, and
reports the makespan against the lower bound max(largest job, total / groups) and, for small sets, the exact optimum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from opendit.errors import OpenDiTError
from opendit.parallel.sequence import split_sizes


def speed_shares(speeds: Sequence[float]) -> tuple[float, ...]:
    """Token shares proportional to measured per-rank speed (any positive unit), normalised to sum 1."""
    speeds = [float(s) for s in speeds]
    if not speeds or any(not math.isfinite(s) or s <= 0 for s in speeds):
        raise OpenDiTError(f"rank speeds must be positive finite numbers, got {speeds}; measure them with calibrate")
    total = sum(speeds)
    return tuple(s / total for s in speeds)


class TokenBalancer:
    """Automatic token re-splitting during a run (`--balance-tokens`): measure, then re-split, up to `rounds` times.

    The runtime calls `observe(busy_s)` once per model call with this rank's busy time (call time minus time blocked
    in collectives). After `warmup` calls (lazy initialisation, caches) it averages the next `window`; then
    `exchange(busy)` (a collective over the sequence-parallel ranks, every rank in lockstep) returns every rank's
    average, and all ranks compute the same new sizes from the same numbers (speed-proportional shares). The sizes are
    adopted only if the predicted step time (largest busy time, each rank's cost taken as proportional to its tokens)
    falls by at least `min_gain`; otherwise balancing stops. Output stays exact: only the split changes.
    """

    def __init__(
        self,
        num_tokens: int,
        sizes: Sequence[int],
        exchange,
        warmup: int = 1,
        window: int = 2,
        rounds: int = 2,
        min_gain: float = 0.05,
    ):
        if warmup < 0 or window < 1 or rounds < 1 or not 0 <= min_gain < 1:
            raise OpenDiTError(
                f"balancer needs warmup >= 0, window >= 1, rounds >= 1 and 0 <= min_gain < 1; got {warmup}, {window}, "
                f"{rounds}, {min_gain}"
            )
        self.num_tokens, self.sizes, self.exchange = num_tokens, list(sizes), exchange
        self.warmup, self.window, self.rounds, self.min_gain = warmup, window, rounds, min_gain
        self.history: list[dict] = []  # one entry per decision: sizes before/after, busy times, predicted gain
        self._seen: list[float] = []
        self._calls = 0
        self.done = False

    def observe(self, busy_s: float) -> list[int] | None:
        """Record one call's busy time; returns new token sizes when this call ends a measurement window and
        re-splitting pays, else None. Collective (exchange) at the end of every window."""
        if self.done:
            return None
        self._calls += 1
        if self._calls <= self.warmup:
            return None
        self._seen.append(float(busy_s))
        if len(self._seen) < self.window:
            return None
        mine = sum(self._seen) / len(self._seen)
        self._seen, self._calls = [], 0
        busy = [max(1e-9, float(b)) for b in self.exchange(mine)]
        speeds = [n / b for n, b in zip(self.sizes, busy)]  # tokens per busy second, per rank
        new = split_sizes(self.num_tokens, len(self.sizes), speed_shares(speeds))
        predicted = max(n * b / s for n, b, s in zip(new, busy, self.sizes))
        gain = 1 - predicted / max(busy)
        adopt = gain >= self.min_gain and new != self.sizes
        self.history.append(
            {"sizes": self.sizes, "busy_s": busy, "new_sizes": new, "predicted_gain": gain, "adopted": adopt}
        )
        if not adopt or len(self.history) >= self.rounds:
            self.done = True
        if not adopt:
            return None
        self.sizes = new
        return new


# ------------------------------------------------------------------------------------------------ requests over dp
@dataclass
class Assignment:
    groups: list[list[int]]  # request indices per dp group, in run order
    loads: list[float]  # finish time of each group (seconds)
    makespan: float
    lower_bound: float
    optimum: float | None  # exact optimum when the set is small enough to search, else None
    method: str

    @property
    def ratio_to_bound(self) -> float:
        return self.makespan / self.lower_bound

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio_to_bound": self.ratio_to_bound}


def _loads(groups: list[list[int]], costs: Sequence[float], speeds: Sequence[float]) -> list[float]:
    return [sum(costs[i] for i in g) / s for g, s in zip(groups, speeds)]


def lower_bound(costs: Sequence[float], group_speeds: Sequence[float]) -> float:
    """No schedule beats the total work over the total speed, nor the largest job on the fastest group."""
    return max(sum(costs) / sum(group_speeds), max(costs) / max(group_speeds))


def optimal_makespan(costs: Sequence[float], group_speeds: Sequence[float], limit: int = 14) -> float | None:
    """Exact optimum by exhaustive search over assignments (groups ** n), None above `limit` requests."""
    n, k = len(costs), len(group_speeds)
    if n > limit or k**n > 5_000_000:
        return None
    best = math.inf
    for labels in itertools.product(range(k), repeat=n - 1):  # request 0 on group 0 is WLOG only for equal groups
        for first in range(k) if len(set(group_speeds)) > 1 else (0,):
            loads = [0.0] * k
            loads[first] += costs[0]
            for i, g in enumerate(labels, 1):
                loads[g] += costs[i]
            best = min(best, max(load / s for load, s in zip(loads, group_speeds)))
    return best


def _improve(groups: list[list[int]], costs: Sequence[float], speeds: Sequence[float]) -> None:
    """Moves and swaps that lower the largest group load, until none does (in place)."""
    improved = True
    while improved:
        improved = False
        loads = _loads(groups, costs, speeds)
        worst = max(range(len(groups)), key=loads.__getitem__)
        for other in range(len(groups)):
            if other == worst:
                continue
            pair_max = max(loads[worst], loads[other])
            for i in list(groups[worst]):  # move i from worst to other
                a = loads[worst] - costs[i] / speeds[worst]
                b = loads[other] + costs[i] / speeds[other]
                if max(a, b) < pair_max - 1e-12:
                    groups[worst].remove(i)
                    groups[other].append(i)
                    improved = True
                    break
            if improved:
                break
            for i, j in itertools.product(list(groups[worst]), list(groups[other])):  # swap i <-> j
                a = loads[worst] + (costs[j] - costs[i]) / speeds[worst]
                b = loads[other] + (costs[i] - costs[j]) / speeds[other]
                if max(a, b) < pair_max - 1e-12:
                    groups[worst][groups[worst].index(i)] = j
                    groups[other][groups[other].index(j)] = i
                    improved = True
                    break
            if improved:
                break


def assign_requests(
    costs: Sequence[float], groups: int, group_speeds: Sequence[float] | None = None, exact_limit: int = 14
) -> Assignment:
    """Spread requests with predicted costs (seconds on a speed-1 group) over `groups` dp groups.

    LPT, then move/swap local search; the exact optimum is also computed for up to `exact_limit` requests, and
    used when it beats the heuristic (so small sets are always optimal).
    """
    costs = [float(c) for c in costs]
    if groups < 1 or not costs or any(c < 0 or not math.isfinite(c) for c in costs):
        raise OpenDiTError(f"need >= 1 group and non-negative finite request costs, got {groups} groups, {costs}")
    speeds = [1.0] * groups if group_speeds is None else [float(s) for s in group_speeds]
    if len(speeds) != groups or any(s <= 0 for s in speeds):
        raise OpenDiTError(f"group_speeds must give {groups} positive speeds, got {speeds}")
    plan: list[list[int]] = [[] for _ in range(groups)]
    loads = [0.0] * groups
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # LPT onto the group that finishes it first
        g = min(range(groups), key=lambda g: (loads[g] + costs[i] / speeds[g], g))
        plan[g].append(i)
        loads[g] += costs[i] / speeds[g]
    _improve(plan, costs, speeds)
    loads = _loads(plan, costs, speeds)
    method = "lpt+local-search"
    optimum = optimal_makespan(costs, speeds, exact_limit)
    if optimum is not None and optimum < max(loads) - 1e-12:
        plan = _exact_assignment(costs, speeds, optimum)
        loads, method = _loads(plan, costs, speeds), "exact"
    return Assignment(
        groups=plan,
        loads=loads,
        makespan=max(loads),
        lower_bound=lower_bound(costs, speeds),
        optimum=optimum,
        method=method,
    )


def _exact_assignment(costs: Sequence[float], speeds: Sequence[float], target: float) -> list[list[int]]:
    k = len(speeds)
    for labels in itertools.product(range(k), repeat=len(costs)):
        plan: list[list[int]] = [[] for _ in range(k)]
        for i, g in enumerate(labels):
            plan[g].append(i)
        if max(_loads(plan, costs, speeds)) <= target + 1e-12:
            return plan
    raise AssertionError("the optimum was found by the same search")


def request_costs(model, requests: Sequence[dict], plan, speeds, steps: int = 50) -> list[float]:
    """Predicted seconds of each request ({"images", "tokens", "guided"}) on one dp group running `plan`
    (with dp=1): the costs for `assign_requests`."""
    from dataclasses import replace

    from opendit.planning.cost import predict_step_time

    group = replace(plan, dp=1)
    out = []
    for req in requests:
        guided = req.get("guided", True)
        batch = req["images"] * (2 if guided else 1)
        step = predict_step_time(model, req.get("tokens", model.num_tokens), batch, group, speeds, guided=guided)
        out.append(req.get("steps", steps) * step.total_s)
    return out
