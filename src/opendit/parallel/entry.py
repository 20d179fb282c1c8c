"""`opendit.parallelize(module, plan)`: the public way to parallelise a module inside a process group.

For OpenDiT's DiT and every module class with a family (families/: diffusers' own `_cp_plan`, or declared). Call it on
every rank of an initialised process group (torchrun, or an engine worker) with the same plan; the module is changed
in place and returned, with the same signature, outputs, `.config` and `.dtype` on every rank, so a diffusers
pipeline keeps working around it. What it installs: the sequence split/gather points and the strategy's attention
kernels (parallel/apply.py for our DiT, families/apply.py for the others), and cfg/dp splits of
each call's batch (parallel/batch.py).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError


def parallelize(module: nn.Module, plan: ParallelConfig) -> nn.Module:
    """Parallelise `module` in place over the world's ranks under `plan`; returns the module."""
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.batch import install_batch_split

    if not isinstance(plan, ParallelConfig):
        raise OpenDiTError(f"plan must be an opendit ParallelConfig, got {type(plan).__name__}")
    if not dist.is_initialized():
        raise OpenDiTError("opendit.parallelize needs an initialised process group: run under torchrun (or an engine)")
    if getattr(module, "_opendit_plan", None) is not None:
        raise OpenDiTError("this module is parallelised already (parallelize each module once)")
    if plan.world_size != dist.get_world_size():
        raise OpenDiTError(
            f"the plan {plan.describe()} needs {plan.world_size} ranks, the process group has {dist.get_world_size()}"
            "; make the product of the degrees (dp x cfg x ring x ulysses x tp) the world size"
        )
    if plan.world_size == 1:
        return module  # one rank: nothing to split
    params = list(module.parameters())
    device = params[0].device if params else "cpu"
    if _is_ours(module):
        runtime = build_runtime(plan, device)
        _apply_ours(module, runtime)
        install_batch_split(module, runtime)
    else:
        from opendit.families.apply import apply_family, check_family, family_plan

        family = check_family(module, plan)
        plan, _notes = family_plan(plan, family)
        heads = family.num_heads(module) or plan.ulysses
        plan.validate(dist.get_world_size(), heads, max(plan.sp_degree, 1), plan.dp, plan.cfg > 1)
        runtime = build_runtime(plan, device)
        apply_family(module, family, runtime)
        install_batch_split(module, runtime, family.not_batched, family.cfg_batched is not False)
    module._opendit_plan = plan
    module._opendit_runtime = runtime
    return module


def _is_ours(module: nn.Module) -> bool:
    from opendit.models.spec import _SPECS

    return type(getattr(module, "config", None)) in _SPECS


def _apply_ours(module: nn.Module, runtime) -> None:
    """Our DiT: the sequence parallelism of parallel/apply.py in place (cfg/dp go through the batch hooks)."""
    from opendit.parallel.apply import parallelize as install

    if runtime is None or (runtime.plan.sp_degree == 1 and runtime.plan.tp == 1):
        return
    install(module, runtime)  # token split/gather hooks and kernels on the module itself; its wrapper is not used
