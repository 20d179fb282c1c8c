"""`opendit.parallelize(module, plan)`: the public way to parallelise a module inside a process group.

For OpenDiT's DiT and every module class with a family (families/: diffusers' own `_cp_plan`, or declared). Call it on
every rank of an initialised process group (torchrun, or an engine worker) with the same plan; the module is changed
in place and returned, with the same signature, outputs, `.config` and `.dtype` on every rank, so a diffusers
pipeline keeps working around it. What it installs: the sequence split/gather points and the strategy's attention
kernels as the module's family declares (families/apply.py), and cfg/dp splits of
each call's batch (parallel/batch.py).
"""

from __future__ import annotations

import os

import torch
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
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    check_device_pairing(device, dist.get_backend())
    if plan.world_size == 1:
        return module  # one rank: nothing to split
    plan, runtime = parallelize_family(module, plan, dist.get_world_size(), device, runtime)
    module._opendit_plan = plan
    module._opendit_runtime = runtime
    return module


def check_device_pairing(device: torch.device, backend: str) -> None:
    """OpenDiTError (one line, naming the fix) when the module's device and the process group's backend cannot work
    together: NCCL moves CUDA tensors only, each rank on its own GPU; gloo is the CPU backend. Checked before anything
    is installed, so a wrong setup fails here instead of at the first collective (or as two ranks on one GPU)."""
    from opendit.distributed.env import rank_gpu_index

    backend = str(backend).lower()
    local = rank_gpu_index()  # cuda:LOCAL_RANK (cuda:0 where the launcher pinned one GPU per process)
    setup = f"torch.cuda.set_device({local}) then module.to('cuda:{local}') (or pipe.to('cuda:{local}'))"
    if device.type == "meta":
        return  # built on meta and filled later (sharded loading): the filling puts it on the rank's device
    if backend == "nccl" and device.type != "cuda":
        raise OpenDiTError(
            f"the process group is NCCL but the module is on {device}: move it to this rank's GPU cuda:LOCAL_RANK "
            f"before opendit.parallelize: {setup}"
        )
    if backend == "nccl":
        want = local if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        current = torch.cuda.current_device()
        if device.index != want or current != want:
            raise OpenDiTError(
                f"the module is on {device} and the current GPU is cuda:{current}, but this rank's GPU is cuda:{want} "
                f"(LOCAL_RANK): every rank needs its own GPU; call {setup}"
            )
    if backend == "gloo" and device.type == "cuda":
        raise OpenDiTError(
            f"the module is on {device} but the process group is gloo (CPU): init_process_group('nccl', "
            f"device_id=torch.device('cuda', {local})) after torch.cuda.set_device({local}), or keep the module on CPU"
        )
