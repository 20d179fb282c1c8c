"""Local diffusers pipelines on OpenDiT's engine: `opendit sample --diffusers DIR --prompt TEXT ...`.

The pipeline's own `__call__` runs: its text encoders, its scheduler and denoising loop, its VAE. OpenDiT loads it
on every rank (`DiffusionPipeline.from_pretrained(DIR)`), parallelises its transformer in place
(`opendit.parallelize`: Ulysses / ring / USP over the sequence, cfg and dp splits of each transformer call's batch;
every rank then holds the whole output, so the pipeline's loop runs unchanged on every rank) and records the call.

Seeding: all prompts of a call go into ONE pipeline call with ONE `torch.Generator(device="cpu").manual_seed(seed)`,
exactly as `pipe(prompts, generator=torch.Generator().manual_seed(seed))` draws them: image i is the i-th image of
that batch's noise, not an image seeded seed + i (OpenDiT's DiT path). Every rank builds the same generator, so every
rank draws the same noise.

Per rank (engine/pipeline_runner.py): `PipelineRunner` loads, parallelises and calls the pipeline. Checked in the caller
before any process starts (`resolve_pipeline_engine`, `resolve_pipeline_call`): the folder
(`inspect_pipeline`: model_index.json, a transformer class with an OpenDiT plan; no weights read), the plan against a
meta-device instance of the transformer (the checks of `opendit.parallelize`), and each call's fields against the
pipeline's `__call__` (prompt or class labels, negative prompt, image size, guidance for --cfg-parallel, prompts for
--dp). Calls use `output_type="np"`, converted to uint8 as diffusers' `numpy_to_pil` does ((x * 255).round());
PixArt's resolution binning is turned off (the size asked is the size computed). Video pipelines (Wan: `.frames`)
give frame 0 of each video as its image and every frame in `GenerationResult.frames` (saved as an animated GIF).
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from opendit.api.request import CallRequest, EngineRequest
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.io.outputs import prepare_output_dir, prepare_trace_file
from opendit.io.quiet import quiet_transformers

LAYOUT = "a local diffusers pipeline folder (save_pretrained layout)"
SEEDING = (
    "all prompts in one pipeline call with one torch.Generator(device='cpu').manual_seed(seed), as diffusers' own "
    "pipe(prompts, generator=...); every rank draws the same noise"
)
CALL_PARAMETERS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "video_length")  # whose
# defaults the record shows; a folder may set its own (FOLDER_DEFAULTS beside model_index.json: the tiny folders' few
# frames at a small size) for the calls that give none
FOLDER_DEFAULTS = "opendit_call_defaults.json"
FRAMES_PARAMETERS = ("num_frames", "video_length")  # --frames: a video pipeline's frame count (Latte: video_length)


# ------------------------------------------------------------------------------------------------ the folder
def inspect_pipeline(folder: str | Path) -> dict:
    """What a pipeline folder holds, from its JSON files alone (no weights read): pipeline and transformer class,
    the transformer's config and heads, the pipeline's `__call__` parameters and defaults, the weights' bytes.
    Raises OpenDiTError naming the fix for what OpenDiT cannot run."""
    from opendit.api.pipeline_calls import image_size_multiple
    from opendit.families import declared_families

    path = Path(folder)
    if not path.exists():
        raise OpenDiTError(f"--diffusers {folder} does not exist; pass {LAYOUT}")
    if not path.is_dir():
        raise OpenDiTError(f"--diffusers {folder} is a file, not a folder; pass {LAYOUT}")
    if not (path / "model_index.json").is_file():
        raise OpenDiTError(
            f"--diffusers {folder} is not a diffusers pipeline folder (save_pretrained layout): no model_index.json"
        )
    index = _read_json(path / "model_index.json", folder)
    pipeline = str(index.get("_class_name"))
    entry = index.get("transformer")
    supported = "every diffusers class with a _cp_plan and " + ", ".join(declared_families())
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        parts = ", ".join(k for k, v in index.items() if isinstance(v, list)) or "none"
        raise OpenDiTError(
            f"--diffusers {folder}: {pipeline} has no transformer (its components: {parts}); OpenDiT parallelises "
            f"the transformer of pipelines built on {supported}"
        )
    config_file = path / "transformer" / "config.json"
    if not config_file.is_file():
        raise OpenDiTError(f"--diffusers {folder}: no transformer/config.json; pass {LAYOUT}")
    config = _read_json(config_file, folder)
    for name in dict.fromkeys((str(entry[1]), str(config.get("_class_name", entry[1])))):
        if transformer_family(name) is None:
            raise OpenDiTError(
                f"--diffusers {folder}: its transformer {name} is not supported; OpenDiT parallelises {supported}"
            )
    family = transformer_family(str(entry[1]))
    call = _call_parameters(pipeline, folder)
    defaults_file = path / FOLDER_DEFAULTS
    call_defaults = _read_json(defaults_file, folder) if defaults_file.is_file() else {}
    unknown = [name for name in call_defaults if name not in call]
    if unknown:
        raise OpenDiTError(f"--diffusers {folder}: {FOLDER_DEFAULTS} names {unknown}, which {pipeline}.__call__ does "
                           "not take; give a JSON object of its arguments")  # fmt: skip
    call.update({name: value for name, value in call_defaults.items() if name in CALL_PARAMETERS})
    files = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file()]
    weights = sum(f.stat().st_size for f in files)
    transformer_bytes = sum(f.stat().st_size for f in files if f.relative_to(path).parts[0] == "transformer")
    component_bytes: dict[str, int] = {}  # weight files per component folder (text_encoder, vae, ...)
    for f in files:
        component = f.relative_to(path).parts[0]
        component_bytes[component] = component_bytes.get(component, 0) + f.stat().st_size
    return {
        "folder": str(path.resolve()),
        "pipeline_class": pipeline,
        "transformer_class": str(entry[1]),
        "transformer_config": config,
        "scheduler_class": (index.get("scheduler") or [None, None])[1],
        "num_heads": int(config.get(family.heads_attr, 1)),
        "cfg_batched": family.cfg_batched if family.cfg_batched is not None else pipeline_batches_guidance(pipeline),
        "family": family.name,
        "call": call,
        "call_defaults": call_defaults,
        "video": _video_geometry(path, index, pipeline, entry[1], config, call),
        "id2label": index.get("id2label"),
        "weight_bytes": weights,
        "transformer_bytes": transformer_bytes,
        "component_bytes": component_bytes,
        "size_multiple": image_size_multiple(path, pipeline),  # pipeline_calls.py
    }


def transformer_family(class_name: str):
    """The family of a diffusers transformer class named in a folder's JSON (None: unknown class or no family)."""
    import diffusers

    from opendit.families import family_for

    cls = getattr(diffusers, class_name, None)
    return family_for(cls) if isinstance(cls, type) else None


def _read_json(file: Path, folder) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OpenDiTError(f"--diffusers {folder}: cannot read {file.name} ({exc}); pass {LAYOUT}") from None
    if not isinstance(data, dict):
        raise OpenDiTError(f"--diffusers {folder}: {file.name} is not a JSON object; pass {LAYOUT}")
    return data


def pipeline_batches_guidance(pipeline: str) -> bool:
    """Whether a pipeline class runs its transformer once per step on the [uncond; cond] batch (so --cfg-parallel
    has a batch to split) rather than once per guidance branch. Read from its `__call__` source, for families whose
    class does not declare it: one call site of the denoiser = batched, two or more = one call per branch."""
    import re

    from opendit.api.pipeline_calls import pipeline_source

    source = pipeline_source(pipeline, "__call__")
    if source is None:
        return False
    calls = re.findall(r"\b(?:self\.transformer(?:_2)?|current_model|transformer)\(", source)
    return len(calls) == 1


def _call_parameters(pipeline: str, folder) -> dict:
    """{parameter: default} of the pipeline class's __call__ (defaults only for CALL_PARAMETERS)."""
    import diffusers

    with quiet_transformers():  # importing a pipeline imports its transformers classes, which warn on import
        cls = getattr(diffusers, pipeline, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise OpenDiTError(
            f"--diffusers {folder}: {pipeline} is not a pipeline class of diffusers {diffusers.__version__} (custom "
            "pipelines are not supported); pass a folder saved from a diffusers pipeline"
        )
    params = inspect.signature(cls.__call__).parameters
    return {name: params[name].default if name in CALL_PARAMETERS else None for name in params if name != "self"}


def _video_geometry(path: Path, index: dict, pipeline: str, transformer: str, config: dict, call: dict) -> dict | None:
    """A video pipeline's frame and pixel steps, read the way the pipeline reads them: its class built on the meta
    device around its VAE and transformer (configs only), its own `vae_scale_factor*` / `*_compression_ratio`
    attributes, times the transformer's spatial patch. None for pipelines without a frame count."""
    frames = next((name for name in FRAMES_PARAMETERS if name in call), None)
    if frames is None:
        return None
    pipe = meta_pipeline(path, index, pipeline, transformer, config)
    found = vars(pipe) if pipe is not None else {}
    temporal = found.get("vae_scale_factor_temporal", found.get("vae_temporal_compression_ratio"))
    spatial = found.get("vae_scale_factor_spatial", found.get("vae_spatial_compression_ratio",
                                                               found.get("vae_scale_factor")))  # fmt: skip
    patch = config.get("patch_size") or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch) * int(
        found.get("transformer_spatial_patch_size", 1)
    )
    return {
        "frames_parameter": frames,
        "temporal_ratio": int(temporal) if temporal else None,  # latent frames = (F - 1) / ratio + 1
        "pixel_step": int(spatial) * patch if spatial else None,  # pixels per token side: VAE ratio x patch
        "model_frames": config.get("video_length"),  # a transformer with a fixed temporal position table (Latte)
        "vae_class": type(found["vae"]).__name__ if found.get("vae") is not None else None,
    }


def meta_pipeline(path: Path, index: dict, pipeline: str, transformer: str, config: dict):
    """The pipeline class around its VAE and transformer built on the meta device from their configs (no weights),
    every other component None; None where the class cannot be built that way."""
    import diffusers

    cls, vae_entry = getattr(diffusers, pipeline, None), index.get("vae")
    vae_cls = (
        getattr(diffusers, str(vae_entry[1]), None) if isinstance(vae_entry, list) and len(vae_entry) == 2 else None
    )
    if cls is None or vae_cls is None or not (path / "vae" / "config.json").is_file():
        return None
    vae_config = _read_json(path / "vae" / "config.json", path)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: None for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty}
    try:
        with torch.device("meta"), warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            kwargs.update(vae=vae_cls.from_config(vae_config),
                          transformer=getattr(diffusers, transformer).from_config(config))  # fmt: skip
            return cls(**kwargs)
    except Exception:  # noqa: BLE001 - a pipeline whose __init__ needs more than its VAE: no geometry, no checks
        return None


def meta_decoded_shape(vae_cls: type, config: dict, latent_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `vae_cls` (built from `config` on the meta device: no weights, no arithmetic) decodes a latent of
    `latent_shape` into; None where that VAE cannot decode it so (a batch it cannot take, a decode needing data)."""
    try:
        with torch.device("meta"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tuple(vae_cls.from_config(config).decode(torch.zeros(latent_shape), return_dict=False)[0].shape)
    except Exception:  # noqa: BLE001 - any failure means "not this latent"
        return None


def decoded_frame_count(folder: str | Path, vae_class: str, latent_frames: int) -> int | None:
    """How many frames the folder's VAE decodes `latent_frames` latent frames into (its meta-device decode of a
    (1, C, latent_frames, 8, 8) latent); None where that cannot be read. Some VAEs decode latent frames in batches
    (AutoencoderKLCogVideoX: 2 after the first), so an even latent count gives 4 more frames than (L - 1) x ratio + 1:
    read, not assumed."""
    import diffusers

    path = Path(folder)
    vae_cls = getattr(diffusers, vae_class, None)
    if vae_cls is None or not (path / "vae" / "config.json").is_file():
        return None
    config = _read_json(path / "vae" / "config.json", path)
    channels = config.get("latent_channels") or config.get("z_dim")
    shape = meta_decoded_shape(vae_cls, config, (1, int(channels), latent_frames, 8, 8))  # -> (1, 3, frames, H, W)
    return shape[2] if shape is not None else None


def _check_decoded_frames(info: dict, frames: int, ratio: int) -> None:
    """Refuse a frame count the VAE decodes into another count (CogVideoX's 4k + 1 with an even latent count), naming
    the nearest counts that come out as asked."""
    folder, vae_class, name = info["folder"], info["video"]["vae_class"], info["pipeline_class"]
    latent = (frames - 1) // ratio + 1
    decoded = decoded_frame_count(folder, vae_class, latent)
    if decoded is None or decoded == frames:
        return
    kept = [(n - 1) * ratio + 1 for n in range(max(latent - 2, 1), latent + 3) if n != latent]
    kept = [f for f in kept if decoded_frame_count(folder, vae_class, (f - 1) // ratio + 1) == f]
    raise OpenDiTError(
        f"--frames {frames}: {name}'s VAE ({vae_class}) decodes its {latent} latent frames into {decoded} frames, "
        f"not {frames}: use --frames " + " or ".join(str(f) for f in kept[:2])
    )


def check_video_call(info: dict, kwargs: dict) -> None:
    """Refuse, before any process starts, a frame count the VAE's temporal compression cannot produce, a frame count
    the transformer's temporal positions cannot take, and an image size its VAE and patches cannot take; then the
    pipeline's own `check_inputs` on a meta-device instance (its ValueError as one error line)."""
    video, name = info.get("video"), info["pipeline_class"]
    if not video:
        return
    frames = kwargs.get(video["frames_parameter"], info["call"].get(video["frames_parameter"]))
    ratio = video["temporal_ratio"]
    if isinstance(frames, int) and ratio and (frames - 1) % ratio:
        below = (frames - 1) // ratio * ratio + 1
        raise OpenDiTError(
            f"--frames {frames}: {name}'s VAE compresses time by {ratio} (the first frame alone, then {ratio} frames "
            f"per latent frame), so it takes {ratio}k + 1 frames: use --frames {below} or {below + ratio}"
        )
    if isinstance(frames, int) and ratio and frames > 1 and video.get("vae_class"):
        _check_decoded_frames(info, frames, ratio)
    model_frames = video["model_frames"]
    if isinstance(frames, int) and model_frames and frames not in (1, model_frames):
        raise OpenDiTError(
            f"--frames {frames}: {name}'s transformer adds a temporal position table of {model_frames} frames to every "
            f"video, so it takes --frames {model_frames} (or 1)"
        )
    step = video["pixel_step"]
    for parameter in ("height", "width"):
        size = kwargs.get(parameter, info["call"].get(parameter))
        if isinstance(size, int) and step and size % step:
            raise OpenDiTError(
                f"--image-size {size}: {name}'s VAE and patches make one token of {step}x{step} pixels, so the "
                f"{parameter} must be a multiple of {step}: use --image-size {max(size // step, 1) * step}"
            )
    own_checks(info, kwargs)


def own_checks(info: dict, kwargs: dict) -> None:
    """The pipeline's own `check_inputs` on a meta-device instance (no weights), given the call's arguments it names
    (None for the rest): its ValueError (e.g. LTX's height divisible by 32) as one error line before any process."""
    path = Path(info["folder"])
    index = _read_json(path / "model_index.json", path)
    pipe = meta_pipeline(path, index, info["pipeline_class"], info["transformer_class"], info["transformer_config"])
    check = getattr(pipe, "check_inputs", None)
    if check is None:
        return
    given = {**{k: v for k, v in info["call"].items() if k in CALL_PARAMETERS}, **kwargs}
    params = inspect.signature(check).parameters
    arguments = {n: given.get(n) for n, p in params.items() if n in given or p.default is inspect.Parameter.empty}
    try:
        check(**arguments)
    except ValueError as exc:
        raise OpenDiTError(f"{info['pipeline_class']} refuses the call: {exc}") from None
    except (TypeError, AttributeError):  # an argument its __call__ fills in before checking (CogVideoX's height)
        return


def meta_transformer(info: dict) -> torch.nn.Module:
    """The folder's transformer built on the meta device from its config (no memory, no weights)."""
    import diffusers

    cls = getattr(diffusers, info["transformer_class"])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(info["transformer_config"])


# ------------------------------------------------------------------------------------------------ resolution
@dataclass
class PipelineSpec:
    """An engine on a diffusers pipeline folder, resolved in the caller: what every rank needs to load it."""

    settings: EngineRequest
    folder: str  # absolute
    info: dict  # inspect_pipeline's
    world: int
    plan: ParallelConfig
    plan_notes: list[str]
    note: str | None = None

    @property
    def config(self):
        return None  # no DiTConfig: the pipeline's transformer has its own (info["transformer_config"])

    @property
    def family(self) -> str | None:
        """The transformer's family name (cache defaults are per family)."""
        return self.info.get("family")

    @property
    def ckpt(self) -> str:
        return self.folder

    @property
    def defaults(self) -> dict:
        """What a call runs without flags (the server's /healthz and page): the folder's or the pipeline's own."""
        call = self.info["call"]
        return {"steps": call.get("num_inference_steps"), "cfg_scale": call.get("guidance_scale")}

    runner = "opendit.engine.pipeline_runner:PipelineRunner"  # what runs it on every rank (engine/replica.py)
    client_kind = "prompt"  # clients send prompts (a class-conditional pipeline's: its label names)

    def class_labels(self) -> list[str]:
        return []

    def worker_bytes(self) -> int:
        return self.info["weight_bytes"]  # the pipeline's weight files (every component, stored dtype)

    def resolve_call(self, request: CallRequest) -> PipelineCall:
        return resolve_pipeline_call(self, request)


@dataclass
class PipelineCall:
    """One call on a pipeline engine, validated: the pipeline's arguments (but the generator) and the record's."""

    prompts: list[str]
    seed: int
    kwargs: dict  # the pipeline __call__'s arguments, but `generator` (built from seed on every rank)
    request: dict  # the record's "request" entry
    steps: int | None = None  # as asked (None: the pipeline's default)
    cfg_scale: float | None = None
    scheduler: None = None  # the pipeline runs its own scheduler
    notes: list[str] = field(default_factory=list)
    cache: Any = None  # a cache.CacheConfig, or None
    trace: str | None = None  # a Chrome trace of every rank's steps, model calls and collectives


def resolve_pipeline_engine(settings: EngineRequest, images: int | None = None, cfg_scale: float | None = None):
    """Validate an engine on `settings.diffusers`: the folder, the processes and the plan (no weights read). The
    plan is the pipeline's, whatever the batch (`images`, `cfg_scale`: the resolver interface, unused here)."""
    from opendit.api.generation import DIFFUSERS_BF16_DRIFT, resolve_dtype
    from opendit.parallel.vae import check_vae_parallel

    flags = {"--model": settings.model, "--ckpt": settings.ckpt, "--vae": settings.vae}
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise OpenDiTError(
            "--diffusers loads the whole pipeline (transformer, VAE, text encoders) from its folder; drop "
            + " ".join(given)
        )
    settings, dtype_note = resolve_dtype(settings, DIFFUSERS_BF16_DRIFT)
    world = settings.world_size()
    info = inspect_pipeline(settings.diffusers)
    settings, plan, notes = plan_pipeline(settings, info, world)
    notes += check_pipeline_plan(plan, info, world)
    notes += check_vae_parallel(settings.vae_parallel, info["folder"], world)  # unsplittable VAE: refused here
    return PipelineSpec(settings, info["folder"], info, world, plan, dtype_note + notes)


def plan_pipeline(settings: EngineRequest, info: dict, world: int) -> tuple[EngineRequest, ParallelConfig, list[str]]:
    """choose_pipeline_plan, and under --memory-gib the text encoders' placement: when each encoder on one rank
    (the default) leaves no transformer plan within the budget, the encoders sharded over every rank
    (--encoder-shard: 1/N of each per rank) are tried, and taken, with a note saying why. Returns the settings the
    engine runs with (encoder_shard set where the planner chose it), the plan and its notes."""
    try:
        plan, notes = choose_pipeline_plan(settings, info, world)
        return settings, plan, notes
    except OpenDiTError as exc:
        once = exc
    placed = settings.encode_every_rank or settings.encoder_shard  # the user's own placement: kept
    encoders = [n for n in info["component_bytes"] if n.startswith("text_encoder")]
    if settings.memory_gib is None or world == 1 or placed or not encoders:
        raise once
    sharded = settings.model_copy(update={"encoder_shard": True})
    try:
        plan, notes = choose_pipeline_plan(sharded, info, world)
    except OpenDiTError as again:
        sharded_too = f"with the text encoders sharded over the ranks (--encoder-shard): {again}"
        raise OpenDiTError(f"{once}; {sharded_too}") from once
    why = f"text encoders sharded over the {world} ranks (--encoder-shard), as each encoder on one rank does not fit"
    return sharded, plan, [f"{why}: {once}", *notes]


def choose_pipeline_plan(settings: EngineRequest, info: dict, world: int) -> tuple[ParallelConfig, list[str]]:
    """The plan asked for, or (no degrees, world > 1) all ranks on one sequence dimension: Ulysses when the heads
    divide evenly over the ranks (or --sp-impl ulysses), else ring; with --parallel auto, the planner's."""
    plan = settings.plan() or ParallelConfig()
    if world == 1 or plan.world_size != 1:
        return plan, []
    if settings.parallel_auto or settings.memory_gib is not None:
        return auto_pipeline_plan(plan, info, world, settings.memory_gib, settings)
    heads = info["num_heads"]
    ring = plan.sp_impl == "ring" or (plan.sp_impl == "auto" and heads % world != 0)
    chosen = replace(plan, ring=world) if ring else replace(plan, ulysses=world)
    why = f"ring: ulysses degree {world} does not divide {heads} heads" if ring else f"ulysses over {heads} heads"
    return chosen, [f"plan chosen automatically: {chosen.describe()} ({why})"]


def auto_pipeline_plan(plan: ParallelConfig, info: dict, world: int, memory_gib: float | None = None,
                       settings: EngineRequest | None = None):  # fmt: skip
    """--parallel auto / --memory-gib G: the planner's fastest plan from the transformer's cost view
    (planning/diffusers_cost.py) at its configured sample size (one image; 256 text tokens where text joins the
    attention). Under G, each rank also holds what planning/pipeline_memory.py counts: the text encoders it owns
    (all of them with --encode-every-rank, 1/N of each with --encoder-shard), the VAE and other weights, and the
    decode phase's activation (a band when the decode is split), so the transformer's plan must fit what they
    leave."""
    from opendit.models.precision import parse_dtype
    from opendit.planning.diffusers_cost import diffusers_auto_plan
    from opendit.planning.pipeline_memory import pipeline_memory

    config = info["transformer_config"]
    patch = config.get("patch_size", 1)
    patch = (patch[-1] if isinstance(patch, (list, tuple)) else patch) or 1
    side = max(int(config.get("sample_size") or 64) // int(patch), 1)
    budget, notes = None, []
    if memory_gib is not None:
        every_rank = bool(settings is not None and settings.encode_every_rank)
        height, width, frames = _output_geometry(info)
        dtype_bytes = parse_dtype(settings.dtype if settings is not None else "fp32").itemsize
        split = _vae_split_planned(settings.vae_parallel if settings is not None else None, info, world, height)
        shard = bool(settings is not None and settings.encoder_shard)
        held = pipeline_memory(info, world, every_rank, split, height, width, frames, dtype_bytes, shard)
        budget = memory_gib * 2**30 - held.total
        if budget <= 0:
            fix = "drop --encode-every-rank, " if every_rank else ""
            raise OpenDiTError(
                f"--memory-gib {memory_gib:g}: besides the transformer, a rank holds {held.describe()} "
                f"({held.total / 2**30:.3g} GiB); {fix}give more memory or more processes"
            )
        notes.append(f"memory: the transformer's plan fits {budget / 2**30:.3g} GiB per rank, after "
                     f"{held.describe()}{' (decode split over the ranks)' if split else ''}")  # fmt: skip
    best, why = diffusers_auto_plan(meta_transformer(info), world, 1, True, side * side, 256, memory_bytes=budget)
    chosen = replace(
        plan, dp=best.dp, cfg=best.cfg, ulysses=best.ulysses, ring=best.ring, tp=best.tp, sp_impl=best.sp_impl
    )
    return chosen, [f"plan chosen by the planner at {side * side} image tokens: {why.splitlines()[0]}", *notes]


def _output_geometry(info: dict) -> tuple[int, int, int]:
    """(height, width, frames decoded at once) of the folder's default output, in pixels."""
    call, config = info["call"], info["transformer_config"]
    side = int(config.get("sample_size") or 64) * 8  # latent side x the usual VAE factor, where the call has no size
    height, width = int(call.get("height") or side), int(call.get("width") or side)
    return height, width, 4 if info.get("video") else 1  # video VAEs decode a latent frame (4 frames) at a time


def _vae_split_planned(mode: bool | None, info: dict, world: int, height: int) -> bool:
    """Whether the decode will run split: parallel/vae.split_planned's rule at the image's latent rows, for a VAE
    that has a split plan."""
    from opendit.parallel.vae import split_planned, vae_refusal

    if not split_planned(mode, height // 8, world):
        return False
    vae_file = Path(info["folder"]) / "vae" / "config.json"
    vae_config = _read_json(vae_file, info["folder"]) if vae_file.is_file() else {}
    index = _read_json(Path(info["folder"]) / "model_index.json", info["folder"])
    vae_class = (index.get("vae") or [None, None])[1]
    return vae_refusal(vae_class, vae_config) is None


def check_pipeline_plan(plan: ParallelConfig, info: dict, world: int) -> list[str]:
    """Raise the OpenDiTError `opendit.parallelize` would raise on the ranks, here; return the plan's notes."""
    from opendit.api.pipeline_calls import check_guidance_batch
    from opendit.families.apply import check_family, family_plan

    check_guidance_batch(plan, info)
    if plan.balance_tokens or plan.token_shares is not None:
        raise OpenDiTError(
            "--balance-tokens re-splits the tokens by each rank's measured speed, which OpenDiT's families split "
            "evenly from the class plan (no shares yet): drop it, or run OpenDiT's own DiT"
        )
    if world == 1 and plan.world_size == 1:
        return []
    module = meta_transformer(info)
    family = check_family(module, plan)
    if plan.cfg > 1 and not info["cfg_batched"]:
        raise OpenDiTError(
            f"--cfg-parallel splits one guided call's batch, but {info['pipeline_class']} calls the transformer once "
            "per guidance branch (true CFG), so there is no batch to split; use --ulysses/--ring or --dp instead"
        )
    plan, notes = family_plan(plan, family)
    heads = info["num_heads"]
    return notes + plan.validate(world, heads, max(plan.sp_degree, 1), plan.dp, plan.cfg > 1)


def resolve_pipeline_call(spec: PipelineSpec, request: CallRequest) -> PipelineCall:
    """Validate one call against the pipeline and the plan, build the pipeline's arguments and create (or refuse)
    the output folder: nothing is sent before this."""
    if request.classes is not None:
        raise OpenDiTError(
            "--classes is for OpenDiT's class-conditional DiT models; a --diffusers pipeline takes --prompt TEXT "
            "(one image per prompt)"
        )
    if request.prompt is None:
        raise OpenDiTError('prompt (--prompt) is required with --diffusers; e.g. --prompt "a photo of a cat"')
    if request.scheduler is not None:
        raise OpenDiTError(
            f"--scheduler chooses a scheduler of OpenDiT's DiT; a --diffusers pipeline runs its own "
            f"({spec.info['scheduler_class']}): drop --scheduler"
        )
    size = request.image_size if request.image_size is not None else spec.settings.image_size
    kwargs = call_kwargs(spec.info, request, size)
    guidance = kwargs.get("guidance_scale", spec.info["call"].get("guidance_scale"))
    if spec.plan.cfg > 1 and not (isinstance(guidance, (int, float)) and guidance > 1):
        raise OpenDiTError("cfg parallel needs guidance: pass --cfg-scale > 1, or drop --cfg-parallel")
    if spec.plan.dp > len(request.prompt):
        raise OpenDiTError(
            f"dp degree {spec.plan.dp} exceeds the {len(request.prompt)} prompt(s) of this call (one image each); "
            f"give more prompts or use --dp {len(request.prompt)}"
        )
    if request.out is not None:
        prepare_output_dir(request.out, "--out")
    from opendit.cache.config import request_cache

    cache = request_cache(request, spec.family, spec.plan)
    if cache is not None and "callback_on_step_end" not in spec.info["call"] and "callback" not in spec.info["call"]:
        raise OpenDiTError(f"{spec.info['pipeline_class']} takes no step callback, so a cache cannot follow its steps")
    if cache is not None:
        from opendit.api.pipeline_calls import check_cache_layout

        check_cache_layout(meta_transformer(spec.info), cache)
    asked = {**spec.settings.model_dump(), **request.model_dump(exclude={"out"}), "image_size": size}
    # absolute: workers may not share the caller's working directory (torchrun on other nodes)
    trace = str(Path(prepare_trace_file(request.trace)).resolve()) if request.trace is not None else None
    return PipelineCall(list(request.prompt), request.seed, kwargs, asked, request.steps, request.cfg_scale,
                        cache=cache, trace=trace)  # fmt: skip


def call_kwargs(info: dict, request: CallRequest, size: int | None) -> dict:
    """The pipeline's __call__ arguments for a call (but the generator); refuses what this pipeline cannot take."""
    params, name = info["call"], info["pipeline_class"]
    kwargs: dict = {"output_type": "np"}
    if "prompt" in params:
        kwargs["prompt"] = list(request.prompt)
    elif "class_labels" in params:  # DiTPipeline: the prompts are class names (its id2label)
        kwargs["class_labels"] = label_ids(info, request.prompt)
    else:
        raise OpenDiTError(f"{name} takes neither a prompt nor class labels; OpenDiT cannot call it")
    asked = {
        "negative_prompt": ("--negative-prompt", request.negative_prompt),
        "num_inference_steps": ("--steps", request.steps),
        "guidance_scale": ("--cfg-scale", request.cfg_scale),
        "height": ("--image-size", size),
        "width": ("--image-size", size),
        # video pipelines: their frame count (num_frames; Latte's video_length)
        next((p for p in FRAMES_PARAMETERS if p in params), "num_frames"): ("--frames", request.frames),
    }
    for parameter, (flag, value) in asked.items():
        if value is None:
            continue
        if parameter not in params:
            raise OpenDiTError(f"{flag}: {name} takes no {parameter} argument; drop {flag}")
        kwargs[parameter] = value
    for parameter, value in (info.get("call_defaults") or {}).items():  # the folder's own defaults
        kwargs.setdefault(parameter, value)
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False  # the size asked is the size computed
    check_video_call(info, kwargs)
    from opendit.api.pipeline_calls import check_image_size

    check_image_size(info, kwargs)
    return kwargs


def label_ids(info: dict, prompts: list[str]) -> list[int]:
    """Class ids of a class-conditional pipeline (DiTPipeline) for prompts naming its labels (model_index.json's
    id2label; a label of several comma-separated names answers to each, as DiTPipeline.get_label_ids)."""
    labels = {}
    for key, names in (info.get("id2label") or {}).items():
        for label in str(names).split(","):
            labels[label.strip()] = int(key)
    if not labels:
        raise OpenDiTError(f"{info['pipeline_class']} is class-conditional and its model_index.json has no id2label")
    unknown = [p for p in prompts if p not in labels]
    if unknown:
        some = ", ".join(list(labels)[:8])
        raise OpenDiTError(f"--prompt {unknown[0]!r} is not a class label of this pipeline; its labels: {some}, ...")
    return [labels[p] for p in prompts]
