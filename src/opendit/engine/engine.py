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

diffusers pipelines: `Engine(diffusers=DIR)` runs a local diffusers pipeline folder instead (opendit/api/pipelines.py:
its own loop and scheduler, its transformer parallelised by `opendit.parallelize`); each call takes
`generate(prompt=[...], negative_prompt=..., seed=, steps=, cfg_scale=, image_size=)`, one image per prompt, all in
one pipeline call with one generator seeded `seed`. Same executors, same replica (runner: engine/pipeline_runner.py).
"""

from __future__ import annotations

import numbers
import time

import numpy as np

from opendit.api.generation import (
    ENGINE_FIELDS,
    GenerationRequest,
    GenerationResult,
    prepare,
    resolve_call,
    resolve_engine,
)
from opendit.api.request import EngineRequest, call_model
from opendit.errors import OpenDiTError


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
    ):
        start = time.perf_counter()
        given = {name: value for name, value in locals().items() if name in ENGINE_FIELDS}  # the signature above
        self._start(resolve_engine(EngineRequest.build(given)), start)  # checked once, no weights read

    @classmethod
    def from_spec(cls, spec) -> Engine:
        """An engine on a spec resolved already (generation.resolve_engine): nothing is checked again."""
        engine = cls.__new__(cls)
        engine._start(spec, time.perf_counter())
        return engine

    def _start(self, spec, start: float) -> None:
        from opendit.engine.executors import start_executor

        self._calls, self._executor = 0, None
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

    def generate(self, classes=None, **fields) -> GenerationResult | None:
        """One image per entry of `classes` (image i seeded seed + i), or on a diffusers engine one per `prompt` (one
        pipeline call, one generator seeded `seed`); None on the serving ranks of torchrun. The keywords are the
        call's fields (request.py: seed, steps, cfg_scale, scheduler, image_size, trace, prompt, negative_prompt,
        motion, frames, cache and every cache method's options, e.g. cache="fbcache", cache_threshold=0.1);
        an unknown one is refused with the list of fields."""
        if not self.is_main:
            return None
        if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
            classes = [classes]  # one image (documented shorthand)
        if "out" in fields:
            raise OpenDiTError("Engine.generate writes no files: drop out= and save with opendit.save_outputs")
        call = self.check(classes=classes, **fields)
        return self.run_calls([call])[0]

    def check(self, **fields):
        """One call's fields (generate()'s arguments) validated against this engine and resolved: the Call that
        run_calls takes. Raises OpenDiTError (nothing is sent) for bad input, or when the engine is closed."""
        if self.closed:
            raise OpenDiTError(f"engine is closed: {self._executor.closed_reason}")
        return resolve_call(self.spec, call_model().build(fields))

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
    """Generate one image per entry of `classes` (with `diffusers=DIR`: of `prompt`) on a one-shot `opendit.Engine`:
    keyword arguments (or a GenerationRequest) hold the engine's fields and the call's.

    With nproc > 1 (and not already inside torchrun) this starts nproc local workers and returns rank 0's result;
    inside torchrun every rank calls it and rank 0's result holds the images (other ranks get an empty array).
    Scripts that pass nproc > 1 must call it under `if __name__ == "__main__":` (workers are spawned). To make many
    calls, keep an Engine instead: it starts the workers and loads the model once.
    """
    return run_job(prepare(_one_shot_request(request, kwargs)))


def run_job(job) -> GenerationResult:
    """A prepared one-shot job (generation.prepare: the request checked and resolved once, its plan chosen for its
    batch and guidance) on a one-shot engine; nothing is checked again."""
    with Engine.from_spec(job.spec) as engine:
        result = engine.run_calls([job.resolved])[0]
    if result is None:  # ranks > 0 under torchrun: rank 0 holds the images
        labels = list(job.request.classes if job.request.classes is not None else job.request.prompt or [])
        return GenerationResult(images=np.zeros((0, 0, 0, 0), np.uint8), labels=labels)
    result.record["request"] = job.request.to_dict()  # as asked (None = the model's default), not as resolved
    return result


def _one_shot_request(request: GenerationRequest | None, kwargs: dict) -> GenerationRequest:
    """generate()'s request from its arguments; a wrong shape is an OpenDiTError like every other bad input."""
    if request is not None:
        if kwargs:
            raise OpenDiTError(f"pass a GenerationRequest or keyword fields, not both (got {', '.join(kwargs)})")
        return request  # prepare() checks its type
    if "classes" not in kwargs and "prompt" not in kwargs:
        raise OpenDiTError("classes is required; e.g. opendit.generate(classes=[0, 1, 2])")
    return GenerationRequest(**kwargs)  # unknown fields: OpenDiTError with the list
