"""Checkpoint I/O: official DiT `.pt` files, training checkpoints, and our own safetensors + JSON config.

Loading is memory-lean: the model is built on the `meta` device (no memory, no init), tensors are read one at a time,
cast to the target dtype and device, and adopted by `load_state_dict(assign=True)`, so no second copy of the model is
ever held. Peak while loading = the model in its target dtype + one source tensor (tests/test_loading_memory.py).

Why not plain mmap: pages of a memory-mapped file that have been read count in the process's resident set until the
mapping goes away, so mmap-reading a 2.7 GB fp32 DiT-XL/2 file into a 1.35 GB bf16 model peaked at 4.1 GB (3.0x the
bf16 bytes, measured). Hence: safetensors tensors are read with ordinary file reads at the offsets of the file's header
(page cache, not resident set); `.pt` files (a zip that only torch's unpickler understands) are still opened with
torch.load(mmap=True), and after each tensor is cast, its pages are handed back with madvise(MADV_DONTNEED) - safe for a
private, read-only file mapping: a page that is touched again is re-read from the file (Linux; elsewhere a no-op).

Checking: `inspect_checkpoint` reads a source's headers and tensor shapes (no weights) in the caller, before any process
starts, and turns every way a file can be wrong into one OpenDiTError line naming the file, the cause and the fix.
Sources: a file, or a run directory of `opendit train` (its checkpoints/latest.pt); the model config comes from the
.json beside the weights or from a training checkpoint's own "model_config".
"""

import argparse
import copy
import ctypes
import functools
import hashlib
import json
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from opendit.errors import OpenDiTError
from opendit.models.dit import ARCHS, DiT, DiTConfig, build_dit

# Finding and opening checkpoint files, with one message per way a file can be wrong (each naming the fix).
#
# A source is a file or a run directory of `opendit train` (its checkpoints/latest.pt). `.pt` files are opened with
# torch.load(weights_only=True): tensors and plain data only; a file whose pickle would run code is refused with a way
# out (`resave_trusted`) that is only for files the user trusts. The formats and loading follow below.
# What a checkpoint may be, for the messages that ask for one.
KINDS = "an official DiT .pt, a training .pt of opendit train (or its --out run directory), or a .safetensors + .json"


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def locate_checkpoint(ckpt: str | Path) -> Path:
    """The weights file of a source: the file itself, or a run directory's checkpoints/latest.pt."""
    path = Path(ckpt)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "latest.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
        if (path / "config.json").is_file() or (path / "checkpoints").is_dir():
            raise OpenDiTError(
                f"run directory {path} has no checkpoint yet (no checkpoints/latest.pt): train until it saves one "
                f"(opendit train --out {path} --ckpt-every K), or pass a checkpoint file"
            )
        files = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
        fix = f"pass --ckpt {files[0]}" if files else f"pass {KINDS}"
        raise OpenDiTError(
            f"{path} is a directory, not a run directory of opendit train (no checkpoints/latest.pt); {fix}"
        )
    if not path.is_file():
        raise OpenDiTError(f"checkpoint {path} does not exist; check the path, or pass {KINDS}")
    return path


def _newest_sibling(path: Path) -> Path | None:
    """The newest other numbered checkpoint beside `path` (training keeps a few): a fix for a damaged latest.pt."""
    others = sorted(p for p in path.parent.glob("step_*.pt") if p.name != path.name)
    return others[-1] if others else None


def _load_error(path: Path, exc: Exception, resume: bool) -> OpenDiTError:
    """One message per way torch.load fails, each with a fix that works (tests/test_checkpoint_errors.py runs them)."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        target = path if resume else path.with_name(f"{path.stem}-tensors.pt")
        use = "then resume again" if resume else f"then pass --ckpt {target}"
        return OpenDiTError(
            f"checkpoint {path} contains pickled code ({found.group(1) if found else 'a non-tensor object'}), which "
            f"OpenDiT will not execute (it loads with torch.load(weights_only=True)); only if you trust its source, "
            f'keep just its tensors: python -c "from opendit.io.checkpoint import resave_trusted; '
            f'resave_trusted({str(path)!r}, {str(target)!r})", {use}'
        )
    sibling = _newest_sibling(path)
    if sibling is None:
        alt = ""
    elif resume:
        alt = f", or resume from the newest numbered checkpoint: cp {sibling} {path}"
    else:
        alt = f", or pass --ckpt {sibling} (the newest other checkpoint beside it)"
    reason = first_line(exc).split(". ")[0]
    return OpenDiTError(
        f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch file ({type(exc).__name__}: "
        f"{reason}); copy or download an intact DiT checkpoint again{alt}"
    )


def _allowed_globals():
    """Plain-data classes that DiT checkpoints pickle and that run no code when rebuilt: the official DiT training
    script saves its argparse.Namespace as "args"."""
    return torch.serialization.safe_globals([argparse.Namespace])  # torch >= 2.5, as pyproject requires


def load_torch_file(path: str | Path, map_location="cpu", mmap: bool = True, resume: bool = False) -> object:
    """torch.load(weights_only=True): tensors and plain data only, never code. Failures: OpenDiTError naming the fix
    (`resume`: the fixes for `opendit train --resume`)."""
    path = Path(path)
    try:
        with _allowed_globals():
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except (RuntimeError, ValueError) as exc:  # a pre-zip (torch < 1.6) file cannot be mapped: read it whole
                if not mmap or "mmap can only be used" not in str(exc):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file becomes one message
        raise _load_error(path, exc, resume) from exc


def _plain(obj: object) -> object:
    """obj with only tensors and plain data kept (dicts, lists, numbers, strings): what weights_only loads."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        kept = {k: _plain(v) for k, v in obj.items() if isinstance(k, (str, int))}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return (list if isinstance(obj, list) else tuple)(v for v in map(_plain, obj) if v is not _DROP)
    if isinstance(obj, torch.Tensor):
        return obj.detach()  # a Parameter becomes a plain tensor
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Size, torch.dtype, torch.device)):
        return obj
    return _DROP


_DROP = object()


def resave_trusted(source: str | Path, target: str | Path) -> Path:
    """For a checkpoint you trust that pickles code: load it with the code run (weights_only=False), keep only its
    tensors and plain data, and save that to `target` (which may be `source`), loadable with weights_only=True."""
    target = Path(target)
    obj = torch.load(source, map_location="cpu", weights_only=False)  # the caller vouches for this file
    tmp = target.with_name(target.name + ".tmp")
    torch.save(_plain(obj), tmp)
    os.replace(tmp, target)
    return target


def config_from_dict(data: dict):
    """A saved model config -> DiTConfig, or VideoDiTConfig (models/video_dit.py) when it has frames."""
    from opendit.models.video_dit import VideoDiTConfig

    return VideoDiTConfig.from_dict(data) if "frames" in data else DiTConfig.from_dict(data)


def build_model(config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A DiT or a video DiT (by the config's type) on `device` ("meta": no memory, no init)."""
    from opendit.models.video_dit import VideoDiTConfig, build_video_dit

    if isinstance(config, VideoDiTConfig):
        return build_video_dit(config, device=device, dtype=dtype)
    return build_dit(config, device=device, dtype=dtype)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Keys every DiT state dict has: a file without them holds some other model's tensors.
_DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight")


def _pick_weights(obj: object, path: Path, use: str | None = None) -> Mapping[str, torch.Tensor]:
    """Official files are raw EMA state dicts; training checkpoints are {"model","ema","opt","args"}: `use` if given,
    else EMA (the weights to sample with)."""
    if isinstance(obj, SafetensorsStateDict):
        return obj
    if not isinstance(obj, dict):
        raise OpenDiTError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (tensor names -> tensors); pass {KINDS}"
        )
    for key in dict.fromkeys((use, "ema", "model", "state_dict")):
        if key is not None and isinstance(obj.get(key), dict):
            return obj[key]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        found = f"its entries {', '.join(map(repr, bad[:4]))} are not tensors" if bad else "it is empty"
        raise OpenDiTError(f"checkpoint {path} is not a DiT state dict ({found}); pass {KINDS}")
    return obj


def _check_dit_keys(state: Mapping, path: Path) -> None:
    missing = [k for k in _DIT_KEYS if k not in state]
    if not missing and any(k.startswith("blocks.") for k in state):
        return
    names = ", ".join(list(state)[:3]) + (", ..." if len(state) > 3 else "")
    raise OpenDiTError(
        f"checkpoint {path} holds {len(state)} tensor(s) but no DiT weights (no {', '.join(missing) or 'blocks.*'}; "
        f"it has {names or 'nothing'}); pass {KINDS}"
    )


# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec) -> torch dtypes.
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _damaged(path: Path, detail: str) -> OpenDiTError:
    return OpenDiTError(
        f"cannot read checkpoint {path}: it is not an intact .safetensors file ({detail}); copy or download it again, "
        f"or re-export it (opendit train --export)"
    )


def _entry_span(key: str, entry: dict) -> tuple[int, int]:
    """(start, end) of one header entry's data, after checking the entry is well formed (ValueError if not)."""
    if entry["dtype"] not in _ST_DTYPES:
        raise ValueError(f"tensor {key} has dtype {entry['dtype']}, not one of {', '.join(_ST_DTYPES)}")
    start, end = (int(v) for v in entry["data_offsets"])
    count = math.prod(int(dim) for dim in entry["shape"])
    if not 0 <= start <= end or end - start != count * _ST_DTYPES[entry["dtype"]].itemsize:
        raise ValueError(f"tensor {key}: offsets {start}..{end} do not fit shape {entry['shape']}")
    return start, end


class SafetensorsStateDict(Mapping):
    """A read-only state dict over a safetensors file: each tensor is read from disk only when asked for.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the data
    (offsets relative to the end of the header). Reads use the file, not mmap (see the module docstring for why).
    """

    def __init__(self, path: Path):
        self._path = path
        file_size = os.path.getsize(path)
        try:
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > file_size - 8:
                    raise ValueError(f"header length {size} exceeds the file size {file_size}")
                header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            spans = [(key, _entry_span(key, entry)) for key, entry in header.items()]
        except (struct.error, ValueError, TypeError, AttributeError, KeyError) as exc:  # JSON and Unicode errors too
            raise _damaged(path, f"damaged header: {type(exc).__name__}: {first_line(exc)}") from None
        self._base = 8 + size
        self._entries = header
        needed = max((end for _, (_, end) in spans), default=0)
        if self._base + needed > file_size:  # a download or copy cut short: found here, not at the last tensor
            raise _damaged(path, f"truncated: its header lists {needed} bytes of tensors, the file holds "
                           f"{file_size - self._base}")  # fmt: skip

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = self.shape(key)  # KeyError for unknown keys, as a dict
        return self.read_rows(key, 0, shape[0] if shape else 1)

    def read_rows(self, key: str, start: int, length: int) -> torch.Tensor:
        """Rows [start, start + length) of dim 0 of tensor `key` (row-major: one contiguous byte range), read from
        the file without the rest: what sharded loading reads for a rank's shard."""
        entry = self._entries[key]
        dtype, shape = _ST_DTYPES[entry["dtype"]], list(entry["shape"])
        row = dtype.itemsize * math.prod(shape[1:]) if shape else dtype.itemsize
        first, _ = entry["data_offsets"]
        buffer = bytearray(row * length)
        with open(self._path, "rb") as handle:
            handle.seek(self._base + first + row * start)
            if handle.readinto(buffer) != len(buffer):  # the file shrank since it was opened
                raise _damaged(self._path, f"truncated at tensor {key}")
        out_shape = [length, *shape[1:]] if shape else []
        if not buffer:
            return torch.empty(out_shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(out_shape)  # owns `buffer`; freed with the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])


def _madvise():
    """libc madvise, or None where it is unavailable (then mapped pages are simply not released early)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which `path` is memory-mapped in this process (from /proc/self/maps; [] elsewhere)."""
    target, ranges = str(path.resolve()), []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target:
                    lo, hi = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


class _PageReleaser:
    """Hands back the resident pages of tensors that live in a read-only file mapping of `path` (torch.load mmap)."""

    def __init__(self, path: Path):
        self._fn = _madvise()
        self._ranges = _file_mappings(path) if self._fn else []

    def __call__(self, tensor: torch.Tensor) -> None:
        if not self._ranges or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for lo, hi in self._ranges:  # only ever inside the file's mapping: dropping those pages cannot lose data
            a, b = max(lo, start // page * page), min(hi, -(-end // page) * page)
            if a < b:
                self._fn(a, b - a, mmap.MADV_DONTNEED)


def tensor_shape(state: Mapping, key: str) -> tuple[int, ...]:
    """Works on state dicts, SafetensorsStateDict (reads no tensor) and CheckpointInfo.shapes (name -> shape)."""
    if isinstance(state, SafetensorsStateDict):
        return state.shape(key)
    value = state[key]
    return value if isinstance(value, tuple) else tuple(value.shape)


def read_state_dict(path: str | Path, use: str | None = None) -> Mapping[str, torch.Tensor]:
    """Tensors of a `.pt`/`.pth`/`.safetensors` checkpoint (or a run directory), lazily mapped where the format
    allows. `use`: "ema" or "model" weights of a training checkpoint (default: EMA)."""
    path = locate_checkpoint(path)
    obj = SafetensorsStateDict(path) if path.suffix == ".safetensors" else load_torch_file(path)
    return _pick_weights(obj, path, use)


# How `opendit train --export` records a trained model's sampling (cli/train.py's --sample-steps and --cfg-scale).
TRAINED_STEPS, TRAINED_CFG_SCALE = 30, 3.0


def sampling_defaults(model: dict) -> dict:
    """How to sample a model trained by opendit train, as `opendit train --export` records it: 30 steps, CFG 3
    (1 when it was trained without label dropout: it has no unconditional class then)."""
    guided = model.get("class_dropout_prob", 0) > 0
    scheduler = "flow-euler" if model.get("prediction") == "flow" else "ddim"
    return {"scheduler": scheduler, "steps": TRAINED_STEPS, "cfg_scale": TRAINED_CFG_SCALE if guided else 1.0}


def _config_from(meta: object, source: Path) -> DiTConfig:
    """The DiTConfig of a sidecar / training checkpoint's metadata; OpenDiTError if it is not one."""
    model = meta.get("model") if isinstance(meta, dict) else None
    try:
        if not isinstance(model, dict):
            raise ValueError(
                "it has no 'model' entry" if isinstance(meta, dict) else f"it holds a {type(meta).__name__}"
            )
        required = [f.name for f in fields(DiTConfig) if f.default is MISSING]  # depth, hidden_size, heads, patch
        if [k for k in required if k not in model]:
            raise ValueError(f"its model entry lacks {', '.join(k for k in required if k not in model)}")
        config = config_from_dict(model)
        if not all(isinstance(model[k], int) for k in required):
            raise ValueError(f"{', '.join(required)} must be integers")
    except (TypeError, ValueError, KeyError) as exc:  # OpenDiTError (unknown keys) is a ValueError
        raise OpenDiTError(
            f"config {source} is not an OpenDiT model config ({first_line(exc)}); {_SIDECAR_FIX}"
        ) from None
    return config


_SIDECAR_FIX = "restore the .json written with the weights (opendit train --export), or pass --ckpt RUN_DIR (their run)"


def _read_json(sidecar: Path) -> dict:
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenDiTError(f"config {sidecar} is not valid JSON ({first_line(exc)}); {_SIDECAR_FIX}") from None
    _config_from(meta, sidecar)
    return meta


@dataclass(frozen=True)
class CheckpointInfo:
    """What a source holds, read without its weights: the weights file, its metadata ({"model": config, and the
    sampling "steps"/"scheduler"/"cfg_scale" where known}; None for a bare state dict), every tensor's shape."""

    path: Path
    meta: dict | None
    shapes: dict

    @property
    def config(self):
        """DiTConfig or VideoDiTConfig, or None for a bare state dict."""
        return config_from_dict(self.meta["model"]) if self.meta is not None else None


def inspect_checkpoint(ckpt: str | Path, use: str | None = None) -> CheckpointInfo:
    """Check a source as far as it can be without loading weights; OpenDiTError (one line: file, cause, fix) if bad.
    Cached per file version: a request resolves its model more than once."""
    path = locate_checkpoint(ckpt)
    return _inspect(path, _version(path), _version(path.with_suffix(".json")), use)


def _version(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a file, None if absent: a rewritten weights file or sidecar is inspected again."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _inspect(path: Path, version: tuple, sidecar_version: tuple | None, use: str | None) -> CheckpointInfo:
    obj = SafetensorsStateDict(path) if path.suffix == ".safetensors" else load_torch_file(path)
    state = _pick_weights(obj, path, use)
    _check_dit_keys(state, path)
    sidecar = path.with_suffix(".json")
    meta = None
    if sidecar.is_file():
        meta = _read_json(sidecar)
    elif isinstance(obj, dict) and "model_config" in obj:  # a training checkpoint carries its model's config
        config = _config_from({"model": obj["model_config"]}, path).to_dict()
        meta = {"model": config, **sampling_defaults(config)}
    return CheckpointInfo(path, meta, {k: tensor_shape(state, k) for k in state})


def check_fits(info: CheckpointInfo, config: DiTConfig) -> None:
    """Raise the mismatch message (check_state_dict) if `info`'s tensors do not fit `config`; reads no weights."""
    check_state_dict(build_model(config, device="meta"), info.shapes, info.path)


def infer_config(state: Mapping[str, torch.Tensor]) -> dict:
    """Architecture facts readable from tensor shapes (heads are not: they come from the preset of that depth/width)."""
    try:
        _, tokens, hidden = tensor_shape(state, "pos_embed")  # (1, T, hidden)
        proj = tensor_shape(state, "x_embedder.proj.weight")  # (hidden, C_in, p, p)
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_features = tensor_shape(state, "final_layer.linear.weight")[0]  # p*p*out_channels
        classes = tensor_shape(state, "y_embedder.embedding_table.weight")[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise OpenDiTError(f"checkpoint does not look like a DiT (missing {exc}); is it a DiT checkpoint?") from exc
    patch, in_channels = proj[-1], proj[1]
    out_channels = out_features // (patch * patch)
    return {
        "depth": depth,
        "hidden_size": hidden,
        "patch_size": patch,
        "in_channels": in_channels,
        "learn_sigma": out_channels == 2 * in_channels,
        "num_tokens": tokens,
        "classes_rows": classes,
        "frames": tensor_shape(state, "temp_embed")[1] if "temp_embed" in state else None,  # a video DiT (Latte)
    }


def describe_mismatch(config: DiTConfig, state: Mapping[str, torch.Tensor]) -> str | None:
    """A message naming the model the checkpoint is for, if it is not `config`'s architecture."""
    found = infer_config(state)
    video = getattr(config, "frames", None)
    expected = {
        "depth": config.depth,
        "hidden_size": config.hidden_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "learn_sigma": config.learn_sigma,
        "frames": video,
    }
    wrong = {k: (v, found[k]) for k, v in expected.items() if found[k] != v}
    if not wrong:
        return None
    from opendit.models.video_dit import LATTE_ARCHS

    family, archs = ("Latte", LATTE_ARCHS) if found["frames"] is not None else ("DiT", ARCHS)
    names = [
        f"{family}-{s}/{found['patch_size']}"
        for s, (d, h, _) in archs.items()
        if (d, h) == (found["depth"], found["hidden_size"])
    ]
    guess = f" It looks like {names[0]}; pass --model {names[0]}." if names else ""
    details = ", ".join(f"{k} expected {e} found {f}" for k, (e, f) in wrong.items())
    return f"checkpoint is for another model ({details}).{guess}"


def check_state_dict(model: DiT, state: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Raise an OpenDiTError listing missing/unexpected keys and every shape mismatch (expected vs found); its first
    line names the file (`path`), the cause and the fix, the next ones the details."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)} found {tensor_shape(state, k)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tensor_shape(state, k)
    ]
    if not (missing or unexpected or shapes):
        return
    first = describe_mismatch(model.config, state) or "checkpoint does not match the model."
    lines = [first if path is None else f"{first} (checkpoint {path})"]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
    if shapes:
        lines.append("shape mismatches: " + "; ".join(shapes[:12]))
        if any(k == "pos_embed" for k in state) and "pos_embed" in "".join(shapes):
            grid = int(tensor_shape(state, "pos_embed")[1] ** 0.5)
            lines.append(
                f"(the checkpoint's pos_embed is for a {grid}x{grid} token grid; choose the matching --image-size)"
            )
    raise OpenDiTError("\n  ".join(lines))


def open_for_model(
    config: DiTConfig, ckpt: str | Path, dtype: torch.dtype = torch.float32, use: str | None = None
) -> tuple[DiT, Mapping[str, torch.Tensor], Callable[[torch.Tensor], None], Path]:
    """(the model built on meta, the checkpoint's lazy state dict checked against it, the page releaser of a
    memory-mapped source, the weights file). Nothing is read but headers and shapes."""
    ckpt = locate_checkpoint(ckpt)
    state = read_state_dict(ckpt, use)
    model = build_model(config, device="meta", dtype=dtype)
    check_state_dict(model, state, ckpt)
    release = _PageReleaser(ckpt) if not isinstance(state, SafetensorsStateDict) else lambda tensor: None
    return model, state, release, ckpt


def load_model(
    config: DiTConfig,
    ckpt: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use: str | None = None,
) -> DiT:
    """Build `config`, fill it from `ckpt` (random init when None) in `dtype` on `device`, in eval mode. `ckpt` may be
    a run directory; `use`: "ema" (default) or "model" weights of a training checkpoint. (Sharded plans load each
    rank's shards only: parallel/sharded_loading.py.)"""
    if ckpt is None:
        return build_model(config, device=device, dtype=dtype).eval()
    model, state, release, ckpt = open_for_model(config, ckpt, dtype, use)
    # One tensor at a time: read -> cast -> device -> adopted, so the peak is the model plus one source tensor.
    for key in list(model.state_dict()):
        source = state[key]
        # .to() may return `source` itself (same dtype and device): then clone, so the model never aliases the file.
        value = source.to(device=device, dtype=dtype)
        if value.data_ptr() == source.data_ptr() and not isinstance(state, SafetensorsStateDict):
            value = value.clone()
        release(source)
        model.load_state_dict({key: value}, strict=False, assign=True)
        del source, value
    del state
    for fixed in ("pos_embed", "temp_embed"):  # sin-cos tables (temp_embed: video DiTs), never trained
        if hasattr(model, fixed):
            getattr(model, fixed).requires_grad_(False)
    return model.eval()


def save_safetensors(model: DiT, path: str | Path, extra: dict | None = None) -> Path:
    """Our format: weights in `path` (.safetensors) and `{"model": config, ...extra}` in the `.json` beside it."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    meta = {"model": model.config.to_dict(), **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def read_sidecar_config(ckpt: str | Path) -> dict | None:
    """The model metadata of a source ({"model": config, sampling defaults}): the JSON beside our safetensors, or a
    training checkpoint's own config; None for a bare state dict. The source is checked (inspect_checkpoint)."""
    meta = inspect_checkpoint(ckpt).meta
    return copy.deepcopy(meta)  # the cached original stays as read
