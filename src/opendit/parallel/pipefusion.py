"""PipeFusion (--pipefusion N --patches M --warmup-steps K): the blocks split into N stages, the image into M patches
pipelined through them, each patch attending to the other patches' K/V of the previous step (stale), after xDiT.

Per denoising step, on stage s (this rank, holding blocks [b_s, b_s + n_s) of split_sizes(depth, N) and nothing of
the others, so its block weights are ~1/N):
- for patch m = 0..M-1 (contiguous token ranges, split_sizes(T, M)): stage 0 embeds the patch's tokens, every other
  stage receives them from stage s - 1 (P2P, (B, T_m, C)); the stage's blocks run on them, and each block's attention
  takes the patch's fresh queries, keys and values and, for the other patches, the K/V its cache holds: this step's
  for the patches before m (they went through this block already), the previous step's for those after m. The
  patch's fresh K/V replace its slots. Then the tokens go to stage s + 1 (isend: stage s starts patch m + 1 while
  s + 1 works on m: that overlap is the pipeline);
- the last stage runs the final layer per patch; the prediction (B, C_out, H, W) is broadcast from it to every rank,
  so the sampler steps the whole latent once per step, identically everywhere (multistep schedulers keep their state).
The first K steps run synchronously: one patch = the whole sequence, so every block attends over fresh K/V, exactly
as one device (and the caches are filled); later steps drift, measured (tests, docs/parallelism.md), not hidden.

What a model declares for it (its spec's `stage_view`, e.g. models/dit.py `DiTStageView`): how to embed tokens, the
conditioning vector, the block list, a block call and the head (final layer + unpatchify). Only the DiT declares one.
"""

from __future__ import annotations

import torch
from torch import nn

from opendit.diffusion.hooks import StepContext, StepHook
from opendit.errors import OpenDiTError
from opendit.models.attention import local_attention
from opendit.parallel.sequence import split_sizes


class StaleKV:
    """One block's attention core under PipeFusion: q, k, v of the current patch (B, T_m, H, D) attend over the whole
    sequence's K/V, this patch's fresh, the others' from the cache (B, T, H, D), which the fresh ones then update."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.start, self.length = 0, 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k is None or self.length == self.k.shape[1] or self.k.shape[0] != k.shape[0]:
            if self.start != 0:
                raise OpenDiTError("PipeFusion: a patch came before the synchronous warm-up filled the K/V cache")
            self.k, self.v = k.detach().clone(), v.detach().clone()  # (B, T, H, D): the whole sequence, fresh
            return local_attention(q, k, v)
        self.k[:, self.start : self.start + self.length] = k  # this patch's slots: fresh from now on
        self.v[:, self.start : self.start + self.length] = v
        return local_attention(q, self.k, self.v)  # (B, T_m, H, D)


class PipeFusionModel:
    """The sampler's model_fn over a PipeFusion pipeline (see the module docstring), with ParallelModel's interface
    (parallel/apply.py; no token split, balancer or tensor split); every rank returns the same prediction. `step`
    (set by the step hook from the sampler) decides warm-up or pipelined."""

    token_sizes = None
    balancer = None
    tensor = None

    def __init__(self, model: nn.Module, runtime, notes: list[str]):
        from opendit.models.spec import spec_for

        self.model, self.runtime, self.notes = model, runtime, notes
        plan, spec = runtime.plan, spec_for(model)
        if spec.stage_view is None:
            raise OpenDiTError(
                f"PipeFusion pipelines row patches of one token sequence through stages of blocks, reusing the "
                f"other patches' stale K/V; {spec.name} declares no such stage view (ModelSpec.stage_view: its blocks "
                "change the token layout between them): drop --pipefusion, or use --ulysses / --ring (exact)"
            )
        self.split = spec.stage_view
        self.comm = runtime.comms["pipefusion"]
        self.stages, self.stage = self.comm.size, self.comm.rank
        blocks = self.split.blocks(model)
        if len(blocks) < self.stages:
            raise OpenDiTError(f"--pipefusion {self.stages} needs at least as many blocks; the model has {len(blocks)}")
        sizes = split_sizes(len(blocks), self.stages)
        self.first = sum(sizes[: self.stage])
        self.mine = list(range(self.first, self.first + sizes[self.stage]))
        for i in range(len(blocks)):  # this stage keeps its own blocks only: ~1/N of the block weights
            if i not in self.mine:
                blocks[i] = nn.Identity()
        self.cores = {}
        for i in self.mine:
            core = StaleKV()
            self.split.attention(blocks[i]).core = core
            self.cores[i] = core
        self.patches, self.warmup = plan.patch_count, plan.warmup_steps
        self.step = 0
        self.stage_layout = {"stages": self.stages, "blocks_per_stage": sizes, "patches": self.patches,
                         "warmup_steps": self.warmup}  # fmt: skip
        notes.append(f"pipefusion: blocks per stage {sizes}, {self.patches} patches, {self.warmup} synchronous steps")

    def step_hooks(self) -> list:
        from opendit.distributed.env import global_rank
        from opendit.parallel.hooks import CommAccounting, FaultInjection

        stats = self.runtime.stats
        return [_StepIndex(self), FaultInjection(global_rank(), self.runtime.fault), CommAccounting(stats)]

    def set_token_sizes(self, sizes: list[int]) -> None:
        raise OpenDiTError("token sizes exist only under sequence parallelism (--ulysses / --ring), not --pipefusion")

    def set_input_size(self, config) -> None:
        if config.input_size != self.model.config.input_size:
            raise OpenDiTError("the image size is fixed under --pipefusion; start a new engine for another size")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model, split, comm = self.model, self.split, self.comm
        tokens_total = split.num_tokens(model)
        patches = 1 if self.step < self.warmup else self.patches  # warm-up: one patch = the whole sequence, exact
        sizes = split_sizes(tokens_total, patches)
        c = split.condition(model, t, y)  # (B, C) on every stage (the embedders are tiny and replicated)
        embedded = split.embed(model, x) if self.stage == 0 else None  # (B, T, C)
        width = model.config.hidden_size
        outputs, sends = [], []
        start = 0
        for size in sizes:
            if self.stage == 0:
                h = embedded[:, start : start + size]  # (B, T_m, C)
            else:  # (B, T_m, C) from the previous stage, in the residual dtype
                h = comm.recv((x.shape[0], size, width), split.residual_dtype(model), self.stage - 1, x.device)
            for i in self.mine:
                self.cores[i].start, self.cores[i].length = start, size
                h = split.block(model, i, h, c)  # (B, T_m, C)
            if self.stage < self.stages - 1:
                sends.append(comm.send(h.contiguous(), self.stage + 1))
            else:
                outputs.append(split.final(model, h, c))  # (B, T_m, p*p*C_out)
            start += size
        for handle in sends:
            handle.wait()
        last = self.stages - 1
        if self.stage == last:
            out = split.unpatchify(model, torch.cat(outputs, dim=1)).contiguous()  # (B, C_out, H, W)
        else:
            out = torch.empty(split.output_shape(model, x), dtype=split.compute_dtype(model), device=x.device)
        return comm.broadcast(out, src=last)


class _StepIndex(StepHook):
    """Tells the pipeline which step the sampler is on (warm-up or pipelined)."""

    def __init__(self, pmodel: PipeFusionModel):
        self.pmodel = pmodel

    def on_step_start(self, ctx: StepContext) -> None:
        self.pmodel.step = ctx.index
