"""The runner of OpenDiT's own models (a DiT or video DiT checkpoint): load (whole, or each rank's shards), parallelise
through the family's applier, sample with OpenDiT's sampler (diffusion/sampler.py), decode on the output rank.
engine/replica.py drives it; its interface is described there."""

from __future__ import annotations

import time

import torch

from opendit.api.generation import Call, EngineSpec
from opendit.diffusion.sampler import SampleResult, sample
from opendit.distributed.mesh import Runtime, build_runtime
from opendit.engine.replica import Ran
from opendit.errors import OpenDiTError
from opendit.io.checkpoint import file_sha256, load_model, open_for_model
from opendit.io.outputs import VAE_MISSING, decode, load_vae
from opendit.models.precision import parse_dtype
from opendit.observe.memory import exact_malloc
from opendit.parallel.apply import ParallelModel, parallelize, plan_record
from opendit.parallel.sequence import offsets, split_sizes
from opendit.parallel.sharded_loading import fill_sharded

SHARDED_MMAP_THRESHOLD = 1 << 20  # bytes; see SamplerRunner.__init__


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


class SamplerRunner:
    """One rank's model, loaded and parallelised once (see the module docstring)."""

    def __init__(self, spec: EngineSpec, device: torch.device):
        self.spec, self.device, self.plan = spec, device, spec.plan
        self.runtime = build_runtime(spec.plan, device) if spec.world > 1 else None
        if spec.plan.shard_weights and spec.world > 1 and device.type == "cpu":
            # glibc raises its mmap threshold to the largest block freed so far, after which every gathered weight
            # unit comes from the heap and is kept there when freed: measured, DiT-XL/2 over 2 ranks then sampled
            # at 3.36 GiB per rank, more than one process. A fixed threshold returns every buffer >= 1 MiB to the
            # OS when freed (a page fault per page on the next allocation: ~0.1 s per GB gathered).
            exact_malloc(SHARDED_MMAP_THRESHOLD)
        is_output = self.runtime is None or self.runtime.index == 0
        self.model, self.pmodel, self.load_record = load_replica_model(spec, device, self.runtime)
        self.parameter_bytes = _parameter_bytes(self.model)
        if spec.config.latent and spec.settings.vae is None:
            raise OpenDiTError(VAE_MISSING)
        # loaded once, on the rank that decodes and records: the VAE and the checkpoint's hash; when the decode is
        # split (--vae-parallel, or auto at the engine's image size: parallel/vae.py) on every rank, each decoding a
        # band of the latent's rows; a call at another size then decides per decode (VaeSplit.wanted)
        split = self.runtime is not None and spec.vae_split_planned
        self.vae = load_vae(spec.settings.vae, device) if spec.config.latent and (is_output or split) else None
        self.vae_split = None
        if split:
            from opendit.parallel.vae import install_vae_split

            self.vae_split = install_vae_split(self.vae, self.runtime.exact("all"), spec.settings.vae_parallel)
        self.ckpt_sha256 = file_sha256(spec.ckpt) if spec.ckpt and is_output else None
        self.progress = spec.settings.progress and is_output

    def denoisers(self) -> list[tuple[str, torch.nn.Module]]:
        return [("model", self.model)]

    def labels(self, call: Call) -> list:
        return list(call.classes)

    def run(self, call: Call, hooks: list) -> Ran:
        """Sample every image of the call under the plan (a new size re-installs the token split: exact)."""
        (self.pmodel or self.model).set_input_size(call.config)
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
            "progress": self.progress,
            "hooks": hooks,
        }
        labels = torch.tensor(call.classes, dtype=torch.long)
        # (C, H, W) per image, (C, F, H, W) per video (models/video_dit.py is channel-first)
        shape = getattr(config, "sample_shape", None) or (config.in_channels, *config.input_size)
        if self.pmodel is None:
            result = sample(self.model, labels, shape, **kwargs)
        else:
            result = sample_images(self.pmodel, labels, shape, **kwargs)
        return Ran(step_times=result.step_times, sampling_s=sum(result.step_times), result=result.samples)

    def decodes_on_every_rank(self, call: Call) -> bool:
        """Whether every rank takes part in this call's decode (replica.py then calls outputs() on each): the split
        is installed and wanted at the call's latent rows; otherwise the output rank decodes alone."""
        return self.vae_split is not None and self.vae_split.wanted(call.config.input_size[0])[0]

    def outputs(self, call: Call, ran: Ran):
        """(images (B, H, W, C), frames (B, F, H, W, C) or None), uint8: the samples decoded on this (output) rank."""
        if self.spec.settings.video:  # (B, C, F, h, w) -> frames; the first frame stands for each video
            from opendit.api.video import decode_video

            frames = decode_video(ran.result, call.config, self.vae, self.device)
            return frames[:, 0], frames
        return decode(ran.result, call.config, self.vae, self.device), None

    def record_fields(self, call: Call, images, frames) -> dict:
        spec = self.spec
        return {
            "resolved": {
                "steps": call.steps,
                "scheduler": call.scheduler,
                "cfg_scale": call.cfg_scale,
                "dtype": str(parse_dtype(spec.settings.dtype)),
            },
            "model": call.config.to_dict(),
            "checkpoint": spec.ckpt,
            "checkpoint_sha256": self.ckpt_sha256,
        }

    def parallel_record(self, call: Call) -> dict:
        record = plan_record(self.runtime, self.pmodel, len(call.classes))
        if self.vae_split is not None:  # the last decode, split over the ranks
            record["vae_decode"] = dict(self.vae_split.band.last)
        return record
