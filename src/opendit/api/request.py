"""The request schema (pydantic v2): every field a generation takes, typed, bounded and checked in one place.

Two models, split as the engine splits a request (engine.py):
- `EngineRequest`: fixed for an engine's life: model source (model, ckpt, vae), dtype, device, processes (nproc), the
  parallel plan (`ParallelRequest`, the fields of a ParallelConfig), parallel_auto, default image size, progress bar,
  or a diffusers pipeline folder (`diffusers`, run by opendit/api/pipelines.py instead of a DiT model);
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
field is one typed, bounded attribute of one of these models with its text (`described`): the CLI flags, the Engine
keywords and the server's body are derived from it (surfaces.py); a cache method's options join the call's fields
from its own Options model (`call_model`).
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
from opendit.diffusion.sampler import SCHEDULERS, check_scheduler
from opendit.distributed.config import MESH_DIMS, ParallelConfig
from opendit.distributed.env import env_world_size, in_distributed_env
from opendit.errors import OpenDiTError
from opendit.models.dit import preset
from opendit.models.precision import AUTO, parse_dtype
from opendit.parallel.registry import get_strategy


class _FieldError(ValueError):
    """Raised by this module's validators: `fragment` follows the field's label ("must be ...", "is empty");
    None means the standard "must be <what>, got <value>" sentence. `fix` overrides the field's example."""

    def __init__(self, fragment: str | None = None, fix: str | None = None):
        super().__init__(fragment or "invalid")
        self.fragment, self.fix = fragment, fix


# Bounds (inclusive). Each is a limit of the code or of the hardware, not a taste:
MAX_STEPS = 1000  # every scheduler here runs on DiT's 1000-step training schedule; diffusers' DDPM/DDIM refuse more
MAX_CLASSES = 1024  # images per call: one batch (x2 with guidance) is held at once on every rank; >= ImageNet's 1000
MAX_CLASS_ID = 2**31 - 1  # labels are int64 tensors; no model has more classes (the model's own range is checked too)
MAX_IMAGE_SIZE = 8192  # pixels per side: DiT-XL/2 at 8192 px is 262,144 tokens, past what one generation can hold
MAX_CFG_SCALE = 100.0  # guidance saturates images long before (DiT uses 1.5-4); keeps s * (cond - uncond) far from inf
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes -2**63 .. 2**64 - 1 and wraps negatives (-1 == 2**64 - 1),
# so seeds are 0 .. 2**64 - 1 and image i's seed + i must stay in range (image i draws its noise from seed + i)
MAX_WORLD = 1024  # each mesh degree and their product: one process per device; past any job this code targets
MAX_NPROC = 256  # --nproc starts local processes, each holding a model replica: 16x the largest node (16 GPUs)
MAX_PATH_BYTES = 4096  # Linux PATH_MAX: longer paths fail in every os call (ENAMETOOLONG)
MAX_MEMORY_GIB = 1 << 20  # per rank: a PiB, far beyond any device, still a finite number
MAX_NAME_BYTES = 255  # Linux NAME_MAX, per path component
MAX_PROMPT_CHARS = 1 << 16  # per prompt: text encoders read at most a few hundred tokens (CLIP 77, T5 512) of it


_DEGREE = f"an integer from 1 to {MAX_WORLD}"
_SWITCH = "True or False"


# ------------------------------------------------------------------------------------------------ field types
def _plain_int(value: Any) -> Any:
    """numpy (or any other Integral) integer scalars -> int, exactly; bool and all else go to the strict check."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


def _plain_float(value: Any) -> Any:
    """A numpy bool -> bool (refused by the strict check, as True is); numpy numbers -> float, exactly."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, torch.Tensor):  # strict float would read a tensor through __float__: refused as any non-number
        return _opaque(value)
    return value


def _opaque(value: Any) -> Any:
    """A stand-in that no numeric check accepts, shown as `value` and named by its type in the error."""
    text = repr(value)
    return type(type(value).__name__, (), {"__repr__": lambda _self: text})()


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
Float = Annotated[float, BeforeValidator(_plain_float)]
Degree = Annotated[Int, Field(ge=1, le=MAX_WORLD)]
Switch = bool  # strict: True or False only (no 0/1, no "yes")
PathText = Annotated[str, BeforeValidator(_fspath), AfterValidator(_check_path)]
FilePath = Annotated[PathText, AfterValidator(_names_a_file)]
ImageSize = Annotated[Int, Field(ge=1, le=MAX_IMAGE_SIZE)]
ClassId = Annotated[Int, Field(ge=0, le=MAX_CLASS_ID)]
Share = Annotated[Float, Field(gt=0.0)]  # relative speed of one sequence rank
Shares = Annotated[tuple[Share, ...], Field(min_length=1, max_length=MAX_WORLD)]
Classes = Annotated[list[ClassId], BeforeValidator(_as_class_list), Field(min_length=1, max_length=MAX_CLASSES)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Prompts = Annotated[list[Prompt], BeforeValidator(_as_prompt_list), Field(min_length=1, max_length=MAX_CLASSES)]


def described(default: Any = None, *, help: str, what: str, example: str, flag: str | None = None,
              item: tuple[str, str] | None = None, cli: dict | None = None) -> Any:  # fmt: skip
    """A request field's one declaration of its text: `help` (the CLI's --help and the server's schema), `what` a
    valid value is and an `example` of one (every error message names them), the CLI `flag` where it is not
    --name-with-dashes, the (what, example) of a list's `item`s, and `cli` specifics for argparse (group, nargs,
    metavar, action, const, choices, default; skip: no flag). surfaces.py derives the CLI flags, the Engine
    keywords and the server's body from these."""
    meta = {"what": what, "example": example, "flag": flag, "item": item, "cli": cli or {}}
    return Field(default, description=help, json_schema_extra={OPENDIT_META: meta})


OPENDIT_META = "x-opendit"


def field_meta(info) -> dict:
    """The `described` metadata of a model field ({} for a field declared without it)."""
    extra = info.json_schema_extra
    return dict(extra.get(OPENDIT_META, {})) if isinstance(extra, dict) else {}


def field_flag(name: str, info) -> str:
    return field_meta(info).get("flag") or "--" + name.replace("_", "-")


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


_PAR = {"group": "parallel"}
# the one image_size field: the engine's default size and a call's own (one flag, one schema entry)
IMAGE_SIZE = described(
    None,
    help="output size in pixels (default: the model's own)",
    what=f"an integer from 1 to {MAX_IMAGE_SIZE} (pixels)",
    example="e.g. --image-size 256",
)


class ParallelRequest(Schema):
    """The fields of a ParallelConfig (distributed/config.py), typed and bounded; `config()` builds it."""

    dp: Degree = described(1, help="data parallel: groups that each generate a share of the images",
                           what=_DEGREE, example="e.g. --dp 2", cli=_PAR)  # fmt: skip
    cfg: Annotated[Int, Field(ge=1, le=2)] = described(
        1, help="conditional / unconditional halves on 2 groups", what="1 or 2", example="pass --cfg-parallel for 2",
        flag="--cfg-parallel", cli={**_PAR, "action": "store_const", "const": 2},
    )  # fmt: skip
    ulysses: Degree = described(1, help="Ulysses (all-to-all, head-parallel) sequence degree", what=_DEGREE,
                                example="e.g. --ulysses 2", cli=_PAR)  # fmt: skip
    ring: Degree = described(1, help="ring-attention sequence degree", what=_DEGREE, example="e.g. --ring 2", cli=_PAR)
    tp: Degree = described(
        1, help="tensor parallel: attention heads, MLP and adaLN weights split over N ranks (innermost)", what=_DEGREE,
        example="e.g. --tp 2", cli=_PAR,
    )  # fmt: skip
    pipefusion: Degree = described(1, help="PipeFusion: the blocks in N stages, image patches pipelined",
                                   what=_DEGREE, example="e.g. --pipefusion 2", cli=_PAR)  # fmt: skip
    patches: Annotated[Int, Field(ge=0, le=65536)] = described(  # 0: one per stage (ParallelConfig's default)
        0, help="PipeFusion: patches M >= N (default: N)", what="an integer from 0 to 65536 (0: one per stage)",
        example="e.g. --patches 4", cli=_PAR,
    )  # fmt: skip
    warmup_steps: Annotated[Int, Field(ge=0, le=10000)] = described(
        1, help="PipeFusion: synchronous (exact) first steps (default 1)", what="an integer from 0 to 10000",
        example="e.g. --warmup-steps 2", cli=_PAR,
    )  # fmt: skip
    sp_impl: Annotated[str, AfterValidator(_check_sp_impl)] = described(
        "auto", help="sequence-parallel strategy (default: the registry's for the degrees, ulysses-overlap on "
        "--ulysses; fastseq and ulysses use the --ulysses degree)", what="auto or a registered strategy",
        example="see `opendit plan --list-strategies`", cli={**_PAR, "choices": "strategies"},
    )  # fmt: skip
    shard_weights: Switch = described(False, help="shard weights over the sequence-parallel group", what=_SWITCH,
                                      example="pass --shard-weights or leave it out", cli=_PAR)  # fmt: skip
    comm_dtype: Literal["bf16", "fp16"] | None = described(
        None, help="send activations in this dtype", what="bf16, fp16 or None", example="e.g. --comm-dtype bf16",
        cli={**_PAR, "choices": ("bf16", "fp16")},
    )  # fmt: skip
    token_shares: Annotated[Shares | None, BeforeValidator(_as_shares)] = described(  # None: an even split
        None, help="relative speed of each sequence rank (uneven devices)", what="None or a tuple of relative speeds",
        example="e.g. token_shares=(1.0, 2.0)", item=("a finite speed > 0", "e.g. token_shares=(1.0, 2.0)"),
        cli={"skip": True},
    )  # fmt: skip
    balance_tokens: Switch = described(
        False, help="re-split the sequence by each rank's measured speed after the first steps (uneven devices; exact)",
        what=_SWITCH, example="pass --balance-tokens or leave it out", cli=_PAR,
    )  # fmt: skip

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

    model: Annotated[str, AfterValidator(_check_model)] | None = described(  # None, no ckpt: the shipped digits
        None, help="preset name (see `opendit models`); default: the shipped digits model",
        what="a preset name (`opendit models` lists them)", example="e.g. --model DiT-XL/2",
    )  # fmt: skip
    ckpt: FilePath | None = described(
        None, help="checkpoint: official DiT .pt, training .pt, or our .safetensors (+ .json)",
        what="a path to a .pt or .safetensors file", example="e.g. --ckpt DiT-XL-2-256x256.pt",
    )  # fmt: skip
    vae: PathText | None = described(None, help="local diffusers AutoencoderKL folder (latent models only)",
                                     what="a path to a local diffusers AutoencoderKL folder",
                                     example="e.g. --vae ./sd-vae-ft-ema")  # fmt: skip
    dtype: Annotated[str, AfterValidator(_check_dtype)] = described(
        "fp32", help="fp32 | bf16 | fp16 | auto (bf16 where calibrated fast and the model's drift is documented)",
        what="one of fp32, bf16, fp16, auto", example="e.g. --dtype bf16",
    )  # fmt: skip
    device: Annotated[str, AfterValidator(_check_device)] | None = described(
        None, help="cpu | cuda | cuda:N (default: cuda if available)", what="cpu, cuda or cuda:N",
        example="e.g. --device cpu",
    )  # fmt: skip
    nproc: Annotated[Int, Field(ge=1, le=MAX_NPROC)] | None = described(  # None: 1, torchrun's world, the plan's
        None, help="local worker processes to start (default 1; under torchrun: its world)",
        what=f"an integer from 1 to {MAX_NPROC} (local processes)", example="e.g. --nproc 2", cli=_PAR,
    )  # fmt: skip
    parallel: Annotated[ParallelRequest | None, BeforeValidator(_as_plan_fields)] = described(  # None: for nproc
        None, help="the parallel plan (one mesh)", what="an opendit ParallelConfig",
        example="e.g. ParallelConfig(ulysses=2)", flag="--dp/--ulysses/--ring/--tp",
    )  # fmt: skip
    parallel_auto: Switch = described(  # with no degrees: the planner chooses (cost model), not default_plan
        False, help="with --nproc and no degrees: auto = the planner's fastest plan from the cost model (see "
        "`opendit plan`)", what=_SWITCH, example="pass --parallel auto or leave it out", flag="--parallel",
        cli={**_PAR, "choices": ("default", "auto"), "true": "auto"},
    )  # fmt: skip
    memory_gib: Annotated[Float, Field(gt=0, le=MAX_MEMORY_GIB)] | None = described(  # per rank: plans must fit
        None, help="memory per rank (GiB): the plan's predicted whole-run peak must fit; without degrees the planner "
        "picks the fastest plan that fits (e.g. --shard-weights); if none fits, says how many ranks or which dtype "
        "would", what=f"a number of GiB from 0 to {MAX_MEMORY_GIB} (memory per rank)", example="e.g. --memory-gib 2",
        cli=_PAR,
    )  # fmt: skip
    image_size: ImageSize | None = IMAGE_SIZE  # the engine's default size (a call may ask another); None: model's
    vae_parallel: Switch | None = described(  # None: auto (parallel/vae.py's AUTO_MIN_ROWS latent rows per rank)
        None, help="split the VAE decode over the ranks in row bands (exact; AutoencoderKL, AutoencoderKLWan): "
        "--vae-parallel (or on) always, off never; default: auto (on when nproc > 1 and every rank gets >= 16 "
        "latent rows)", what="True (on), False (off) or None (auto)",
        example="pass --vae-parallel, --vae-parallel off, or leave it out",
        cli={**_PAR, "choices": ("on", "off"), "true": "on", "nargs": "?", "const": "on"},
    )  # fmt: skip
    progress: Switch = described(
        True,
        help="no progress bar",
        what=_SWITCH,
        flag="--no-progress",
        example="pass --no-progress or leave it out",
        cli={"action": "store_false"},
    )
    diffusers: PathText | None = described(  # a local diffusers pipeline folder: its own loop runs (pipelines.py)
        None, help="a local diffusers pipeline folder (save_pretrained layout)",
        what="a local diffusers pipeline folder", example="e.g. --diffusers ./PixArt-XL-2-512",
        cli={"group": "diffusers", "metavar": "DIR"},
    )  # fmt: skip
    encode_every_rank: Switch = described(  # the default: each text encoder on one rank (parallel/encoders.py)
        False, help="every rank loads and runs every text encoder (default: each encoder on one rank, its output "
        "broadcast, so N ranks hold one copy)", what=_SWITCH, example="pass --encode-every-rank or leave it out",
        cli={"group": "diffusers"},
    )  # fmt: skip
    encoder_shard: Switch = described(  # FSDP2 over all ranks, loaded lean (parallel/lean_pipeline.py)
        False, help="shard each text encoder's weights over all ranks (FSDP2, its blocks' parts as units; every rank "
        "runs it with gathered weights, each loads 1/N from the folder's safetensors): for an encoder one rank cannot "
        "hold",
        what=_SWITCH, example="pass --encoder-shard or leave it out", cli={"group": "diffusers"},
    )  # fmt: skip
    video: Switch = described(  # a video DiT (the bundled digits video model, our checkpoints, Latte files)
        False, help="sample videos: GIF + lossless PNG frames per video", what=_SWITCH,
        example="pass --video or leave it out", cli={"group": "video"},
    )  # fmt: skip

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
        if self.encode_every_rank and self.diffusers is None:
            raise OpenDiTError("--encode-every-rank places a pipeline's text encoders: it needs --diffusers DIR")
        if self.encoder_shard and self.diffusers is None:
            raise OpenDiTError("--encoder-shard shards a pipeline's text encoders: it needs --diffusers DIR")
        if self.encoder_shard and self.encode_every_rank:
            raise OpenDiTError("--encoder-shard and --encode-every-rank place the text encoders two ways; drop one")
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
    classes: Classes | None = described(
        None, help="one image per class id (default: 0 to 9)",
        what=f"a list of 1 to {MAX_CLASSES} integer class ids", example="e.g. --classes 0 1 2",
        item=("an integer class id (0 or more)", "e.g. --classes 0 1 2"), cli={"nargs": "+"},
    )  # fmt: skip
    seed: Annotated[Int, Field(ge=0, le=SEED_MAX)] = described(
        0, help="image i uses seed + i (--diffusers: one generator seeded SEED for all)",
        what="an integer from 0 to 2**64 - 1 (image i uses seed + i)", example="e.g. --seed 0",
    )  # fmt: skip
    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)] | None = described(
        None, help="denoising steps (default: the model's recommendation)", what=f"an integer from 1 to {MAX_STEPS}",
        example="try --steps 30",
    )  # fmt: skip
    scheduler: Annotated[str, AfterValidator(_check_scheduler)] | None = described(
        None, help="ddpm | ddim | dpm-solver | flow-euler (default: the model's)",
        what=f"one of {', '.join(SCHEDULERS)}", example="e.g. --scheduler ddim",
    )  # fmt: skip
    cfg_scale: Annotated[Float, Field(ge=1.0, le=MAX_CFG_SCALE)] | None = described(
        None, help="classifier-free guidance scale; 1 disables guidance",
        what=f"a finite number from 1 to {MAX_CFG_SCALE:g} (1 disables guidance)", example="e.g. --cfg-scale 4",
    )  # fmt: skip
    image_size: ImageSize | None = IMAGE_SIZE  # None: the engine's image size
    out: PathText | None = described(  # the folder `opendit sample` writes (the library itself writes no images)
        None, help="output folder", what="a folder path", example="e.g. --out outputs",
        cli={"default": "outputs", "server": False},
    )  # fmt: skip
    trace: FilePath | None = described(  # a Chrome trace JSON of the call
        None, help="write a Chrome trace JSON of the sampling loop, every rank (ui.perfetto.dev)",
        what="a file path", example="e.g. --trace trace.json", cli={"metavar": "FILE", "server": False},
    )  # fmt: skip
    prompt: Prompts | None = described(  # one image each, all in one pipeline call
        None, help="one image per prompt (repeatable); all prompts go into one pipeline call with one generator",
        what=f"a list of 1 to {MAX_CLASSES} prompts (text)", example='e.g. --prompt "a photo of a cat"',
        item=(f"a text of at most {MAX_PROMPT_CHARS} characters", 'e.g. --prompt "a cat"'),
        cli={"group": "diffusers", "nargs": "+", "action": "extend", "metavar": "TEXT"},
    )  # fmt: skip
    negative_prompt: Prompt | None = described(
        None, help="for pipelines that take one (guided ones)",
        what=f"a text of at most {MAX_PROMPT_CHARS} characters", example='e.g. --negative-prompt "blurry"',
        cli={"group": "diffusers", "metavar": "TEXT"},
    )  # fmt: skip
    motion: (
        Annotated[list[str], BeforeValidator(_as_motion_list), Field(min_length=1, max_length=MAX_CLASSES)] | None
    ) = described(  # --video, a model trained with motion: one direction per class, or one for all
        None, help="digits video model: right | left | down | up, one per class or one for all",
        what="a list of directions (right, left, down, up)", example="e.g. --motion right up",
        item=("a direction: right, left, down or up", "e.g. --motion right"), cli={"group": "video", "nargs": "+"},
    )  # fmt: skip
    frames: Annotated[Int, Field(ge=1, le=1024)] | None = described(  # --video: the model's own frame count
        None, help="frames per video (a video DiT: must be the model's own; a video pipeline: its num_frames or "
        "video_length)",
        what="an integer from 1 to 1024", example="e.g. --frames 8", cli={"group": "video"},
    )  # fmt: skip
    # caching across steps: a method name ("pab", "fbcache", a registered one) with its options (each method's
    # Options fields, added by `call_model`), or {"method": name, **options}; cache/config.py checks these
    cache: str | dict | None = described(
        None, help="reuse work across denoising steps: none | pab | fbcache | a registered method",
        what="none or a cache method (pab, fbcache, a registered one)", example="e.g. --cache fbcache",
        cli={"group": "cache"},
    )  # fmt: skip

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
            from opendit.api.video import motion_labels

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


_CALL_MODELS: dict[tuple, type[CallRequest]] = {}


def call_model() -> type[CallRequest]:
    """CallRequest with every registered cache method's options as fields of their own (`--pab-range`,
    `--cache-threshold`, a registered method's `--<method>-<option>`), built again whenever the set of methods
    changes: a method registered from user code gets its options on every surface (CLI, Engine.generate, the
    server's schema) with no other edit."""
    from pydantic import create_model

    from opendit.cache.registry import cache_methods, option_fields

    methods = sorted(cache_methods().items())
    key = tuple((name, id(method)) for name, method in methods)
    if key not in _CALL_MODELS:
        fields = {}
        for name, method in methods:
            for option, field in option_fields(method):
                fields[field] = _option_field(name, field, method.Options.model_fields[option])
        _CALL_MODELS.clear()  # one current model: the registry changed
        _CALL_MODELS[key] = create_model("CallRequest", __base__=CallRequest, **fields)
    return _CALL_MODELS[key]


def _option_field(method: str, field: str, info) -> tuple:
    """A cache option as an optional request field (None: the method's default), its text derived from the option."""
    import typing

    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    bounds = {type(m).__name__: m for m in info.metadata}
    annotation, cli = info.annotation, {"group": "cache", **extra.get("cli", {})}
    words = {int: "an integer", float: "a finite number"}
    if typing.get_origin(annotation) is tuple:  # fixed-length tuple: a list given (JSON, CLI) is taken as one
        count, item = len(typing.get_args(annotation)), typing.get_args(annotation)[0]
        annotation = Annotated[annotation, BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]
        what = extra.get("what", f"{count} values ({words.get(item, item.__name__)})")
        example = " ".join(str(v) for v in info.default)
        cli = {"nargs": count, **cli}
    else:
        low = [f">= {m.ge}" for m in bounds.values() if getattr(m, "ge", None) is not None]
        low += [f"> {m.gt}" for m in bounds.values() if getattr(m, "gt", None) is not None]
        what = extra.get("what", " ".join([words.get(annotation, f"a {getattr(annotation, '__name__', 'value')}"),
                                           *low]))  # fmt: skip
        example = str(info.default)
        annotation = {int: Int, float: Float}.get(annotation, annotation)
        annotation = Annotated[(annotation, *info.metadata)] if info.metadata else annotation
    flag = "--" + field.replace("_", "-")
    help_text = f"{method}: {info.description or field} (default {info.default})"
    return annotation | None, described(None, help=help_text, what=what, example=f"e.g. {flag} {example}", cli=cli)


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
    names = [part for part in loc if isinstance(part, str)]
    flag, what, fix = field_help(names[-1] if names else "", isinstance(loc[-1], int) if loc else False)
    label = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if flag and flag != f"--{label}":
        label += f" ({flag})"
    if kind == "missing":
        return f"{label} is required; {fix}"
    if isinstance(cause, _FieldError) and cause.fragment:
        return f"{label} {cause.fragment}; {cause.fix or fix}"
    typed = kind.endswith("_type") or kind in ("is_instance_of", "model_attributes_type")
    return f"{label} must be {what}, got {shown(value, typed)}; {fix}"


def field_help(name: str, item: bool = False) -> tuple[str, str, str]:
    """(CLI flag, what a valid value is, an example) of a request field (or of one entry of a list field), from its
    one declaration (`described`)."""
    for model in (call_model(), EngineRequest, ParallelRequest):
        info = model.model_fields.get(name)
        if info is not None:
            meta = field_meta(info)
            if not meta:
                break
            what, example = meta["item"] if item and meta.get("item") else (meta["what"], meta["example"])
            flag = "" if meta["cli"].get("skip") else meta.get("flag") or f"--{name.replace('_', '-')}"
            return flag, what, example
    return "", "valid", "see `opendit sample --help`"


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
