"""`parallelize(model, runtime)`: apply the runtime's plan to a plain single-device model from outside.

Nothing here names a model's modules: the model's spec (models/spec.py) declares where tokens are split and gathered,
which modules are attention, and the shard units; the plan's strategy (parallel/registry.py) installs its kernel.
What it installs:
- a forward hook on each of the spec's `token_split` modules (output -> this rank's contiguous block of tokens,
  ⌈T/P⌉ / ⌊T/P⌋ per rank or token_shares: any token count works without padding) and `token_gather` modules
  (output all-gathered over the "sp" group, ring x ulysses, in sequence order);
- the strategy's kernel in every attention module (an attention core, or a whole-module forward for FastSeq and
  the overlapped Ulysses);
- under --shard-weights, FSDP2 over the spec's shard units (parallel/sharding.py).
What the returned `ParallelModel` adds around the model (the sampler's `model_fn(x, t, y)` on the full CFG batch):
- cfg = 2: cfg rank c runs half c of [cond; uncond] and the halves are all-gathered before the guidance combine;
- `step_hooks()`: the runtime's per-step hooks (comm accounting, fault injection, --balance-tokens re-splitting the
  tokens by measured per-rank speed; `set_token_sizes` re-installs the kernels; exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from opendit.distributed.mesh import Runtime
from opendit.errors import OpenDiTError
from opendit.models.spec import spec_for
from opendit.parallel.balance import TokenBalancer
from opendit.parallel.batch import BatchSplit
from opendit.parallel.registry import get_strategy
from opendit.parallel.sequence import TokenGather, TokenShard, check_sizes, head_sizes, split_sizes


@dataclass
class ParallelModel:
    """model_fn for the sampler: (2B|B, C, H, W), (2B|B,), (2B|B,) -> (2B|B, C_out, H, W), identical on every rank
    of a dp group."""

    model: nn.Module
    runtime: Runtime
    token_sizes: list[int] | None  # tokens per sequence rank (None without sequence parallelism)
    notes: list[str] = field(default_factory=list)
    balancer: TokenBalancer | None = None  # --balance-tokens: re-splits token_sizes from measured busy times
    token_hooks: list = field(default_factory=list, repr=False)  # the installed split/gather hooks
    tensor: dict | None = None  # --tp: what tensor parallelism split (parallel/tensor.py), None without it
    batch: BatchSplit | None = field(default=None, repr=False)  # the cfg split of each call (parallel/batch.py)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cfg rank 0 runs the conditional half of [cond; uncond], rank 1 the other; the halves are gathered back:
        # (2B, C, H, W) -> (B, C, H, W) per rank -> (2B, C_out, H, W). The sampler splits images over dp itself.
        if self.batch is None:
            self.batch = BatchSplit(self.runtime, levels=("cfg",))
        if not self.batch.active:
            return self.model(x, t, y)
        return self.batch.call(self.model, x, t, y)

    def step_hooks(self) -> list:
        """The runtime's per-step hooks for the sampler, in the order they must run (see parallel/hooks.py)."""
        from opendit.parallel.hooks import TokenBalancing, runtime_step_hooks

        balancing = (TokenBalancing(self, self.runtime.stats),) if self.balancer is not None else ()
        return runtime_step_hooks(self.runtime, first=balancing)

    def set_token_sizes(self, sizes: list[int]) -> None:
        """Re-split the sequence (exact: only which rank holds which tokens changes). Collective-free, but every rank
        of the sequence group must switch before the next call, to the same sizes."""
        if self.token_sizes is None:
            raise OpenDiTError("token sizes exist only under sequence parallelism (--ulysses / --ring)")
        sizes = check_sizes(sizes, self.runtime.plan.sp_degree)
        self.token_hooks = install_sequence(self.model, self.runtime, sizes, self.token_hooks)
        self.token_sizes = sizes

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
        plan, dims = self.runtime.plan, spec_for(config).dims(config)
        plan.validate(self.runtime.world_size, dims.num_heads, dims.num_tokens, plan.dp, plan.cfg > 1)
        self.model.set_input_size(config)
        if self.token_sizes is not None:
            sizes = token_split(dims.num_tokens, self.runtime)
            self.token_hooks = install_sequence(self.model, self.runtime, sizes, self.token_hooks)
            self.token_sizes = sizes
            if self.balancer is not None:
                self.balancer = make_balancer(dims.num_tokens, sizes, self.runtime)


def token_split(num_tokens: int, runtime: Runtime) -> list[int]:
    """Tokens per sequence rank, in sp order (ring_i * ulysses + ulysses_i)."""
    plan = runtime.plan
    return split_sizes(num_tokens, plan.sp_degree, plan.token_shares)


def parallelize(model: nn.Module, runtime: Runtime) -> ParallelModel:
    """Install the runtime's sequence parallelism into `model` (in place, as its spec declares) and wrap it for
    cfg/dp parallelism."""
    plan, dims = runtime.plan, spec_for(model).dims(model.config)
    notes = plan.validate(
        runtime.world_size, dims.num_heads, dims.num_tokens, plan.dp, plan.cfg > 1, frames=dims.sequences
    )
    if plan.pipefusion > 1:  # the blocks over stages, patches pipelined (alone on the mesh: config validation)
        from opendit.parallel.pipefusion import PipeFusionModel

        return PipeFusionModel(model, runtime, notes)
    tensor = install_tensor(model, runtime) if plan.tp > 1 else None  # first: the SP kernels see the narrow modules
    if plan.sp_degree == 1:
        if plan.shard_weights:
            raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
        return ParallelModel(model, runtime, None, notes, tensor=tensor)
    sizes = token_split(dims.num_tokens, runtime)
    if plan.impl == "dsp":
        from opendit.parallel.dsp import dsp_sizes

        frames, positions = dsp_sizes(dims.sequences, dims.num_tokens, plan.ulysses)
        notes.append(f"dsp: frames per rank {frames} (spatial blocks), positions per rank {positions} (temporal)")
    elif len(set(sizes)) > 1:
        notes.append(f"{dims.num_tokens} tokens over {plan.sp_degree} sequence ranks: {sizes} (uneven, exact)")
    hooks = install_sequence(model, runtime, sizes)
    if plan.shard_weights:
        shard_weights(model, runtime)
    balancer = make_balancer(dims.num_tokens, sizes, runtime) if plan.balance_tokens else None
    return ParallelModel(model, runtime, sizes, notes, balancer, hooks, tensor)


def install_tensor(model: nn.Module, runtime: Runtime) -> dict:
    """--tp: split the blocks over the tp group as the model's spec declares (parallel/tensor.py)."""
    from opendit.parallel.tensor import apply_tensor_parallel

    spec = spec_for(model)
    if spec.tensor_split is None:
        raise OpenDiTError(
            f"{spec.name} declares no tensor-parallel split (ModelSpec.tensor_split); drop --tp or use --ulysses/--ring"
        )
    return apply_tensor_parallel(model, spec.tensor_split, runtime.comms["tp"])


def make_balancer(num_tokens: int, sizes: list[int], runtime: Runtime) -> TokenBalancer:
    """--balance-tokens: a TokenBalancer whose exchange all-gathers every sequence rank's busy time (exact, fp64)."""
    exact_sp = runtime.exact("sp")

    def exchange(busy_s: float) -> list[float]:  # (1, 1) per rank, on the group's device -> (P,) busy times
        return [row[0] for row in exact_sp.all_gather_values([busy_s], torch.float64)]

    return TokenBalancer(num_tokens, sizes, exchange)


def install_sequence(model: nn.Module, runtime: Runtime, sizes: list[int], old_hooks: list | None = None) -> list:
    """Install (or re-install with new sizes) the plan's sequence-parallel strategy into the attention modules the
    model's spec declares, and the spec's token split / gather points as forward hooks. Returns the hook handles
    (pass them back as `old_hooks` on a re-install so the previous split is removed first)."""
    spec = spec_for(model)
    for handle in old_hooks or ():
        handle.remove()
    strategy = get_strategy(runtime.plan.impl)
    if strategy.layout != "tokens":  # DSP: the strategy installs the model's own split points
        return strategy.install_model(model, spec, runtime)
    strategy.install(spec.attention_modules(model), runtime, sizes)
    modules = dict(model.named_modules())
    hooks = []
    for path, dim in spec.token_split.items():  # output (B, T, D) -> this rank's (B, T_rank, D); no communication
        shard = TokenShard(runtime.comms["sp"], sizes, dim)
        hooks.append(modules[path].register_forward_hook(lambda _m, _args, out, shard=shard: shard(out)))
    for path, dim in spec.token_gather.items():  # output (B, T_rank, D) -> (B, T, D) in sequence order
        # the gathered tokens are the model's output: full precision whatever comm_dtype says
        gather = TokenGather(runtime.exact("sp"), sizes, dim)
        hooks.append(modules[path].register_forward_hook(lambda _m, _args, out, gather=gather: gather(out)))
    return hooks


def shard_weights(model: nn.Module, runtime: Runtime) -> None:
    """Shard parameters over the sequence-parallel group (parallel/sharding.py), one all-gather per spec unit."""
    from opendit.parallel.sharding import apply_weight_sharding

    # the runtime's own 1-D mesh over the sequence group: the kernels and FSDP2 share one set of groups
    spec = spec_for(model)
    apply_weight_sharding(model, runtime.sp_mesh, units=spec.shard_unit_modules(model), stats=runtime.stats,
                          root_used_after_units=spec.root_used_after_embedding)  # fmt: skip


def plan_record(runtime: Runtime, pmodel: ParallelModel, num_images: int) -> dict:
    """What record.json says about the plan: degrees, kernel, splits and the notes on exact fallbacks."""
    plan, heads = runtime.plan, spec_for(pmodel.model).dims(pmodel.model.config).num_heads
    return {
        "config": plan.to_dict(),
        "describe": plan.describe(),
        "impl": plan.impl,
        "world_size": runtime.world_size,
        "mesh_order": "pipefusion, dp, cfg, ring, ulysses, tp (outer -> inner)",
        "tensor": pmodel.tensor,
        "pipefusion": getattr(pmodel, "stage_layout", None),
        "token_split": pmodel.token_sizes,  # after any --balance-tokens re-split
        "token_balance": pmodel.balancer.history if pmodel.balancer is not None else None,
        "head_split": head_sizes(heads, plan.ulysses) if plan.ulysses > 1 else None,
        "images_per_dp_group": split_sizes(
            num_images, plan.dp
        ),  # contiguous blocks (engine/sampler_runner.image_split)
        "notes": pmodel.notes,
    }
