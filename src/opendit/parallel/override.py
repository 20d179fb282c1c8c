"""Kernels that replace a whole SelfAttention module's forward from outside (FastSeq, overlapped Ulysses).

They change how q, k, v are projected as well as attended, so they cannot be a plain `attn.core`. Installing sets an
instance attribute `forward` (nn.Module.__call__ looks up self.forward, so the instance attribute wins): the
module's parameters and state_dict keys are unchanged, and uninstalling restores the single-device forward.
"""

from __future__ import annotations

from collections.abc import Sequence

from opendit.models.attention import SelfAttention


class AttentionOverride:
    attribute = "attention_override"  # where the installed kernel is kept on the module (subclasses rename it)

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
