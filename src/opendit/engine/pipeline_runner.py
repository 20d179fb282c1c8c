"""The runner of a diffusers pipeline folder: the pipeline loaded once on every rank, its denoisers parallelised, then
called once per engine call with its own loop, scheduler and VAE (pipelines.py resolves and checks what it runs;
engine/replica.py drives this runner, its interface described there).

Every rank runs the whole pipeline call: the scheduler's loop is repeated on each rank, each text encoder runs on
one rank and its output is broadcast (parallel/encoders.py; `--encode-every-rank`: on every rank), the
transformers' work is split (their outputs are all-gathered, so every rank's loop sees the same tensors), and the
VAE's decode is split in row bands when --vae-parallel asks it or (auto) the latent is large enough
(parallel/vae.py: the pipeline's own `vae.decode` call runs split, every rank gets the whole image). The output rank
converts the output.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from opendit.api.pipelines import SEEDING, PipelineCall, PipelineSpec, meta_decoded_shape
from opendit.diffusion.sampler import device_clock
from opendit.engine.replica import Ran
from opendit.errors import OpenDiTError
from opendit.io.quiet import quiet_transformers
from opendit.models.precision import parse_dtype
from opendit.parallel.encoders import encoder_owners, place_encoders, skipped_components, text_encoder_names
from opendit.parallel.hooks import runtime_step_hooks

# glibc's mmap threshold in sharded CPU pipeline workers: 64 KiB, not the DiT path's 1 MiB. A T5 of 12 28-MiB units
# over 2 ranks kept 44 MiB resident after its first forward at 1 MiB (small gathered tensors left in the heap), 14 MiB
# at 64 KiB; a pipeline has one or two hundred units.
PIPELINE_MMAP_THRESHOLD = 1 << 16
DENOISERS = ("transformer", "transformer_2")  # a pipeline's denoising modules (Wan 2.2: two experts)

GIF_NOTE = "; videos: frame 0 as each PNG, every frame in an animated GIF"


def load_pipeline(folder: str, dtype: str, device: torch.device, **components):
    """The pipeline on `device`; `components` given (None: left out, e.g. the text encoders another rank holds) are
    not read from the folder."""
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings(), quiet_transformers():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=parse_dtype(dtype), **components)
        except (OSError, ValueError, KeyError) as exc:
            raise OpenDiTError(f"cannot load the pipeline from --diffusers {folder}: {exc}") from exc
    return pipe.to(device)


def lean_denoisers(spec: PipelineSpec) -> list[str]:
    """The denoisers loaded lean (built on meta, sharded, filled from the folder): under --shard-weights over a
    sequence-parallel group without tensor parallelism (whose split is applied to loaded weights)."""
    plan = spec.plan
    if not (plan.shard_weights and plan.sp_degree > 1 and plan.tp == 1):
        return []
    index = json.loads((Path(spec.folder) / "model_index.json").read_text())
    return [name for name in DENOISERS if isinstance(index.get(name), list) and index[name][0] is not None]


def rebuilt(pipe):
    """The pipeline built again from its own components and config arguments: attributes its __init__ derives from a
    component (SD3's default_sample_size from the transformer's config, a VAE scale factor) are right again after a
    component was left out of from_pretrained and set afterwards. The modules themselves are the same objects."""
    import inspect

    accepted = inspect.signature(type(pipe).__init__).parameters
    components = {name: module for name, module in pipe.components.items() if name in accepted}
    settings = {name: value for name, value in pipe.config.items() if name in accepted and name not in components}
    fresh = type(pipe)(**components, **settings)
    fresh.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return fresh


def to_uint8(output) -> tuple[np.ndarray, np.ndarray | None]:
    """A pipeline's output_type="np" output -> (images (N, H, W, C), frames (N, F, H, W, C) or None), uint8."""
    frames = getattr(output, "frames", None)
    pixels = np.asarray(frames if frames is not None else output.images, dtype=np.float32)
    pixels = (pixels * 255).round().clip(0, 255).astype(np.uint8)  # diffusers' numpy_to_pil
    if pixels.ndim == 5:
        return np.ascontiguousarray(pixels[:, 0]), pixels
    return pixels, None


class PipelineRunner:
    """One rank's pipeline, loaded once, every denoiser (transformer, and transformer_2 where the pipeline has one:
    Wan 2.2's low-noise expert) parallelised the same way (see the module docstring)."""

    def __init__(self, spec: PipelineSpec, device: torch.device):
        start = time.perf_counter()
        self.spec, self.device, self.plan, self.runtime = spec, device, spec.plan, None
        self._lean_records: dict = {}  # denoiser -> its sharded loading's record
        is_output = spec.world == 1 or dist.get_rank() == 0
        bars = spec.settings.progress and is_output
        owners, rank = {}, (dist.get_rank() if spec.world > 1 else 0)
        names = text_encoder_names(spec.folder)
        shard = names if spec.world > 1 and getattr(spec.settings, "encoder_shard", False) else []
        if spec.world > 1 and not spec.settings.encode_every_rank:  # each other text encoder on one rank
            owners = encoder_owners([name for name in names if name not in shard], spec.world)
        lean = lean_denoisers(spec) if spec.world > 1 else []
        if (lean or shard) and device.type == "cpu":  # gathered weights freed to the OS at once (sampler_runner.py)
            from opendit.observe.memory import exact_malloc

            exact_malloc(PIPELINE_MMAP_THRESHOLD)
        left_out = {**skipped_components(owners, rank), **dict.fromkeys([*lean, *shard])}
        with contextlib.nullcontext() if bars else _no_loading_bars():
            self.pipe = load_pipeline(spec.folder, spec.settings.dtype, device, **left_out)
        self.pipe.set_progress_bar_config(disable=not bars)
        dtype = parse_dtype(spec.settings.dtype)
        encoders = place_encoders(self.pipe, spec.folder, owners, rank, dtype, device)
        record = {"mode": "lean" if lean else "whole"}
        if shard:
            record["sharded_encoders"] = self._shard_encoders(shard, dtype)
            encoders["text_encoder_bytes"] += sum(r["bytes"] for r in record["sharded_encoders"].values())
            encoders["text_encoders"] = {**(encoders["text_encoders"] if owners else {}),
                                         **dict.fromkeys(shard, "sharded over every rank")}  # fmt: skip
        if spec.world > 1:
            from opendit.parallel.entry import parallelize

            for name in DENOISERS:
                if name in lean:  # built and sharded on meta, then its local shards read from the folder
                    self._load_lean(name, dtype)
                elif getattr(self.pipe, name, None) is not None:  # one runtime: the experts take turns on the ranks
                    module = getattr(self.pipe, name)
                    parallelize(module, spec.plan, runtime=self.runtime)
                    self.runtime, self.plan = module._opendit_runtime, module._opendit_plan  # kernel for the degrees
            if lean:
                record["denoisers"] = self._lean_records
        if lean or shard:  # loaded as None, set afterwards: what __init__ derives from them is derived again
            self.pipe = rebuilt(self.pipe)
        self.vae_split = self._split_vae()
        if decode_per_sample_if_needed(getattr(self.pipe, "vae", None)):
            record["vae_decodes_per_sample"] = True
        self.parameter_bytes = sum(_parameter_bytes(module) for _name, module in self.denoisers())
        self.load_record = {**record, "seconds": time.perf_counter() - start, **encoders}

    def _shard_encoders(self, names: list[str], dtype: torch.dtype) -> dict:
        """--encoder-shard: each text encoder built on meta, FSDP2-sharded over every rank, filled from the folder."""
        from opendit.parallel.lean_pipeline import shard_encoder

        records = {}
        for name in names:
            module, records[name] = shard_encoder(self.spec.folder, name, dtype, self.device)
            setattr(self.pipe, name, module)
        return records

    def _load_lean(self, name: str, dtype: torch.dtype) -> None:
        """Denoiser `name` built on meta, parallelised and FSDP2-sharded there, then its local shards read from the
        folder's safetensors (parallel/lean_pipeline.py): no rank ever holds it whole."""
        from opendit.distributed.mesh import build_runtime
        from opendit.families.apply import family_plan
        from opendit.families.registry import require_family
        from opendit.parallel.entry import parallelize
        from opendit.parallel.lean_pipeline import build_on_meta, fill_component

        module = build_on_meta(self.spec.folder, name, dtype)
        if self.runtime is None:  # built for the real device (the module's own, meta, would give a meta mesh)
            self.runtime = build_runtime(family_plan(self.spec.plan, require_family(module))[0], self.device)
        parallelize(module, self.spec.plan, runtime=self.runtime)
        self.runtime, self.plan = module._opendit_runtime, module._opendit_plan
        stats = fill_component(module, self.spec.folder, name, self.device)
        self._lean_records[name] = stats.to_dict()
        setattr(self.pipe, name, module)

    def _split_vae(self):
        """The pipeline's VAE decode split over every rank (parallel/vae.py), unless --vae-parallel off, one process
        or (auto) a VAE without a split plan (the caller refused it under --vae-parallel)."""
        from opendit.parallel.vae import install_vae_split, vae_refusal

        mode, vae = self.spec.settings.vae_parallel, getattr(self.pipe, "vae", None)
        if self.runtime is None or mode is False or vae is None:
            return None
        if vae_refusal(type(vae).__name__, dict(vae.config)) is not None:
            return None  # auto on a VAE with no split plan: decoded whole (noted by check_vae_parallel)
        return install_vae_split(vae, self.runtime.exact("all"), mode)

    def denoisers(self) -> list[tuple[str, torch.nn.Module]]:
        """The pipeline's transformers, in the order its loop first calls them."""
        found = [(name, getattr(self.pipe, name, None)) for name in DENOISERS]
        return [(name, module) for name, module in found if module is not None]

    def labels(self, call: PipelineCall) -> list:
        return list(call.prompts)

    def run(self, call: PipelineCall, hooks: list) -> Ran:
        """The pipeline's own call, with one generator seeded call.seed; its step callback ends each step."""
        # lists copied: a pipeline may edit its arguments in place (ZImagePipeline writes its chat template into the
        # caller's prompt list), which would change this call's record and any later run of it
        kwargs = {k: list(v) if isinstance(v, list) else v for k, v in call.kwargs.items()}
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(call.seed)
        total = int(kwargs.get("num_inference_steps", self.spec.info["call"].get("num_inference_steps") or 0))
        hooks = [*hooks, *runtime_step_hooks(self.runtime)]
        begin = time.perf_counter()
        try:
            with PipelineLoop([module for _name, module in self.denoisers()], hooks, self.spec.info["call"], total,
                              self.device) as loop:  # fmt: skip
                kwargs.update(loop.callback_kwargs())
                output = self.pipe(**kwargs)
        except ValueError as exc:  # the pipeline's check_inputs (e.g. a size its VAE and patches cannot take)
            raise OpenDiTError(f"{type(self.pipe).__name__} refused the call: {exc}") from exc
        # the whole call: prompt encoding, the denoising loop, the VAE decode
        return Ran(step_times=loop.times, sampling_s=time.perf_counter() - begin, result=output)

    def outputs(self, call: PipelineCall, ran: Ran):
        return to_uint8(ran.result)

    def record_fields(self, call: PipelineCall, images: np.ndarray, frames) -> dict:
        spec, pipe, defaults = self.spec, self.pipe, self.spec.info["call"]
        return {
            "pipeline": {
                "folder": spec.folder,
                "class": type(pipe).__name__,
                "loop": f"{type(pipe).__name__}.__call__ (diffusers' own denoising loop and scheduler)",
                "transformer": type(pipe.transformer).__name__,
                "denoisers": [name for name, _module in self.denoisers()],
                "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
                "call": call.kwargs,  # what the pipeline was called with, besides the generator
                "seeding": SEEDING,
                "outputs": "uint8 = (x * 255).round() of output_type='np'" + (GIF_NOTE if frames is not None else ""),
            },
            "resolved": {
                "steps": call.kwargs.get("num_inference_steps", defaults.get("num_inference_steps")),
                "cfg_scale": call.kwargs.get("guidance_scale", defaults.get("guidance_scale")),
                "image_size": list(images.shape[1:3]),
                "frames": int(frames.shape[1]) if frames is not None else None,
                "dtype": str(parse_dtype(spec.settings.dtype)),
                "encoder_placement": self.encoder_placement,  # as run: the planner may have chosen --encoder-shard
            },
        }

    @property
    def encoder_placement(self) -> str:
        """Where the text encoders ran: the request's placement, or the one the planner chose under --memory-gib."""
        settings = self.spec.settings
        if self.spec.world == 1 or settings.encode_every_rank:
            return "every rank"
        return "sharded over every rank (--encoder-shard)" if settings.encoder_shard else "each on one rank"

    def parallel_record(self, call: PipelineCall) -> dict:
        record = {"world_size": self.spec.world, "describe": self.plan.describe(), "config": self.plan.to_dict()}
        if self.vae_split is not None:  # the last decode: split over the ranks or not, and why
            record["vae_decode"] = dict(self.vae_split.band.last)
        return record


def decode_per_sample_if_needed(vae) -> bool:
    """Make `vae.decode` decode one sample at a time where the VAE cannot decode a batch, and say whether it did.

    AutoencoderKLHunyuanVideo15 (diffusers 0.42.1) builds its mid-block causal mask as (B, S, S) and hands it to
    scaled_dot_product_attention with (B, 1, S, D) queries, so it broadcasts to (B, B, S, S) and a batch of 2 fails:
    its pipeline decodes one video per call. Found, not listed: the VAE is built on the meta device from its config and
    asked to decode a batch of 2 and of 1 (shapes only). Exact: a VAE decodes each sample on its own anyway."""
    if vae is None:
        return False
    config = dict(vae.config)
    channels = config.get("latent_channels") or config.get("z_dim")
    if not channels:
        return False
    # (B, C, h, w) for image VAEs, (B, C, frames, h, w) for video VAEs (their encoders take 5-D input)
    video = any(isinstance(m, torch.nn.Conv3d) for m in vae.modules())

    def decodes(batch: int) -> bool:
        shape = (batch, int(channels), 2, 8, 8) if video else (batch, int(channels), 8, 8)
        return meta_decoded_shape(type(vae), config, shape) is not None

    if decodes(2) or not decodes(1):
        return False
    from diffusers.models.autoencoders.vae import DecoderOutput

    whole = vae.decode  # the split decode where --vae-parallel installed one: each sample then decodes split

    def decode(z: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        # z: (B, C, [frames,] h, w) -> B decodes of (1, C, [frames,] h, w), concatenated on the batch
        sample = torch.cat([whole(z[i : i + 1], *args, return_dict=False, **kwargs)[0] for i in range(z.shape[0])])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.decode = decode
    return True


def _parameter_bytes(module: torch.nn.Module) -> int:
    from opendit.parallel.sharding import sharded_parameter_bytes

    return sharded_parameter_bytes(module)


class PipelineLoop:
    """Feeds step hooks (diffusion/hooks.py: the cache, the trace) from a diffusers pipeline's own loop, as our
    sampler does: the transformer's forward hooks time each model call, the pipeline's step callback ends a step.
    `callback_kwargs()` gives the callback arguments the pipeline takes (none: the step times stay empty)."""

    def __init__(self, denoisers: list, hooks: list, params: dict, num_steps: int, device: torch.device):
        from opendit.diffusion.hooks import HookList, LoopInfo

        self.hooks, self.params, self.device = HookList(hooks), params, device
        self.now = device_clock(device)  # device time on CUDA (synchronises before each reading), as the sampler
        self.loop = LoopInfo(num_steps=num_steps, batch=0, guided=False)  # each row decides alone (no pairing)
        self.times: list[float] = []
        self.ctx = None
        self._handles = [
            handle
            for module in denoisers
            for handle in (
                module.register_forward_pre_hook(self._call_start),
                module.register_forward_hook(self._call_end),
            )
        ]

    def __enter__(self) -> PipelineLoop:
        self.hooks.on_loop_start(self.loop)
        self._start_step(0)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.hooks.on_loop_end(self.loop)

    def _start_step(self, index: int) -> None:
        from opendit.diffusion.hooks import StepContext

        self.ctx = StepContext(index=index, num_steps=self.loop.num_steps, timestep=float("nan"),
                               start_s=self.now())  # fmt: skip
        self.hooks.on_step_start(self.ctx)

    def _call_start(self, _module, _args) -> None:
        self._call_began = self.now()

    def _call_end(self, _module, _args, _output) -> None:
        from opendit.diffusion.hooks import ModelCall

        self.ctx.model_calls.append(ModelCall(self._call_began, self.now()))

    def tick(self) -> None:
        self.ctx.end_s = self.now()
        self.times.append(self.ctx.seconds)
        self.hooks.on_step_end(self.ctx)
        if len(self.times) < self.loop.num_steps:
            self._start_step(len(self.times))

    def callback_kwargs(self) -> dict:
        if "callback_on_step_end" in self.params:
            return {"callback_on_step_end": lambda _pipe, _i, _t, tensors: (self.tick(), tensors)[1]}
        if "callback" in self.params and "callback_steps" in self.params:  # PixArt's older callback
            return {"callback": lambda _i, _t, _latents: self.tick(), "callback_steps": 1}
        return {}


@contextlib.contextmanager
def _no_loading_bars():
    """diffusers' and transformers' loading bars off while loading (their switches are process-wide: restored)."""
    from diffusers.utils import logging as diffusers_logging

    libraries = [diffusers_logging]
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        libraries.append(transformers_logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was in zip(libraries, enabled):
            if was:
                library.enable_progress_bar()
