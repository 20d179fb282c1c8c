"""Per-rank execution of an `opendit.Engine`: load and parallelise once (`Replica`), then sample, decode and record
each call; `serve` is the loop of the ranks that take their calls by broadcast.

Message flow (engine.py describes the modes; every message is a tuple):
- local pool (`pool_worker`, one per WorkerPool process): every rank builds its Replica; rank 0 sends
  ("ready", load_s) once every rank has loaded. Then, per message rank 0 takes from its channel, rank 0 broadcasts it
  to every rank (`dist.broadcast_object_list` over the control group) and:
    ("call", Call)  every rank samples in lockstep; rank 0 decodes and sends the GenerationResult back;
    ("close",)      every rank leaves the loop and destroys the process group.
- torchrun: rank 0 is the caller's own process (Engine.generate broadcasts and runs the call itself); ranks > 0 run
  `serve(replica)` inside Engine() until rank 0 broadcasts ("close",).

The broadcasts go over a control group (gloo, every rank) with a long timeout, not the runtime's "all" group: between
calls the serving ranks wait for as long as the caller takes, which must not trip the process-group timeout (that
timeout, OPENDIT_PG_TIMEOUT_S, is what ends a call whose peer died). A dead peer while idle is still noticed: the
WorkerPool (or torchrun's agent) sees the process exit and ends the others.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from opendit.cache.runtime import install_cache
from opendit.checkpoint import file_sha256, load_model, open_for_model
from opendit.diffusion.hooks import StepHook
from opendit.diffusion.sampler import SampleResult, sample
from opendit.distributed.comm import CommStats
from opendit.distributed.env import global_rank
from opendit.distributed.mesh import Runtime, build_runtime
from opendit.errors import OpenDiTError
from opendit.generation import Call, EngineSpec, GenerationResult
from opendit.memory import exact_malloc
from opendit.outputs import VAE_MISSING, decode, load_vae
from opendit.parallel.apply import ParallelModel, parallelize, plan_record
from opendit.parallel.sequence import offsets, split_sizes
from opendit.parallel.sharded_loading import fill_sharded
from opendit.parallel.trace import TraceHook
from opendit.precision import parse_dtype
from opendit.replica import ReplicaBase

SHARDED_MMAP_THRESHOLD = 1 << 20  # bytes; see Replica.__init__


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def image_split(num_images: int, runtime: Runtime) -> tuple[list[int], int]:
    """(images per dp group, first image index of this rank's group): contiguous blocks, uneven allowed."""
    sizes = split_sizes(num_images, runtime.plan.dp)
    return sizes, offsets(sizes)[runtime.coords["dp"]]


def sample_images(pmodel: ParallelModel, labels: torch.Tensor, shape: tuple[int, int, int], **kwargs) -> SampleResult:
    """`sampler.sample` for every image of `labels` under the runtime's plan: this dp group denoises its block with
    `first_index`, so image i still draws its noise from seed + i, then the blocks are all-gathered over dp.
    Returns all (N, C, H, W) samples on every rank. kwargs: sampler.sample's (hooks run before the runtime's)."""
    sizes, first = image_split(len(labels), pmodel.runtime)
    mine = labels[first : first + sizes[pmodel.runtime.coords["dp"]]]
    hooks = [*kwargs.pop("hooks", ()), *pmodel.step_hooks()]
    result = sample(pmodel, mine, shape, first_index=first, hooks=hooks, **kwargs)
    dp_comm = pmodel.runtime.comms["dp"]
    if dp_comm is not None:  # (N_group, C, H, W) -> (N, C, H, W) in image order
        result.samples = dp_comm.all_gather(result.samples.contiguous(), 0, sizes)
    return result


def _parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards under --shard-weights)."""
    try:
        from opendit.parallel.sharding import sharded_parameter_bytes
    except ImportError:  # weight sharding not in this build: every rank holds every parameter
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sharded_parameter_bytes(model)


def load_replica_model(spec: EngineSpec, device: torch.device, runtime: Runtime | None):
    """(model, ParallelModel or None, the loading record) of one rank.

    A plan with sharded weights, tensor parallelism or PipeFusion, and a checkpoint, loads each rank's part only: the
    model is built and parallelised on meta (PipeFusion drops the other stages' blocks there), then its local shards
    are read from the file (parallel/sharded_loading.py), so the loading peak is that part plus one tensor. Every
    other plan loads the whole model, one tensor at a time (checkpoint.py)."""
    dtype = parse_dtype(spec.settings.dtype)
    plan = spec.plan
    # each rank holds a part of the weights
    split = (plan.shard_weights and plan.sp_degree > 1) or plan.tp > 1 or plan.pipefusion > 1
    if runtime is not None and split and spec.ckpt is not None:
        model, state, release, path = open_for_model(spec.load_config or spec.config, spec.ckpt, dtype)
        model.set_input_size(spec.config)  # on meta: only shapes; the positions are derived when filled
        pmodel = parallelize(model, runtime)
        stats = fill_sharded(model, state, device, release, path)
        del state
        return model.eval(), pmodel, stats.to_dict()
    start = time.perf_counter()
    model = load_model(spec.load_config or spec.config, spec.ckpt, device, dtype)
    model.set_input_size(spec.config)  # a no-op unless the checkpoint's own size is another
    pmodel = parallelize(model, runtime) if runtime is not None else None
    return model, pmodel, {"mode": "whole", "seconds": time.perf_counter() - start}


class Replica(ReplicaBase):
    """One rank's model (or the only process's): loaded and parallelised once, then `run(call)` per call.

    With spec.world > 1 this is one rank of the job: it joins the process group from the environment (torchrun's or
    the WorkerPool's), agrees on rank 0's spec (so every rank runs the same plan even if their resolution differed,
    e.g. other calibration caches on other nodes), builds the runtime and the control group."""

    def __init__(self, spec: EngineSpec):
        start = time.perf_counter()
        spec = self.join(spec)
        settings, device = spec.settings, self.device
        if spec.world > 1:
            self.runtime = build_runtime(spec.plan, device)
        if spec.plan.shard_weights and spec.world > 1 and device.type == "cpu":
            # glibc raises its mmap threshold to the largest block freed so far, after which every gathered weight
            # unit comes from the heap and is kept there when freed: measured, DiT-XL/2 over 2 ranks then sampled
            # at 3.36 GiB per rank, more than one process. A fixed threshold returns every buffer >= 1 MiB to the
            # OS when freed (a page fault per page on the next allocation: ~0.1 s per GB gathered).
            exact_malloc(SHARDED_MMAP_THRESHOLD)
        self.is_output = self.runtime is None or self.runtime.index == 0
        self.model, self.pmodel, self.load_record = load_replica_model(spec, device, self.runtime)
        self.parameter_bytes = _parameter_bytes(self.model)
        if spec.config.latent and settings.vae is None:
            raise OpenDiTError(VAE_MISSING)
        # loaded once, on the rank that decodes and records: the VAE and the checkpoint's hash
        self.vae = load_vae(settings.vae, device) if spec.config.latent and self.is_output else None
        self.ckpt_sha256 = file_sha256(spec.ckpt) if spec.ckpt and self.is_output else None
        self.load_s = time.perf_counter() - start
        self.memory.end("load")  # from the process start: imports, the process group, the model, the VAE
        self.calls = 0

    def run(self, call: Call, on_step=None) -> GenerationResult | None:
        """Sample one call on this rank (every rank of the job at once); the output rank returns the result.
        on_step(done, total) is called after every denoising step (the server's progress events)."""
        start = time.perf_counter()
        self.memory.end("between_calls")  # what ran since the last phase (idle, the previous call's record)
        if self.pmodel is not None:  # a new size re-installs the token split on every rank (exact)
            self.pmodel.set_input_size(call.config)
        else:
            self.model.set_input_size(call.config)
        stats = self.runtime.stats if self.runtime is not None else CommStats()
        stats.reset()
        stats.history.clear()  # per-call counters: the record's comm_per_step covers this call's steps only
        trace = self.trace_hook(stats)
        result = self._sample(call, [trace] if on_step is None else [trace, ProgressHook(on_step)])
        self.memory.end("sampling")
        ranks = self._rank_records(call, trace, result.step_times, stats)
        self.calls += 1
        if not self.is_output:
            return None
        frames = None
        if self.spec.settings.video:  # (B, C, F, h, w) -> frames (B, F, H, W, C); the first frame stands for each
            from opendit.video import decode_video

            frames = decode_video(result.samples, call.config, self.vae, self.device)
            images = frames[:, 0]
        else:
            images = decode(result.samples, call.config, self.vae, self.device)
        self.memory.end("decode")
        ranks[0]["memory"] = self.memory.record()  # this rank's, now with its decode
        utilisation = self.finish_ranks(call, ranks, {"request": call.request, "plan": self.spec.plan.describe()})
        record = self._record(call, result.step_times, ranks, start, utilisation)
        return GenerationResult(images=images, labels=list(call.classes), record=record, frames=frames)

    def _sample(self, call: Call, hooks: list) -> SampleResult:
        config = call.config
        kwargs = {
            "num_classes": config.num_classes,
            "scheduler_name": call.scheduler,
            "prediction": config.prediction,
            "learn_sigma": config.learn_sigma,
            "steps": call.steps,
            "cfg_scale": call.cfg_scale,
            "seed": call.seed,
            "image_seeds": call.image_seeds,
            "device": self.device,
            "progress": self.spec.settings.progress and self.is_output,
            "hooks": hooks,  # the trace before the runtime's hooks: CommAccounting closes each step's counters last
        }
        labels = torch.tensor(call.classes, dtype=torch.long)
        # (C, H, W) per image, (C, F, H, W) per video (models/video_dit.py is channel-first)
        shape = getattr(config, "sample_shape", None) or (config.in_channels, *config.input_size)
        self.cache_summary = None
        cache = install_cache(self.model, call.cache, self.runtime) if call.cache is not None else None
        if cache is not None:  # installed for this call only (after the plan's kernels), removed below
            kwargs["hooks"] = [cache, *kwargs["hooks"]]
        try:
            if self.pmodel is None:
                return sample(self.model, labels, shape, **kwargs)
            return sample_images(self.pmodel, labels, shape, **kwargs)
        finally:
            if cache is not None:
                self.cache_summary = cache.summary()
                cache.remove()

    def _rank_records(self, call: Call, trace: TraceHook, step_times: list[float], stats: CommStats) -> list[dict]:
        """Every rank's timings, peak memory, resident parameter bytes, comm counters and utilisation (and, when
        tracing, its trace events), collected on every rank in one all_gather_object."""
        mine = {
            "rank": global_rank(),
            "coords": self.runtime.coords if self.runtime is not None else None,
            "load_s": self.load_s,
            "sampling_s": sum(step_times),
            "per_step_s": step_times,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": self.memory.record(),  # peaks of load, sampling (and, on the output rank, decode) and whole
            "loading": self.load_record,
            "parameter_bytes": self.parameter_bytes,  # this rank's shards under --shard-weights
            "comm_per_step": stats.history,  # per denoising step: {kind: {calls, bytes, wait_s}} on this rank
            "comm_after_sampling": stats.snapshot(),  # after the last step: the dp gather of the samples
        }
        return self.gather_ranks(mine, call, trace)

    def _record(self, call: Call, step_times: list[float], ranks: list[dict], start: float, utilisation) -> dict:
        """record.json of one call (on the output rank)."""
        spec = self.spec
        return {
            "request": call.request,
            "resolved": {
                "steps": call.steps,
                "scheduler": call.scheduler,
                "cfg_scale": call.cfg_scale,
                "dtype": str(parse_dtype(spec.settings.dtype)),
            },
            "model": call.config.to_dict(),
            "checkpoint": spec.ckpt,
            "checkpoint_sha256": self.ckpt_sha256,
            "note": spec.note,
            "device": str(self.device),
            "parallel": self._parallel_record(len(call.classes)),
            "timing": {
                "load_s": self.load_s,
                "sampling_s": sum(step_times),
                "per_step_s": step_times,
                "total_s": time.perf_counter() - start,
            },
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": ranks[0]["memory"],  # this (the output) rank's peaks per phase; every rank's under "ranks"
            "loading": self.load_record,
            "comm": _comm_record(ranks) if self.runtime is not None else None,
            "ranks": ranks if self.runtime is not None else None,
            "utilisation": utilisation,
            "trace": call.trace,
            "cache": self.cache_summary,  # per step what was computed and reused (this rank's view), and the totals
        }

    def _parallel_record(self, num_images: int) -> dict:
        plan = self.spec.plan
        if self.runtime is None:
            return {"world_size": 1, "describe": plan.describe(), "config": plan.to_dict(), "notes": []}
        parallel = plan_record(self.runtime, self.pmodel, num_images)
        parallel["notes"] = list(dict.fromkeys(self.spec.plan_notes + parallel["notes"]))
        parallel["backend"] = dist.get_backend()
        if self.device.type == "cpu" and self.spec.settings.device is None and torch.cuda.is_available():
            parallel["notes"].append(
                f"{torch.cuda.device_count()} GPU(s) for {os.environ.get('LOCAL_WORLD_SIZE')} processes on this "
                "node: every rank needs its own GPU, so this job ran on CPU with gloo"
            )
        return parallel


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
    }


def serve(replica: Replica, channel=None) -> None:
    """The serving loop of a parallel job's ranks: rank 0 takes each message from its channel (pool mode; under
    torchrun rank 0 is the caller and never runs this loop) and broadcasts it; every rank runs each call; rank 0
    sends each result back. Returns at ("close",)."""
    while True:
        message = None
        if channel is not None and replica.is_output:
            try:
                message = channel.recv()
            except SystemExit:  # the pool closed the channel without a close message (gc, parent exit): release
                replica.broadcast(("close",))  # the peers waiting in the broadcast, so that they exit cleanly too
                raise
        message = replica.broadcast(message)
        if message[0] == "close":
            return
        progress = None
        if channel is not None and replica.is_output:  # ("step", done, total) after every step, then the result
            progress = lambda done, total: channel.send(("step", done, total))  # noqa: E731
        result = replica.run(message[1], on_step=progress)
        if channel is not None and replica.is_output:
            channel.send(result)


class ProgressHook(StepHook):
    """Calls on_step(done, total) after every denoising step."""

    def __init__(self, on_step):
        self.on_step = on_step

    def on_step_end(self, ctx) -> None:
        self.on_step(ctx.index + 1, ctx.num_steps)


def make_replica(spec) -> Replica:
    """This rank's replica for an engine spec: the one the spec names (OpenDiT's sampler over a DiT: Replica; a
    diffusers pipeline's own loop: pipeline_replica.PipelineReplica), imported by name so that the worker need not
    import every runner."""
    import importlib

    module, name = spec.replica.split(":")
    return getattr(importlib.import_module(module), name)(spec)


def pool_worker(channel, spec: EngineSpec) -> None:
    """Entry point of every WorkerPool process of a local engine: load once, say ready, serve until close.

    An exception ends this process; the pool then ends the others and the engine raises WorkerFailed with it."""
    import threading

    from tqdm.auto import tqdm

    # tqdm's default lock is a multiprocessing semaphore, registered with the resource tracker this process shares
    # with the caller: a worker that the pool ends (os._exit, SIGTERM) would leave the caller's exit warning of
    # "leaked semaphore objects". One progress bar per process needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    replica = make_replica(spec)
    replica.barrier()  # every rank loaded: a failure to load is reported by the engine's constructor, not a call
    if replica.is_output:
        channel.send(("ready", replica.load_s))
    serve(replica, channel)
    replica.close()
