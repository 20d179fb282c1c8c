"""`opendit.parallelize(module, plan)`: the public way to parallelise a module inside a process group.

For OpenDiT's DiT and every module class with a family (families/: diffusers' own `_cp_plan`, or declared). Call it on
every rank of an initialised process group (torchrun, or an engine worker) with the same plan; the module is changed
in place and returned, with the same signature, outputs, `.config` and `.dtype` on every rank, so a diffusers
pipeline keeps working around it. What it installs: the sequence split/gather points and the strategy's attention
kernels as the module's family declares (families/apply.py), and cfg/dp splits of
each call's batch (parallel/batch.py).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError


def parallelize(module: nn.Module, plan: ParallelConfig, runtime=None) -> nn.Module:
    """Parallelise `module` in place over the world's ranks under `plan`; returns the module. `runtime`: the
    runtime of a module parallelised before under the same plan, to share its process groups and counters (the
    denoisers of one pipeline, e.g. Wan 2.2's two experts, take turns on the same ranks)."""
    from opendit.families.apply import parallelize_family

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
    plan, runtime = parallelize_family(module, plan, dist.get_world_size(), device, runtime)
    module._opendit_plan = plan
    module._opendit_runtime = runtime
    return module
