"""Apply a plan to a module of a registered family (in place): tensor parallel, the family's split/gather plan, and
the strategy's kernel on every attention call that spans the split (families/attention.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from opendit.errors import OpenDiTError
from opendit.families.attention import AttentionSite, route_dispatch, route_sdpa, routes_dispatch
from opendit.families.registry import Family, require_family
from opendit.families.splits import SequenceState, install_plan, matching_modules, plan_modules_missing
from opendit.parallel.registry import get_strategy

# what `--sp-impl auto` runs on a family's attention calls, by (ulysses > 1, ring > 1)
AUTO_IMPL = {(True, False): "ulysses", (False, True): "ring", (True, True): "usp"}
# the strategies the planner ranks for families (FastSeq and the overlapped Ulysses run when asked for, but on
# projected q, k, v they send as much as Ulysses or more: see their `core`)
PLANNED_STRATEGIES = ("ulysses", "ring", "usp")


def parallelize_family(module: nn.Module, plan, world: int, device, runtime=None):
    """Check and install `plan` on `module` as its family declares (in place); returns (plan with its kernel
    resolved, runtime). OpenDiT's own models go through their ModelSpec (parallel/apply.py), every other family
    through its split/gather plan and attention sites; cfg/dp split each call's batch the same way for both. A given
    `runtime` (built for the same plan) is shared instead of building another."""
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.batch import install_batch_split

    family = require_family(module)
    if family.model_spec is not None:
        from opendit.parallel.apply import parallelize

        runtime = runtime or build_runtime(plan, device)
        if plan.sp_degree > 1 or plan.tp > 1:
            parallelize(module, runtime)  # split/gather hooks and kernels on the module itself
        install_batch_split(module, runtime)
        return plan, runtime
    check_family(module, plan)
    plan, _notes = family_plan(plan, family)
    plan.validate(world, family.num_heads(module) or plan.ulysses, max(plan.sp_degree, 1), plan.dp, plan.cfg > 1)
    runtime = runtime or build_runtime(plan, device)
    apply_family(module, family, runtime)
    install_batch_split(module, runtime, family.not_batched, family.cfg_batched is not False)
    return plan, runtime


def family_plan(plan, family: Family):
    """The plan with its sequence kernel resolved for this family (`auto` -> ulysses / ring / usp) and notes."""
    if plan.sp_degree == 1:
        return plan, []
    if plan.sp_impl == "auto":
        impl = AUTO_IMPL[(plan.ulysses > 1, plan.ring > 1)]
        return replace(plan, sp_impl=impl), [f"{family.name}: sequence parallel kernel {impl}"]
    return plan, []


def check_family(module: nn.Module, plan) -> Family:
    """Refuse what this module cannot take under `plan`, with the method's reason, before anything is installed."""
    family = require_family(module)
    owner = type(module).__name__
    missing = plan_modules_missing(module, family.cp_plan)
    if missing:
        raise OpenDiTError(f"{family.name}'s plan names modules {missing} that this {owner} does not have; fix the "
                           "family declaration (module paths as in named_modules())")  # fmt: skip
    heads = family.num_heads(module)
    if plan.pipefusion > 1:
        raise OpenDiTError(
            f"PipeFusion splits OpenDiT's DiT blocks over stages with its own stage view; {owner} has none declared "
            "yet: use --ulysses / --ring (exact) instead"
        )
    if plan.tp > 1:
        if family.tensor is None:
            why = family.notes.get("tp", "declares no tensor split yet")
            raise OpenDiTError(
                f"tensor parallelism splits heads and MLP columns where a family declares them; {family.name} "
                f"{why}: use --ulysses / --ring"
            )
        if heads is not None and plan.tp > heads:
            raise OpenDiTError(
                f"tp degree {plan.tp} exceeds {owner}'s {heads} attention heads; use --tp {heads} or less"
            )
        heads = None if heads is None else heads // plan.tp
    if plan.sp_degree > 1:
        impl = family_plan(plan, family)[0].sp_impl
        strategy = get_strategy(impl)
        if strategy.layout != "tokens":
            raise OpenDiTError(
                f"--sp-impl {impl} switches the split between the frames and the positions of a model with spatial "
                f"and temporal blocks (OpenDiT's video DiT); {owner} attends over one token sequence: use "
                "--sp-impl ulysses, ring or usp"
            )
        if strategy.splits_heads and heads is not None and plan.ulysses > heads:
            raise OpenDiTError(
                f"ulysses degree {plan.ulysses} exceeds {owner}'s {heads} attention heads (per tensor-parallel rank): "
                f"use --ulysses {heads} or less and --ring for the rest"
            )
    if plan.cfg > 1 and family.cfg_batched is False:
        raise OpenDiTError(
            f"--cfg-parallel splits one guided call's batch, but {owner}'s pipelines call the transformer once per "
            "branch (true CFG); use --ulysses/--ring or --dp instead"
        )
    if plan.shard_weights and plan.sp_degree == 1:
        raise OpenDiTError("--shard-weights shards over the sequence-parallel group; add --ulysses or --ring")
    return family


class KernelCache:
    """The strategy's attention core for given per-rank sizes, built once per sizes (kernels are stateless)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.strategy = get_strategy(runtime.plan.impl)
        self._kernels: dict[tuple[int, ...], object] = {}

    def __call__(self, sizes: list[int]):
        key = tuple(sizes)
        if key not in self._kernels:
            self._kernels[key] = self.strategy.core(self.runtime, list(sizes))
        return self._kernels[key]


def apply_family(module: nn.Module, family: Family, runtime) -> dict:
    """Install the runtime's tensor and sequence parallelism into `module`; returns what was done."""
    tensor = None
    if runtime.plan.tp > 1:  # first: the sequence kernels then run on each rank's heads
        from opendit.parallel.tensor import apply_tensor_parallel

        tensor = apply_tensor_parallel(module, family.tensor, runtime.comms["tp"])
    if runtime.plan.sp_degree == 1:
        return {"family": family.name, "attention_sites": 0, "tensor": tensor}
    state = SequenceState(runtime.exact("sp"))
    install_plan(module, family.cp_plan, state)
    if family.install is not None:
        family.install(module, state)
    sites = install_sites(module, family, state, KernelCache(runtime))
    units = None
    if runtime.plan.shard_weights:  # FSDP2 over the sequence group: one all-gather per block part (split_block_units)
        from opendit.parallel.sharding import apply_weight_sharding

        units = shard_units(module, family)
        apply_weight_sharding(module, runtime.sp_mesh, units=units, stats=runtime.stats, root_used_after_units=True,
                              split_root=True)  # fmt: skip
    return {"family": family.name, "attention_sites": len(sites), "impl": runtime.plan.impl, "tensor": tensor,
            "shard_units": None if units is None else len(units)}  # fmt: skip


def shard_units(module: nn.Module, family: Family) -> list[nn.Module]:
    """The blocks of every ModuleList directly under the root, in registration order (the forward order of the
    transformer classes: Flux's double- then single-stream blocks), but those the family reads outside their own
    forward (`Family.shard_in_root`); parameters outside the units stay in the root unit, gathered all forward."""
    kept = {m for pattern in family.shard_in_root for _p, m in matching_modules(module, pattern)}
    from opendit.parallel.sharding import split_block_units

    units = [b for child in module.children() if isinstance(child, nn.ModuleList) for b in child if b not in kept]
    if not units:
        raise OpenDiTError(f"{type(module).__name__} has no list of blocks to shard; drop --shard-weights")
    return split_block_units(units)  # each block as its attention and feed-forward parts (smaller gathers)


def install_sites(module: nn.Module, family: Family, state: SequenceState, kernels) -> list[str]:
    """An AttentionSite on every attention call of the family that can span the split; returns their paths."""
    owner, paths = type(module).__name__, []
    if family.attention:  # SDPA route on the declared modules
        for pattern in family.attention:
            for path, attn in matching_modules(module, pattern):
                route_sdpa(attn, AttentionSite(path, state, kernels, owner))
                paths.append(path)
    else:  # dispatch route on every attention module whose processor takes a parallel config
        for path, attn in module.named_modules():
            processor = getattr(attn, "processor", None)
            if processor is None or not hasattr(attn, "set_processor") or not routes_dispatch(processor):
                continue
            processor = copy.copy(processor)  # one site per module, even where modules shared a processor
            attn.set_processor(processor)
            route_dispatch(processor, AttentionSite(path, state, kernels, owner))
            paths.append(path)
    if not paths:
        raise OpenDiTError(
            f"{family.name}: no attention module of {owner} can be reached (none matches {list(family.attention)}, "
            "or no processor calls diffusers' dispatch_attention_fn with a parallel config); declare its attention "
            "modules in its family"
        )
    return paths
