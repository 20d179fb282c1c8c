"""Lean loading of a diffusers pipeline's big modules: under `--shard-weights` the transformer(s), under
`--encoder-shard` each text encoder, are never whole on any rank. Without it the pipeline was loaded whole on every
rank and sharded afterwards, so the loading peak was the whole pipeline per rank whatever the sharding saved later.

The order is sharded_loading.py's (torchtitan's), for any diffusers / transformers module class:

    with empty_weights(): model = cls.from_config(config)     # parameters on meta; buffers real (computed by __init__)
    cast on meta to the pipeline's dtype (keep-in-fp32 modules as the library's own loading keeps them)
    parallelize / apply_weight_sharding on meta                # FSDP2 units: DTensors with meta local shards
    fill_sharded(model, FolderState(component folder), device) # local shards allocated, read row range by row range

`FolderState` is a lazy state dict over a component folder's safetensors: one file, or several with their
`*.safetensors.index.json` (weight_map: tensor -> file). Each read is the rows of one tensor that this rank holds, so
a rank's loading peak is its shards plus one tensor in flight (its rows, for FSDP2's Shard(0)).

Text encoders (`--encoder-shard`): FSDP2 over all ranks; every rank runs the encoder on the same prompts with each
unit's weights all-gathered just before it runs (an exact copy), so every rank computes the one-process embeddings
itself and nothing is broadcast. Units, found generically: the blocks of the encoder's largest nn.ModuleList (T5's
encoder.block, CLIP's encoder.layers), each split into the parts it calls (sharding.split_block_units: T5's attention
layer and its feed-forward's wi_0, wi_1, wo; a gathered part costs ~2.5x its size, so smaller parts lower the
call's peak), and its untied nn.Embedding modules outside them (CLIP's token and position tables); the rest (final
norms; T5's shared table, tied between `shared` and `encoder.embed_tokens`, which FSDP2 can only keep tied inside
one unit: vocab x d, 0.5 GB for T5-XXL in fp32) stays in the root unit, gathered for the whole forward.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from opendit.errors import OpenDiTError
from opendit.io.checkpoint import SafetensorsStateDict

INDEX_SUFFIX = ".safetensors.index.json"


class FolderState(Mapping):
    """A read-only lazy state dict over a component folder's safetensors (one file, or sharded with an index): the
    interface fill_sharded reads (`read_rows`, `shape`), each tensor from the file that holds it."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
        files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name and ".bf16." not in p.name)
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]  # tensor name -> file in the folder
            opened = {name: SafetensorsStateDict(folder / name) for name in sorted(set(weight_map.values()))}
            self._where = {key: opened[name] for key, name in weight_map.items()}
        elif len(files) == 1:
            single = SafetensorsStateDict(files[0])
            self._where = dict.fromkeys(single, single)
        else:
            found = ", ".join(p.name for p in sorted(folder.iterdir())) if folder.is_dir() else "no such folder"
            raise OpenDiTError(
                f"lean loading reads one .safetensors file or an index of them from {folder}, found: {found}; "
                "re-save the pipeline with save_pretrained(safe_serialization=True), or drop --shard-weights / "
                "--encoder-shard"
            )
        self.folder = folder

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def read_rows(self, key: str, start: int, length: int) -> torch.Tensor:
        return self._where[key].read_rows(key, start, length)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _Aliased(Mapping):
    """`state` with transformers' tied names resolved: a parameter saved under its tie partner's name (T5's
    encoder.embed_tokens.weight for shared.weight) is read from there."""

    def __init__(self, state: Mapping, ties: Mapping[str, str]):
        self._state, self._alias = state, {}
        for target, source in ties.items():
            for want, have in ((target, source), (source, target)):
                if want not in state and have in state:
                    self._alias[want] = have

    def _key(self, key: str) -> str:
        return self._alias.get(key, key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._state[self._key(key)]

    def read_rows(self, key: str, start: int, length: int) -> torch.Tensor:
        return self._state.read_rows(self._key(key), start, length)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._state.shape(self._key(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._key(key) in self._state

    def __iter__(self) -> Iterator[str]:
        return iter([*self._state, *self._alias])

    def __len__(self) -> int:
        return len(self._state) + len(self._alias)


@contextlib.contextmanager
def empty_weights():
    """Parameters created on meta (no memory), buffers on the CPU as the module's __init__ computes them (a
    non-persistent buffer such as PixArt's sin-cos positions is not in the file: it keeps its computed value)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def component_class(folder: str | Path, name: str):
    """The class of pipeline component `name` (model_index.json: [library, class name])."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name)


def build_on_meta(folder: str | Path, name: str, dtype: torch.dtype) -> nn.Module:
    """Component `name` of the pipeline folder built from its config with its parameters on meta, in `dtype` (the
    modules the library keeps in fp32 for that dtype kept in fp32, as its from_pretrained does), in eval mode."""
    cls, path = component_class(folder, name), Path(folder) / name
    with empty_weights():
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            model = cls.from_config(cls.load_config(path))
            keep = getattr(cls, "_keep_in_fp32_modules", None) if dtype == torch.float16 else None
        else:  # transformers PreTrainedModel
            from opendit.io.quiet import quiet_transformers

            with quiet_transformers():
                config = cls.config_class.from_pretrained(path)
                model = cls._from_config(config, dtype=dtype)
            plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
            keep = list(plan)
    nn.Module.to(model, dtype)  # on meta: only the recorded dtype changes (nn.Module's: diffusers' own warns)
    for pattern in keep or ():  # a module name component (T5's "wo"): its parameters stay fp32
        for module_name, module in model.named_modules():
            if pattern in module_name.split("."):
                nn.Module.to(module, torch.float32)
    if hasattr(model, "tie_weights"):  # transformers: as from_pretrained leaves it (T5's shared = embed_tokens)
        model.tie_weights()  # after the casts, which on meta give each module a parameter of its own
    return model.eval()


def fill_component(model: nn.Module, folder: str | Path, name: str, device: torch.device):
    """Materialise `model` (parallelised / sharded on meta) on `device` from the folder's `name` safetensors."""
    from opendit.parallel.sharded_loading import fill_sharded

    state = FolderState(Path(folder) / name)
    ties = getattr(model, "_tied_weights_keys", None)
    if isinstance(ties, Mapping) and ties:
        state = _Aliased(state, ties)
    return fill_sharded(model, state, device, path=Path(folder) / name, derived={})


def encoder_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of a text encoder: the blocks of its largest ModuleList (each as its parts,
    sharding.split_block_units) and its untied nn.Embedding modules outside them, in registration order (their
    forward order in T5 and CLIP)."""
    from opendit.parallel.sharding import split_block_units

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    inside = {id(m) for block in blocks for m in block.modules()}
    owners: dict[int, int] = {}  # parameter -> how many modules hold it (a tied table: T5's shared, embed_tokens)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    units, seen = [], set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, nn.Embedding) and id(module) not in inside and owners[id(module.weight)] == 1:
            units.append(module)  # a tied table stays in the root unit (FSDP2 ties parameters within one unit)
        elif module is blocks:  # each block as its attention and feed-forward parts (T5: block.layer[0], [1])
            units.extend(split_block_units(list(blocks)))
    return units


def shard_encoder(folder: str | Path, name: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, dict]:
    """Text encoder `name` built on meta, FSDP2-sharded over all ranks, its local shards filled from the folder:
    (the encoder, its loading record). OpenDiTError when it has no list of blocks to shard."""
    from torch.distributed.device_mesh import DeviceMesh

    from opendit.distributed.env import inject_phase_fault
    from opendit.parallel.sharding import apply_weight_sharding, sharded_parameter_bytes

    model = build_on_meta(folder, name, dtype)
    units = encoder_units(model)
    if not units:
        raise OpenDiTError(f"{name} ({type(model).__name__}) has no list of blocks to shard; drop --encoder-shard")
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)  # every rank: (world,)
    apply_weight_sharding(model, mesh, units=units, root_used_after_units=True)
    stats = fill_component(model, folder, name, device)
    # test hook: one rank fails as the encoder starts while the others wait in its first unit's all-gather
    model.register_forward_pre_hook(lambda module, args: inject_phase_fault("encode"))
    return model, {**stats.to_dict(), "units": len(units), "bytes": sharded_parameter_bytes(model)}
