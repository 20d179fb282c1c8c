"""Sharded loading: fill each rank's parameter shards straight from the checkpoint file, one tensor at a time, so no
rank ever holds more than its shards plus one tensor in flight.

Without it, `--shard-weights` loaded the whole model on every rank and sharded it afterwards, so the loading peak
(the whole model in its dtype, plus one source tensor) decided whether a job fit, and sharding saved nothing there
(DiT-XL/2, 4 ranks: 3,679 MiB per rank vs 3,324 for one process). The order here is the one torchtitan uses for
training: build on `meta`, apply the parallel plan on `meta`, materialise only the local shards, fill them.

    model = build on meta (no memory) -> parallelize(model, runtime)   # kernels + FSDP2 units, still on meta
    fill_sharded(model, state, device)                                 # local shards allocated and read

What a rank reads for a parameter: its DTensor placements say which part of the global tensor this rank holds
(`local_region`: per mesh dim, Shard(d) splits dim d in torch.chunk pieces of ceil(n/P) rows, the last ones shorter
or empty, exactly as FSDP2 and DTensor lay them out; Replicate keeps it whole). The rows of dim 0 that region spans
are read from the file (safetensors: one byte range; a memory-mapped .pt: a view of the mapping whose pages are
handed back right after, see checkpoint.py), narrowed along the other dims, cast and copied into the local shard. So
FSDP2's Shard(0) reads exactly the shard; a parameter sharded along another dim (pos_embed (1, T, C) over T) reads
its whole rows once, at most one tensor. Tensor parallelism (parallel/tensor.py) keeps plain local parameters with a
SliceLayout each (ranges of the global tensor along one dim: a fused qkv's three per-head row blocks): the rows of a
dim-0 layout are read range by range, a layout along another dim reads the whole rows once and narrows them.

Parameters the model computes rather than learns (the spec's `derived`, DiT's sin-cos positions) are filled from the
model when the file has them for another size. Buffers the model was built with (not on meta: a diffusers or
transformers module built under `empty_weights()`, parallel/lean_pipeline.py, computes its non-persistent buffers in
__init__, e.g. PixArt's sin-cos positions, CLIP's position ids) keep those values when the file lacks them.
Everything else must come from the file: a missing tensor or a buffer on meta the spec does not derive is an error,
never uninitialised memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.models.spec import spec_for


@dataclass
class LoadStats:
    """What sharded loading did on this rank (for record.json)."""

    tensors: int = 0
    read_bytes: int = 0  # bytes read from the file on this rank (in the file's dtype)
    largest_read_bytes: int = 0  # the largest single read: the "one tensor in flight"
    local_bytes: int = 0  # bytes of this rank's parameter shards after loading
    derived: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"mode": "sharded", **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}}


def local_region(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) per dim of the part of the global tensor that this rank's local tensor holds."""
    region = [(0, n) for n in tensor.shape]
    spec = getattr(tensor, "_spec", None)  # a DTensor's placements; a plain tensor is whole
    if spec is None:
        return region
    mesh = spec.mesh
    coords = mesh.get_coordinate()
    if coords is None:
        raise OpenDiTError("this rank is not in the mesh of the parameter it is loading")
    for mesh_dim, placement in enumerate(spec.placements):
        if not placement.is_shard():
            continue  # Replicate: whole along every dim
        dim = placement.dim
        start, length = region[dim]
        chunk = -(-length // mesh.size(mesh_dim))  # torch.chunk: ceil(n / P) rows per piece, the last ones shorter
        offset = min(coords[mesh_dim] * chunk, length)
        region[dim] = (start + offset, max(0, min(chunk, length - offset)))
    return region


def _read_region(state: Mapping, key: str, region: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """(the region of tensor `key` of `state`, bytes read for it): its dim-0 rows are read alone where the format
    allows (safetensors), or viewed in the file's mapping (.pt), then narrowed along the other dims."""
    if not region:  # a scalar
        value = state[key]
        return value, value.element_size()
    start, length = region[0]
    if hasattr(state, "read_rows"):  # safetensors: read only those rows from the file
        rows = state.read_rows(key, start, length)
    else:  # a state dict of (memory-mapped) tensors: a view, nothing read until copied
        rows = state[key].narrow(0, start, length)
    box = rows
    for dim, (start, length) in enumerate(region[1:], 1):
        box = box.narrow(dim, start, length)
    return box, rows.numel() * rows.element_size()


def _read_slices(state: Mapping, key: str, layout) -> tuple[torch.Tensor, int]:
    """(the local tensor of a tensor-parallel SliceLayout, bytes read): dim-0 ranges are read one by one (only those
    rows from a safetensors file); another dim reads the rows once and narrows them."""
    if layout.dim == 0:
        parts = [
            _read_region(state, key, [(start, n), *((0, d) for d in layout.global_shape[1:])])
            for start, n in layout.ranges
        ]
        return torch.cat([p for p, _ in parts]), sum(nbytes for _, nbytes in parts)
    whole, nbytes = _read_region(state, key, [(0, d) for d in layout.global_shape])
    return torch.cat([whole.narrow(layout.dim, start, n) for start, n in layout.ranges], layout.dim), nbytes


def _check_shape(key: str, expected: tuple, found: tuple, path) -> None:
    if tuple(found) != tuple(expected):
        raise OpenDiTError(
            f"checkpoint {path}: tensor {key} has shape {tuple(found)}, the model needs {tuple(expected)}; "
            "is the checkpoint for this model and image size?"
        )


def fill_sharded(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    release: Callable[[torch.Tensor], None] = lambda tensor: None,
    path=None,
    derived: Mapping[str, Callable[[nn.Module], torch.Tensor]] | None = None,
) -> LoadStats:
    """Materialise `model` (parallelised on meta: its parameters DTensors with meta local shards) on `device` and fill
    every local shard from `state` (a lazy state dict: SafetensorsStateDict or memory-mapped tensors), one tensor at a
    time. `release(source)` hands a memory-mapped source's pages back after its copy. `derived`: name -> the value
    computed from the model where the file lacks it or has it for another size (default: the model spec's). Returns
    this rank's LoadStats."""
    start_s = time.perf_counter()
    from opendit.parallel.tensor import tensor_layouts

    derivable = spec_for(model).derived if derived is None else derived
    stats = LoadStats()
    layouts = tensor_layouts(model)  # the parameters --tp split: name -> SliceLayout of the global tensor
    built = {key: buf.detach().clone() for key, buf in model.named_buffers() if not buf.is_meta and key not in state}
    model.to_empty(device=device)  # local shards only (1/P of each parameter), uninitialised until filled below
    derived = []
    with torch.no_grad():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            region = local_region(tensor)
            if key in built:  # a buffer computed when the model was built, not in the file: its own value
                local.copy_(built.pop(key))
                derived.append(key)
                continue
            if key in derivable and (key not in state or _shape(state, key) != tuple(tensor.shape)):
                source = derivable[key](model)  # computed for the model's own size, (global shape)
                _check_shape(key, tuple(tensor.shape), tuple(source.shape), path)
                for dim, (start, length) in enumerate(region):
                    source = source.narrow(dim, start, length)
                local.copy_(source)
                derived.append(key)
                continue
            if key not in state:
                raise OpenDiTError(
                    f"checkpoint {path} has no tensor {key}, which {type(model).__name__} needs; is it this model's?"
                )
            layout = layouts.get(key)
            _check_shape(key, layout.global_shape if layout else tuple(tensor.shape), _shape(state, key), path)
            box, nbytes = _read_slices(state, key, layout) if layout else _read_region(state, key, region)
            local.copy_(box)  # cast to the parameter's dtype, moved to its device
            stats.tensors += 1
            stats.read_bytes += nbytes
            stats.largest_read_bytes = max(stats.largest_read_bytes, nbytes)
            if not hasattr(state, "read_rows"):
                release(state[key])  # the mapped pages of the source: resident until handed back
            del box
    stats.derived = tuple(derived)
    stats.local_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    stats.seconds = time.perf_counter() - start_s
    return stats


def _shape(state: Mapping, key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(state[key].shape)
