"""cfg and data parallelism over one model call's batch, as hooks on the model (for `opendit.parallelize`).

The call's batch (B, ...) — [uncond; cond] under guidance, several prompts under dp — is split over the cfg group
into halves, then each half over the dp groups (contiguous blocks, uneven allowed); every tensor argument whose dim
0 is the batch is narrowed the same way (nested dicts too: PixArt's added_cond_kwargs). After the call the output's
first tensor is all-gathered over dp, then over cfg, so every rank returns the whole batch in order: exact, since
samples of a batch never interact.
"""

from __future__ import annotations

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.parallel.sequence import offsets, split_sizes


class BatchSplit:
    """The one cfg/dp split of a call's batch: as hooks on a module (`install_batch_split`), or around any callable
    (`call`). `levels`: which mesh dimensions split it (OpenDiT's sampler splits the images over dp for the whole
    loop, so its model calls split over cfg only)."""

    def __init__(self, runtime, not_batched: tuple[str, ...] = (), batched_cfg: bool = True, levels=("cfg", "dp")):
        self.runtime, self.not_batched = runtime, set(not_batched)
        self.cfg = runtime.comms["cfg"] if "cfg" in levels else None
        self.dp = runtime.comms["dp"] if "dp" in levels else None
        self.batched_cfg = batched_cfg
        self.sizes: list[tuple[list[int], int]] = []  # per split level (cfg, dp): (sizes, this rank's index)

    def _levels(self, batch: int) -> list[tuple[object, list[int], int]]:
        levels = []
        if self.cfg is not None:
            if batch % 2:
                raise OpenDiTError(
                    f"--cfg-parallel splits a guided batch (its two branches) in halves, but this call's batch is "
                    f"{batch}"
                    + (
                        ""
                        if self.batched_cfg
                        else "; this pipeline calls the transformer once per branch: drop "
                        "--cfg-parallel and use --ulysses/--ring or --dp"
                    )  # fmt: skip
                )
            levels.append((self.cfg, [batch // 2] * 2, self.runtime.coords["cfg"]))
            batch //= 2
        if self.dp is not None:
            if batch < self.dp.size:
                raise OpenDiTError(f"--dp {self.dp.size} needs at least {self.dp.size} samples per call, got {batch}")
            levels.append((self.dp, split_sizes(batch, self.dp.size), self.runtime.coords["dp"]))
        return levels

    def narrow(self, value, batch: int, start: int, length: int):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.narrow(0, start, length)
        if _is_sample_list(value) and len(value) == batch:  # one tensor per sample (Z-Image's latents, captions)
            return value[start : start + length]
        if isinstance(value, dict):
            return {k: self.narrow(v, batch, start, length) for k, v in value.items()}
        return value

    def pre_hook(self, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        batch = len(first) if _is_sample_list(first) else first.shape[0]
        levels = self._levels(batch)
        self.sizes = [(sizes, index) for _, sizes, index in levels]
        for _, sizes, index in levels:  # cfg half, then this dp group's block of it
            start = offsets(sizes)[index]
            args = tuple(self.narrow(a, batch, start, sizes[index]) for a in args)
            kwargs = {
                k: v if k in self.not_batched else self.narrow(v, batch, start, sizes[index]) for k, v in kwargs.items()
            }
            batch = sizes[index]
        return args, kwargs

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on this rank's part of the batch; the output's first tensor gathered back whole."""
        args, kwargs = self.pre_hook(None, args, kwargs)
        return self.post_hook(None, args, kwargs, fn(*args, **kwargs))

    @property
    def active(self) -> bool:
        return self.cfg is not None or self.dp is not None

    def post_hook(self, module, args, kwargs, output):
        comms = [comm for comm in (self.cfg, self.dp) if comm is not None]
        tensor = _first_tensor(output)
        samples = _is_sample_list(tensor)
        if samples:  # a list of per-sample outputs of one shape: (B, ...) for the gathers, a list again after
            tensor = torch.stack(list(tensor))
        for comm, (sizes, _index) in reversed(list(zip(comms, self.sizes))):  # dp blocks, then the cfg halves
            tensor = comm.all_gather(tensor.contiguous(), 0, sizes)  # (B_group, ...) -> (B_level, ...)
        return _replace_first_tensor(output, list(tensor.unbind(0)) if samples else tensor)


def _is_sample_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample  # diffusers' Transformer2DModelOutput


def _replace_first_tensor(output, tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, (tuple, list)):
        return type(output)([tensor, *output[1:]])
    output.sample = tensor
    return output


def install_batch_split(model: nn.Module, runtime, not_batched=(), batched_cfg: bool = True) -> BatchSplit | None:
    """cfg/dp hooks on the model's forward (None when the plan has neither)."""
    if runtime.comms["cfg"] is None and runtime.comms["dp"] is None:
        return None
    split = BatchSplit(runtime, not_batched, batched_cfg)
    model.register_forward_pre_hook(split.pre_hook, with_kwargs=True)
    model.register_forward_hook(split.post_hook, with_kwargs=True)
    return split
