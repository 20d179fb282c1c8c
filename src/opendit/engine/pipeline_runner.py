"""Per rank: a diffusers pipeline loaded once, its transformer parallelised, then called once per engine call
(`PipelineReplica`, the diffusers counterpart of worker.Replica; pipelines.py resolves and checks what it runs).

Every rank runs the whole pipeline call: the text encoders, the scheduler's loop and the VAE are repeated on each
rank, and only the transformer's work is split (its outputs are all-gathered, so every rank's loop sees the same
tensors). Rank 0 converts the output and writes the record.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from opendit.errors import OpenDiTError
from opendit.memory import max_rss_bytes
from opendit.outputs import GenerationResult
from opendit.pipelines import SEEDING, PipelineCall, PipelineSpec, quiet_transformers
from opendit.precision import parse_dtype
from opendit.replica import ReplicaBase

GIF_NOTE = "; videos: frame 0 as each PNG, every frame in an animated GIF"


def load_pipeline(folder: str, dtype: str, device: torch.device):
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings(), quiet_transformers():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=parse_dtype(dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise OpenDiTError(f"cannot load the pipeline from --diffusers {folder}: {exc}") from exc
    return pipe.to(device)


def to_uint8(output) -> tuple[np.ndarray, np.ndarray | None]:
    """A pipeline's output_type="np" output -> (images (N, H, W, C), frames (N, F, H, W, C) or None), uint8."""
    frames = getattr(output, "frames", None)
    pixels = np.asarray(frames if frames is not None else output.images, dtype=np.float32)
    pixels = (pixels * 255).round().clip(0, 255).astype(np.uint8)  # diffusers' numpy_to_pil
    if pixels.ndim == 5:
        return np.ascontiguousarray(pixels[:, 0]), pixels
    return pixels, None


def peak_memory_bytes(device: torch.device) -> int:
    """As worker.peak_memory_bytes: the device allocator's peak on CUDA, else the process's maximum resident set."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else max_rss_bytes()


class PipelineReplica(ReplicaBase):
    """One rank's pipeline (or the only process's): loaded once, its transformer parallelised, then `run(call)` per
    call. The interface of worker.Replica (is_output, spec, load_s, broadcast, barrier, run, close), so the engine
    and worker.serve drive it the same way, over the same kind of control group."""

    def __init__(self, spec: PipelineSpec):
        start = time.perf_counter()
        spec = self.join(spec)
        device = self.device
        self.is_output = spec.world == 1 or dist.get_rank() == 0
        bars = spec.settings.progress and self.is_output
        with contextlib.nullcontext() if bars else _no_loading_bars():
            self.pipe = load_pipeline(spec.folder, spec.settings.dtype, device)
        self.pipe.set_progress_bar_config(disable=not bars)
        self.plan = spec.plan
        if spec.world > 1:
            from opendit.parallel.entry import parallelize

            parallelize(self.pipe.transformer, spec.plan)
            self.runtime = self.pipe.transformer._opendit_runtime
            self.plan = self.pipe.transformer._opendit_plan  # with the kernel chosen for the degrees
        self.load_s = time.perf_counter() - start
        self.memory.end("load")
        self.calls = 0

    def run(self, call: PipelineCall, on_step=None) -> GenerationResult | None:
        """One pipeline call on this rank (every rank of the job at once); the output rank returns the result."""
        start = time.perf_counter()
        self.memory.end("between_calls")
        stats = self.runtime.stats if self.runtime is not None else None
        if stats is not None:
            stats.reset()
        kwargs = {**call.kwargs, "generator": torch.Generator(device="cpu").manual_seed(call.seed)}
        total = int(kwargs.get("num_inference_steps", self.spec.info["call"].get("num_inference_steps") or 0))
        progress = None if on_step is None else (lambda done: on_step(done, total))
        cache = self._install_cache(call)
        trace = self.trace_hook(stats)
        hooks = [*([cache] if cache is not None else []), trace]  # the cache first: it starts each step's slots
        self.cache_summary = None
        begin = time.perf_counter()
        try:
            with PipelineLoop(self.pipe.transformer, hooks, self.spec.info["call"], total, self.device,
                              progress) as loop:  # fmt: skip
                kwargs.update(loop.callback_kwargs())
                output = self.pipe(**kwargs)
        except ValueError as exc:  # the pipeline's check_inputs (e.g. a size its VAE and patches cannot take)
            raise OpenDiTError(f"{type(self.pipe).__name__} refused the call: {exc}") from exc
        finally:
            if cache is not None:
                self.cache_summary = cache.summary()
                cache.remove()
        step_times = loop.times
        sampling_s = time.perf_counter() - begin
        self.memory.end("sampling")  # the whole call: prompt encoding, the denoising loop, the VAE decode
        images, frames = to_uint8(output)
        ranks = self._rank_records(call, sampling_s, step_times, stats, trace)
        self.calls += 1
        if not self.is_output:
            return None
        utilisation = self.finish_ranks(call, ranks, {"request": call.request, "plan": self.plan.describe()})
        record = self._record(call, images, frames, ranks, start, utilisation)
        return GenerationResult(images=images, labels=list(call.prompts), record=record, frames=frames)

    def _install_cache(self, call: PipelineCall):
        """The call's cache on the transformer (after its parallel plan), stepped by the pipeline's loop."""
        if call.cache is None:
            return None
        from opendit.cache.runtime import install_cache

        return install_cache(self.pipe.transformer, call.cache, self.runtime)

    def _rank_records(self, call, sampling_s: float, step_times: list[float], stats, trace) -> list[dict]:
        mine = {
            "rank": dist.get_rank() if self.spec.world > 1 else 0,
            "load_s": self.load_s,
            "sampling_s": sampling_s,
            "per_step_s": step_times,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": self.memory.record(),
            "comm": stats.snapshot() if stats is not None else None,  # {kind: {calls, bytes, wait_s}}, this call
        }
        return self.gather_ranks(mine, call, trace)

    def _record(self, call: PipelineCall, images: np.ndarray, frames, ranks: list[dict], start: float, utilisation):
        """record.json of one call (on the output rank)."""
        spec, pipe, defaults = self.spec, self.pipe, self.spec.info["call"]
        parallel = {"world_size": spec.world, "describe": self.plan.describe(), "config": self.plan.to_dict()}
        parallel["notes"] = list(dict.fromkeys(spec.plan_notes + call.notes))
        if spec.world > 1:
            parallel["backend"] = dist.get_backend()
        return {
            "request": call.request,
            "pipeline": {
                "folder": spec.folder,
                "class": type(pipe).__name__,
                "loop": f"{type(pipe).__name__}.__call__ (diffusers' own denoising loop and scheduler)",
                "transformer": type(pipe.transformer).__name__,
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
            },
            "note": spec.note,
            "device": str(self.device),
            "parallel": parallel,
            "timing": {
                "load_s": self.load_s,
                "sampling_s": ranks[0]["sampling_s"],
                "per_step_s": ranks[0]["per_step_s"],  # between step ends; the first includes prompt encoding
                "total_s": time.perf_counter() - start,
            },
            "peak_memory_bytes": ranks[0]["peak_memory_bytes"],
            "memory": ranks[0]["memory"],
            "comm": _comm_record(ranks) if spec.world > 1 else None,
            "utilisation": utilisation,
            "ranks": ranks if spec.world > 1 else None,
            "cache": self.cache_summary,
        }


def _comm_record(ranks: list[dict]) -> dict:
    return {
        "convention": "bytes = payload a rank sends to other ranks (wire dtype); calls per op kind; the whole call",
        "per_rank": [rank["comm"] for rank in ranks],
    }


class PipelineLoop:
    """Feeds step hooks (diffusion/hooks.py: the cache, the trace) from a diffusers pipeline's own loop, as our
    sampler does: the transformer's forward hooks time each model call, the pipeline's step callback ends a step.
    `callback_kwargs()` gives the callback arguments the pipeline takes (none: the step times stay empty)."""

    def __init__(self, transformer, hooks: list, params: dict, num_steps: int, device: torch.device, on_step=None):
        from opendit.diffusion.hooks import HookList, LoopInfo

        self.hooks, self.params, self.device, self.on_step = HookList(hooks), params, device, on_step
        self.loop = LoopInfo(num_steps=num_steps, batch=0, guided=False)  # each row decides alone (no pairing)
        self.times: list[float] = []
        self.ctx = None
        self._handles = [transformer.register_forward_pre_hook(self._call_start),
                         transformer.register_forward_hook(self._call_end)]  # fmt: skip

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
                               start_s=time.perf_counter())  # fmt: skip
        self.hooks.on_step_start(self.ctx)

    def _call_start(self, _module, _args) -> None:
        self._call_began = time.perf_counter()

    def _call_end(self, _module, _args, _output) -> None:
        from opendit.diffusion.hooks import ModelCall

        self.ctx.model_calls.append(ModelCall(self._call_began, time.perf_counter()))

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ctx.end_s = time.perf_counter()
        self.times.append(self.ctx.seconds)
        self.hooks.on_step_end(self.ctx)
        if self.on_step is not None:
            self.on_step(len(self.times))
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
