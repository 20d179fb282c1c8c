"""`parallelize(model, runtime)`: apply the runtime's plan to a plain single-device DiT from outside.

What it installs (the model file is never edited; see models/dit.py for the three plug-in points):
- `model.token_shard` / `model.token_gather`: TokenShard / TokenGather over the "sp" group (ring x ulysses), with
  ⌈T/P⌉ / ⌊T/P⌋ tokens per rank (or token_shares), so any token count works without padding;
- `blocks[i].attn.core`: RingAttention or HybridAttention (USP); or, for FastSeq and Ulysses, the whole
  SelfAttention forward (FastSeqAttention.install, UlyssesOverlapAttention.install: the K/V all-to-all travels
  while Q is projected; `ULYSSES_OVERLAP = False` falls back to the UlyssesAttention core).
What the returned `ParallelModel` adds around the model (the sampler's `model_fn(x, t, y)` on the full CFG batch):
- cfg = 2: cfg rank c runs half c of [cond; uncond] and the halves are all-gathered before the guidance combine;
- balance_tokens: `ParallelModel` times each call (minus collective waits) and, after the first steps, re-splits
  the tokens by measured per-rank speed (balance.TokenBalancer; `set_token_sizes` re-installs the kernels; exact);
- dp > 1: `ParallelModel.sample` gives dp group i its contiguous block of images (uneven allowed) with
  `first_index`, so its noise is the noise those images get on one device, and gathers the samples at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opendit.diffusion.sampler import SampleResult, sample
from opendit.distributed.config import head_split
from opendit.distributed.mesh import Runtime
from opendit.errors import OpenDiTError
from opendit.models.dit import DiT
from opendit.parallel.balance import TokenBalancer
from opendit.parallel.sequence import TokenGather, TokenShard, check_sizes, offsets, split_sizes


@dataclass
class ParallelModel:
    """model_fn for the sampler: (2B|B, C, H, W), (2B|B,), (2B|B,) -> (2B|B, C_out, H, W), identical on every rank
    of a dp group."""

    model: DiT
    runtime: Runtime
    token_sizes: list[int] | None  # tokens per sequence rank (None without sequence parallelism)
    notes: list[str] = field(default_factory=list)
    balancer: TokenBalancer | None = None  # --balance-tokens: re-splits token_sizes from measured busy times

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg_comm = self.runtime.comms["cfg"]
        if cfg_comm is None:
            return self._model_call(x, t, y)
        b = x.shape[0]
        if b % 2:
            raise OpenDiTError(f"cfg parallel needs the guided batch [cond; uncond] (even size), got batch {b}")
        half, c = b // 2, self.runtime.coords["cfg"]
        part = slice(c * half, (c + 1) * half)  # cfg rank 0: conditional half, rank 1: unconditional half
        out = self._model_call(x[part], t[part], y[part])  # (B, C_out, H, W)
        return cfg_comm.all_gather(out.contiguous(), 0, [half, half])  # (2B, C_out, H, W) = [cond; uncond]

    def _model_call(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y)

    def step_hooks(self) -> list:
        """The runtime's per-step hooks for the sampler, in the order they must run (see parallel/hooks.py)."""
        from opendit.distributed.mesh import global_rank
        from opendit.parallel.hooks import CommAccounting, FaultInjection, TokenBalancing

        hooks = [TokenBalancing(self, self.runtime.stats)] if self.balancer is not None else []
        return [*hooks, FaultInjection(global_rank(), self.runtime.fault), CommAccounting(self.runtime.stats)]

    def set_token_sizes(self, sizes: list[int]) -> None:
        """Re-split the sequence (exact: only which rank holds which tokens changes). Collective-free, but every rank
        of the sequence group must switch before the next call, to the same sizes."""
        if self.token_sizes is None:
            raise OpenDiTError("token sizes exist only under sequence parallelism (--ulysses / --ring)")
        install_sequence(self.model, self.runtime, check_sizes(sizes, self.runtime.plan.sp_degree))
        self.token_sizes = list(sizes)

    def set_input_size(self, config) -> None:
        """Another image size for the next calls (same architecture): new positions and a new token split, installed
        in every kernel (exact). Every rank of the runtime must call it with the same config before the next call."""
        if config.input_size == self.model.config.input_size:
            return
        if self.runtime.plan.shard_weights:
            raise OpenDiTError(
                "the image size is fixed when weights are sharded (--shard-weights); start a new engine for "
                f"{config.image_size[0]}x{config.image_size[1]}"
            )
        plan = self.runtime.plan
        plan.validate(self.runtime.world_size, config.num_heads, config.num_tokens, plan.dp, plan.cfg > 1)
        self.model.set_input_size(config)
        if self.token_sizes is not None:
            sizes = token_split(config.num_tokens, self.runtime)
            install_sequence(self.model, self.runtime, sizes)
            self.token_sizes = sizes
            if self.balancer is not None:
                self.balancer = make_balancer(config.num_tokens, sizes, self.runtime)

    def image_split(self, num_images: int) -> tuple[list[int], int]:
        """(images per dp group, first image index of this rank's group)."""
        sizes = split_sizes(num_images, self.runtime.plan.dp)
        return sizes, offsets(sizes)[self.runtime.coords["dp"]]

    def sample(self, labels: torch.Tensor, shape: tuple[int, int, int], **kwargs) -> SampleResult:
        """`sampler.sample` for every image of `labels`: this dp group denoises its block (seeded as on one device),
        then the blocks are all-gathered over dp. Returns all (N, C, H, W) samples on every rank."""
        sizes, first = self.image_split(len(labels))
        mine = labels[first : first + sizes[self.runtime.coords["dp"]]]
        hooks = [*kwargs.pop("hooks", ()), *self.step_hooks()]
        result = sample(self, mine, shape, first_index=first, hooks=hooks, **kwargs)
        dp_comm = self.runtime.comms["dp"]
        if dp_comm is not None:  # (N_group, C, H, W) -> (N, C, H, W) in image order
            result.samples = dp_comm.all_gather(result.samples.contiguous(), 0, sizes)
        return result


# `--sp-impl ulysses` runs the overlapped module-level kernel (ulysses_overlap.py); False: the plain UlyssesAttention
# core (USP always uses the plain core inside its ring). Measured on 2 CPU ranks: benchmarks/results/scaling.json.
ULYSSES_OVERLAP = True


def token_split(num_tokens: int, runtime: Runtime) -> list[int]:
    """Tokens per sequence rank, in sp order (ring_i * ulysses + ulysses_i)."""
    plan = runtime.plan
    return split_sizes(num_tokens, plan.sp_degree, plan.token_shares)


def parallelize(model: DiT, runtime: Runtime) -> ParallelModel:
    """Install the runtime's sequence parallelism into `model` (in place) and wrap it for cfg/dp parallelism."""
    plan, cfg = runtime.plan, model.config
    notes = plan.validate(runtime.world_size, cfg.num_heads, cfg.num_tokens, num_images=plan.dp, guided=plan.cfg > 1)
    if plan.sp_degree == 1:
        if plan.shard_weights:
            raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
        return ParallelModel(model, runtime, None, notes)
    sizes = token_split(cfg.num_tokens, runtime)
    if len(set(sizes)) > 1:
        notes.append(f"{cfg.num_tokens} tokens over {plan.sp_degree} sequence ranks: {sizes} (uneven, exact)")
    install_sequence(model, runtime, sizes)
    if plan.shard_weights:
        shard_weights(model, runtime)
    balancer = make_balancer(cfg.num_tokens, sizes, runtime) if plan.balance_tokens else None
    return ParallelModel(model, runtime, sizes, notes, balancer)


def make_balancer(num_tokens: int, sizes: list[int], runtime: Runtime) -> TokenBalancer:
    """--balance-tokens: a TokenBalancer whose exchange all-gathers every sequence rank's busy time (exact, fp64)."""
    exact_sp = runtime.exact("sp")

    def exchange(busy_s: float) -> list[float]:  # (1,) per rank -> (P,) busy times, in sp order
        return exact_sp.all_gather(torch.tensor([busy_s], dtype=torch.float64), 0, [1] * exact_sp.size).tolist()

    return TokenBalancer(num_tokens, sizes, exchange)


def install_sequence(model: DiT, runtime: Runtime, sizes: list[int]) -> None:
    """Install (or re-install with new sizes) the sequence-parallel kernels and the token shard / gather."""
    plan = runtime.plan
    sp_comm = runtime.comms["sp"]
    impl = plan.impl
    if impl == "fastseq":
        from opendit.parallel.attention.fastseq import FastSeqAttention

        for block in model.blocks:
            FastSeqAttention.install(block.attn, sp_comm, sizes)
    elif impl == "ulysses" and ULYSSES_OVERLAP:
        from opendit.parallel.attention.ulysses_overlap import UlyssesOverlapAttention

        for block in model.blocks:  # K/V all-to-all under Q's projection, 2 head groups pipelined; same bytes
            UlyssesOverlapAttention.install(block.attn, runtime.comms["ulysses"], sizes)
    else:
        core = make_core(impl, runtime, sizes)
        for block in model.blocks:
            block.attn.core = core  # stateless: one kernel object serves every block
    model.token_shard = TokenShard(sp_comm, sizes)  # (B, T, C) -> (B, T_rank, C)
    # the gathered tokens are the model's output: full precision whatever comm_dtype says
    model.token_gather = TokenGather(runtime.exact("sp"), sizes)  # (B, T_rank, p*p*out) -> (B, T, p*p*out)


def make_core(impl: str, runtime: Runtime, sizes: list[int]):
    """The AttentionCore (B, S_rank, H, Dh) x3 -> (B, S_rank, H, Dh) for one sequence-parallel kernel."""
    comms = runtime.comms
    if impl == "ulysses":
        from opendit.parallel.attention.ulysses import UlyssesAttention

        return UlyssesAttention(comms["ulysses"], sizes)
    if impl == "ring":
        from opendit.parallel.attention.ring import RingAttention

        return RingAttention(comms["ring"], sizes)
    if impl == "usp":
        from opendit.parallel.attention.usp import HybridAttention

        return HybridAttention(comms["ulysses"], comms["ring"], sizes)
    raise OpenDiTError(f"unknown sequence-parallel implementation {impl!r}")


def shard_weights(model: DiT, runtime: Runtime) -> None:
    """Shard parameters over the sequence-parallel group (opendit.parallel.sharding), gathered per block on use."""
    try:
        from opendit.parallel.sharding import apply_weight_sharding
    except ImportError as exc:
        raise OpenDiTError(
            "--shard-weights is not available in this build (opendit.parallel.sharding is missing)"
        ) from exc
    apply_weight_sharding(model, runtime.comms["sp"])


def plan_record(runtime: Runtime, pmodel: ParallelModel, num_images: int) -> dict:
    """What record.json says about the plan: degrees, kernel, splits and the notes on exact fallbacks."""
    plan, cfg = runtime.plan, pmodel.model.config
    sizes, _ = pmodel.image_split(num_images)
    return {
        "config": plan.to_dict(),
        "describe": plan.describe(),
        "impl": plan.impl,
        "world_size": runtime.world_size,
        "mesh_order": "dp, cfg, ring, ulysses (outer -> inner)",
        "token_split": pmodel.token_sizes,  # after any --balance-tokens re-split
        "token_balance": pmodel.balancer.history if pmodel.balancer is not None else None,
        "head_split": head_split(cfg.num_heads, plan.ulysses) if plan.ulysses > 1 else None,
        "images_per_dp_group": sizes,
        "notes": pmodel.notes,
    }
