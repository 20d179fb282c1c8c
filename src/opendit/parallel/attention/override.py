"""Kernels that replace a whole SelfAttention module's forward from outside (FastSeq, overlapped Ulysses).

They change how q, k, v are projected as well as attended, so they cannot be a plain `attn.core`. Installing sets an
instance attribute `forward` (nn.Module.__call__ looks up self.forward, so the instance attribute wins): the
module's parameters and state_dict keys are unchanged, and uninstalling restores the single-device forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opendit.errors import OpenDiTError
from opendit.models.attention import AttentionCore, SelfAttention, local_attention
from opendit.parallel.sequence import check_sizes


class AttentionOverride:
    attribute = "attention_override"  # where the installed kernel is kept on the module (subclasses rename it)
    kernel = "AttentionOverride"  # the name error messages use

    def __init__(self, module: SelfAttention, comm, seq_sizes: Sequence[int], attn: AttentionCore = local_attention):
        """module: the SelfAttention whose qkv / proj / heads the kernel uses; comm: its group; seq_sizes: tokens
        per group rank (uneven allowed); attn: the local attention it runs on its heads."""
        self.check_module(self.kernel, module)
        self.module, self.comm, self.attn = module, comm, attn
        self.seq_sizes = check_sizes(seq_sizes, comm.size)

    @staticmethod
    def check_module(kernel: str, module) -> None:
        if not isinstance(module, SelfAttention):
            raise OpenDiTError(
                f"{kernel} replaces a SelfAttention (fused qkv + proj); got {type(module).__name__}; for other modules "
                "install a sequence-parallel attention core (UlyssesAttention, RingAttention) instead"
            )

    @staticmethod
    def check_input(kernel: str, x: torch.Tensor, seq_sizes: Sequence[int], rank: int) -> None:
        """x must be this rank's token shard (B, seq_sizes[rank], C)."""
        if x.dim() != 3 or x.shape[1] != seq_sizes[rank]:
            raise OpenDiTError(
                f"{kernel} on rank {rank}: expected x (B, {seq_sizes[rank]}, C) for seq_sizes {list(seq_sizes)}, got "
                f"{tuple(x.shape)}; shard tokens with the same sizes the kernel was built with"
            )

    @classmethod
    def install(cls, module: SelfAttention, comm, seq_sizes: Sequence[int], **kwargs):
        """Make module(x) run this kernel; returns the kernel."""
        kernel = cls(module, comm, seq_sizes, **kwargs)
        module.forward = kernel
        setattr(module, cls.attribute, kernel)
        return kernel

    @classmethod
    def uninstall(cls, module: SelfAttention) -> None:
        """Restore the module's own (single-device) forward."""
        module.__dict__.pop("forward", None)
        module.__dict__.pop(cls.attribute, None)
