"""The request schema (pydantic v2): every field a generation takes, typed, bounded and checked in one place.

Two models, split as the engine splits a request (engine.py):
- `EngineRequest`: fixed for an engine's life: model source (model, ckpt, vae), dtype, device, processes (nproc), the
  parallel plan (`ParallelRequest`, the fields of a ParallelConfig), parallel_auto, default image size, progress bar,
  or a diffusers pipeline folder (`diffusers`, run by opendit/pipelines.py instead of a DiT model);
- `CallRequest`: what each `generate()` call may change: classes (or prompts), seed, steps, scheduler, cfg_scale,
  image size, video motion / frames, the cache across steps, the output folder (`--out`) and the trace file.

The rules, in the order they run:
1. types are strict: no bool where a number is expected, no float -> int or str -> number coercion (numpy integer
   scalars count as integers; classes may also be a tuple, a range or a 1-D integer numpy array);
2. every number is bounded (each bound, and why, is next to its constant below), every float is finite;
3. rules across the fields of one request: seed + len(classes) - 1 within torch.Generator's range, --parallel auto
   without explicit degrees, --nproc vs torchrun's world (`EngineRequest.world_size`);
4. rules against the resolved engine (model and plan; `check_engine`, `CallRequest.resolve`): class ids vs the model's
   classes, scheduler vs the model's prediction type, image size vs the patch size, one size under sharded weights,
   and the plan vs the world size, batch, guidance and model (delegated to `check_plan`, i.e. the planner's
   check_request and ParallelConfig.validate, whose messages name the nearest valid plans).
Every failure is ONE OpenDiTError naming the field and the fix (`build` converts pydantic's ValidationError). A new
field is a typed, bounded attribute of one of these models plus its entry in FIELD_HELP.
"""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from opendit.cache.config import request_cache, spec_family
from opendit.diffusion.sampler import check_scheduler
from opendit.distributed.config import MESH_DIMS, ParallelConfig
from opendit.distributed.env import env_world_size, in_distributed_env
from opendit.errors import OpenDiTError
from opendit.models.dit import preset
from opendit.parallel.registry import get_strategy
from opendit.precision import AUTO, parse_dtype
from opendit.request_fields import (  # noqa: F401 - the bounds are part of the schema module's interface
    _DEGREE,
    _SWITCH,
    FIELD_HELP,
    MAX_CFG_SCALE,
    MAX_CLASS_ID,
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MAX_MEMORY_GIB,
    MAX_NAME_BYTES,
    MAX_NPROC,
    MAX_PATH_BYTES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MAX_WORLD,
    SEED_MAX,
    FieldHelp,
)


class _FieldError(ValueError):
    """Raised by this module's validators: `fragment` follows the field's label ("must be ...", "is empty");
    None means the standard "must be <what>, got <value>" sentence. `fix` overrides the field's example."""

    def __init__(self, fragment: str | None = None, fix: str | None = None):
        super().__init__(fragment or "invalid")
        self.fragment, self.fix = fragment, fix


# ------------------------------------------------------------------------------------------------ field types
def _plain_int(value: Any) -> Any:
    """numpy (or any other Integral) integer scalars -> int, exactly; bool and all else go to the strict check."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value  # a bytes path then fails the str check


def _check_path(value: str) -> str:
    """A path every os call can take: the errors of odd strings are reported here, not as tracebacks later."""
    if not value:
        raise _FieldError("must be a non-empty path")
    if "\0" in value:
        raise _FieldError("must not contain a NUL character")
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raise _FieldError("must be encodable as a file name (it holds unpaired surrogates)") from None
    if len(raw) > MAX_PATH_BYTES:
        raise _FieldError(f"is {len(raw)} bytes long, more than the {MAX_PATH_BYTES} a path may have")
    longest = max(len(part) for part in raw.split(b"/"))
    if longest > MAX_NAME_BYTES:
        raise _FieldError(f"has a {longest}-byte component, more than the {MAX_NAME_BYTES} a file name may have")
    return value


def _names_a_file(value: str) -> str:
    if not os.path.basename(os.path.normpath(value)) or os.path.normpath(value) in (".", ".."):
        raise _FieldError(f"must name a file, got {value!r}")  # "/" or ".": no file name to read (or add .json to)
    return value


def _check_device(value: str) -> str:
    match = re.fullmatch(r"(cpu|cuda)(?::(\d{1,4}))?", value)
    if match is None:
        raise _FieldError()
    if match[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match[2] or 0)
        if index >= count:
            raise _FieldError(
                f"{value} asks for GPU {index}, but this machine has {count} GPU(s)", fix="use --device cpu"
            )
    return value


def _check_model(value: str) -> str:
    if value.startswith("Latte-"):  # a video DiT preset (models/video_dit.py), for --video
        from opendit.models.video_dit import preset as video_preset

        video_preset(value)
    else:
        preset(value)  # raises "unknown model ...; choose one of ..."
    return value


def _as_motion_list(value: Any) -> Any:
    """One motion (a str) -> a one-entry list; a tuple -> a list."""
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, tuple) else value


def _check_dtype(value: str) -> str:
    if value == AUTO:  # resolved per engine (generation.resolve_dtype): bf16 where fast and documented, else fp32
        return value
    try:
        parse_dtype(value)
    except OpenDiTError:
        raise OpenDiTError(f"unknown dtype {value!r}; choose one of fp32, bf16, fp16, auto") from None
    return value


def _check_scheduler(value: str) -> str:
    check_scheduler(value)  # raises "unknown scheduler ...; choose one of ..."
    return value


def _check_sp_impl(value: str) -> str:
    if value != "auto":
        get_strategy(value)  # raises "unknown sp-impl ...; choose one of ..."
    return value


def _as_class_list(value: Any) -> Any:
    """Sequences of class ids -> a list (after a length check, so that a huge range is never materialised)."""
    is_array = isinstance(value, np.ndarray)
    if not (isinstance(value, (list, tuple, range)) or is_array):
        return value  # the strict list check names the type
    if is_array and (value.ndim != 1 or value.dtype.kind not in "iu"):
        raise _FieldError()
    if len(value) == 0:
        raise _FieldError("is empty (no classes given)")
    if len(value) > MAX_CLASSES:
        raise _FieldError(f"has {len(value)} entries, more than {MAX_CLASSES} per call", "split them over calls")
    return value.tolist() if is_array else list(value)


def _as_prompt_list(value: Any) -> Any:
    """One prompt (a str) -> a one-prompt list; a tuple -> a list (after a length check, as classes)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        return value  # the strict list check names the type
    if len(value) == 0:
        raise _FieldError("is empty (no prompts given)")
    if len(value) > MAX_CLASSES:
        raise _FieldError(f"has {len(value)} entries, more than {MAX_CLASSES} per call", "split them over calls")
    return list(value)


def _as_plan_fields(value: Any) -> Any:
    """A ParallelConfig -> its fields (validated like every other field); dicts (JSON) and None pass as they are."""
    return value.to_dict() if isinstance(value, ParallelConfig) else value


def _as_shares(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Int = Annotated[int, BeforeValidator(_plain_int)]
Degree = Annotated[Int, Field(ge=1, le=MAX_WORLD)]
Switch = bool  # strict: True or False only (no 0/1, no "yes")
PathText = Annotated[str, BeforeValidator(_fspath), AfterValidator(_check_path)]
FilePath = Annotated[PathText, AfterValidator(_names_a_file)]
ImageSize = Annotated[Int, Field(ge=1, le=MAX_IMAGE_SIZE)]
ClassId = Annotated[Int, Field(ge=0, le=MAX_CLASS_ID)]
Share = Annotated[float, Field(gt=0.0)]  # relative speed of one sequence rank
Shares = Annotated[tuple[Share, ...], Field(min_length=1, max_length=MAX_WORLD)]
Classes = Annotated[list[ClassId], BeforeValidator(_as_class_list), Field(min_length=1, max_length=MAX_CLASSES)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Prompts = Annotated[list[Prompt], BeforeValidator(_as_prompt_list), Field(min_length=1, max_length=MAX_CLASSES)]


class Schema(BaseModel):
    """Strict, closed (unknown fields refused), finite floats; `build` is the one way in."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def build(cls, fields: dict):
        """Validate `fields` into this model, or raise one OpenDiTError with a one-line message."""
        if not isinstance(fields, dict):
            raise OpenDiTError(f"a {cls.__name__} is built from a dict of its fields, got {type(fields).__name__}")
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise OpenDiTError(error_message(exc.errors(include_url=False)[0], cls)) from None


class ParallelRequest(Schema):
    """The fields of a ParallelConfig (distributed/config.py), typed and bounded; `config()` builds it."""

    dp: Degree = 1
    cfg: Annotated[Int, Field(ge=1, le=2)] = 1  # the two halves of guidance, or not split
    ulysses: Degree = 1
    ring: Degree = 1
    tp: Degree = 1
    pipefusion: Degree = 1
    patches: Annotated[Int, Field(ge=0, le=65536)] = 0  # 0: one per stage (ParallelConfig's default)
    warmup_steps: Annotated[Int, Field(ge=0, le=10000)] = 1
    sp_impl: Annotated[str, AfterValidator(_check_sp_impl)] = "auto"
    shard_weights: Switch = False
    comm_dtype: Literal["bf16", "fp16"] | None = None
    token_shares: Annotated[Shares | None, BeforeValidator(_as_shares)] = None  # None: an even split
    balance_tokens: Switch = False

    @model_validator(mode="after")
    def _world_in_range(self) -> ParallelRequest:
        world = self.dp * self.cfg * self.ulysses * self.ring * self.tp * self.pipefusion
        if world > MAX_WORLD:
            raise OpenDiTError(
                f"the parallel degrees dp={self.dp} x cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses} x "
                f"tp={self.tp} x pipefusion={self.pipefusion} need "
                f"{world} processes, more than {MAX_WORLD}; use smaller degrees (their product is the process count)"
            )
        return self

    def config(self) -> ParallelConfig:
        return ParallelConfig(**dict(self))


class EngineRequest(Schema):
    """What is fixed for an engine's life (opendit.Engine's arguments). Treat as immutable."""

    model: Annotated[str, AfterValidator(_check_model)] | None = None  # None with no ckpt: the shipped digits model
    ckpt: FilePath | None = None
    vae: PathText | None = None
    dtype: Annotated[str, AfterValidator(_check_dtype)] = "fp32"
    device: Annotated[str, AfterValidator(_check_device)] | None = None  # None: cuda if available
    nproc: Annotated[Int, Field(ge=1, le=MAX_NPROC)] | None = None  # None: 1, torchrun's world, or the plan's
    parallel: Annotated[ParallelRequest | None, BeforeValidator(_as_plan_fields)] = None  # None: chosen for nproc
    parallel_auto: Switch = False  # with no degrees: the planner chooses (cost model), not default_plan
    memory_gib: Annotated[float, Field(gt=0, le=MAX_MEMORY_GIB)] | None = None  # per rank: plans must fit in it
    image_size: ImageSize | None = None  # the engine's default size; None: the model's own
    progress: Switch = True
    diffusers: PathText | None = None  # a local diffusers pipeline folder: its own loop runs (opendit/pipelines.py)
    video: Switch = False  # a video DiT (the bundled digits video model, our checkpoints, Latte files): video.py

    @model_validator(mode="after")
    def _auto_or_degrees(self) -> EngineRequest:
        """--parallel auto with explicit degrees would silently ignore one of the two: refuse the pair."""
        plan = self.parallel
        given = {dim: getattr(plan, dim) for dim in MESH_DIMS if plan is not None and getattr(plan, dim) > 1}
        if self.parallel_auto and given:
            flags = " ".join("--cfg-parallel" if dim == "cfg" else f"--{dim} {n}" for dim, n in given.items())
            raise OpenDiTError(
                f"--parallel auto chooses the degrees itself, but {flags} was given; drop one of the two"
            )
        return self

    def plan(self) -> ParallelConfig | None:
        return self.parallel.config() if self.parallel is not None else None

    def world_size(self) -> int:
        """Processes for this request: torchrun's world, else nproc, else the plan's product of degrees."""
        if in_distributed_env():
            world = env_world_size()
            if self.nproc is not None and self.nproc != world:
                raise OpenDiTError(
                    f"--nproc {self.nproc} conflicts with the {world} processes torchrun started; drop --nproc "
                    "under torchrun (its --nproc-per-node x --nnodes sets the world)"
                )
            return world
        return self.nproc if self.nproc is not None else (self.plan().world_size if self.parallel is not None else 1)


@dataclass
class ResolvedCall:
    """A call's settings with the model's defaults filled in, checked against the engine."""

    steps: int
    scheduler: str
    cfg_scale: float
    config: Any  # DiTConfig (VideoDiTConfig) at this call's image size
    notes: list[str]
    labels: list[int] | None = None  # the model's labels (a motion model's digit + 10 * direction)
    cache: Any = None  # cache.CacheConfig (None: no cache)


class CallRequest(Schema):
    """What one generate() call asks for (None: the model's default, or the engine's image size)."""

    # classes (OpenDiT's DiT) or prompt (a --diffusers pipeline): which one the engine needs is checked in resolve
    classes: Classes | None = None
    seed: Annotated[Int, Field(ge=0, le=SEED_MAX)] = 0
    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)] | None = None
    scheduler: Annotated[str, AfterValidator(_check_scheduler)] | None = None
    cfg_scale: Annotated[float, Field(ge=1.0, le=MAX_CFG_SCALE)] | None = None
    image_size: ImageSize | None = None
    out: PathText | None = None  # the folder `opendit sample` writes (the library itself writes no images)
    trace: FilePath | None = None  # a Chrome trace JSON of the call
    prompt: Prompts | None = None  # one image each, all in one pipeline call
    negative_prompt: Prompt | None = None
    motion: (
        Annotated[list[str], BeforeValidator(_as_motion_list), Field(min_length=1, max_length=MAX_CLASSES)] | None
    ) = None  # --video, a model trained with motion: one direction per class, or one for all
    frames: Annotated[Int, Field(ge=1, le=1024)] | None = None  # --video: must be the model's own frame count
    # caching across steps: a method name ("pab", "fbcache", a registered one) with the flags below, or
    # {"method": name, **options}; cache/config.py checks these and names the fix
    cache: str | dict | None = None
    pab_range: Int | None = None
    pab_window: list[float] | None = None
    pab_mlp_range: Int | None = None
    cache_threshold: float | None = None
    cache_max_reuse: Int | None = None
    cache_guard_steps: Int | None = None

    @model_validator(mode="after")
    def _seeds_in_range(self) -> CallRequest:
        if self.classes is not None and self.prompt is not None:
            raise OpenDiTError(
                "pass --classes (OpenDiT's class-conditional DiT) or --prompt (a --diffusers pipeline), not both"
            )
        if self.classes is None:
            return self  # prompts: one generator for the whole call (pipelines.py)
        last = self.seed + len(self.classes) - 1
        if last > SEED_MAX:
            raise OpenDiTError(
                f"seed {self.seed} + {len(self.classes) - 1} (image i uses seed + i) exceeds 2**64 - 1, the largest "
                f"seed torch.Generator takes; use --seed {SEED_MAX - len(self.classes) + 1} or less"
            )
        return self

    def resolve(self, engine) -> ResolvedCall:
        """The rules against the engine's resolved model and plan (`engine`: a generation.EngineSpec), and the
        model's defaults filled in. Raises OpenDiTError naming the fix."""
        if self.prompt is not None or self.negative_prompt is not None:
            flag = "--prompt" if self.prompt is not None else "--negative-prompt"
            raise OpenDiTError(
                f"{flag} needs --diffusers DIR (a local diffusers text-to-image pipeline folder); OpenDiT's DiT "
                "models take --classes"
            )
        if self.classes is None:
            raise OpenDiTError("classes is required; e.g. --classes 0 1 2")
        config, defaults = engine.config, engine.defaults
        video = engine.settings.video
        if not video and (self.motion is not None or self.frames is not None):
            raise OpenDiTError(f"{'--motion' if self.motion is not None else '--frames'} applies to --video only")
        labels = self.classes
        if video:
            from opendit.video import motion_labels

            config = config.with_frames(self.frames)
            labels = motion_labels(self.classes, self.motion, config)
        steps = self.steps if self.steps is not None else defaults["steps"]
        scheduler = self.scheduler or defaults["scheduler"]
        cfg_scale = float(self.cfg_scale if self.cfg_scale is not None else defaults["cfg_scale"])
        check_scheduler(scheduler, config.prediction)  # e.g. ddpm on a flow model: names the schedulers that fit
        bad = [c for c in labels if c >= config.num_classes]
        if bad:
            raise OpenDiTError(f"class id {bad[0]} is outside this model's range 0..{config.num_classes - 1}")
        if self.image_size is not None:
            config = config.with_image_size(self.image_size)  # a multiple of the patch (x8 for latent models)
        if config.input_size != engine.config.input_size and engine.plan.shard_weights:
            have, want = engine.config.image_size, config.image_size
            raise OpenDiTError(
                f"the image size is fixed when weights are sharded (--shard-weights): this engine makes "
                f"{have[0]}x{have[1]}; start a new engine for {want[0]}x{want[1]}"
            )
        notes = check_plan(engine.plan, engine.world, config, len(self.classes), cfg_scale != 1.0)
        cache = request_cache(self, spec_family(config), engine.plan)
        return ResolvedCall(int(steps), scheduler, cfg_scale, config, notes, labels, cache)


def check_plan(plan: ParallelConfig, world: int, config, images: int, guided: bool) -> list[str]:
    """Raise OpenDiTError if the plan cannot run this batch at this size (cfg parallel without guidance, more dp
    groups than images, more sequence ranks than tokens, degrees vs world and heads, ...); return the notes on exact
    fallbacks. Delegates to the planner's check_request (ParallelConfig.validate + the nearest valid plans)."""
    from opendit.planning.planner import check_request

    notes = check_request(plan, config, world, images, guided)
    if plan.shard_weights and plan.sp_degree == 1:
        raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
    return notes


def check_engine(spec) -> list[str]:
    """An engine's plan against its world and model, before any process starts (`spec`: a generation.EngineSpec).
    Calls are checked again with their own batch and guidance (`CallRequest.resolve`)."""
    return check_plan(spec.plan, spec.world, spec.config, spec.plan.dp, spec.plan.cfg > 1)


# ------------------------------------------------------------------------------------------------ messages
def error_message(error: dict, model: type[BaseModel]) -> str:
    """pydantic's first error -> one line naming the field (and its flag) and the fix."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    cause = (error.get("ctx") or {}).get("error")
    if kind == "value_error" and isinstance(cause, Exception) and not isinstance(cause, _FieldError):
        return str(cause)  # a delegated check's own message (unknown model, plan rules, ...): it names its fix
    if kind == "extra_forbidden":
        return f"unknown field {loc[-1]!r}; the fields are: {', '.join(model.model_fields)}"
    key = f"{loc[-2]}[]" if len(loc) > 1 and isinstance(loc[-1], int) else str(loc[-1]) if loc else ""
    help = FIELD_HELP.get(key, FieldHelp("", "valid", "see `opendit sample --help`"))
    label = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if help.flag and help.flag != f"--{label}":
        label += f" ({help.flag})"
    if kind == "missing":
        return f"{label} is required; {help.fix}"
    if isinstance(cause, _FieldError) and cause.fragment:
        return f"{label} {cause.fragment}; {cause.fix or help.fix}"
    typed = kind.endswith("_type") or kind in ("is_instance_of", "model_attributes_type")
    return f"{label} must be {help.what}, got {shown(value, typed)}; {help.fix}"


def shown(value: Any, typed: bool = False) -> str:
    """A short, one-line rendering of a bad value (huge lists and integers summarised, long text cut)."""
    if isinstance(value, np.ndarray):
        text = f"an array of shape {value.shape} and dtype {value.dtype}"
    elif isinstance(value, (list, tuple, range)) and len(value) > 8:
        text = f"a {type(value).__name__} of {len(value)} entries"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        text = f"an integer of {value.bit_length()} bits"
    else:
        try:
            text = repr(value)
        except ValueError:  # e.g. a list holding an integer of more than 4300 digits (Python's str limit)
            text = f"a {type(value).__name__}"
        text = text if len(text) <= 60 else text[:57] + "..."
    name = type(value).__name__
    return f"{text} ({'an' if name[0] in 'aeiou' else 'a'} {name})" if typed else text
