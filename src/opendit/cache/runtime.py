"""`install_cache(model, config, runtime)`: a cache across denoising steps, installed from outside into a plain
model (ours or a diffusers transformer) after any parallel plan, driven by the sampler's step hooks.

Shard-awareness: the cache wraps module forwards on each rank, so each rank caches its own shard of every tensor
(tokens under Ulysses / ring / USP / FastSeq, frames or positions under DSP, its half under cfg-parallel, its
images under dp). A reused attention or block does not run, so its all-to-alls / ring passes do not run either:
recorded bytes fall on reused steps. The one addition is the first-block cache's decision metric: per sample,
(|r - r_prev|_1, |r_prev|_1) summed over this rank's tokens, then all-reduced (fp64) over the sequence group so
every rank of a sample's sequence group decides the same (kind "cache_metric" in the comm counters).

Per image: the decision is made for each image (or video) of the model's batch. Under our sampler's guidance an
image's conditional and unconditional rows decide together (their metric sums are added, in one call or over the cfg
group under --cfg-parallel): both branches then reuse on the same steps, so their stale errors stay correlated and
largely cancel in uncond + s (cond - uncond) (measured: +1.2-1.7 dB PSNR at equal speed,
benchmarks/cache_pairing.py). A diffusers pipeline runs its own loop (no LoopInfo reaches the cache): there each row
decides alone. A batch that mixes images, a dp split or the server's batching therefore never changes an image. When
some samples reuse and others do not, the remaining blocks run on the computing samples' rows only.

Calls: a model call within a step is a "slot" (our sampler calls once per step, [cond; uncond] in one batch;
diffusers' Flux / Wan pipelines call once per branch): each slot keeps its own cached tensors.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from opendit.cache.config import CacheConfig, check_cache_plan, validate_cache
from opendit.cache.layout import cache_layout
from opendit.cache.registry import cache_method
from opendit.diffusion.hooks import LoopInfo, StepContext, StepHook
from opendit.errors import OpenDiTError


class StepCache(StepHook):
    """The installed cache: a step hook for the sampler plus the wrapped forwards. `remove()` restores the model."""

    def __init__(self, model: nn.Module, config: CacheConfig, runtime=None):
        validate_cache(config)
        self.model, self.config, self.runtime = model, config, runtime
        self.layout = cache_layout(model)
        self.step, self.num_steps, self.slot, self.batch = 0, 0, -1, 0
        self.compact_call = True  # this call's mixed batches may carry compact rows (BlockCache._compact_forward)
        self.guided_images = 0  # images of a guided loop (our sampler): their two branches decide together
        self.records: list[dict] = []
        self.replay: list | None = None  # [step][slot] -> per-sample reuse flags, to rerun recorded decisions
        self.state: dict = {}  # the method's own per-cache state (cache/registry.py)
        self.blocks = None  # fbcache's BlockCache (the compact-rows path reads it)
        self._restore: list[tuple[nn.Module, object]] = []
        self._handles = [model.register_forward_pre_hook(self._begin_call, with_kwargs=True)]
        self.method = cache_method(config.kind, config.source)
        self.method.install(self)

    # ---------------------------------------------------------------------------------------------- step hooks
    def on_loop_start(self, loop: LoopInfo) -> None:
        self.reset(loop.num_steps)
        self.guided_images = loop.batch if loop.guided else 0

    def on_step_start(self, ctx: StepContext) -> None:
        self.start_step(ctx.index)

    def reset(self, num_steps: int) -> None:
        """A new trajectory of `num_steps` steps: every cached tensor is dropped."""
        self.num_steps, self.records = int(num_steps), []
        self.method.reset(self)
        self.start_step(0)

    def start_step(self, index: int) -> None:
        self.step, self.slot = int(index), -1
        while len(self.records) <= self.step:
            self.records.append({"step": len(self.records), "calls": []})

    def _begin_call(self, _module, args, kwargs):
        if self.num_steps == 0:
            raise OpenDiTError("the cache was not started: pass it to the sampler's hooks (or call reset(num_steps))")
        self.slot += 1
        self.batch = self.layout.batch_size(args, kwargs)
        # a ControlNet's residuals are added to the tokens between blocks at full batch: no compact rows then
        self.compact_call = not any(
            "controlnet" in name and isinstance(value, (torch.Tensor, list, tuple)) and len(value) > 0
            for name, value in kwargs.items()
        )
        self.records[self.step]["calls"].append(
            {"samples": self.batch, "reused_samples": [], "blocks_skipped": 0, "attention_reused": 0, "mlp_reused": 0}
        )

    @property
    def call_record(self) -> dict:
        return self.records[self.step]["calls"][self.slot]

    # ---------------------------------------------------------------------------------------------- plumbing
    def wrap(self, module: nn.Module, forward) -> None:
        """Make `module` run `forward` (an instance attribute, restored by remove())."""
        self._restore.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(B, k) fp64 per-sample partial sums -> summed over this rank's sequence group, then over the image's two
        branches under guidance: every rank holding a piece of an image gets the same sums."""
        comm = self.runtime.comms.get("sp") if self.runtime is not None else None
        if comm is not None and comm.size > 1:
            values = comm.all_reduce(values, kind="cache_metric", inplace=True)  # (B, k) fp64, counted
        return self._pair_branches(values)

    def _pair_branches(self, values: torch.Tensor) -> torch.Tensor:
        images = self.guided_images
        if not images:
            return values
        if values.shape[0] == 2 * images:  # [branch a; branch b] in this call: (2n, k) -> (2, n, k) -> per image
            return values.reshape(2, images, -1).sum(0).repeat(2, 1)  # (n, k) -> (2n, k), a + b == b + a exactly
        cfg = self.runtime.comms.get("cfg") if self.runtime is not None else None
        if cfg is not None and values.shape[0] == images:  # --cfg-parallel: this rank holds one branch of each image
            return cfg.all_reduce(values, kind="cache_metric", inplace=True)  # (n, k) fp64: a + b over the 2 ranks
        # e.g. opendit.parallelize(..., dp=N) splitting each model call's batch: an image's branches sit on other
        # ranks, so pairing would differ from one process (every rank of the call sees the same sizes: no hang)
        raise OpenDiTError(
            f"fbcache decides per image, but this model call holds {values.shape[0]} rows of a {images}-image guided "
            "loop (the batch is split inside the model call): split the images before sampling (the Engine / "
            "opendit.engine.sampler_runner.sample_images do) or drop --dp"
        )

    def summary(self) -> dict:
        """What record.json says: the settings, per step what was computed and reused, and the totals saved."""
        totals = defaultdict(int)
        for step in self.records:
            for call in step["calls"]:
                for key in ("blocks_skipped", "attention_reused", "mlp_reused"):
                    totals[key] += call[key]
                totals["sample_steps"] += call["samples"]
                totals["samples_reused"] += len(call["reused_samples"])
        blocks, attention = len(self.layout.blocks), len(self.layout.attention)
        calls = sum(len(step["calls"]) for step in self.records)
        saved = {
            **totals,
            "model_calls": calls,
            "blocks_per_call": blocks,
            "attention_per_call": attention,
            # a skipped block of one sample = 1/blocks of that sample's model call
            "model_calls_saved": self.method.calls_saved(self, totals),
            "attention_calls_saved_share": totals["attention_reused"] / max(1, calls * attention),
        }
        return {"config": self.config.to_dict(), "describe": self.config.describe(), "family": self.layout.family,
                "steps": self.records, "saved": saved}  # fmt: skip

    def remove(self) -> None:
        """Restore every wrapped forward and drop the cached tensors."""
        for module, forward in reversed(self._restore):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        self._restore.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state.clear()
        if self.blocks is not None:
            self.blocks.reset()


def install_cache(model: nn.Module, config: CacheConfig, runtime=None) -> StepCache | None:
    """Install `config`'s cache into `model` (after any parallel plan: it wraps the forwards the plan installed).
    None for kind "none". Pass the returned hook to the sampler (before the runtime's hooks)."""
    if not config.enabled:
        return None
    plan = getattr(runtime, "plan", None)
    check_cache_plan(plan)
    if plan is not None:
        cache_method(config.kind, config.source).check(plan)
    return StepCache(model, config, runtime)
