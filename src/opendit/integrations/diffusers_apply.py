"""Apply a plan to a diffusers transformer instance (see diffusers_parallel.py for what is installed and why)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from opendit.errors import OpenDiTError
from opendit.integrations.diffusers_parallel import (
    CORE_STRATEGIES,
    KernelCache,
    SequenceState,
    attention_modules,
    install_gather,
    install_splits,
)
from opendit.integrations.diffusers_processors import PROCESSORS
from opendit.integrations.diffusers_specs import SPECS, spec_for_module


def diffusers_plan(plan, spec, module):
    """The plan with a kernel that runs on diffusers' attention (an attention core): `auto` picks ulysses / ring /
    usp for the degrees; fastseq and ulysses-overlap (fused-qkv forwards of our own DiT) are refused."""
    if plan.sp_degree == 1:
        return plan, []
    if plan.sp_impl == "auto":
        impl = {(True, False): "ulysses", (False, True): "ring", (True, True): "usp"}[(plan.ulysses > 1, plan.ring > 1)]
        return replace(plan, sp_impl=impl), [f"{spec.name}: sequence parallel kernel {impl}"]
    if plan.sp_impl not in CORE_STRATEGIES:
        raise OpenDiTError(
            f"--sp-impl {plan.sp_impl} replaces a fused-qkv attention forward (OpenDiT's own DiT); for "
            f"{type(module).__name__} choose one of {', '.join(CORE_STRATEGIES)} (or auto)"
        )
    return plan, []


def check_diffusers(module: nn.Module, plan) -> None:
    """Refuse what this module cannot take, before anything is installed."""
    spec = spec_for_module(module)
    if spec is None:
        raise OpenDiTError(
            f"{type(module).__name__} has no OpenDiT plan; supported: OpenDiT's DiT and the diffusers classes "
            + ", ".join(SPECS)
        )
    heads = spec.num_heads(module)
    if plan.tp > 1:
        if spec.tensor is None:
            raise OpenDiTError(
                f"--tp is not declared for {type(module).__name__} yet (tensor parallel runs on OpenDiT's DiT, "
                "diffusers' DiT and PixArt); use --ulysses / --ring"
            )
        if plan.tp > heads:
            raise OpenDiTError(
                f"tp degree {plan.tp} exceeds {type(module).__name__}'s {heads} attention heads; use --tp {heads} "
                "or less (tensor parallelism splits attention by heads)"
            )
        heads //= plan.tp  # what the sequence kernels see on each tensor-parallel rank (at least)
    if plan.ulysses > heads:
        raise OpenDiTError(
            f"ulysses degree {plan.ulysses} exceeds {type(module).__name__}'s {heads} attention heads; use "
            f"--ulysses {max(d for d in range(1, heads + 1) if d <= heads)} or less, or --ring"
        )
    if plan.cfg > 1 and not spec.cfg_batched:
        raise OpenDiTError(
            f"--cfg-parallel splits one guided call's batch, but {type(module).__name__}'s pipelines call the "
            "transformer once per branch (true CFG); use --ulysses/--ring or --dp instead"
        )
    if plan.shard_weights:
        raise OpenDiTError(f"--shard-weights is not supported for {type(module).__name__} yet; drop it")


def apply_diffusers(module: nn.Module, runtime) -> dict:
    """Install the runtime's sequence parallelism into a diffusers transformer (in place); returns what was done."""
    spec = spec_for_module(module)
    tensor = None
    if runtime.plan.tp > 1:  # first: the sequence processors then run on each rank's heads
        from opendit.parallel.tensor import apply_tensor_parallel

        tensor = apply_tensor_parallel(module, spec.tensor, runtime.comms["tp"])
    if runtime.plan.sp_degree == 1:
        return {"spec": spec.name, "attention_modules": 0, "tensor": tensor}
    state = SequenceState(size=runtime.plan.sp_degree, rank=runtime.comms["sp"].rank)  # sp order, as the kernels
    kernels = KernelCache(runtime)
    install_splits(module, spec, state)
    install_gather(module, spec, runtime, state)
    found = attention_modules(module, spec)
    for _path, attn, (kind, streams) in found:
        attn.set_processor(PROCESSORS[kind](state, kernels, streams))
    return {"spec": spec.name, "attention_modules": len(found), "impl": runtime.plan.impl, "tensor": tensor}
