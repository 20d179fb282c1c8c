"""One rank's replica of an engine (or the only process's): `Replica(spec)` joins the job, loads and parallelises
through the runner the spec names, then `run(call)` per call. Whatever the runner, the replica does the rest the
same way: the per-phase memory peaks, the call's comm counters and trace, the cache installed on every denoiser,
every rank's record gathered on every rank, and the one record.json writer on the output rank.

A runner (the source's own way of generating) has this interface:
    Runner(spec, device)                         load and parallelise on this rank; sets `runtime` (None: one process)
    runner.denoisers() -> [(name, module)]       what a cache is installed on (Wan 2.2: both experts)
    runner.run(call, hooks) -> Ran               the denoising loop, feeding `hooks` (diffusion/hooks.py) each step
    runner.outputs(call, ran) -> (images, frames)   uint8, on the output rank (a decode, or the pipeline's own output);
                                                 on every rank when runner.decodes_on_every_rank(call) (optional:
                                                 the sampler path's VAE decode split over the ranks)
    runner.rank_fields() / runner.record_fields(call, images, frames) / runner.parallel_record(call)
`sampler_runner.SamplerRunner` runs OpenDiT's sampler over its DiT / video DiT; `pipeline_runner.PipelineRunner`
runs a diffusers pipeline's own `__call__`.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import torch.distributed as dist

from opendit.diffusion.hooks import StepHook
from opendit.distributed.comm import CommStats
from opendit.distributed.control import ControlMember
from opendit.distributed.env import global_rank, init_from_env, pick_device, single_device
from opendit.io.outputs import GenerationResult
from opendit.observe.memory import PhasePeaks, peak_memory_bytes
from opendit.observe.trace import TraceHook, utilisation_summary, write_chrome_trace
from opendit.parallel.attention.ring import attention_kernels


@dataclass
class Ran:
    """What a runner's loop leaves for the replica: its step times, and what `outputs` turns into images."""

    step_times: list[float]
    sampling_s: float
    result: object  # the runner's own (latents to decode, or the pipeline's output)


class Replica(ControlMember):
    """See the module docstring. With spec.world > 1 this is one rank of the job: it joins the process group from the
    environment (torchrun's or the WorkerPool's) and agrees on rank 0's spec, so every rank runs the same plan."""

    runtime = None

    def __init__(self, spec):
        start = time.perf_counter()
        spec = self._join(spec)
        module, name = spec.runner.split(":")  # imported by name: a worker imports only the runner it runs
        self.runner = getattr(importlib.import_module(module), name)(spec, self.device)
        self.runtime = self.runner.runtime
        self.is_output = spec.world == 1 or global_rank() == 0
        self.load_s = time.perf_counter() - start
        self.memory.end("load")  # from the process start: imports, the process group, the model, the VAE
        self.calls = 0

    def _join(self, spec):
        """Join the job (spec.world > 1: process group, control group, rank 0's spec) or pick the device."""
        self.control, self.owns_group = None, False
        if spec.world > 1:
            device, backend = pick_device(spec.settings.device)
            self.owns_group = init_from_env(device, backend)
            self.join_control()
            spec = self.broadcast(spec)
        else:
            device = single_device(spec.settings.device)
        self.spec, self.device = spec, device
        # phase peaks reset the high-water mark: only in worker processes, never in a caller's own (in-process engine)
        self.memory = PhasePeaks(device, reset=spec.world > 1)
        return spec

    def run(self, call, on_step=None) -> GenerationResult | None:
        """One call on this rank (every rank of the job at once); the output rank returns the result. on_step(done,
        total) is called after every denoising step (the server's progress events)."""
        start = time.perf_counter()
        self.memory.end("between_calls")  # what ran since the last phase (idle, the previous call's record)
        stats = self.runtime.stats if self.runtime is not None else CommStats()
        stats.device_timing = self.device.type == "cuda"  # waits timed on the GPU (CUDA events), comm.py
        stats.reset()
        stats.history.clear()  # per-call counters: the record's comm_per_step covers this call's steps only
        trace = self._trace_hook(stats)
        caches = self._install_caches(call)
        # the cache first (it starts each step's slots), then the trace; the runner appends its runtime's hooks last
        hooks = [*caches.values(), trace, *([ProgressHook(on_step)] if on_step is not None else [])]
        try:
            ran = self.runner.run(call, hooks)
        finally:
            cache_record = _cache_record(caches)
            for cache in caches.values():
                cache.remove()
        self.memory.end("sampling")
        ranks = self._gather_ranks(call, trace, ran, stats)
        self.calls += 1
        if not self.is_output:
            split = getattr(self.runner, "decodes_on_every_rank", None)  # the sampler path's split VAE decode
            if split is not None and split(call):  # this rank decodes a band
                self.runner.outputs(call, ran)
            return None
        images, frames = self.runner.outputs(call, ran)
        self.memory.end("decode")
        ranks[0]["memory"] = self.memory.record()  # this rank's, now with its decode
        parallel = self._parallel_record(call)
        utilisation = self._finish_trace(call, ranks, parallel["describe"])
        record = {
            "request": call.request,
            **self.runner.record_fields(call, images, frames),
            "note": self.spec.note,
            "device": str(self.device),
            "parallel": parallel,
            "timing": {
                "load_s": self.load_s,
                "sampling_s": ran.sampling_s,
                "per_step_s": ran.step_times,
                "total_s": time.perf_counter() - start,
            },
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": ranks[0]["memory"],  # this (the output) rank's peaks per phase; every rank's under "ranks"
            "loading": self.runner.load_record,
            "comm": _comm_record(ranks) if self.runtime is not None else None,
            "ranks": ranks if self.runtime is not None else None,
            "utilisation": utilisation,
            "trace": call.trace,
            "cache": cache_record,  # per step what was computed and reused (this rank's view), and the totals
        }
        return GenerationResult(images=images, labels=self.runner.labels(call), record=record, frames=frames)

    def _install_caches(self, call) -> dict:
        """The call's cache on every denoiser (after its parallel plan), for this call only."""
        if call.cache is None:
            return {}
        from opendit.cache.runtime import install_cache

        return {name: install_cache(module, call.cache, self.runtime) for name, module in self.runner.denoisers()}

    def _trace_hook(self, stats: CommStats) -> TraceHook:
        """This call's timeline and utilisation (clocks aligned at a barrier over every rank)."""
        align = None if self.spec.world == 1 else (lambda: dist.barrier(group=self.control))
        rank = global_rank() if self.spec.world > 1 else 0
        return TraceHook(stats, rank, align=align, device=self.device)

    def _gather_ranks(self, call, trace: TraceHook, ran: Ran, stats: CommStats) -> list[dict]:
        """Every rank's timings, peak memory, resident parameter bytes, comm counters and utilisation (and, when
        tracing, its trace events), on every rank in rank order (one all_gather_object)."""
        mine = {
            "rank": global_rank() if self.spec.world > 1 else 0,
            "coords": self.runtime.coords if self.runtime is not None else None,
            "load_s": self.load_s,
            "sampling_s": ran.sampling_s,
            "per_step_s": ran.step_times,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": self.memory.record(),  # peaks of load, sampling (and, on the output rank, decode) and whole
            "loading": self.runner.load_record,
            "parameter_bytes": self.runner.parameter_bytes,  # this rank's shards under --shard-weights / --tp
            "comm_per_step": stats.history,  # per denoising step: {kind: {calls, bytes, wait_s}} on this rank
            "comm_after_sampling": stats.snapshot(),  # after the last step: e.g. the dp gather of the samples
            "utilisation": trace.summary(),
        }
        if call.trace is not None:
            mine["trace_events"] = trace.events()
        if self.spec.world == 1:
            return [mine]
        everyone: list = [None] * self.spec.world
        dist.all_gather_object(everyone, mine, group=self.control)
        return everyone

    def _finish_trace(self, call, ranks: list[dict], plan: str) -> dict:
        """On the output rank: write the call's Chrome trace (if asked); the utilisation summary."""
        if call.trace is not None:
            metadata = {"request": call.request, "plan": plan}
            write_chrome_trace(call.trace, [rank.pop("trace_events") for rank in ranks], metadata)
        return utilisation_summary([rank.pop("utilisation") for rank in ranks])

    def _parallel_record(self, call) -> dict:
        plan = self.runner.plan
        if self.runtime is None:
            return {"world_size": 1, "describe": plan.describe(), "config": plan.to_dict(), "notes": list(call.notes)}
        parallel = self.runner.parallel_record(call)
        parallel["notes"] = list(dict.fromkeys(self.spec.plan_notes + call.notes + parallel.get("notes", [])))
        parallel["backend"] = dist.get_backend()
        kernels = attention_kernels()  # ring / USP on CUDA: the fused kernel chosen per dtype and head dim, and why
        if kernels:
            parallel["attention_kernels"] = kernels
        return parallel


class ProgressHook(StepHook):
    """Calls on_step(done, total) after every denoising step."""

    def __init__(self, on_step):
        self.on_step = on_step

    def on_step_end(self, ctx) -> None:
        self.on_step(ctx.index + 1, ctx.num_steps)


def _cache_record(caches: dict):
    """The record's "cache": the one denoiser's summary, or each denoiser's by name (Wan 2.2's two experts)."""
    if not caches:
        return None
    if len(caches) == 1:
        return next(iter(caches.values())).summary()
    return {"per_denoiser": {name: cache.summary() for name, cache in caches.items()}}


def _comm_record(ranks: list[dict]) -> dict:
    """Rank 0's comm counters per step, and every rank's summed per step."""
    per_step_total = []
    for step in range(len(ranks[0]["comm_per_step"])):
        total: dict[str, dict[str, float]] = {}
        for rank in ranks:
            for kind, counts in rank["comm_per_step"][step].items():
                slot = total.setdefault(kind, {"calls": 0, "bytes": 0})
                slot["calls"] += counts["calls"]
                slot["bytes"] += counts["bytes"]
        per_step_total.append(total)
    return {
        "convention": "bytes = payload a rank sends to other ranks (wire dtype); calls per op kind",
        "rank0_per_step": ranks[0]["comm_per_step"],
        "all_ranks_per_step": per_step_total,
        "per_rank_after_steps": [rank["comm_after_sampling"] for rank in ranks],  # outside the steps' counters
    }
