"""The denoising loop: diffusers schedulers, classifier-free guidance, per-image seeded noise.

The model is any `f(x, t, y) -> prediction` (a DiT, or the parallel runtime's wrapper around one). CFG lives here,
not in the model: the conditional and unconditional halves are one batch [cond; uncond], so CFG parallelism is just a
split of that batch. Image i draws all of its noise (initial and per-step) from its own generator seeded `seed + i`,
so any split of a batch over devices reproduces exactly the images of one device.

Times (step_times, the hooks' step and model-call clocks) are the device's: on CUDA, where launches return before
the work is done, every clock reading at a step's start, around its model call and at its end first synchronises
the device (four synchronisations per step, a few tens of microseconds against steps of milliseconds); on CPU the
clock is read as it is.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from opendit.diffusion.hooks import HookList, LoopInfo, ModelCall, StepContext, StepHook
from opendit.errors import OpenDiTError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# DiT's training schedule: 1000 steps, linear betas 1e-4 .. 0.02 (facebookresearch/DiT, create_diffusion).
_DDPM_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
SCHEDULERS = {"ddpm": "epsilon", "ddim": "epsilon", "dpm-solver": "epsilon", "flow-euler": "flow"}


def check_scheduler(name: str, prediction: str | None = None) -> None:
    """OpenDiTError naming the fix if `name` is no scheduler or (given the model's prediction type) does not fit it.
    The request schema (request.py) calls this at the boundary; make_scheduler keeps it as its own precondition."""
    if name not in SCHEDULERS:
        raise OpenDiTError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if prediction is not None and SCHEDULERS[name] != prediction:
        fits = [s for s, p in SCHEDULERS.items() if p == prediction]
        raise OpenDiTError(
            f"scheduler {name} needs a model that predicts {SCHEDULERS[name]}, but this model predicts {prediction}; "
            f"use --scheduler {' or '.join(fits)}"
        )


def make_scheduler(name: str, prediction: str, learn_sigma: bool):
    """A fresh diffusers scheduler for a model that predicts `prediction` ("epsilon" or "flow")."""
    check_scheduler(name, prediction)
    if name == "ddpm":
        variance = "learned_range" if learn_sigma else "fixed_small"
        return DDPMScheduler(**_DDPM_BETAS, variance_type=variance, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**_DDPM_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    if name == "dpm-solver":
        return DPMSolverMultistepScheduler(**_DDPM_BETAS, algorithm_type="dpmsolver++", solver_order=2)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def image_generators(
    seed: int, count: int, first_index: int = 0, image_seeds: Sequence[int] | None = None
) -> list[torch.Generator]:
    """One CPU generator per image, seeded `seed + index` (or `image_seeds[index]` when a batch merges several
    requests, each with its own seed): identical on every rank and independent of batching."""
    if image_seeds is not None:
        return [torch.Generator("cpu").manual_seed(image_seeds[first_index + i]) for i in range(count)]
    return [torch.Generator("cpu").manual_seed(seed + first_index + i) for i in range(count)]


def device_clock(device: str | torch.device) -> Callable[[], float]:
    """perf_counter read once `device`'s queued work is done (CUDA: torch.cuda.synchronize), plain on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


@dataclass
class SampleResult:
    samples: torch.Tensor  # (B, C, H, W) fp32, the denoised model-space tensor (latents or pixels in [-1, 1])
    step_times: list[float] = field(default_factory=list)  # seconds per denoising step


def guide(out: torch.Tensor, channels: int, cfg_scale: float, keep_variance: bool) -> torch.Tensor:
    """The model output (2B|B, C or 2C, H, W) -> the scheduler's input (B, C or 2C, H, W): classifier-free guidance
    on the prediction channels; the learned variance (if kept) is the conditional half's, as DiT does."""
    pred, variance = out[:, :channels], out[:, channels:]  # variance is empty unless learn_sigma
    if cfg_scale != 1.0:
        cond, uncond = pred.chunk(2)  # (B, C, H, W) each
        pred = uncond + cfg_scale * (cond - uncond)
        variance = variance.chunk(2)[0]
    if keep_variance:
        pred = torch.cat([pred, variance], dim=1)  # (B, 2C, H, W): diffusers' learned_range reads both halves
    return pred


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    num_classes: int,
    scheduler_name: str,
    prediction: str,
    learn_sigma: bool,
    steps: int,
    cfg_scale: float,
    seed: int,
    first_index: int = 0,
    image_seeds: Sequence[int] | None = None,
    eta: float = 0.0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    hooks: Sequence[StepHook] = (),
) -> SampleResult:
    """Denoise len(labels) images of shape (C, H, W). cfg_scale 1 means no guidance (and no unconditional pass).

    Trusts its arguments: requests are validated once, at the boundary (request.py: steps 1..1000, cfg_scale finite
    and >= 1, class ids in the model's range, seeds within the generator's range), before any worker starts."""
    labels = labels.to(device)
    scheduler = make_scheduler(scheduler_name, prediction, learn_sigma)
    scheduler.set_timesteps(steps, device=device)
    generators = image_generators(seed, len(labels), first_index, image_seeds)
    channels = shape[0]
    x = randn_tensor((len(labels), *shape), generator=generators, device=torch.device(device), dtype=torch.float32)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # (B, C, H, W); flow schedulers start at sigma 1
    guided = cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels  # (2B,) or (B,)
    step_kwargs = {"generator": generators} if scheduler_name == "ddpm" else {}
    if scheduler_name == "ddim":
        step_kwargs["eta"] = eta
    hook = HookList(hooks)
    loop = LoopInfo(len(scheduler.timesteps), len(labels), guided, [float(t) for t in scheduler.timesteps])
    hook.on_loop_start(loop)
    step_times = []
    now = device_clock(device)  # device time: synchronises CUDA before each reading
    for index, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        ctx = StepContext(index, loop.num_steps, float(t), now())
        hook.on_step_start(ctx)
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x  # (B, C, H, W)
        x_in = torch.cat([x_in, x_in]) if guided else x_in  # (2B, C, H, W) with CFG
        t_batch = t.to(torch.float32).expand(x_in.shape[0])  # (2B,) or (B,)
        call_start = now()
        out = model_fn(x_in, t_batch, y).float()  # (2B|B, C or 2C, H, W)
        ctx.model_calls.append(ModelCall(call_start, now()))
        pred = guide(out, channels, cfg_scale, keep_variance=scheduler_name == "ddpm" and learn_sigma)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample  # (B, C, H, W)
        ctx.end_s = now()
        step_times.append(ctx.seconds)
        hook.on_step_end(ctx)
    hook.on_loop_end(loop)
    return SampleResult(samples=x, step_times=step_times)
