"""Exponential moving average of a model's weights, the weights DiT ships and samples with."""

import copy

import torch
from torch import nn

from opendit.errors import OpenDiTError


class EMA:
    """ema = decay * ema + (1 - decay) * weights after every optimiser step; buffers are copied, not averaged.

    Holds its own frozen copy of the module (`self.module`), so exporting or sampling from it needs no weight swap.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise OpenDiTError(f"EMA decay must be in [0, 1), got {decay}; typical values are 0.995 to 0.9999")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                # lerp_: ema + (1 - decay) * (param - ema) = decay * ema + (1 - decay) * param, one fused op per tensor
                ema_params[name].lerp_(param.detach().to(ema_params[name].dtype), 1.0 - self.decay)
            else:  # frozen parameters (pos_embed) follow the model exactly
                ema_params[name].copy_(param)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
