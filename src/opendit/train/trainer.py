"""Train a class-conditional DiT: flow matching (or DDPM epsilon), label dropout for CFG, AdamW, EMA, DDP, resume.

Conventions shared with the sampler (diffusers FlowMatchEulerDiscreteScheduler, shift 1, 1000 train timesteps):
x_t = (1 - sigma) * x0 + sigma * noise with sigma in (0, 1]; the model is called as model(x_t, sigma * 1000, y) and
predicts v = noise - x0. Pixels are in [-1, 1].

Reproducibility is by construction, not by saved iterator state: the batch, noise, sigma and label-dropout draws of
step s come from generators seeded by (seed, s) over the *global* batch, and every rank slices its part. Hence
(a) resuming at step k gives bitwise the same losses as not stopping, and (b) N processes compute the same global
batch as one process, so their losses agree up to float rounding of the gradient all-reduce.
"""

import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from opendit.digits.data import BatchSampler, ImageDataset, build_dataset, step_seed
from opendit.errors import OpenDiTError
from opendit.io.checkpoint import build_model, config_from_dict
from opendit.models.dit import DiT
from opendit.train.ema import EMA, unwrap
from opendit.train.setup import learning_rate, model_preset

NUM_TRAIN_TIMESTEPS = 1000  # sigma -> model timestep t = sigma * 1000, as FlowMatchEulerDiscreteScheduler does
# Changing these mid-run would silently change the loss curve; resume refuses instead.
RESUME_MUST_MATCH = (
    "model", "data", "image_size", "channels", "prediction", "learn_sigma", "time_sampling", "batch_size", "seed",
    "label_dropout", "ema_decay", "video", "lr_schedule",
)  # fmt: skip


@dataclass
class TrainConfig:
    out: str = "runs/digits"
    model: str = "DiT-D/2"
    data: str = "digits"  # "digits" or a folder with one subfolder of images per class
    image_size: int = 16
    channels: int = 1
    prediction: str = "flow"  # "flow" (velocity, the sampler's convention) or "epsilon" (DDPM)
    learn_sigma: bool = False  # epsilon only; the extra sigma channels are not trained (no VLB term)
    # Uniform sigma by default: the 30-step Euler sampler visits sigma on a uniform grid in (0, 1], so uniform training
    # matches what sampling asks of the model. SD3's logit-normal (which starves sigma near 0 and 1) pays off for large
    # latents where those ends are easy; at 16x16 pixels the sigma ~ 1 end decides each digit's layout and class.
    time_sampling: str = "uniform"  # or "logit-normal"
    steps: int = 5000
    batch_size: int = 64  # global, split over processes (unevenly if it must be)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up steps
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over --steps (after any warm-up)
    ema_decay: float = 0.995
    label_dropout: float = 0.1  # fraction of labels replaced by the null class, so CFG has an unconditional model
    seed: int = 0
    precision: str = "fp32"  # or "bf16" (autocast; weights, optimiser and EMA stay fp32)
    grad_checkpointing: bool = False
    ckpt_every: int = 500
    keep: int = 2  # numbered checkpoints kept besides latest.pt
    log_every: int = 10
    nproc: int = 1
    threads: int = 0  # CPU threads per process; 0 = cores / nproc
    device: str = "auto"  # "auto", "cpu" or "cuda"
    resume: bool = False
    time_limit: float = 0.0  # minutes of training after which to checkpoint and stop; 0 = none
    progress: bool = True
    video: bool = False  # a video DiT (Latte-* presets) on video data (moving-digits)

    def validate(self) -> None:
        arch = model_preset(self)  # raises with the list of presets
        if self.video != (self.data == "moving-digits"):
            raise OpenDiTError(
                "--video trains on --data moving-digits (and moving-digits needs --video)"
                if self.video
                else "--data moving-digits is video data: add --video (and a video preset, e.g. --model Latte-D/4)"
            )
        checks = [
            (self.prediction in ("flow", "epsilon"), f"--prediction must be flow or epsilon, got {self.prediction!r}"),
            (not (self.prediction == "flow" and self.learn_sigma), "--learn-sigma applies to epsilon prediction only"),
            (self.time_sampling in ("uniform", "logit-normal"), "--time-sampling must be uniform or logit-normal"),
            (self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16, got {self.precision!r}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (
                self.batch_size >= self.nproc >= 1,
                f"need 1 <= --nproc <= --batch-size ({self.batch_size}), got {self.nproc}",
            ),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.label_dropout < 1, f"--label-dropout must be in [0, 1), got {self.label_dropout}"),
            (self.ckpt_every >= 1 and self.log_every >= 1, "--ckpt-every and --log-every must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.lr_schedule in ("constant", "cosine"), "--lr-schedule must be constant or cosine"),
        ]
        for ok, message in checks:
            if not ok:
                raise OpenDiTError(message)
        patch = arch.patch_size
        if self.image_size % patch:
            raise OpenDiTError(f"--image-size {self.image_size} must be a multiple of {self.model}'s patch {patch}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def model_config(cfg: TrainConfig, dataset: ImageDataset):
    """The preset's architecture, set up for this dataset: pixel space, its channels, classes and resolution (and
    frames, for video)."""
    video = {"frames": dataset.frames, "motion": True} if cfg.video else {}
    return replace(
        model_preset(cfg),
        **video,
        input_size=(cfg.image_size, cfg.image_size),
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        learn_sigma=cfg.learn_sigma,
        class_dropout_prob=cfg.label_dropout,
        latent=False,
        prediction=cfg.prediction,
    )


def draw_batch(cfg: TrainConfig, dataset: ImageDataset, sampler: BatchSampler, model: DiT, step: int) -> dict:
    """Everything random about global batch `step`, on CPU: x0 (B,C,H,W), noise, t (B,), labels after dropout (B,)."""
    x0, labels = dataset.batch(sampler.indices(step))
    if cfg.video:
        x0 = x0.transpose(1, 2).contiguous()  # (B, F, C, H, W) -> (B, C, F, H, W): the video DiT is channel-first
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0x7EA1))
    noise = torch.randn(x0.shape, generator=gen)  # (B, C, H, W)
    b = x0.shape[0]
    if cfg.prediction == "flow":
        if cfg.time_sampling == "uniform":
            sigma = 1.0 - torch.rand(b, generator=gen)  # (B,) in (0, 1]: sigma = 0 (clean input) is never asked for
        else:
            sigma = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
        t = sigma
    else:
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=gen)  # integer DDPM timesteps
    labels = model.y_embedder.drop_labels(labels, gen) if cfg.label_dropout > 0 else labels
    return {"x0": x0, "noise": noise, "t": t, "labels": labels}


def per_sample_loss(model, batch: dict, prediction: str, ddpm=None) -> torch.Tensor:
    """MSE between the model's prediction and its target, averaged per sample: (B,) float32."""
    x0, noise, t, labels = batch["x0"], batch["noise"], batch["t"], batch["labels"]
    if prediction == "flow":
        s = t.view(-1, *[1] * (x0.dim() - 1))  # (B, 1, 1, 1) sigma; (B, 1, 1, 1, 1) for video
        x_t = (1 - s) * x0 + s * noise
        out = model(x_t, t * NUM_TRAIN_TIMESTEPS, labels)
        target = noise - x0  # velocity d x_t / d sigma
    else:
        x_t = ddpm.add_noise(x0, noise, t)
        out = model(x_t, t, labels)
        target = noise
    out = out[:, : x0.shape[1]].float()  # learn_sigma models: the first C channels are the epsilon prediction
    return (out - target).pow(2).flatten(1).mean(dim=1)  # (B,)


def train(cfg: TrainConfig) -> dict:
    """Train in this process, under torchrun (WORLD_SIZE set), or over cfg.nproc spawned local processes.

    Returns {"step", "loss", "elapsed_s", "checkpoint", "log"}. A failing or dying rank ends the whole job: the
    launcher terminates the others and raises WorkerFailed with that rank's message (OpenDiTError for bad input);
    collectives also time out after 10 minutes.
    """
    cfg.validate()
    if cfg.resume:  # in the caller, before any process starts or data is built: a bad checkpoint is named first
        read_resume_state(_resume_path(cfg), cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one rank per process already
        _env_worker(cfg)
    elif cfg.nproc > 1:
        from opendit.distributed.launch import launch

        # each process gets the torchrun environment, so it runs exactly the torchrun path above
        launch(_env_worker, cfg.nproc, (cfg,), threads_per_proc=cfg.threads or None, model_bytes=_train_bytes(cfg))
    else:
        _worker(0, 1, cfg)
    return summary(cfg.out)


def _train_bytes(cfg: TrainConfig) -> int:
    """Training state per process, for the launcher's memory warning: fp32 weights, gradients, EMA, two AdamW moments
    and DDP's gradient buckets (6 copies of the parameters)."""

    size = (cfg.image_size, cfg.image_size)
    config = replace(model_preset(cfg), input_size=size, in_channels=cfg.channels, learn_sigma=cfg.learn_sigma)
    return 6 * 4 * sum(p.numel() for p in build_model(config, device="meta").parameters())


def summary(out: str | Path) -> dict:
    out = Path(out)
    records = read_log(out / "log.jsonl")
    last = records[-1] if records else {}
    return {
        "step": last.get("step", 0),
        "loss": last.get("loss"),
        "elapsed_s": last.get("elapsed_s"),
        "checkpoint": str(out / "checkpoints" / "latest.pt"),
        "log": str(out / "log.jsonl"),
    }


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _setup(rank: int, world: int, cfg: TrainConfig) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise OpenDiTError("--device cuda but no CUDA device is visible; use --device cpu")
    if use_cuda and world > torch.cuda.device_count():
        raise OpenDiTError(f"--nproc {world} needs {world} GPUs, {torch.cuda.device_count()} visible; lower --nproc")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:  # rendezvous from the environment torchrun or opendit's launcher set
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    return device


def _env_worker(cfg: TrainConfig) -> None:
    """One rank of a multi-process run: its rank and world size come from the environment (torchrun or launch)."""
    _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), cfg)


def _worker(rank: int, world: int, cfg: TrainConfig) -> None:
    device = _setup(rank, world, cfg)
    try:
        _train_loop(rank, world, cfg, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one rank's training loop holds: data, model (and its DDP wrapper), EMA, optimiser, where it starts."""

    dataset: ImageDataset
    mconfig: object  # DiTConfig or VideoDiTConfig
    model: torch.nn.Module
    net: torch.nn.Module
    ema: EMA
    params: list
    opt: torch.optim.Optimizer
    ddpm: object
    start: int
    elapsed: float


def _prepare_run(rank: int, world: int, cfg: TrainConfig, device: torch.device) -> _Run:
    if cfg.video:
        from opendit.digits.video_data import MovingDigitsDataset

        dataset = MovingDigitsDataset()
        if cfg.image_size != dataset.resolution[0] or cfg.channels != dataset.channels:
            raise OpenDiTError(f"moving digits are {dataset.resolution[0]} px grey: use --image-size 16 --channels 1")
    else:
        dataset = build_dataset(cfg.data, cfg.image_size, cfg.channels)
    mconfig = model_config(cfg, dataset)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts rank 0's weights anyway)
    model = build_model(mconfig).to(device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    ema = EMA(model, cfg.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, elapsed = 0, 0.0
    latest = _resume_path(cfg)
    if latest is not None:
        start, elapsed = load_checkpoint(latest, cfg, model, ema, opt, device)
    ddpm = None
    if cfg.prediction == "epsilon":
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)  # linear betas 1e-4..0.02, as DiT trains
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(dataset, mconfig, model, net, ema, params, opt, ddpm, start, elapsed)


def _train_step(run: _Run, cfg: TrainConfig, batch: dict, step: int, world: int, device: torch.device):
    """One optimiser step on this rank's slice of the global batch; returns the per-sample losses (detached)."""
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        losses = per_sample_loss(run.net, batch, cfg.prediction, run.ddpm)  # (hi - lo,)
    # sum / global B, times world because DDP averages gradients over ranks: the gradient of the global mean
    (losses.sum() * (world / cfg.batch_size)).backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.ema.update(run.model)
    return losses.detach()


def _train_loop(rank: int, world: int, cfg: TrainConfig, device: torch.device) -> None:
    out = Path(cfg.out)
    run = _prepare_run(rank, world, cfg, device)
    if run.start >= cfg.steps:
        return
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": run.mconfig.to_dict()}, indent=2))
        _truncate_log(out / "log.jsonl", run.start)
    sampler = BatchSampler(len(run.dataset), cfg.batch_size, cfg.seed)
    lo, hi = rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world  # this rank's slice, uneven allowed
    bar = tqdm(
        total=cfg.steps, initial=run.start, disable=rank != 0 or not cfg.progress, desc="train", dynamic_ncols=True
    )
    window_loss = torch.zeros((), dtype=torch.float64, device=device)  # sum of per-sample losses since the last log
    window_steps, window_start = 0, time.perf_counter()
    session_start = time.perf_counter()
    for step in range(run.start, cfg.steps):
        batch = draw_batch(cfg, run.dataset, sampler, run.model, step)
        batch = {k: v[lo:hi].to(device, non_blocking=True) for k, v in batch.items()}
        window_loss += _train_step(run, cfg, batch, step, world, device).double().sum()
        window_steps += 1
        bar.update(1)
        done, stop = step + 1, False
        if done % cfg.log_every == 0 or done == cfg.steps:
            timing = (window_steps, window_start, run.elapsed, session_start)
            stop, loss = _log(rank, world, cfg, out, done, window_loss, *timing)
            bar.set_postfix(loss=f"{loss:.4f}")
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if done % cfg.ckpt_every == 0 or done == cfg.steps or stop:
            if rank == 0:
                total = run.elapsed + time.perf_counter() - session_start
                save_checkpoint(out / "checkpoints", cfg, run.mconfig, run.model, run.ema, run.opt, done, total)
            if world > 1:
                dist.barrier()
        if stop:
            break
    bar.close()


def _log(rank, world, cfg, out, done, window_loss, window_steps, window_start, elapsed, session_start):
    """Reduce the window's loss over ranks, append one JSONL record (rank 0), agree on the time-limit stop.

    Returns (stop, mean loss of the window).
    """
    now = time.perf_counter()
    total = elapsed + now - session_start
    stop = torch.tensor([float(cfg.time_limit > 0 and total >= cfg.time_limit * 60)], device=window_loss.device)
    if world > 1:
        dist.all_reduce(window_loss)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # rank 0's clock decides for everyone; MAX makes it agree
    loss = window_loss.item() / (window_steps * cfg.batch_size)
    if rank == 0:
        record = {
            "step": done,
            "loss": loss,
            "lr": learning_rate(cfg, done - 1),
            "samples_per_s": window_steps * cfg.batch_size / max(now - window_start, 1e-9),
            "elapsed_s": round(total, 3),
        }
        with open(out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return bool(stop.item()), loss


def _truncate_log(path: Path, step: int) -> None:
    """On resume from step k, drop records past k (written after the checkpoint by the interrupted run)."""
    if path.is_file():
        keep = [r for r in read_log(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(ckpt_dir, cfg, mconfig, model, ema, opt, step, elapsed) -> Path:
    """Atomic write of step_XXXXXXX.pt (tmp + rename), copied to latest.pt; older numbered ones beyond `keep` go."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "elapsed_s": elapsed,
        "args": asdict(cfg),  # "args" as in the official DiT's training checkpoints
        "model_config": mconfig.to_dict(),
        "rng": _rng_state(),  # every draw of the loop uses (seed, step) generators; saved for anything else
    }
    path = ckpt_dir / f"step_{step:07d}.pt"
    for target in (path, ckpt_dir / "latest.pt"):
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
    numbered = sorted(ckpt_dir.glob("step_*.pt"))
    for old in numbered[: max(0, len(numbered) - cfg.keep)]:
        old.unlink()
    return path


def _resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint --resume continues from (None without --resume); OpenDiTError if there is none."""
    if not cfg.resume:
        return None
    latest = Path(cfg.out) / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise OpenDiTError(f"--resume but {latest} does not exist; drop --resume to start a new run in {cfg.out}")
    return latest


# What save_checkpoint writes and resume needs.
_RESUME_KEYS = ("model", "ema", "opt", "step", "elapsed_s", "args", "rng")


def read_resume_state(path: Path, cfg: TrainConfig, map_location="cpu", mmap: bool = True) -> dict:
    """A training checkpoint's state, checked for --resume: readable, complete, and of a run with these settings."""
    from opendit.io.checkpoint import load_torch_file

    state = load_torch_file(path, map_location, mmap=mmap, resume=True)
    if not isinstance(state, dict):
        what = f"it holds a {type(state).__name__}"
    else:
        missing = [k for k in _RESUME_KEYS if k not in state]
        what = f"no {', '.join(map(repr, missing))}" if missing else None
        what = what or (None if isinstance(state["args"], dict) else "its 'args' are not a dict")
    if what is not None:
        raise OpenDiTError(
            f"cannot resume from {path}: it is not a training checkpoint of opendit train ({what}); "
            f"start a new run in another --out directory (or drop --resume to start over in {cfg.out})"
        )
    saved = state["args"]
    defaults = TrainConfig()  # a key an older run did not save had this default
    saved = {k: saved.get(k, getattr(defaults, k)) for k in RESUME_MUST_MATCH}
    diff = {k: (saved[k], getattr(cfg, k)) for k in RESUME_MUST_MATCH if saved[k] != getattr(cfg, k)}
    if diff:
        details = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise OpenDiTError(f"cannot resume {path}: {details}; use the original values or a new --out directory")
    return state


def load_checkpoint(path, cfg: TrainConfig, model: DiT, ema: EMA, opt, device) -> tuple[int, float]:
    """Restore model, EMA, optimiser and RNG; refuse settings that would change the curve. Returns (step, elapsed)."""
    # no mmap: the optimiser adopts the loaded tensors, which must be ordinary memory, not a mapping of the file
    state = read_resume_state(Path(path), cfg, map_location=device, mmap=False)
    try:
        unwrap(model).load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, KeyError, ValueError) as exc:  # e.g. another number of classes in the data folder
        raise OpenDiTError(
            f"cannot resume from {path}: its weights do not fit this run's model ({str(exc).splitlines()[0][:160]}); "
            "use the original data, or start a new run in another --out directory"
        ) from None
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return int(state["step"]), float(state["elapsed_s"])


def export_ema(checkpoint: str | Path, path: str | Path, extra: dict | None = None) -> Path:
    """EMA weights of a training checkpoint -> `path`.safetensors + .json {"model": config, **extra}."""
    from opendit.io.checkpoint import load_torch_file, locate_checkpoint, save_safetensors

    checkpoint = locate_checkpoint(checkpoint)  # a file or a run directory
    state = load_torch_file(checkpoint, mmap=False)
    if not isinstance(state, dict) or "ema" not in state or "model_config" not in state:
        raise OpenDiTError(f"{checkpoint} is not an OpenDiT training checkpoint (needs 'ema' and 'model_config')")
    model = build_model(config_from_dict(state["model_config"]))
    model.load_state_dict(state["ema"])
    return save_safetensors(model, path, extra)
