"""The planner: every valid parallel plan for a request, predicted with the cost model, filtered by memory, ranked.

A pure function of its inputs (model config, tokens, images, CFG, world size, speeds with per-device memory): no
process groups, no devices touched, so it runs for hardware this machine cannot reach (8x H100, 2 nodes over IB).

Objectives:
- latency (default): the wall time of THIS request, steps x the busiest group's step time (dp groups get ⌈images/dp⌉);
- throughput: images per second in steady state with a queue of such requests, every dp group busy with
  ⌈images/dp⌉ images (dp may exceed the images of one request: the other groups serve the next requests).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.spec import spec_for
from opendit.parallel.registry import strategies_for
from opendit.planning.cost import MemoryCost, Speeds, StepCost
from opendit.planning.pipefusion_cost import memory, request_s, step_time

GIB = 1 << 30
OBJECTIVES = ("latency", "throughput")


@dataclass
class PlanEstimate:
    config: ParallelConfig
    step: StepCost
    memory: MemoryCost
    fits: bool
    request_s: float  # steps x step time of the busiest group
    images_per_s: float

    def score(self, objective: str) -> float:
        return self.request_s if objective == "latency" else -self.images_per_s

    def row(self) -> dict:
        return {
            "plan": self.config.describe(),
            "config": self.config.to_dict(),
            "step_s": self.step.total_s,
            "request_s": self.request_s,
            "images_per_s": self.images_per_s,
            "compute_s": self.step.compute_s,
            "comm_exposed_s": self.step.comm_s,
            "comm_hidden_s": self.step.hidden_s,
            "overhead_s": self.step.overhead_s,
            "bytes_per_rank_per_step": self.step.bytes_per_rank,
            "calls_per_rank_per_step": self.step.calls_per_rank,
            "memory_bytes": self.memory.total,
            "memory": self.memory.to_dict(),
            "fits": self.fits,
        }


@dataclass
class PlanResult:
    objective: str
    ranked: list[PlanEstimate]  # plans that fit, best first
    dropped: list[PlanEstimate]  # plans that do not fit in memory, leanest first
    request: dict = field(default_factory=dict)

    @property
    def best(self) -> PlanEstimate:
        return self.ranked[0]

    def explain(self, others: int = 3) -> str:
        return explain(self, others)

    def table(self, top: int = 5) -> str:
        lines = [f"{'#':>2} {'plan':<44} {'step ms':>9} {'request s':>10} {'img/s':>8} {'MB/step':>9} {'GiB/rank':>9}"]
        for i, est in enumerate(self.ranked[:top], 1):
            lines.append(
                f"{i:>2} {est.config.describe():<44} {est.step.total_s * 1e3:>9.2f} {est.request_s:>10.3f} "
                f"{est.images_per_s:>8.3g} {est.step.bytes_per_rank / 1e6:>9.2f} {est.memory.total / GIB:>9.2f}"
            )
        return "\n".join(lines)

    def to_dict(self, top: int | None = None) -> dict:
        return {
            "objective": self.objective,
            "request": self.request,
            "best": self.best.row(),
            "why": self.explain(),
            "ranked": [e.row() for e in self.ranked[:top]],
            "dropped_for_memory": len(self.dropped),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(
    world_size: int,
    num_heads: int,
    tokens: int,
    images: int,
    guided: bool,
    impls: tuple[str, ...] | None = None,
    shard_options: tuple[bool, ...] = (False, True),
    queue: bool = False,
    frames: int = 1,
    tensor: bool = False,
    pipeline_depth: int = 0,
) -> list[ParallelConfig]:
    """Every plan that ParallelConfig.validate accepts. queue=True lets dp exceed the request's images; `frames`: a
    video model's frame count (`tokens` is then the positions per frame; DSP needs it); `tensor`: the model
    declares a tensor-parallel split, so tp degrees are candidates too; `pipeline_depth`: the model declares a
    PipeFusion split over that many blocks, so PipeFusion over every rank is a candidate (stale: see `plan`)."""
    plans = _pipefusion_plans(world_size, tokens, pipeline_depth, num_heads, max(images, 1), guided, frames)
    max_images = max(images, world_size) if queue else images
    for dp, cfg in itertools.product(_divisors(world_size), (1, 2) if guided else (1,)):
        if world_size % (dp * cfg) or dp > max_images:
            continue
        inner = world_size // (dp * cfg)
        for tp, ulysses in itertools.product(_divisors(inner) if tensor else (1,), _divisors(inner)):
            if inner % (tp * ulysses):
                continue
            sp = inner // tp
            ring = sp // ulysses
            # every registered strategy that runs on these degrees (parallel/registry.py), or none without sp
            fits = [s.name for s in strategies_for(ulysses, ring)]
            candidates = ["auto"] if sp == 1 else [i for i in fits if impls is None or i in impls]
            options = itertools.product(candidates, shard_options if sp > 1 else (False,))
            plans += _valid(
                [
                    ParallelConfig(dp=dp, cfg=cfg, ulysses=ulysses, ring=ring, tp=tp, sp_impl=i, shard_weights=shard)
                    for i, shard in options
                ],
                (world_size, num_heads, tokens, max_images, guided, frames),
            )
    return plans


def _valid(plans: list[ParallelConfig], request: tuple) -> list[ParallelConfig]:
    """The plans ParallelConfig.validate accepts for request = (world, heads, tokens, images, guided, frames)."""
    world, heads, tokens, images, guided, frames = request
    out = []
    for plan in plans:
        try:
            plan.validate(world, heads, tokens, images, guided, frames=frames)
        except OpenDiTError:
            continue
        out.append(plan)
    return out


def _pipefusion_plans(world, tokens, depth, num_heads, images, guided, frames) -> list[ParallelConfig]:
    """PipeFusion over all `world` ranks (it runs alone on the mesh) with M = N, 2N and 4N patches, one warm-up step:
    more patches shrink the pipeline's bubble ((M + N - 1) / (M N) of one device's time) but run smaller matmuls."""
    if world == 1 or depth < world:
        return []
    plans = [ParallelConfig(pipefusion=world, patches=patches) for patches in (world, 2 * world, 4 * world)]
    return _valid(plans, (world, num_heads, tokens, images, guided, frames))


def estimate(
    model,
    tokens: int,
    images: int,
    guided: bool,
    plan: ParallelConfig,
    speeds: Speeds,
    steps: int,
    decode_bytes: float = 0.0,
) -> PlanEstimate:
    per_image = 2 if guided else 1
    batch = max(images, plan.dp) * per_image  # throughput: each dp group holds at least one image
    step = step_time(model, tokens, batch, plan, speeds, guided=guided)
    mem = memory(model, tokens, batch, plan, speeds, guided=guided, decode_bytes=decode_bytes)
    group_images = math.ceil(max(images, plan.dp) / plan.dp)
    total_s = request_s(step, steps)  # PipeFusion: its warm-up steps at their own (slower) time
    return PlanEstimate(
        config=plan,
        step=step,
        memory=mem,
        fits=mem.total <= speeds.memory_bytes,
        request_s=total_s,
        images_per_s=plan.dp * group_images / total_s,
    )


def _rank_key(e: PlanEstimate, objective: str) -> tuple:
    """Best first; ties: fewer bytes, unsharded weights, then the simpler plan (less ring, less tp)."""
    c = e.config
    return (round(e.score(objective), 12), e.step.bytes_per_rank, c.shard_weights, c.pipefusion, c.ring, c.tp)


def _no_fit(speeds: Speeds, images: int, tokens: int, world_size: int, dropped: list[PlanEstimate]) -> OpenDiTError:
    lean = dropped[:3]
    return OpenDiTError(
        f"no plan fits {speeds.memory_bytes / GIB:.1f} GiB per device for {images} image(s) of {tokens} tokens "
        f"on {world_size} rank(s); the leanest need "
        + "; ".join(f"{e.config.describe()}: {e.memory.total / GIB:.1f} GiB" for e in lean)
        + ". Fix: more devices (sequence parallel divides activations, --shard-weights or --tp divides weights), "
        "fewer images per request, or a smaller dtype (--dtype bf16)"
    )


def plan(
    model,
    world_size: int,
    speeds: Speeds,
    images: int = 1,
    guided: bool = True,
    tokens: int | None = None,
    steps: int = 50,
    objective: str = "latency",
    memory_bytes: float | None = None,
    impls: tuple[str, ...] | None = None,
    shard_options: tuple[bool, ...] = (False, True),
    decode_bytes: float = 0.0,
    stale: bool = True,
) -> PlanResult:
    """Rank every valid plan for a request. Raises OpenDiTError when none fits, naming the leanest plans.
    stale=False leaves out the plans whose outputs drift from one device's (PipeFusion's stale K/V); `--parallel
    auto` and memory fitting ask for exact plans only, `opendit plan` shows both."""
    if objective not in OBJECTIVES:
        raise OpenDiTError(f"unknown objective {objective!r}; choose latency or throughput")
    if world_size < 1 or images < 1 or steps < 1:
        raise OpenDiTError(f"world size, images and steps must be >= 1 (got {world_size}, {images}, {steps})")
    dims = spec_for(model).dims(model, tokens)
    tokens = dims.num_tokens
    if memory_bytes is not None:
        speeds = speeds.with_memory(memory_bytes)
    queue = objective == "throughput"
    tensor = spec_for(model).tensor_split is not None
    depth = dims.depth if stale and spec_for(model).stage_view is not None and impls is None else 0
    configs = enumerate_plans(
        world_size, dims.num_heads, tokens, images, guided, impls, shard_options, queue, dims.sequences, tensor, depth
    )
    if not configs:
        raise OpenDiTError(
            f"no valid plan for {world_size} ranks, {dims.num_heads} heads, {tokens} tokens; use at most {tokens} ranks"
        )
    estimates = [estimate(model, tokens, images, guided, c, speeds, steps, decode_bytes) for c in configs]

    ranked = sorted((e for e in estimates if e.fits), key=lambda e: _rank_key(e, objective))
    dropped = sorted((e for e in estimates if not e.fits), key=lambda e: e.memory.total)
    request = {
        "model": {k: getattr(model, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")},
        "tokens": tokens,
        "images": images,
        "guided": guided,
        "world_size": world_size,
        "steps": steps,
        "hardware": speeds.name,
        "memory_per_device_gib": speeds.memory_bytes / GIB,
    }
    if not ranked:
        raise _no_fit(speeds, images, tokens, world_size, dropped)
    return PlanResult(objective=objective, ranked=ranked, dropped=dropped, request=request)


def _parts(e: PlanEstimate) -> dict[str, float]:
    return {"compute": e.step.compute_s, "communication": e.step.comm_s, "overhead": e.step.overhead_s}


def explain(result: PlanResult, others: int = 3) -> str:
    """Why the winner wins: its time split, then for the next plans the component that costs them the most."""
    best = result.best
    s = best.step
    unit = "request" if result.objective == "latency" else "throughput"
    lines = [
        f"best ({result.objective}): {best.config.describe()}: {s.total_s * 1e3:.2f} ms/step predicted "
        f"(compute {s.compute_s * 1e3:.2f}, exposed communication {s.comm_s * 1e3:.2f}, hidden {s.hidden_s * 1e3:.2f},"
        f" overhead {s.overhead_s * 1e3:.2f}), {s.bytes_per_rank / 1e6:.2f} MB sent per rank per step, "
        f"{best.memory.total / GIB:.2f} GiB per rank of {result.request.get('memory_per_device_gib', 0):.1f}"
    ]
    if best.config.pipefusion > 1:
        warm = best.step.detail["warmup_step_s"]
        lines.append(
            f"  PipeFusion: {best.config.warmup_steps} synchronous step(s) at {warm * 1e3:.2f} ms, then stale K/V "
            f"(outputs drift from one device; exact plans only: `--exact-only`); it sends "
            f"{best.step.bytes_per_rank / 1e6:.2f} MB per step in P2P patches instead of per-block collectives"
        )
    for other in result.ranked[1 : 1 + others]:
        if result.objective == "latency":
            loss = other.request_s / best.request_s - 1
        else:
            loss = best.images_per_s / other.images_per_s - 1
        diffs = {k: other_v - _parts(best)[k] for k, other_v in _parts(other).items()}
        worst = max(diffs, key=diffs.get)
        why = f"{worst} +{diffs[worst] * 1e3:.2f} ms/step"
        if other.config.pipefusion > 1:
            why += f" (stale K/V after {other.config.warmup_steps} exact step(s): outputs drift)"
        if worst == "communication":
            why += f" ({other.step.bytes_per_rank / 1e6:.2f} vs {s.bytes_per_rank / 1e6:.2f} MB/step)"
        if result.objective == "throughput" and other.config.dp != best.config.dp:
            why += f", {other.config.dp} vs {best.config.dp} independent groups"
        lines.append(f"  vs {other.config.describe()}: {loss:+.1%} {unit}; {why}")
    if result.dropped:
        lean = result.dropped[0]
        lines.append(
            f"  {len(result.dropped)} plan(s) dropped for memory, e.g. {lean.config.describe()} needs "
            f"{lean.memory.total / GIB:.2f} GiB"
        )
    return "\n".join(lines)


def _distance(a: ParallelConfig, b: ParallelConfig) -> float:
    dims = ("dp", "cfg", "ulysses", "ring", "tp", "pipefusion")
    d = sum(abs(math.log2(getattr(a, n)) - math.log2(getattr(b, n))) for n in dims)
    d += 0.5 * (a.sp_impl not in ("auto", b.sp_impl)) + 0.25 * (a.shard_weights != b.shard_weights)
    return d


def nearest_plans(
    requested: ParallelConfig,
    world_size: int,
    num_heads: int,
    tokens: int,
    images: int,
    guided: bool,
    k: int = 3,
    tensor: bool = False,
    pipeline_depth: int = 0,
) -> list[ParallelConfig]:
    """The k valid plans closest to a requested one (distance in log2 of the degrees, then kernel and sharding);
    `tensor`: tp degrees are candidates (the model declares a tensor-parallel split); `pipeline_depth`: PipeFusion
    plans too (asked for when the request is one)."""
    valid = enumerate_plans(world_size, num_heads, tokens, images, guided, tensor=tensor, pipeline_depth=pipeline_depth)
    return sorted(valid, key=lambda p: (_distance(requested, p), p.ring, -p.cfg))[:k]


def check_request(
    requested: ParallelConfig,
    model,
    world_size: int,
    images: int,
    guided: bool,
    tokens: int | None = None,
    speeds: Speeds | None = None,
) -> list[str]:
    """Validate a user's plan; on failure raise OpenDiTError naming the nearest valid plans (and, with speeds,
    a plan that fits memory). Returns ParallelConfig.validate's notes."""
    dims = spec_for(model).dims(model, tokens)
    tokens = dims.num_tokens
    tensor = spec_for(model).tensor_split is not None
    if requested.tp > 1 and not tensor:
        raise OpenDiTError(
            f"{spec_for(model).name} declares no tensor-parallel split; drop --tp (use --ulysses / --ring)"
        )
    try:
        notes = requested.validate(world_size, dims.num_heads, tokens, images, guided, frames=dims.sequences)
    except OpenDiTError as exc:
        depth = dims.depth if requested.pipefusion > 1 and spec_for(model).stage_view is not None else 0
        near = nearest_plans(requested, world_size, dims.num_heads, tokens, images, guided, 3, tensor, depth)
        names = "; ".join(p.describe() for p in near) or "none (check the world size)"
        raise OpenDiTError(f"{exc}. Nearest valid plans for {world_size} rank(s): {names}") from exc
    if speeds is not None:
        batch = images * (2 if guided else 1)
        mem = memory(model, tokens, batch, requested, speeds, guided=guided)
        if mem.total > speeds.memory_bytes:
            fitting = [
                e.config
                for e in sorted(
                    (
                        estimate(model, tokens, images, guided, c, speeds, 1)
                        for c in enumerate_plans(
                            world_size, dims.num_heads, tokens, images, guided, frames=dims.sequences, tensor=tensor
                        )
                    ),
                    key=lambda e: (_distance(requested, e.config), e.memory.total),
                )
                if e.fits
            ][:3]
            raise OpenDiTError(
                f"plan {requested.describe()} needs {mem.total / GIB:.2f} GiB per device, more than "
                f"{speeds.memory_bytes / GIB:.2f} GiB; nearest plans that fit: "
                + ("; ".join(p.describe() for p in fitting) or "none: use more devices or fewer images")
            )
    return notes


def auto_plan(model_config, world_size: int, images: int, guided: bool, objective: str = "latency", speeds=None):
    """The planner's best ParallelConfig for a generate() request, and its explanation (for `--parallel auto`).

    speeds: None -> this machine's cached calibration (else the documented default of its class).
    """
    from opendit.planning.speeds import resolve_speeds

    if world_size < 1:
        raise OpenDiTError(f"--nproc must be >= 1 for --parallel auto, got {world_size}")
    result = plan(
        model_config, world_size, speeds or resolve_speeds(), images=images, guided=guided, objective=objective,
        stale=False,
    )  # fmt: skip
    return result.best.config, result.explain(others=2)


# ------------------------------------------------------------------------------------------------ fitting memory
def plan_flags(config: ParallelConfig) -> str:
    """The `opendit sample` flags of a plan (the degrees and the switches the planner varies)."""
    flags = [f"--nproc {config.world_size}"] if config.world_size > 1 else []
    dims = ("dp", "ulysses", "ring", "tp")
    flags += [f"--{dim} {getattr(config, dim)}" for dim in dims if getattr(config, dim) > 1]
    flags += ["--cfg-parallel"] if config.cfg > 1 else []
    flags += ["--shard-weights"] if config.shard_weights else []
    if config.pipefusion > 1:
        flags += [f"--pipefusion {config.pipefusion} --patches {config.patch_count}"]
    return " ".join(flags) or "one process"


@dataclass(frozen=True)
class Workload:
    """What one call generates, as the memory fit sees it: the model (its config), the images per call, whether CFG
    doubles the batch, and the VAE decode's bytes (weights + activations, outputs.vae_memory_bytes) that the output
    rank pays after sampling."""

    model: object
    images: int
    guided: bool
    decode_bytes: float = 0.0

    def estimate(self, plan: ParallelConfig, speeds: Speeds) -> PlanEstimate:
        """One step's estimate of `plan` at the model's own token count."""
        tokens = spec_for(self.model).dims(self.model).num_tokens
        return estimate(self.model, tokens, self.images, self.guided, plan, speeds, 1, self.decode_bytes)


def _leanest(work: Workload, world: int, speeds: Speeds) -> PlanEstimate | None:
    spec = spec_for(work.model)
    dims, tensor = spec.dims(work.model), spec.tensor_split is not None
    configs = enumerate_plans(
        world, dims.num_heads, dims.num_tokens, work.images, work.guided, frames=dims.sequences, tensor=tensor
    )
    return min((work.estimate(c, speeds) for c in configs), key=lambda e: e.memory.total, default=None)


def memory_advice(work: Workload, world: int, speeds: Speeds, max_world: int = 256) -> str:
    """What would fit `speeds.memory_bytes` per rank: the fewest ranks (from `world` up, doubling) with their leanest
    plan, and a half-precision dtype at `world` ranks when the request is in fp32."""
    options = []
    ranks = max(world, 2) if world == 1 else world * 2
    while ranks <= max_world:
        lean = _leanest(work, ranks, speeds)
        if lean is not None and lean.fits:
            options.append(f"{plan_flags(lean.config)} ({lean.memory.total / GIB:.2f} GiB per rank predicted)")
            break
        ranks *= 2
    if speeds.dtype_bytes == 4:
        lean = _leanest(work, world, replace(speeds, dtype_bytes=2))
        if lean is not None and lean.fits:
            options.append(f"--dtype bf16 with {plan_flags(lean.config)} ({lean.memory.total / GIB:.2f} GiB per rank)")
    return " or ".join(options) if options else f"nothing up to {max_world} ranks in half precision: more memory"


def fit_plan(
    work: Workload, world: int, speeds: Speeds, requested: ParallelConfig | None = None, shard_options=(False, True)
) -> tuple[ParallelConfig, str]:
    """A plan whose predicted whole-run peak fits `speeds.memory_bytes` per rank, and why: `requested` (given
    degrees, or one process) if it fits, else (no degrees) the planner's fastest plan that fits, with weight sharding
    among `shard_options`. When nothing fits, OpenDiTError with the predicted need and `memory_advice` (how many
    ranks, or which dtype, would fit)."""
    budget = speeds.memory_bytes / GIB
    if requested is not None or world == 1:
        requested = requested or ParallelConfig()
        est = work.estimate(requested, speeds)
        if est.fits:
            return requested, f"{est.memory.total / GIB:.2f} GiB per rank predicted, within {budget:g}"
        raise OpenDiTError(
            f"{plan_flags(requested)} needs {est.memory.total / GIB:.2f} GiB per rank (whole run, predicted: "
            f"{_phases(est)}), more than --memory-gib {budget:g}; fits with {memory_advice(work, world, speeds)}"
        )
    try:
        result = plan(work.model, world, speeds, work.images, work.guided, steps=1, decode_bytes=work.decode_bytes,
                      shard_options=shard_options, stale=False)  # fmt: skip
    except OpenDiTError as exc:
        if "no plan fits" not in str(exc):
            raise
        lean, advice = _leanest(work, world, speeds), memory_advice(work, world, speeds)
        raise OpenDiTError(
            f"no plan for {world} ranks fits --memory-gib {budget:g} per rank (the leanest, {plan_flags(lean.config)},"
            f" needs {lean.memory.total / GIB:.2f} GiB: {_phases(lean)}); fits with {advice}"
        ) from None
    best = result.best
    dropped = f", {len(result.dropped)} plan(s) dropped for memory" if result.dropped else ""
    return best.config, f"fastest plan within --memory-gib {budget:g}: {best.memory.total / GIB:.2f} GiB{dropped}"


def _phases(est: PlanEstimate) -> str:
    m = est.memory
    parts = {"process": m.process, "loading": m.loading, "sampling": m.sampling, "decode": m.decode}
    return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
