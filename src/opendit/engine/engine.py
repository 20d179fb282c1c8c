"""`opendit.Engine`: load a model (and start its worker processes) once, then generate many times.

    with opendit.Engine(nproc=2, parallel=ParallelConfig(ulysses=2)) as engine:
        a = engine.generate(classes=[0, 1, 2])                                   # the model's steps and guidance
        b = engine.generate(classes=[7] * 10, seed=5, steps=20, cfg_scale=3.0)  # another batch, seed, schedule
        c = engine.generate(classes=[4], image_size=32)                         # another size (re-split, exact)

The constructor holds everything that is fixed for the engine's life: the model source (model / ckpt, vae), dtype,
processes (nproc), the ParallelConfig (chosen once, as `opendit.generate` chooses it: given degrees, default_plan, or
the planner with parallel_auto=True), device and default image size. Each `generate()` call may change the classes
(and so the batch size), seed, steps, guidance, scheduler and image size, and returns a GenerationResult (images
(B, H, W, C) uint8, labels, record); `trace=FILE` also writes a Chrome trace of that call with every rank's events.

How the calls run — in this process, on a local pool of workers, or across torchrun's ranks — is one executor chosen
once from the world size (engine/executors.py: the modes and the message flow). Under torchrun EVERY rank constructs
the Engine with the same arguments; ranks > 0 serve rank 0's calls inside the constructor until rank 0 closes its
engine, then get an engine whose `is_main` is False and whose generate() returns None. So one script runs both ways:

    with Engine() as engine:                 # ranks > 0 serve in here, until rank 0 leaves its `with`
        result = engine.generate(classes=[1, 2, 3])
        if engine.is_main:                   # rank 0 (and the only process otherwise)
            save_outputs(result, "out")

Errors: the constructor's arguments and every call are validated in the caller by the request schema (request.py:
strict types, bounded ranges, finite guidance; classes out of range, steps outside 1..1000, cfg < 1, a scheduler that
does not fit the model's prediction, cfg parallel without guidance, a bad image size or too few tokens for the
sequence degree, more dp groups than images, another size under sharded weights, a trace file that cannot be
written...) before anything is sent: OpenDiTError, and the engine stays usable. A worker that fails ends the engine:
that call raises WorkerFailed with the failing rank's message (OpenDiTError when the rank raised one), and later calls
raise OpenDiTError("engine is closed: rank R failed: ..."). No receive waits forever on a dead worker: the pool's recv
raises as soon as any worker exits.

diffusers pipelines: `Engine(diffusers=DIR)` runs a local diffusers pipeline folder instead (opendit/pipelines.py:
its own loop and scheduler, its transformer parallelised by `opendit.parallelize`); each call takes
`generate(prompt=[...], negative_prompt=..., seed=, steps=, cfg_scale=, image_size=)`, one image per prompt, all in
one pipeline call with one generator seeded `seed`. Same executors, same replica (runner: engine/pipeline_runner.py).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from opendit.errors import OpenDiTError
from opendit.generation import ENGINE_FIELDS, GenerationRequest, GenerationResult, prepare, resolve_call, resolve_engine
from opendit.request import CallRequest, EngineRequest

CACHE_FIELDS = ("cache", "pab_range", "pab_window", "pab_mlp_range", "cache_threshold", "cache_max_reuse",
                "cache_guard_steps")  # fmt: skip


class Engine:
    """A long-lived generator: see the module docstring for the modes and the message flow."""

    def __init__(
        self,
        model: str | None = None,
        ckpt: str | None = None,
        vae: str | None = None,
        dtype: str = "fp32",
        nproc: int | None = None,
        parallel=None,
        parallel_auto: bool = False,
        device: str | None = None,
        image_size: int | None = None,
        progress: bool = False,
        memory_gib: float | None = None,
        diffusers: str | None = None,
        video: bool = False,
        *,
        _plan_for: tuple[int, float | None] | None = None,  # opendit.generate: plan for this (batch, cfg_scale)
    ):
        from opendit.engine.executors import start_executor

        start = time.perf_counter()
        self._calls = 0
        self._executor = None
        given = {name: value for name, value in locals().items() if name in ENGINE_FIELDS}  # the signature above
        spec = resolve_engine(EngineRequest.build(given), *(_plan_for or (None, None)))  # checked, no weights
        self._executor = start_executor(spec)  # in-process, local pool or torchrun: chosen once
        self.spec = self._executor.spec
        self._launch_s = time.perf_counter() - start

    @property
    def mode(self) -> str:
        """How the calls run: "in-process", "pool" or "torchrun" (engine/executors.py)."""
        return self._executor.name

    @property
    def is_main(self) -> bool:
        """False on torchrun's serving ranks (their generate() returns None)."""
        return self._executor.is_main

    @property
    def plan(self):
        """The ParallelConfig every call runs with."""
        return self.spec.plan

    @property
    def world_size(self) -> int:
        return self.spec.world

    def generate(
        self,
        classes=None,
        seed: int = 0,
        steps: int | None = None,
        cfg_scale: float | None = None,
        scheduler: str | None = None,
        image_size: int | None = None,
        trace: str | Path | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        motion: str | list[str] | None = None,
        frames: int | None = None,
        cache: str | None = None,
        **cache_options,
    ) -> GenerationResult | None:
        """One image per entry of `classes` (image i seeded seed + i), or on a diffusers engine one per `prompt` (one
        pipeline call, one generator seeded `seed`); None on the serving ranks of torchrun. `cache` ("pab" or
        "fbcache") with `cache_options` (pab_range, pab_window, pab_mlp_range, cache_threshold, cache_max_reuse,
        cache_guard_steps) reuses work across this call's steps (opendit/cache)."""
        if not self.is_main:
            return None
        if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
            classes = [classes]  # one image (documented shorthand)
        values = {"classes": classes, "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "scheduler": scheduler}
        texts = {"prompt": prompt, "negative_prompt": negative_prompt}
        video = {"motion": motion, "frames": frames}  # video engines (video=True): result.frames holds the videos
        # None: the engine's image size; unknown cache option names: the schema names the known fields
        caching = {"cache": cache, **cache_options}
        call = self.check(**values, **texts, **video, **caching, image_size=image_size, trace=trace)
        return self.run_calls([call])[0]

    def check(self, **fields):
        """One call's fields (generate()'s arguments) validated against this engine and resolved: the Call that
        run_calls takes. Raises OpenDiTError (nothing is sent) for bad input, or when the engine is closed."""
        if self.closed:
            raise OpenDiTError(f"engine is closed: {self._executor.closed_reason}")
        return resolve_call(self.spec, CallRequest.build(fields))

    def run_calls(self, calls: list, on_step=None) -> list[GenerationResult]:
        """Run checked calls (`check`) as ONE denoising loop when they merge (batching.py: same steps, guidance,
        scheduler and size; each image keeps its own request's seed, so each result equals that call alone), and
        return one GenerationResult per call. on_step(done, total) is called on this process after every step.
        Calls that do not merge raise ValueError: the caller groups them (opendit/serve does)."""
        from opendit.engine.batching import merge_calls, split_result

        if not self.is_main:
            return [None] * len(calls)
        if self.closed:
            raise OpenDiTError(f"engine is closed: {self._executor.closed_reason}")
        merged = merge_calls(calls)
        start = time.perf_counter()
        result = self._executor.run(merged, on_step)
        if self._calls == 0:  # + process start, rendezvous and loading
            result.record["timing"]["with_launch_s"] = self._launch_s + time.perf_counter() - start
        self._calls += 1
        return split_result(result, calls)

    @property
    def closed(self) -> bool:
        """True once close() was called or a worker failed: later calls raise OpenDiTError."""
        return self._executor is None or self._executor.closed_reason is not None

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (pool mode; [] otherwise)."""
        return self._executor.worker_pids if self._executor is not None else []

    def close(self) -> None:
        """End the engine: the workers (or torchrun's serving ranks) leave the process group and exit. Idempotent."""
        if self._executor is not None:
            self._executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Engine({self.mode}, {self.spec.world} process(es), {self.spec.plan.describe()}, {state})"


def generate(request: GenerationRequest | None = None, **kwargs) -> GenerationResult:
    """Generate one image per entry of `classes` (with `diffusers=DIR`: of `prompt`) on a one-shot `opendit.Engine`.
    Keyword arguments are GenerationRequest fields.

    With nproc > 1 (and not already inside torchrun) this starts nproc local workers and returns rank 0's result;
    inside torchrun every rank calls it and rank 0's result holds the images (other ranks get an empty array).
    Scripts that pass nproc > 1 must call it under `if __name__ == "__main__":` (workers are spawned). To make many
    calls, keep an Engine instead: it starts the workers and loads the model once.
    """
    request = _one_shot_request(request, kwargs)
    job = prepare(request)  # the whole request checked first: the errors (and their order) of a one-shot request
    settings = {k: getattr(request, k) for k in ENGINE_FIELDS}
    labels = list(request.classes if request.classes is not None else request.prompt or [])
    with Engine(**settings, _plan_for=(len(labels), request.cfg_scale)) as engine:
        resolved = {"steps": job.steps, "cfg_scale": job.cfg_scale, "scheduler": job.scheduler}
        texts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
        texts.update(motion=request.motion, frames=request.frames)
        texts.update({name: getattr(request, name) for name in CACHE_FIELDS})
        result = engine.generate(classes=request.classes, seed=request.seed, trace=request.trace, **resolved, **texts)
    if result is None:  # ranks > 0 under torchrun: rank 0 holds the images
        return GenerationResult(images=np.zeros((0, 0, 0, 0), np.uint8), labels=labels)
    result.record["request"] = asdict(request)  # as asked (None = the model's default), not as resolved
    return result


def _one_shot_request(request: GenerationRequest | None, kwargs: dict) -> GenerationRequest:
    """generate()'s request from its arguments; a wrong shape is an OpenDiTError like every other bad input."""
    if request is not None:
        if kwargs:
            raise OpenDiTError(f"pass a GenerationRequest or keyword fields, not both (got {', '.join(kwargs)})")
        return request  # prepare() checks its type
    names = [f.name for f in fields(GenerationRequest)]
    unknown = [name for name in kwargs if name not in names]
    if unknown:
        raise OpenDiTError(f"unknown field {unknown[0]!r} for opendit.generate; the fields are: {', '.join(names)}")
    if "classes" not in kwargs and "prompt" not in kwargs:
        raise OpenDiTError("classes is required; e.g. opendit.generate(classes=[0, 1, 2])")
    return GenerationRequest(**kwargs)
