"""`opendit convert`: an official DiT `.pt`, a training checkpoint of `opendit train` or our own files -> our format
(`OUT.safetensors` + the `OUT.json` config sidecar that `save_safetensors` writes), streamed one tensor at a time.

Why a writer of our own: safetensors' `save_file` serialises every tensor into one in-memory buffer before it writes,
i.e. a second copy of the whole model (2.7 GB for DiT-XL/2 fp32). Here the header is computed from shapes and dtypes
alone (read without touching any weight), then each tensor's bytes go to the file in chunks, cast chunk by chunk when a
target dtype is asked for. Source tensors of a `.pt` are pages of a memory map, which count in the resident set once
read: each chunk's pages are handed back (checkpoint._PageReleaser) as soon as they are written. Peak beyond the
baseline: one chunk for `.pt` sources, one tensor for `.safetensors` sources (read with plain file reads).

File layout (the safetensors format): 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}} padded with spaces to a multiple
of 8, then the tensors' raw little-endian bytes, contiguous, in header order.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from opendit.errors import OpenDiTError
from opendit.io.checkpoint import (
    _ST_DTYPES,
    SafetensorsStateDict,
    _PageReleaser,
    check_state_dict,
    infer_config,
    inspect_checkpoint,
    locate_checkpoint,
    read_state_dict,
    sampling_defaults,
    tensor_shape,
)
from opendit.models.dit import ARCHS, DiTConfig, build_dit, preset
from opendit.models.precision import parse_dtype

_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}  # torch dtype -> safetensors code ("F32", ...)
CHUNK_BYTES = 1 << 22  # 4 MiB per write: bounds the cast buffer and the mapped pages held at once


def _header(entries: Iterable[tuple[str, tuple, torch.dtype]], metadata: Mapping[str, str] | None) -> tuple:
    """The padded JSON header and [(name, shape, dtype, nbytes)] in file order."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors __metadata__ must map str to str")
        header["__metadata__"] = dict(metadata)
    layout, offset = [], 0
    for name, shape, dtype in entries:
        if dtype not in _CODES:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors code ({', '.join(_ST_DTYPES)})")
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, shape, dtype, nbytes))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8), layout  # the format allows trailing spaces; data starts 8-byte aligned


def _write_tensor(handle, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype, release, chunk_bytes: int) -> None:
    """One tensor's bytes, `chunk_bytes` at a time. A function of its own so that every reference to the source tensor
    dies on return, before the next one is read (the caller's loop would otherwise hold two at once)."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"read_tensor returned shape {tuple(tensor.shape)}, the header says {shape}")
    flat = tensor.detach().cpu().reshape(-1)  # a view when contiguous (the usual case), else one copy
    step = max(1, chunk_bytes // max(dtype.itemsize, flat.element_size()))
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        out = piece.to(dtype)  # `piece` itself when no cast: the bytes go from the mapping straight to the file
        handle.write(memoryview(out.view(torch.uint8).numpy()))  # uint8 view: bf16 has no numpy dtype
        del out
        if release is not None:
            release(piece)  # hand this chunk's mapped pages back now, not after the whole tensor


def write_safetensors_streaming(
    path: str | Path,
    names_shapes_dtypes: Iterable[tuple[str, tuple, torch.dtype]],
    read_tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> int:
    """Write a .safetensors file holding one tensor in memory at a time; returns the file's size in bytes.

    `names_shapes_dtypes`: (name, shape, dtype) in file order, dtype being what is stored (read_tensor's result is
    cast to it, chunk by chunk). `read_tensor(name)` -> a tensor of that shape. `release(chunk)` is called on each
    written chunk of the source (to drop its mapped pages). Written to PATH.tmp, then renamed: a failure leaves nothing
    under `path` (and the tmp file is removed)."""
    if sys.byteorder != "little":  # raw tensor bytes are written as they lie in memory; the format is little-endian
        raise OpenDiTError("writing safetensors needs a little-endian machine")
    path = Path(path)
    blob, layout = _header(names_shapes_dtypes, metadata)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for name, shape, dtype, nbytes in layout:
                before = handle.tell()
                _write_tensor(handle, read_tensor(name), shape, dtype, release, chunk_bytes)
                if handle.tell() - before != nbytes:  # cannot happen for a tensor of the right shape; never silent
                    raise ValueError(f"tensor {name}: wrote {handle.tell() - before} bytes, expected {nbytes}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _preset_name(config: DiTConfig) -> str | None:
    """The preset of this architecture (depth, width, heads, patch), or None."""
    for size, arch in ARCHS.items():
        if arch == (config.depth, config.hidden_size, config.num_heads) and config.patch_size in (2, 4, 8):
            return f"DiT-{size}/{config.patch_size}"
    return None


def _infer_preset(found: dict, path: Path) -> str:
    """The preset whose depth and width the tensors have (heads are not readable from shapes; presets fix them)."""
    for size, (depth, hidden, _) in ARCHS.items():
        if (depth, hidden) == (found["depth"], found["hidden_size"]) and found["patch_size"] in (2, 4, 8):
            return f"DiT-{size}/{found['patch_size']}"
    raise OpenDiTError(
        f"checkpoint {path} carries no config and its architecture (depth {found['depth']}, hidden "
        f"{found['hidden_size']}, patch {found['patch_size']}) matches no preset; pass --model NAME (a preset of that "
        f"architecture, see `opendit models`), or convert a checkpoint that carries its config (a training checkpoint "
        f"of opendit train, or a .safetensors with its .json)"
    )


def _config_from_shapes(shapes: Mapping, path: Path, model: str | None, image_size: int | None) -> tuple:
    """(config, preset name, inferred?) of a bare state dict: the preset's architecture plus what the shapes say
    (channels, learned sigma, classes, token grid)."""
    found = infer_config(shapes)
    name = model or _infer_preset(found, path)
    base = preset(name)
    latent = found["in_channels"] == 4  # the sd-vae latents; other channel counts are pixel-space models
    null_rows = int(base.class_dropout_prob > 0)  # the CFG null class is one extra embedding row
    config = replace(
        base,
        in_channels=found["in_channels"],
        learn_sigma=found["learn_sigma"],
        num_classes=found["classes_rows"] - null_rows,
        latent=latent,
    )
    if image_size is not None:
        return config.with_image_size(image_size), name, model is None
    side = math.isqrt(found["num_tokens"])
    if side * side != found["num_tokens"]:
        raise OpenDiTError(
            f"checkpoint {path}: pos_embed holds {found['num_tokens']} tokens, not a square grid, so the image size "
            f"cannot be inferred; pass --image-size (square only), or convert a checkpoint that carries its config"
        )
    grid = side * config.patch_size  # the model's input side (latent or pixel)
    return replace(config, input_size=(grid, grid)), name, model is None


def _resolve_config(info, shapes: Mapping, path: Path, model: str | None, image_size: int | None) -> tuple:
    """(config, preset name or None, inferred?): the source's own config if it has one, else one from the shapes."""
    if info.config is None:
        return _config_from_shapes(shapes, path, model, image_size)
    config = info.config
    if model is not None:
        wanted = preset(model)
        arch = ("depth", "hidden_size", "num_heads", "patch_size")
        if any(getattr(wanted, k) != getattr(config, k) for k in arch):
            own = _preset_name(config) or ", ".join(f"{k} {getattr(config, k)}" for k in arch)
            raise OpenDiTError(
                f"checkpoint {path} carries its own config ({own}), which is not --model {model}; drop --model"
            )
    if image_size is not None:
        config = config.with_image_size(image_size)
    return config, _preset_name(config), False


def _check_paths(ckpt: str | Path, out: str | Path, force: bool) -> tuple[Path, Path]:
    """(weights file of the source, output path), refusing outputs that would lose data or could not be loaded."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise OpenDiTError(f"output {out} must end in .safetensors (its config goes beside it as .json); "
                           f"pass {out.with_suffix('.safetensors')}")  # fmt: skip
    if out.is_dir():
        raise OpenDiTError(f"output {out} is a directory; pass a file path ending in .safetensors")
    source = locate_checkpoint(ckpt)
    if out.resolve() == source.resolve() or out.with_suffix(".json").resolve() == source.resolve():
        raise OpenDiTError(f"output {out} is the checkpoint being converted; pass another output path")
    if not force:
        for target in (out, out.with_suffix(".json")):
            if target.exists():
                raise OpenDiTError(f"{target} already exists; pass --force to overwrite it, or another output path")
    return source, out


def _source_dtypes(state: Mapping, path: Path) -> dict:
    """Each tensor's dtype, without reading a weight: mapped tensors know theirs, a safetensors header names it."""
    if not isinstance(state, SafetensorsStateDict):
        return {k: state[k].dtype for k in state}
    with open(path, "rb") as handle:  # SafetensorsStateDict has checked this header already
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {k: _ST_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__"}


def _target(source: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """--dtype applies to floating tensors only (an integer buffer keeps its type)."""
    return dtype if dtype is not None and source.is_floating_point else source


def convert_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    use: str | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> dict:
    """Convert `ckpt` (official .pt, training .pt or run directory, our .safetensors) to `out` (.safetensors) + its
    .json sidecar, streaming. `use`: "ema" (default) or "model" weights of a training checkpoint; `dtype`: target
    dtype of floating tensors (default: keep each one's). Returns {path, sidecar, bytes, tensors, seconds, config,
    preset, inferred, dtype, source}. Every check runs before anything is written."""
    start = time.perf_counter()
    source, out = _check_paths(ckpt, out, force)
    target = parse_dtype(dtype) if dtype is not None else None
    info = inspect_checkpoint(source, use)  # every way the file can be wrong -> one line; reads no weights
    state = read_state_dict(source, use)  # lazily mapped (.pt) or read on demand (.safetensors)
    config, name, inferred = _resolve_config(info, state, source, model, image_size)
    skeleton = build_dit(config, device="meta")  # shapes only: no memory, no init
    check_state_dict(skeleton, state, source)  # before anything is written
    dtypes = _source_dtypes(state, source)
    keys = list(skeleton.state_dict())  # the model's order; the same keys as the source's (checked)
    entries = [(k, tensor_shape(state, k), _target(dtypes[k], target)) for k in keys]
    meta = {k: v for k, v in (info.meta or {}).items() if k != "model"}  # a source's own sampling settings win
    sidecar = {"model": config.to_dict(), **sampling_defaults(config.to_dict()), **meta}
    release = None if isinstance(state, SafetensorsStateDict) else _PageReleaser(source)
    try:  # a missing output folder is made, as `opendit sample --out` does
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise OpenDiTError(f"cannot create the output folder {out.parent} ({why}); pass another output path") from None
    json_tmp = out.with_name(out.stem + ".json.tmp")
    json_tmp.write_text(json.dumps(sidecar, indent=2))
    try:
        size = write_safetensors_streaming(
            out, entries, state.__getitem__, {"format": "pt", "opendit_config": json.dumps(config.to_dict())}, release
        )
        os.replace(json_tmp, out.with_suffix(".json"))
    finally:
        json_tmp.unlink(missing_ok=True)
    stored = sorted({str(d).removeprefix("torch.") for _, _, d in entries})
    return {
        "path": out,
        "sidecar": out.with_suffix(".json"),
        "source": source,
        "bytes": size,
        "tensors": len(entries),
        "seconds": time.perf_counter() - start,
        "config": config.to_dict(),
        "preset": name,
        "inferred": inferred,
        "image_size": config.image_size,
        "dtype": "/".join(stored),
    }


def describe(summary: dict) -> str:
    """One line for the command line: what was written, size, tensors, time."""
    model = summary["preset"] or "custom DiT"
    how = " (preset inferred from the tensor shapes)" if summary["inferred"] else ""
    height, width = summary["image_size"]
    return (
        f"wrote {summary['path']} (+ {summary['sidecar'].name}): {model}{how} at {height}x{width}, "
        f"{summary['tensors']} tensors, {summary['dtype']}, {summary['bytes'] / 1e6:.1f} MB, "
        f"in {summary['seconds']:.1f} s"
    )
