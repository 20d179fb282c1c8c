"""Requests: what a generation asks for, validated at the boundary and resolved (model, defaults, plan) in the caller.

Two levels, because an `opendit.Engine` loads a model once and then serves many calls:
- engine level (`EngineRequest` -> `resolve_engine` -> `EngineSpec`): model source, dtype, VAE, device, processes,
  parallel plan;
- call level (`CallRequest` -> `resolve_call` -> `Call`): classes, seed, steps, guidance, scheduler, image size, the
  output folder and trace file.
The schema (request.py) checks every field's type and range; the resolution here adds the model (presets, sidecar
JSON: no weights) and the plan, and the schema's cross-field rules run against them. Output folders are created (or
refused) last, still before any process is started or any model is loaded, so a bad request raises OpenDiTError in
the caller and never reaches (or hangs) a worker. `GenerationRequest` is the user-facing dataclass of a one-shot
request (`opendit.generate`, the CLI): `prepare(request)` converts and checks it (-> `Job`), and `generate(request)`
runs it on a one-shot engine (engine.py); per-rank execution is in worker.py. A request with `diffusers` (a local
diffusers pipeline folder) resolves through opendit/api/pipelines.py instead: prompts, the pipeline's own loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from opendit.api.request import (  # noqa: F401 - check_plan re-exported
    CallRequest,
    EngineRequest,
    call_model,
    check_engine,
    check_plan,
)
from opendit.digits import WEIGHTS_DIR  # noqa: E402
from opendit.distributed.config import ParallelConfig, default_plan
from opendit.errors import OpenDiTError
from opendit.io.checkpoint import config_from_dict, read_sidecar_config
from opendit.io.outputs import (  # noqa: F401 - re-exported
    VAE_SCALE,
    GenerationResult,
    decode,
    labelled_grid,
    prepare_output_dir,
    prepare_trace_file,
    save_outputs,
)
from opendit.models.dit import DiTConfig, pixel_config, preset
from opendit.parallel.registry import get_strategy

DEFAULT_CKPT = WEIGHTS_DIR / "digits.safetensors"


class GenerationRequest:
    """A one-shot request as users write it: the engine's fields and the call's, as keyword arguments (request.py
    declares each one: EngineRequest, the call model with every cache method's options). Unset fields keep the
    schema's defaults; every value is checked when the request is prepared (types strict, ranges bounded)."""

    def __init__(self, **fields):
        known = request_field_names()
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise OpenDiTError(f"unknown field {unknown[0]!r} for opendit.generate; the fields are: "
                               f"{', '.join(known)}")  # fmt: skip
        self.__dict__.update({**known, **fields})

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other) -> bool:
        return isinstance(other, GenerationRequest) and other.__dict__ == self.__dict__

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if v != request_field_names()[k])
        return f"GenerationRequest({given})"


def request_field_names() -> dict:
    """Every field of a one-shot request with its default: the engine's, then the call's (`out` is the CLI's)."""
    from opendit.api.request import call_model

    engine = {name: info.get_default(call_default_factory=True) for name, info in EngineRequest.model_fields.items()}
    call = {name: info.get_default(call_default_factory=True) for name, info in call_model().model_fields.items()}
    call.pop("out")
    return {**engine, **call}


@dataclass
class EngineSpec:
    """The engine-level request, resolved: what every rank needs to load and parallelise the model once."""

    settings: EngineRequest  # as validated (device, dtype, vae, progress are read by every rank)
    config: DiTConfig  # at the engine's default image size
    ckpt: str | None
    defaults: dict  # the model's steps, scheduler and cfg_scale
    note: str | None
    world: int
    plan: ParallelConfig
    plan_notes: list[str]
    load_config: DiTConfig | None = None  # the checkpoint's own size, when `config` is another (set after loading)
    # what runs it on every rank ("module:Class", imported by name on each rank: engine/replica.py)
    runner = "opendit.engine.sampler_runner:SamplerRunner"

    @property
    def client_kind(self) -> str:
        """What a client names per image: a class (image models) or a class and a motion (video models)."""
        return "video" if self.settings.video else "class"

    def class_labels(self) -> list[str]:
        """Names of the class ids a client may ask for (a motion model's: its digits)."""
        count = getattr(self.config, "num_classes", 0)
        if getattr(self.config, "motion", False):
            count = 10  # digit + 10 * direction: clients name the digit and the motion
        return [str(label) for label in range(count)]

    @property
    def vae_split_planned(self) -> bool:
        """Whether the VAE decode runs split over the ranks at the engine's image size (--vae-parallel, or auto:
        parallel/vae.split_planned); then every rank loads the VAE and decodes a band of the latent's rows."""
        from opendit.parallel.vae import split_planned

        rows = self.config.input_size[0]
        return bool(self.config.latent) and split_planned(self.settings.vae_parallel, rows, self.world)

    def worker_bytes(self) -> int:
        """Parameter bytes each worker will hold (for the launcher's memory warning): the whole model in its dtype,
        1/P of it (+ one block in flight) with sharded weights."""
        from opendit.models.precision import parse_dtype
        from opendit.models.spec import spec_for

        counts = spec_for(self.config).count_params(self.config)
        itemsize = parse_dtype(self.settings.dtype).itemsize
        if self.plan.shard_weights and self.plan.sp_degree > 1:
            return int((counts["total"] / self.plan.sp_degree + counts["block"]) * itemsize)
        return counts["total"] * itemsize

    def resolve_call(self, request: CallRequest) -> Call:
        """One call validated against this engine: see `resolve_call`."""
        return _resolve_dit_call(self, request)


@dataclass
class Call:
    """One generate() call, validated: the small picklable message the caller sends to the serving ranks."""

    classes: list[int]  # the model's labels (for a motion model: digit + 10 * direction)
    seed: int
    steps: int
    scheduler: str
    cfg_scale: float
    config: DiTConfig  # the model at this call's image size (a VideoDiTConfig under --video)
    request: dict  # the record's "request" entry
    trace: str | None = None  # absolute path of the Chrome trace to write, or None
    notes: list[str] = field(default_factory=list)  # the plan's notes for this call's batch and size
    cache: Any = None  # a cache.CacheConfig, or None
    image_seeds: list[int] | None = None  # per image, when merge_calls batched several requests (else seed + i)


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
    engine: EngineRequest | None = None  # the validated schema objects the job was built from
    call: CallRequest | None = None
    spec: Any = None  # the engine spec and the call, resolved: what engine.run_job runs without checking again
    resolved: Any = None


def resolve_model(request: GenerationRequest) -> tuple[DiTConfig, str | None, dict, str | None]:
    """(config, checkpoint, sampling defaults, note) for a request: from presets, the checkpoint's own config (the
    .json beside our safetensors, or a training checkpoint's; a run directory means its checkpoints/latest.pt) or
    the shipped model. The checkpoint is checked here, in the caller (headers and shapes, no weights): a bad file is
    named before any process starts."""
    from opendit.io.checkpoint import check_fits, inspect_checkpoint

    if request.video:
        from opendit.api.video import resolve_video_model

        return resolve_video_model(request)
    defaults = {"steps": 50, "scheduler": None, "cfg_scale": 4.0}
    note = None
    ckpt = request.ckpt
    if request.model is not None and request.model.startswith("Latte-"):
        raise OpenDiTError(f"{request.model} is a video model: add --video")
    if request.model is None and ckpt is None:
        if DEFAULT_CKPT.is_file():
            ckpt = str(DEFAULT_CKPT)
        else:
            note = "no trained default model is installed: using a randomly initialised DiT-T/2 (images are noise)"
            config = pixel_config("DiT-T/2", 16)
            return config, None, {**defaults, "scheduler": "flow-euler"}, note
    info = inspect_checkpoint(ckpt) if ckpt else None
    native = info.config if info is not None else None
    if native is not None:
        config = native
        if not isinstance(config, DiTConfig):
            raise OpenDiTError(f"{ckpt} is a video model: add --video")
        if request.model is not None and preset(request.model).depth != config.depth:
            raise OpenDiTError(f"--model {request.model} does not match checkpoint {ckpt} (its config: {config})")
        defaults.update({k: info.meta[k] for k in ("steps", "scheduler", "cfg_scale") if k in info.meta})
    else:
        if info is not None and request.model is None:
            raise OpenDiTError(
                f"checkpoint {ckpt} has no model config (no .json beside it, not a training checkpoint of opendit "
                "train); pass --model (e.g. DiT-XL/2) and --image-size"
            )
        config = preset(request.model)
        if request.image_size is None:
            request.image_size = 256
    if request.image_size is not None:
        config = config.with_image_size(request.image_size)
    if info is not None:  # ours load at their own size (resolve_engine), the others at the requested one
        check_fits(info, native or config)
    if defaults["scheduler"] is None:
        defaults["scheduler"] = "flow-euler" if config.prediction == "flow" else "ddpm"
    return config, str(info.path) if info is not None else None, defaults, note


def resolve_engine(
    settings: EngineRequest | GenerationRequest, images: int | None = None, cfg_scale: float | None = None
) -> EngineSpec:
    """Validate the engine-level fields, resolve the model and the processes, and choose and check the plan once
    (cheap: no weights are read), through the source the request names (families/sources.py).

    The automatic plan (no degrees given) depends on the batch and on guidance: a one-shot request passes its own
    (`images`, `cfg_scale`); a long-lived engine plans for the model's default guidance and one image, so that no
    automatic plan ever needs more images than a call has (dp is used only when asked for)."""
    from opendit.families.sources import resolve_source

    return resolve_source(engine_request(settings), images, cfg_scale)


def resolve_checkpoint_engine(settings: EngineRequest, images: int | None, cfg_scale: float | None) -> EngineSpec:
    """The engine spec of an OpenDiT checkpoint or preset (see resolve_engine)."""
    from opendit.models.spec import spec_for

    world = settings.world_size()
    config, ckpt, defaults, note = resolve_model(settings.model_copy())  # a copy: it may fill in the image size
    settings, dtype_note = resolve_dtype(settings, spec_for(config).bf16_drift)  # before planning: plans use it
    guided = (cfg_scale if cfg_scale is not None else defaults["cfg_scale"]) != 1.0
    plan, plan_notes = choose_plan(settings, config, world, images or 1, guided)
    # Our checkpoints carry their own size: load at it, then move to the requested one (the sin-cos positions are
    # recomputed, never trained), so any valid size works. Other checkpoints load at the requested size, as before.
    sidecar = read_sidecar_config(ckpt) if ckpt else None
    native = config_from_dict(sidecar["model"]) if sidecar is not None else None
    load_config = native if native is not None and native.input_size != config.input_size else None
    spec = EngineSpec(settings, config, ckpt, defaults, note, world, plan, dtype_note + plan_notes, load_config)
    spec.plan_notes += check_engine(spec)  # the plan vs the world and the model; each call is checked again
    if settings.vae_parallel and not config.latent:
        raise OpenDiTError("--vae-parallel splits a VAE decode, but this model is pixel-space (no VAE); drop it")
    if settings.vae_parallel and world == 1:
        spec.plan_notes.append("--vae-parallel with one process: the VAE decodes whole")
    return spec


DIFFUSERS_BF16_DRIFT = (
    "diffusers transformers are published for half precision; parallel bf16 = one process within 1e-2"
)


def resolve_dtype(settings: EngineRequest, drift: str | None) -> tuple[EngineRequest, list[str]]:
    """--dtype auto -> the concrete dtype (precision.choose_dtype: this device's calibrated bf16 gain and the model's
    documented drift, `drift`) and a note saying why; any other dtype is kept as asked."""
    from opendit.models.precision import AUTO, choose_dtype
    from opendit.planning.speeds import resolve_speeds

    if settings.dtype != AUTO:
        return settings, []
    speeds = resolve_speeds()
    name, why = choose_dtype(speeds.half_speedup, drift, speeds.source or speeds.name)
    return settings.model_copy(update={"dtype": name}), [f"--dtype auto -> {name}: {why}"]


def choose_plan(
    request: EngineRequest, config: DiTConfig, world: int, images: int, guided: bool
) -> tuple[ParallelConfig, list[str]]:
    """The plan the request asks for, or (no degrees given, world > 1) one chosen for it, with notes saying why."""
    plan = request.plan() or ParallelConfig()
    notes: list[str] = []
    if request.memory_gib is not None:
        return fit_memory(request, config, world, images, guided, plan)
    if world == 1 or plan.world_size != 1:
        return plan, notes
    strategy = get_strategy(plan.sp_impl) if plan.sp_impl != "auto" else None
    if strategy is not None and len(strategy.uses) == 1:  # no degrees but a one-dimension kernel: all processes on it
        plan, why = replace(plan, **{strategy.uses[0]: world}), f"--sp-impl {plan.sp_impl} over all {world} processes"
    else:
        if request.parallel_auto:  # the planner: every valid plan ranked by the cost model
            from opendit.models.precision import parse_dtype
            from opendit.planning.planner import auto_plan
            from opendit.planning.speeds import resolve_speeds, speeds_in_dtype

            speeds = speeds_in_dtype(resolve_speeds(), parse_dtype(request.dtype).itemsize)  # ranked in the run's dtype
            auto, why = auto_plan(config, world, images, guided, speeds=speeds)
        else:
            auto, why = default_plan(world, config.num_heads, guided)
        plan = replace(
            plan,
            dp=auto.dp,
            cfg=auto.cfg,
            ulysses=auto.ulysses,
            ring=auto.ring,
            tp=auto.tp,
            sp_impl=auto.sp_impl if plan.sp_impl == "auto" else plan.sp_impl,
            shard_weights=plan.shard_weights or auto.shard_weights,
        )
    if plan.balance_tokens and plan.sp_degree == 1:  # asked for, but the chosen plan has no sequence to split
        plan = replace(plan, balance_tokens=False)
        notes.append("--balance-tokens not used: the chosen plan has no sequence parallelism")
    notes.append(f"plan chosen automatically: {plan.describe()} ({why})")
    return plan, notes


def fit_memory(
    request: EngineRequest, config: DiTConfig, world: int, images: int, guided: bool, plan: ParallelConfig
) -> tuple[ParallelConfig, list[str]]:
    """--memory-gib G: the requested plan (degrees given, or one process) if its predicted whole-run peak per rank
    fits G, else OpenDiTError with the advice; with no degrees, the planner's fastest plan that fits (sharded weights
    are a candidate unless the request asks for them, then only they are)."""
    from opendit.io.outputs import vae_memory_bytes
    from opendit.models.precision import parse_dtype
    from opendit.parallel.vae import split_planned
    from opendit.planning.planner import Workload, fit_plan
    from opendit.planning.speeds import resolve_speeds, speeds_in_dtype

    speeds = speeds_in_dtype(resolve_speeds(memory_gib=request.memory_gib), parse_dtype(request.dtype).itemsize)
    bands = world if config.latent and split_planned(request.vae_parallel, config.input_size[0], world) else 1
    vae = vae_memory_bytes(request.vae, config.image_size, images, bands) if config.latent else 0.0
    given = world == 1 or plan.world_size != 1
    shard = (True,) if plan.shard_weights else (False, True)
    chosen, why = fit_plan(Workload(config, images, guided, vae), world, speeds, plan if given else None, shard)
    if not given:  # keep the request's own options (kernel, comm dtype, balancing) on the chosen degrees
        chosen = replace(
            plan, dp=chosen.dp, cfg=chosen.cfg, ulysses=chosen.ulysses, ring=chosen.ring, tp=chosen.tp,
            sp_impl=plan.sp_impl if plan.sp_impl != "auto" else chosen.sp_impl, shard_weights=chosen.shard_weights,
        )  # fmt: skip
    split = f" (the VAE decode split over the {world} ranks: a band of rows each)" if bands > 1 else ""
    return chosen, [f"memory: {why}{split}"]


def resolve_call(spec: EngineSpec, request: CallRequest | GenerationRequest) -> Call:
    """Validate one call against the engine (model, plan), resolve its defaults and create (or refuse) its output
    folders: nothing is sent, and nothing computed, before this."""
    return spec.resolve_call(call_request(request))  # the engine's own kind: a DiT's, or a pipeline's


def _resolve_dit_call(spec: EngineSpec, request: CallRequest) -> Call:
    resolved = request.resolve(spec)
    if request.out is not None:
        prepare_output_dir(request.out, "--out")
    trace = None
    if request.trace is not None:
        trace = os.path.abspath(prepare_trace_file(request.trace))  # absolute: workers may not share the cwd
    asked = {  # the record's (the DiT path's fields only)
        **spec.settings.model_dump(exclude={"diffusers"}),
        **request.model_dump(exclude={"out", "prompt", "negative_prompt"}),
        "trace": trace,
    }
    asked["image_size"] = request.image_size if request.image_size is not None else spec.settings.image_size
    return Call(
        classes=resolved.labels if resolved.labels is not None else request.classes,
        seed=request.seed,
        steps=resolved.steps,
        scheduler=resolved.scheduler,
        cfg_scale=resolved.cfg_scale,
        config=resolved.config,
        request=asked,
        trace=trace,
        notes=resolved.notes,
        cache=resolved.cache,
    )


def prepare(request: GenerationRequest, out: str | os.PathLike | None = None) -> Job:
    """Convert and validate a one-shot request and its parallel plan, resolve the model and sampling settings, and
    create (or refuse) the output folder `out` and the trace's folder (cheap: no weights, no processes)."""
    if not isinstance(request, GenerationRequest):
        raise OpenDiTError(f"expected an opendit.GenerationRequest, got {type(request).__name__}")
    settings = engine_request(request)
    call = call_request(request, out)  # every field's type and range checked before anything is resolved
    spec = resolve_engine(settings, len(call.classes) if call.classes is not None else None, call.cfg_scale)
    resolved = resolve_call(spec, call)
    notes = list(dict.fromkeys(spec.plan_notes + resolved.notes))
    return Job(
        request, spec.config, spec.ckpt, resolved.steps, resolved.scheduler, resolved.cfg_scale, spec.note,
        spec.world, spec.plan, notes, settings, call, spec, resolved,
    )  # fmt: skip


def engine_request(request: EngineRequest | GenerationRequest) -> EngineRequest:
    """The engine-level fields of a request, validated (an EngineRequest passes as it is)."""
    if isinstance(request, EngineRequest):
        return request
    return EngineRequest.build({name: getattr(request, name) for name in ENGINE_FIELDS})


def call_request(request: CallRequest | GenerationRequest, out: str | os.PathLike | None = None) -> CallRequest:
    """The call-level fields of a request, validated (a CallRequest passes as it is)."""
    if isinstance(request, CallRequest):
        return request
    values = {name: getattr(request, name) for name in call_fields()}
    return call_model().build({**values, "out": out} if out is not None else values)


# GenerationRequest fields that configure an Engine, and those of one call (image_size is both: the engine's default
# and the call's size; `out` is the CLI's, not a GenerationRequest field).
ENGINE_FIELDS = tuple(EngineRequest.model_fields)


def call_fields() -> tuple[str, ...]:
    """The call's fields (with every registered cache method's options) but `out`."""
    return tuple(name for name in call_model().model_fields if name != "out")
