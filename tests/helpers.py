"""Reference formulas and measures that only the tests use: the USP byte formula, ring call counts, error metrics,
the manual token-share refinement and per-module parameter bytes (the library's own code paths do not need them);
the one-process reference of the equivalence tests (CPU and GPU lanes) and a CLI run of a diffusers folder."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.parallel.attention.ring import ring_bytes
from opendit.parallel.attention.ulysses import ulysses_bytes
from opendit.parallel.attention.usp import group_sizes
from opendit.parallel.balance import speed_shares
from opendit.parallel.sequence import head_sizes


def hybrid_bytes(
    seq_sizes: Sequence[int],
    ulysses: int,
    ring: int,
    batch: int,
    heads: int,
    head_dim: int,
    rank: int | None = None,
    itemsize: int = 4,
) -> int:
    """Bytes HybridAttention sends per call (CommStats convention), for global rank r = g * U + u or all ranks:
    ulysses_bytes within group g (H heads, the group's shards) + ring_bytes within ring u (H_u heads, group blocks)."""
    groups = group_sizes(seq_sizes, ulysses, ring)
    blocks = [sum(g) for g in groups]
    hs = head_sizes(heads, ulysses)

    def one(r: int) -> int:
        g, u = divmod(r, ulysses)
        a2a = ulysses_bytes(groups[g], batch, heads, head_dim, rank=u, itemsize=itemsize)
        return a2a + ring_bytes(blocks, batch, hs[u], head_dim, rank=g, itemsize=itemsize)

    return sum(one(r) for r in range(ulysses * ring)) if rank is None else one(rank)


def ring_calls(world: int) -> int:
    """P2P exchanges (CommStats 'p2p' calls) per RingAttention call on each rank."""
    return world - 1


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp64: one number for 'how far is this precision from the reference'."""
    ref = ref.detach().double()
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def gather_rows(rows: list[dict]) -> list[dict]:
    """Inside a launched world: every rank's result rows, concatenated in rank order on every rank; then the process
    group is torn down (the world function's last step)."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return [row for rank_rows in everyone for row in rank_rows]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images/batches (inf when identical)."""
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def refine_shares(
    shares: Sequence[float],
    token_sizes: Sequence[int],
    busy_s: Sequence[float],
    damping: float = 0.5,
) -> tuple[float, ...]:
    """New token shares from one (or an average of several) denoising steps' per-rank timings.

    token_sizes: tokens each rank held during the measured steps; busy_s: each rank's compute time in those steps,
    i.e. step time minus the time blocked in collectives (CommStats.wait_s summed over kinds) - the wait hides the
    imbalance, since a fast rank waits for the slow one at every collective. Each rank's speed is tokens / busy;
    the new shares move `damping` of the way from the old ones to speed-proportional shares (damping 1: jump).
    The speed estimate assumes cost proportional to tokens; iterating it converges to equal busy times when part of
    the cost is fixed (see the module note on Ulysses).
    """
    if not (len(shares) == len(token_sizes) == len(busy_s)):
        raise OpenDiTError(
            f"shares ({len(shares)}), token_sizes ({len(token_sizes)}) and busy_s ({len(busy_s)}) need one entry "
            "per sequence rank"
        )
    if any(t <= 0 for t in busy_s) or any(n <= 0 for n in token_sizes):
        raise OpenDiTError(f"busy times and token sizes must be positive, got {list(busy_s)}, {list(token_sizes)}")
    if not 0 < damping <= 1:
        raise OpenDiTError(f"damping must be in (0, 1], got {damping}")
    target = speed_shares([n / t for n, t in zip(token_sizes, busy_s)])
    old = speed_shares(shares)
    return speed_shares([(1 - damping) * o + damping * t for o, t in zip(old, target)])


def busy_times(step_s: Sequence[float], wait_s: Sequence[float]) -> list[float]:
    """Per-rank compute time: each rank's step time minus its time blocked waiting in collectives."""
    return [max(1e-9, s - w) for s, w in zip(step_s, wait_s)]


def unit_bytes(module: nn.Module) -> int:
    """Full bytes of one module's parameters (e.g. one block), whether or not the model is sharded."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def forward_peak(model_fn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, base: int) -> int:
    """Peak resident bytes above `base` during a forward, after a first forward that does the one-time work (FSDP2's
    lazy init, kernel workspaces)."""
    from opendit.observe.memory import peak_rss_bytes, reset_peak_rss

    with torch.no_grad():
        model_fn(x, t, y)
        gc.collect()
        reset_peak_rss()
        model_fn(x, t, y)
    return peak_rss_bytes() - base


# The equivalence tests' two models (tests/test_parallel_equivalence.py, tests/gpu/test_nccl_equivalence.py):
# - "T16": DiT-T/2 on 16x16x1 pixels (64 tokens, 4 heads), flow matching + Euler, guidance 4;
# - "T32": DiT-T/2 on 32x32x3 pixels (256 tokens), learned sigma + DDPM (fresh noise per step from per-image seeds).
EQUIVALENCE_MODELS = {
    "T16": {"input_size": (16, 16), "in_channels": 1, "learn_sigma": False, "prediction": "flow"},
    "T32": {"input_size": (32, 32), "in_channels": 3, "learn_sigma": True, "prediction": "epsilon"},
}
EQUIVALENCE_SCHEDULER = {"T16": "flow-euler", "T32": "ddpm"}


def equivalence_config(name: str):
    from opendit.models.dit import DiTConfig, preset

    return DiTConfig(**{**preset("DiT-T/2").to_dict(), "num_classes": 10, "latent": False, **EQUIVALENCE_MODELS[name]})


def random_model(config, seed: int = 0):
    """The official init plus N(0, 0.1) on every parameter but the fixed positions: non-zero adaLN and output."""
    from opendit.models.dit import build_dit, perturb_weights

    torch.manual_seed(seed)
    return perturb_weights(build_dit(config).eval(), std=0.1, seed=seed + 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def equivalence_reference(name: str, steps: int, device=None, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """One equivalence model run in one process on `device` (default CPU) in `dtype`: config, the random `reference`
    model, a guided batch (x, t, y) of 4 images' [cond; uncond] halves, their `labels`, the sampler's `kwargs`
    (guidance 4, seed 11, `steps`) and sample `shape`, and what every plan is compared with: the model output
    `ref_out` on (x, t, y) and the decoded sampled images `ref_img`."""
    from opendit.api.generation import decode
    from opendit.diffusion.sampler import sample

    device = torch.device("cpu") if device is None else device
    config = equivalence_config(name)
    reference = random_model(config).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    labels = torch.tensor([3, 1, 4, 1])
    x = torch.randn(2 * len(labels), config.in_channels, *config.input_size, generator=gen)  # (2B, C, H, W)
    x = x.to(device, dtype)
    t = torch.full((2 * len(labels),), 500.0, device=device)
    y = torch.cat([labels, torch.full_like(labels, config.num_classes)]).to(device)  # [cond; uncond]
    kwargs = {
        "num_classes": config.num_classes,
        "scheduler_name": EQUIVALENCE_SCHEDULER[name],
        "prediction": config.prediction,
        "learn_sigma": config.learn_sigma,
        "steps": steps,
        "cfg_scale": 4.0,
        "seed": 11,
        "device": device,
    }
    shape = (config.in_channels, *config.input_size)
    with torch.no_grad():
        ref_out = reference(x, t, y)
    ref_img = decode(sample(reference, labels, shape, **kwargs).samples, config, None, device)
    return SimpleNamespace(config=config, reference=reference, x=x, t=t, y=y, labels=labels, kwargs=kwargs,
                           shape=shape, ref_out=ref_out, ref_img=ref_img)  # fmt: skip


PROMPTS = ["a photo of a red cat sitting in a garden", "a dog"]
SMALL_CALL = ("--cfg-scale", "3.5", "--image-size", "32")


def sample_folder(folder, out, *extra, call: Sequence[str] = SMALL_CALL):
    """`opendit sample` of a diffusers folder on PROMPTS (2 steps, seed 3, the `call` flags: by default guidance 3.5
    at 32 px; () for the folder's own) into `out`, with the `extra` flags; its images as one (N, H, W, 3) int array."""
    import numpy as np
    from PIL import Image

    from opendit.cli import main

    argv = ["sample", "--diffusers", str(folder), "--steps", "2", "--seed", "3", *call, "--out", str(out),
            "--no-progress", *extra]  # fmt: skip
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    files = sorted(out.glob("[0-9][0-9][0-9]_prompt-*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(int)
