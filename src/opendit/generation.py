"""Requests: what a generation asks for, resolved (model, sampling defaults, parallel plan) and validated in the caller.

Two levels, because an `opendit.Engine` loads a model once and then serves many calls:
- engine level (`resolve_engine` -> `EngineSpec`): model source, dtype, VAE, device, processes, parallel plan;
- call level (`resolve_call` -> `Call`): classes, seed, steps, guidance, scheduler, image size.
Both are checked here, before any process is started or any message is sent, so a bad request raises OpenDiTError in
the caller and never reaches (or hangs) a worker. `prepare(request)` does both for a one-shot request (-> `Job`), and
`generate(request)` runs it on a one-shot engine (engine.py); per-rank execution is in worker.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opendit.checkpoint import read_sidecar_config
from opendit.diffusion.sampler import make_scheduler
from opendit.distributed.config import ParallelConfig, default_plan
from opendit.distributed.env import env_world_size, in_distributed_env
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, pixel_config, preset
from opendit.outputs import VAE_SCALE, GenerationResult, decode, labelled_grid, save_outputs  # noqa: F401 - re-exported
from opendit.parallel.registry import get_strategy
from opendit.precision import parse_dtype

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CKPT = WEIGHTS_DIR / "digits.safetensors"


@dataclass
class GenerationRequest:
    classes: list[int]
    model: str | None = None  # preset name; None with no ckpt -> the shipped digits model
    ckpt: str | None = None
    image_size: int | None = None  # pixels; None -> the model's own size
    steps: int | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = 0
    dtype: str = "fp32"
    vae: str | None = None
    device: str | None = None
    progress: bool = True
    nproc: int | None = None  # processes; None: 1, or torchrun's world, or the plan's product of degrees
    parallel: ParallelConfig | None = None  # degrees and options; None (or all degrees 1): chosen for nproc
    parallel_auto: bool = False  # with nproc > 1 and no degrees: the planner chooses (cost model), not default_plan
    trace: str | None = None  # write a Chrome trace JSON of the call (every rank's steps) to this file


@dataclass
class EngineSpec:
    """The engine-level request, resolved: what every rank needs to load and parallelise the model once."""

    settings: GenerationRequest  # the engine-level fields (classes and per-call fields unused)
    config: DiTConfig  # at the engine's default image size
    ckpt: str | None
    defaults: dict  # the model's steps, scheduler and cfg_scale
    note: str | None
    world: int
    plan: ParallelConfig
    plan_notes: list[str]
    load_config: DiTConfig | None = None  # the checkpoint's own size, when `config` is another (set after loading)


@dataclass
class Call:
    """One generate() call, validated: the small picklable message the caller sends to the serving ranks."""

    classes: list[int]
    seed: int
    steps: int
    scheduler: str
    cfg_scale: float
    config: DiTConfig  # the model at this call's image size
    request: dict  # the record's "request" entry
    trace: str | None = None  # absolute path of the Chrome trace to write, or None


@dataclass
class Job:
    """A request resolved and validated: everything every rank needs, checked before any process is started."""

    request: GenerationRequest
    config: DiTConfig
    ckpt: str | None
    steps: int
    scheduler: str
    cfg_scale: float
    note: str | None
    world: int  # processes: 1, --nproc, or torchrun's WORLD_SIZE
    plan: ParallelConfig
    plan_notes: list[str]


def resolve_model(request: GenerationRequest) -> tuple[DiTConfig, str | None, dict, str | None]:
    """(config, checkpoint, sampling defaults, note) for a request: from presets, sidecar JSON or the shipped model."""
    defaults = {"steps": 50, "scheduler": None, "cfg_scale": 4.0}
    note = None
    ckpt = request.ckpt
    if request.model is None and ckpt is None:
        if DEFAULT_CKPT.is_file():
            ckpt = str(DEFAULT_CKPT)
        else:
            note = "no trained default model is installed: using a randomly initialised DiT-T/2 (images are noise)"
            config = pixel_config("DiT-T/2", 16)
            return config, None, {**defaults, "scheduler": "flow-euler"}, note
    sidecar = read_sidecar_config(ckpt) if ckpt else None
    if sidecar is not None:
        config = DiTConfig.from_dict(sidecar["model"])
        if request.model is not None and preset(request.model).depth != config.depth:
            raise OpenDiTError(f"--model {request.model} does not match checkpoint {ckpt} (its config: {config})")
        defaults.update({k: sidecar[k] for k in ("steps", "scheduler", "cfg_scale") if k in sidecar})
    else:
        if request.model is None:
            raise OpenDiTError(f"checkpoint {ckpt} has no .json config beside it; pass --model (e.g. DiT-XL/2)")
        config = preset(request.model)
        if request.image_size is None:
            request.image_size = 256
    if request.image_size is not None:
        config = config.with_image_size(request.image_size)
    if defaults["scheduler"] is None:
        defaults["scheduler"] = "flow-euler" if config.prediction == "flow" else "ddpm"
    return config, ckpt, defaults, note


def resolve_engine(
    settings: GenerationRequest, images: int | None = None, cfg_scale: float | None = None
) -> EngineSpec:
    """Resolve the model and the processes, and choose the plan once (cheap: no weights are read).

    The automatic plan (no degrees given) depends on the batch and on guidance: a one-shot request passes its own
    (`images`, `cfg_scale`); a long-lived engine plans for the model's default guidance and one image, so that no
    automatic plan ever needs more images than a call has (dp is used only when asked for)."""
    parse_dtype(settings.dtype)
    config, ckpt, defaults, note = resolve_model(settings)
    world = _world_size(settings)
    guided = (cfg_scale if cfg_scale is not None else defaults["cfg_scale"]) != 1.0
    plan, plan_notes = choose_plan(settings, config, world, images or 1, guided)
    # Our checkpoints carry their own size: load at it, then move to the requested one (the sin-cos positions are
    # recomputed, never trained), so any valid size works. Other checkpoints load at the requested size, as before.
    sidecar = read_sidecar_config(ckpt) if ckpt else None
    native = DiTConfig.from_dict(sidecar["model"]) if sidecar is not None else None
    load_config = native if native is not None and native.input_size != config.input_size else None
    return EngineSpec(settings, config, ckpt, defaults, note, world, plan, plan_notes, load_config)


def choose_plan(
    request: GenerationRequest, config: DiTConfig, world: int, images: int, guided: bool
) -> tuple[ParallelConfig, list[str]]:
    """The plan the request asks for, or (no degrees given, world > 1) one chosen for it, with notes saying why."""
    plan = request.parallel or ParallelConfig()
    notes: list[str] = []
    if world == 1 or plan.world_size != 1:
        return plan, notes
    strategy = get_strategy(plan.sp_impl) if plan.sp_impl != "auto" else None
    if strategy is not None and len(strategy.uses) == 1:  # no degrees but a one-dimension kernel: all processes on it
        plan, why = replace(plan, **{strategy.uses[0]: world}), f"--sp-impl {plan.sp_impl} over all {world} processes"
    else:
        if request.parallel_auto:  # the planner: every valid plan ranked by the cost model
            from opendit.planning.planner import auto_plan

            auto, why = auto_plan(config, world, images, guided)
        else:
            auto, why = default_plan(world, config.num_heads, guided)
        plan = replace(
            plan,
            dp=auto.dp,
            cfg=auto.cfg,
            ulysses=auto.ulysses,
            ring=auto.ring,
            sp_impl=auto.sp_impl if plan.sp_impl == "auto" else plan.sp_impl,
            shard_weights=plan.shard_weights or auto.shard_weights,
        )
    if plan.balance_tokens and plan.sp_degree == 1:  # asked for, but the chosen plan has no sequence to split
        plan = replace(plan, balance_tokens=False)
        notes.append("--balance-tokens not used: the chosen plan has no sequence parallelism")
    notes.append(f"plan chosen automatically: {plan.describe()} ({why})")
    return plan, notes


def check_plan(plan: ParallelConfig, world: int, config: DiTConfig, images: int, guided: bool) -> list[str]:
    """Raise OpenDiTError if the plan cannot run this batch at this size; return the notes on exact fallbacks."""
    from opendit.planning.planner import check_request

    notes = check_request(plan, config, world, images, guided)  # an invalid plan's message names the nearest valid
    if plan.shard_weights and plan.sp_degree == 1:
        raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
    return notes


def check_sampling(
    config: DiTConfig, defaults: dict, classes: list[int], steps: int | None, cfg_scale: float | None, scheduler
) -> tuple[int, str, float]:
    """(steps, scheduler, cfg_scale) with the model's defaults filled in; OpenDiTError naming the fix if invalid."""
    if not classes:
        raise OpenDiTError("no classes given; pass e.g. --classes 0 1 2")
    steps = steps if steps is not None else defaults["steps"]
    scheduler = scheduler or defaults["scheduler"]
    cfg_scale = float(cfg_scale if cfg_scale is not None else defaults["cfg_scale"])
    if steps <= 0:
        raise OpenDiTError(f"steps must be positive, got {steps}; try --steps 30")
    if cfg_scale < 1.0:
        raise OpenDiTError(f"cfg scale must be >= 1 (1 disables guidance), got {cfg_scale}")
    make_scheduler(scheduler, config.prediction, config.learn_sigma)  # raises on a scheduler/model mismatch
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad:
        raise OpenDiTError(f"class id {bad[0]} is outside this model's range 0..{config.num_classes - 1}")
    return int(steps), scheduler, cfg_scale


def resolve_call(spec: EngineSpec, request: GenerationRequest) -> Call:
    """Validate one call against the engine (model, plan) and resolve its defaults; nothing is sent before this."""
    classes = [int(c) for c in request.classes]
    steps, scheduler, cfg_scale = check_sampling(
        spec.config, spec.defaults, classes, request.steps, request.cfg_scale, request.scheduler
    )
    config = spec.config
    if request.image_size is not None:
        config = spec.config.with_image_size(request.image_size)
    if config.input_size != spec.config.input_size and spec.plan.shard_weights:
        size = f"{config.image_size[0]}x{config.image_size[1]}"
        raise OpenDiTError(
            f"the image size is fixed when weights are sharded (--shard-weights): this engine makes "
            f"{spec.config.image_size[0]}x{spec.config.image_size[1]}; start a new engine for {size}"
        )
    if spec.world > 1:
        check_plan(spec.plan, spec.world, config, len(classes), cfg_scale != 1.0)
    record = asdict(replace(request, classes=classes))
    return Call(classes, int(request.seed), steps, scheduler, cfg_scale, config, record, request.trace)


def prepare(request: GenerationRequest) -> Job:
    """Resolve the model and sampling settings and validate the request and its parallel plan (cheap: no weights)."""
    if not request.classes:
        raise OpenDiTError("no classes given; pass e.g. --classes 0 1 2")
    parse_dtype(request.dtype)
    config, ckpt, defaults, note = resolve_model(request)
    steps, scheduler, cfg_scale = check_sampling(
        config, defaults, request.classes, request.steps, request.cfg_scale, request.scheduler
    )
    world = _world_size(request)
    guided = cfg_scale != 1.0
    plan, plan_notes = choose_plan(request, config, world, len(request.classes), guided)
    plan_notes += check_plan(plan, world, config, len(request.classes), guided)
    return Job(request, config, ckpt, steps, scheduler, cfg_scale, note, world, plan, plan_notes)


def _world_size(request: GenerationRequest) -> int:
    """Processes for this request: torchrun's world, else --nproc, else the plan's product of degrees."""
    if in_distributed_env():
        world = env_world_size()
        if request.nproc is not None and request.nproc != world:
            raise OpenDiTError(
                f"--nproc {request.nproc} conflicts with the {world} processes torchrun started; drop --nproc "
                "under torchrun (its --nproc-per-node x --nnodes sets the world)"
            )
        return world
    if request.nproc is not None:
        if request.nproc < 1:
            raise OpenDiTError(f"--nproc must be >= 1, got {request.nproc}")
        return request.nproc
    return request.parallel.world_size if request.parallel is not None else 1


# GenerationRequest fields that configure an Engine (the rest are per call).
ENGINE_FIELDS = (
    "model",
    "ckpt",
    "vae",
    "dtype",
    "nproc",
    "parallel",
    "parallel_auto",
    "device",
    "image_size",
    "progress",
)
