"""`generate()`: conditions -> noise -> denoising loop -> decode -> images + a record. CLI and API both call it."""

import importlib.util
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from opendit.checkpoint import file_sha256, load_model, read_sidecar_config
from opendit.diffusion.sampler import make_scheduler, sample
from opendit.distributed.config import ParallelConfig, default_plan
from opendit.distributed.mesh import (
    build_runtime,
    env_world_size,
    global_rank,
    in_distributed_env,
    init_from_env,
    pick_device,
)
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, pixel_config, preset
from opendit.parallel.apply import parallelize, plan_record
from opendit.precision import parse_dtype

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CKPT = WEIGHTS_DIR / "digits.safetensors"
VAE_SCALE = 0.18215  # stabilityai/sd-vae-ft-* latent scaling used by DiT


@dataclass
class GenerationRequest:
    classes: list[int]
    model: str | None = None  # preset name; None with no ckpt -> the shipped digits model
    ckpt: str | None = None
    image_size: int | None = None  # pixels; None -> the model's own size
    steps: int | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = 0
    dtype: str = "fp32"
    vae: str | None = None
    device: str | None = None
    progress: bool = True
    nproc: int | None = None  # processes; None: 1, or torchrun's world, or the plan's product of degrees
    parallel: ParallelConfig | None = None  # degrees and options; None (or all degrees 1): chosen for nproc
    parallel_auto: bool = False  # with nproc > 1 and no degrees: the planner chooses (cost model), not default_plan


@dataclass
class GenerationResult:
    images: np.ndarray  # (B, H, W, C) uint8
    labels: list[int]
    record: dict = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in self.images]


def resolve_model(request: GenerationRequest) -> tuple[DiTConfig, str | None, dict, str | None]:
    """(config, checkpoint, sampling defaults, note) for a request: from presets, sidecar JSON or the shipped model."""
    defaults = {"steps": 50, "scheduler": None, "cfg_scale": 4.0}
    note = None
    ckpt = request.ckpt
    if request.model is None and ckpt is None:
        if DEFAULT_CKPT.is_file():
            ckpt = str(DEFAULT_CKPT)
        else:
            note = "no trained default model is installed: using a randomly initialised DiT-T/2 (images are noise)"
            config = pixel_config("DiT-T/2", 16)
            return config, None, {**defaults, "scheduler": "flow-euler"}, note
    sidecar = read_sidecar_config(ckpt) if ckpt else None
    if sidecar is not None:
        config = DiTConfig.from_dict(sidecar["model"])
        if request.model is not None and preset(request.model).depth != config.depth:
            raise OpenDiTError(f"--model {request.model} does not match checkpoint {ckpt} (its config: {config})")
        defaults.update({k: sidecar[k] for k in ("steps", "scheduler", "cfg_scale") if k in sidecar})
    else:
        if request.model is None:
            raise OpenDiTError(f"checkpoint {ckpt} has no .json config beside it; pass --model (e.g. DiT-XL/2)")
        config = preset(request.model)
        if request.image_size is None:
            request.image_size = 256
    if request.image_size is not None:
        config = config.with_image_size(request.image_size)
    if defaults["scheduler"] is None:
        defaults["scheduler"] = "flow-euler" if config.prediction == "flow" else "ddpm"
    return config, ckpt, defaults, note


def decode(samples: torch.Tensor, config: DiTConfig, vae_path: str | None, device: torch.device) -> np.ndarray:
    """Model-space samples (B, C, h, w) -> uint8 images (B, H, W, C)."""
    if config.latent:
        if vae_path is None:
            raise OpenDiTError(
                "this is a latent model: pass --vae DIR (a local diffusers AutoencoderKL, e.g. sd-vae-ft-ema)"
            )
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
        except Exception as exc:
            raise OpenDiTError(
                f"cannot load the VAE from {vae_path}: {exc}; pass a local AutoencoderKL folder"
            ) from exc
        with torch.no_grad():
            samples = vae.decode(samples.to(device) / VAE_SCALE).sample  # (B, 3, H, W) in [-1, 1]
    pixels = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


@dataclass
class Job:
    """A request resolved and validated: everything every rank needs, checked before any process is started."""

    request: GenerationRequest
    config: DiTConfig
    ckpt: str | None
    steps: int
    scheduler: str
    cfg_scale: float
    note: str | None
    world: int  # processes: 1, --nproc, or torchrun's WORLD_SIZE
    plan: ParallelConfig
    plan_notes: list[str]


def prepare(request: GenerationRequest) -> Job:
    """Resolve the model and sampling settings and validate the request and its parallel plan (cheap: no weights)."""
    if not request.classes:
        raise OpenDiTError("no classes given; pass e.g. --classes 0 1 2")
    parse_dtype(request.dtype)
    config, ckpt, defaults, note = resolve_model(request)
    steps = request.steps if request.steps is not None else defaults["steps"]
    scheduler = request.scheduler or defaults["scheduler"]
    cfg_scale = request.cfg_scale if request.cfg_scale is not None else defaults["cfg_scale"]
    if steps <= 0:
        raise OpenDiTError(f"steps must be positive, got {steps}; try --steps 30")
    if cfg_scale < 1.0:
        raise OpenDiTError(f"cfg scale must be >= 1 (1 disables guidance), got {cfg_scale}")
    make_scheduler(scheduler, config.prediction, config.learn_sigma)  # raises on a scheduler/model mismatch
    bad = [c for c in request.classes if not 0 <= c < config.num_classes]
    if bad:
        raise OpenDiTError(f"class id {bad[0]} is outside this model's range 0..{config.num_classes - 1}")
    world = _world_size(request)
    guided = cfg_scale != 1.0
    plan = request.parallel or ParallelConfig()
    plan_notes = []
    if world > 1 and plan.world_size == 1:  # no degrees given: pick them (or follow --sp-impl)
        if plan.sp_impl in ("ring", "ulysses", "fastseq"):
            degrees = {"ring": world} if plan.sp_impl == "ring" else {"ulysses": world}
            plan, why = replace(plan, **degrees), f"--sp-impl {plan.sp_impl} over all {world} processes"
        else:
            if request.parallel_auto:  # the planner: every valid plan ranked by the cost model
                from opendit.planning.planner import auto_plan

                auto, why = auto_plan(config, world, len(request.classes), guided)
            else:
                auto, why = default_plan(world, config.num_heads, guided)
            plan = replace(
                plan,
                dp=auto.dp,
                cfg=auto.cfg,
                ulysses=auto.ulysses,
                ring=auto.ring,
                sp_impl=auto.sp_impl if plan.sp_impl == "auto" else plan.sp_impl,
                shard_weights=plan.shard_weights or auto.shard_weights,
            )
        if plan.balance_tokens and plan.sp_degree == 1:  # asked for, but the chosen plan has no sequence to split
            plan = replace(plan, balance_tokens=False)
            plan_notes.append("--balance-tokens not used: the chosen plan has no sequence parallelism")
        plan_notes.append(f"plan chosen automatically: {plan.describe()} ({why})")
    plan_notes += plan.validate(world, config.num_heads, config.num_tokens, len(request.classes), guided)
    if plan.shard_weights and plan.sp_degree == 1:
        raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
    if plan.shard_weights and importlib.util.find_spec("opendit.parallel.sharding") is None:
        raise OpenDiTError("--shard-weights is not available in this build (opendit.parallel.sharding is missing)")
    return Job(request, config, ckpt, steps, scheduler, cfg_scale, note, world, plan, plan_notes)


def _world_size(request: GenerationRequest) -> int:
    """Processes for this request: torchrun's world, else --nproc, else the plan's product of degrees."""
    if in_distributed_env():
        world = env_world_size()
        if request.nproc is not None and request.nproc != world:
            raise OpenDiTError(
                f"--nproc {request.nproc} conflicts with the {world} processes torchrun started; drop --nproc "
                "under torchrun (its --nproc-per-node x --nnodes sets the world)"
            )
        return world
    if request.nproc is not None:
        if request.nproc < 1:
            raise OpenDiTError(f"--nproc must be >= 1, got {request.nproc}")
        return request.nproc
    return request.parallel.world_size if request.parallel is not None else 1


def generate(request: GenerationRequest | None = None, **kwargs) -> GenerationResult:
    """Generate one image per entry of `classes`. Keyword arguments are GenerationRequest fields.

    With nproc > 1 (and not already inside torchrun) this starts nproc local workers and returns rank 0's result;
    inside torchrun every rank calls it and rank 0's result holds the images (other ranks get an empty array).
    Scripts that pass nproc > 1 must call it under `if __name__ == "__main__":` (workers are spawned).
    """
    request = request or GenerationRequest(**kwargs)
    job = prepare(request)
    if in_distributed_env() and job.world > 1:
        return _run(job)
    if job.world > 1:
        from opendit.distributed.launch import launch

        start = time.perf_counter()
        result = launch(_worker_generate, job.world, (request,))
        result.record["timing"]["with_launch_s"] = time.perf_counter() - start  # + process start and rendezvous
        return result
    return _run(job)


def _worker_generate(request: GenerationRequest) -> GenerationResult | None:
    """Entry point of each worker that `generate(nproc=N)` starts; only rank 0's result travels back."""
    result = generate(request)
    return result if global_rank() == 0 else None


def _run(job: Job) -> GenerationResult:
    """Load, sample, decode on this process; with job.world > 1, as one rank of the job (process group from env)."""
    request, config = job.request, job.config
    start = time.perf_counter()
    runtime = None
    owns_group = False
    if job.world > 1:
        device, backend = pick_device(request.device)
        owns_group = init_from_env(device, backend)
        runtime = build_runtime(job.plan, device)
    else:
        device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        progress = request.progress and (runtime is None or global_rank() == 0)
        if job.note and progress:
            print(f"note: {job.note}", file=sys.stderr)
        dtype = parse_dtype(request.dtype)
        model = load_model(config, job.ckpt, device=device, dtype=dtype)
        load_time = time.perf_counter() - start
        labels = torch.tensor(request.classes, dtype=torch.long)
        kwargs = {
            "num_classes": config.num_classes,
            "scheduler_name": job.scheduler,
            "prediction": config.prediction,
            "learn_sigma": config.learn_sigma,
            "steps": job.steps,
            "cfg_scale": job.cfg_scale,
            "seed": request.seed,
            "device": device,
            "progress": progress,
        }
        shape = (config.in_channels, *config.input_size)
        if runtime is None:
            result = sample(model, labels, shape, **kwargs)
            parallel = {"world_size": 1, "describe": job.plan.describe(), "config": job.plan.to_dict(), "notes": []}
            comm, ranks = None, None
        else:
            pmodel = parallelize(model, runtime)
            result = pmodel.sample(labels, shape, **kwargs)  # every rank ends with all (N, C, H, W) samples
            parallel = plan_record(runtime, pmodel, len(labels))
            parallel["notes"] = list(dict.fromkeys(job.plan_notes + parallel["notes"]))
            parallel["backend"] = dist.get_backend()
            if device.type == "cpu" and request.device is None and torch.cuda.is_available():
                parallel["notes"].append(
                    f"{torch.cuda.device_count()} GPU(s) for {os.environ.get('LOCAL_WORLD_SIZE')} processes on this "
                    "node: every rank needs its own GPU, so this job ran on CPU with gloo"
                )
            comm, ranks = _gather_rank_records(runtime, model, load_time, result.step_times, device)
        images = decode(result.samples, config, request.vae, device) if runtime is None or runtime.index == 0 else None
    finally:
        if owns_group:
            dist.destroy_process_group()
    if images is None:  # ranks > 0 of a parallel job: rank 0 holds the images
        return GenerationResult(images=np.zeros((0, 0, 0, 0), np.uint8), labels=list(request.classes))
    record = {
        "request": asdict(request),
        "resolved": {
            "steps": job.steps,
            "scheduler": job.scheduler,
            "cfg_scale": job.cfg_scale,
            "dtype": str(parse_dtype(request.dtype)),
        },
        "model": config.to_dict(),
        "checkpoint": job.ckpt,
        "checkpoint_sha256": file_sha256(job.ckpt) if job.ckpt else None,
        "note": job.note,
        "device": str(device),
        "parallel": parallel,
        "timing": {
            "load_s": load_time,
            "sampling_s": sum(result.step_times),
            "per_step_s": result.step_times,
            "total_s": time.perf_counter() - start,
        },
        "peak_memory_bytes": peak_memory_bytes(device),
        "comm": comm,
        "ranks": ranks,
    }
    return GenerationResult(images=images, labels=list(request.classes), record=record)


def _gather_rank_records(
    runtime, model: torch.nn.Module, load_s: float, step_times: list[float], device: torch.device
) -> tuple[dict, list]:
    """Every rank's timings, peak memory, resident parameter bytes and comm counters, collected on every rank."""
    try:
        from opendit.parallel.sharding import sharded_parameter_bytes
    except ImportError:  # weight sharding not in this build: every rank holds every parameter

        def sharded_parameter_bytes(m: torch.nn.Module) -> int:
            return sum(p.numel() * p.element_size() for p in m.parameters())

    history = runtime.stats.history  # per denoising step: {kind: {calls, bytes, wait_s}} on this rank
    after = runtime.stats.snapshot()  # after the last step: the dp gather of the samples
    mine = {
        "rank": global_rank(),
        "coords": runtime.coords,
        "load_s": load_s,
        "sampling_s": sum(step_times),
        "per_step_s": step_times,
        "peak_memory_bytes": peak_memory_bytes(device),
        "parameter_bytes": sharded_parameter_bytes(model),  # this rank's shards under --shard-weights
        "comm_per_step": history,
        "comm_after_sampling": after,
    }
    everyone: list = [None] * runtime.world_size
    dist.all_gather_object(everyone, mine, group=runtime.group("all"))
    per_step_total = []
    for step in range(len(history)):
        total: dict[str, dict[str, float]] = {}
        for rank in everyone:
            for kind, counts in rank["comm_per_step"][step].items():
                slot = total.setdefault(kind, {"calls": 0, "bytes": 0})
                slot["calls"] += counts["calls"]
                slot["bytes"] += counts["bytes"]
        per_step_total.append(total)
    comm = {
        "convention": "bytes = payload a rank sends to other ranks (wire dtype); calls per op kind",
        "rank0_per_step": everyone[0]["comm_per_step"],
        "all_ranks_per_step": per_step_total,
    }
    return comm, everyone


def save_outputs(result: GenerationResult, out_dir: str | Path, label_names: list[str] | None = None) -> Path:
    """Write DIR/samples.png (a labelled grid), DIR/NNN_class-K.png per image and DIR/record.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = result.pil_images()
    for index, (img, label) in enumerate(zip(images, result.labels)):
        img.save(out / f"{index:03d}_class-{label}.png")
    labelled_grid(images, result.labels, label_names).save(out / "samples.png")
    (out / "record.json").write_text(json.dumps(result.record, indent=2, default=str))
    return out / "samples.png"


def labelled_grid(images: list[Image.Image], labels: list[int], names: list[str] | None = None) -> Image.Image:
    """Images (upscaled to at least 96 px, nearest) in a grid of up to 10 columns, each with its class printed above."""
    scale = max(1, -(-96 // max(images[0].size)))
    tile_w, tile_h = images[0].size[0] * scale, images[0].size[1] * scale
    caption, pad = 14, 4
    cols = min(10, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, (img, label) in enumerate(zip(images, labels)):
        x = pad + (index % cols) * (tile_w + pad)
        y = pad + (index // cols) * (tile_h + caption + pad)
        draw.text((x, y), names[label] if names else f"class {label}", fill="black")
        grid.paste(img.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y + caption))
    return grid
