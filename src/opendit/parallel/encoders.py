"""Text encoders once: a diffusers pipeline's text encoders are loaded and run on one rank each, and what they return
reaches every other rank by broadcast, so N ranks hold one copy of each encoder instead of N.

Every rank still runs the pipeline's own `encode_prompt` code (tokenisation, slicing hidden states, pooling,
repeating for images per prompt): only the encoder modules' forward differs. On its owner rank an encoder runs as
loaded and its output (a transformers ModelOutput, tuple or tensor) is broadcast; on the other ranks a stand-in
(`EncoderStandIn`: the encoder's config and dtype, no weights) returns the broadcast output. Every rank calls the
encoders in the same order (the same code on the same prompts), so the k-th forward on every rank is the k-th
broadcast from the owner, and the embeddings are the owner's bit for bit, which are the ones every rank would have
computed itself.

Owners: encoder i (the pipeline's `text_encoder`, `text_encoder_2`, ... in that order) lives on rank i mod N, so
FLUX's CLIP + T5 or SD3's CLIP-L + CLIP-G + T5 go to different ranks when there are enough.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendit.errors import OpenDiTError

ENCODER_PREFIX = "text_encoder"


def text_encoder_names(folder: str | Path) -> list[str]:
    """The pipeline's text encoder components, in their order (text_encoder, text_encoder_2, ...), from its
    model_index.json (a component saved as null is absent)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    names = [name for name, entry in index.items() if name.startswith(ENCODER_PREFIX) and isinstance(entry, list)]
    return sorted((n for n in names if index[n][0] is not None), key=lambda n: (len(n), n))


def encoder_owners(names: list[str], world: int) -> dict[str, int]:
    """Encoder i on rank i mod world: several encoders spread over the ranks."""
    return {name: index % world for index, name in enumerate(names)}


class EncoderStandIn(nn.Module):
    """An encoder on a rank that does not hold it: its config and dtype for the pipeline's code, no weights; its
    forward returns the owner's output, broadcast. A one-element buffer places it on the rank's device, so the
    pipeline's `device` (read from its modules) stays the rank's own."""

    def __init__(self, config: Any, dtype: torch.dtype, owner: int, device: torch.device):
        super().__init__()
        self.config, self._dtype, self.owner = config, dtype, owner
        self.register_buffer("_place", torch.zeros(1, device=device, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:  # as a transformers model's (the pipeline's `device` reads it)
        return self._place.device

    def forward(self, *args, **kwargs):
        return broadcast_output(None, self.owner, self._place.device)


def load_config(folder: str | Path, name: str, index: dict) -> Any:
    """The encoder's config (transformers), read from its subfolder: no weights."""
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise OpenDiTError(f"{name} ({class_name}) has no config class for a stand-in; pass --encode-every-rank")
    return config_class.from_pretrained(Path(folder) / name)


def place_encoders(pipe, folder: str | Path, owners: dict[str, int], rank: int, dtype: torch.dtype,
                   device: torch.device) -> dict:  # fmt: skip
    """On each rank: the encoders it owns broadcast their output after each forward; the others are stand-ins.
    `pipe` was loaded without the encoders this rank does not own (see `skipped_components`). Returns the record."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    for name, owner in owners.items():
        if owner == rank:
            module = getattr(pipe, name)
            module.forward = _broadcasting(module.forward, owner, device)  # the instance's own forward
        else:
            stand_in = EncoderStandIn(load_config(folder, name, index), dtype, owner, device)
            setattr(pipe, name, stand_in)
    held = [getattr(pipe, name, None) for name in text_encoder_names(folder)]
    held_bytes = sum(p.numel() * p.element_size() for m in held if isinstance(m, nn.Module) for p in m.parameters())
    return {"text_encoders": {name: f"rank {owner}" for name, owner in owners.items()} or "every rank",
            "text_encoder_bytes": held_bytes}  # this rank's  # fmt: skip


def skipped_components(owners: dict[str, int], rank: int) -> dict[str, None]:
    """from_pretrained keywords that leave out the encoders this rank does not own (never read from disk)."""
    return {name: None for name, owner in owners.items() if owner != rank}


def _broadcasting(forward, owner: int, device: torch.device):
    from opendit.distributed.env import inject_phase_fault

    def run(*args, **kwargs):
        inject_phase_fault("encode")  # test hook: the owner fails while the other ranks wait for its broadcast
        return broadcast_output(forward(*args, **kwargs), owner, device)

    return run


def broadcast_output(output: Any, owner: int, device: torch.device) -> Any:
    """The owner's `output` (tensors in tuples, lists, dicts or ModelOutputs) on every rank of the world group: the
    structure with tensor placeholders goes as one object, then each tensor by itself, in order."""
    tensors: list[torch.Tensor] = []
    skeleton = _strip(output, tensors) if dist.get_rank() == owner else None
    box = [skeleton]
    dist.broadcast_object_list(box, src=owner, device=device if device.type == "cuda" else None)
    skeleton = box[0]
    if dist.get_rank() != owner:
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _slots(skeleton)]
    for tensor in tensors:  # each (shape as the owner's), contiguous on the run's device
        dist.broadcast(tensor, src=owner)
    return _fill(skeleton, iter(tensors))


class _Slot:
    """Where a tensor stood in the structure: its shape and dtype."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = shape, dtype


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value.contiguous())
        return _Slot(tuple(value.shape), value.dtype)
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: its set fields, rebuilt as its own class
        return (type(value), {key: _strip(item, tensors) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return (type(value), [_strip(item, tensors) for item in value])
    return value


def _slots(skeleton: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    found: list = []

    def walk(node):
        if isinstance(node, _Slot):
            found.append((node.shape, node.dtype))
        elif isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], type):
            for item in node[1].values() if isinstance(node[1], dict) else node[1]:
                walk(item)

    walk(skeleton)
    return found


def _fill(skeleton: Any, tensors) -> Any:
    if isinstance(skeleton, _Slot):
        return next(tensors)
    if isinstance(skeleton, tuple) and len(skeleton) == 2 and isinstance(skeleton[0], type):
        kind, items = skeleton
        if isinstance(items, dict):
            return kind(**{key: _fill(item, tensors) for key, item in items.items()})
        filled = [_fill(item, tensors) for item in items]
        return kind(filled) if kind in (tuple, list) else kind(*filled)  # a namedtuple takes its fields
    return skeleton
