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
"""

import ctypes
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from opendit.errors import OpenDiTError
from opendit.models.dit import _ARCHS, DiT, DiTConfig, build_dit


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pick_weights(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Official files are raw EMA state dicts; training checkpoints are {"model","ema","opt","args"}: prefer EMA."""
    if not isinstance(obj, dict):
        raise OpenDiTError(f"{path} holds a {type(obj).__name__}, not a state dict; expected a DiT checkpoint")
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OpenDiTError(
            f"{path} is not a DiT checkpoint: expected tensors or 'ema'/'model' entries, got {list(obj)}"
        )
    return obj


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


class SafetensorsStateDict(Mapping):
    """A read-only state dict over a safetensors file: each tensor is read from disk only when asked for.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the data
    (offsets relative to the end of the header). Reads use the file, not mmap (see the module docstring for why).
    """

    def __init__(self, path: Path):
        self._path = path
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > os.path.getsize(path):
                raise ValueError(f"header length {size} exceeds the file size")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self._base = 8 + size
        self._entries = header
        for key, entry in header.items():
            if entry["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor {key} has dtype {entry['dtype']}, not one of {', '.join(_ST_DTYPES)}")

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]  # KeyError for unknown keys, as a dict
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with open(self._path, "rb") as handle:
            handle.seek(self._base + start)
            if handle.readinto(buffer) != len(buffer):
                raise OpenDiTError(f"checkpoint {self._path} is truncated at tensor {key}; re-download or re-export it")
        dtype, shape = _ST_DTYPES[entry["dtype"]], entry["shape"]
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)  # owns `buffer`; freed with the tensor

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
    return state.shape(key) if isinstance(state, SafetensorsStateDict) else tuple(state[key].shape)


def read_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Tensors of a `.pt`/`.pth`/`.safetensors` checkpoint, lazily mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise OpenDiTError(f"checkpoint {path} does not exist; pass --ckpt with a path to a .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            return SafetensorsStateDict(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OpenDiTError:
        raise
    except Exception as exc:  # corrupt, truncated, pickled code, wrong format: all get the same actionable message
        raise OpenDiTError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
            "is it an intact DiT .pt (official or training) or .safetensors file?"
        ) from exc
    return _pick_weights(obj, path)


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
    }


def describe_mismatch(config: DiTConfig, state: Mapping[str, torch.Tensor]) -> str | None:
    """A message naming the model the checkpoint is for, if it is not `config`'s architecture."""
    found = infer_config(state)
    expected = {
        "depth": config.depth,
        "hidden_size": config.hidden_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "learn_sigma": config.learn_sigma,
    }
    wrong = {k: (v, found[k]) for k, v in expected.items() if found[k] != v}
    if not wrong:
        return None
    names = [
        f"DiT-{s}/{found['patch_size']}"
        for s, (d, h, _) in _ARCHS.items()
        if (d, h) == (found["depth"], found["hidden_size"])
    ]
    guess = f" It looks like {names[0]}; pass --model {names[0]}." if names else ""
    details = ", ".join(f"{k} expected {e} found {f}" for k, (e, f) in wrong.items())
    return f"checkpoint is for another model ({details}).{guess}"


def check_state_dict(model: DiT, state: Mapping[str, torch.Tensor]) -> None:
    """Raise an OpenDiTError listing missing/unexpected keys and every shape mismatch (expected vs found)."""
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
    lines = [describe_mismatch(model.config, state) or "checkpoint does not match the model:"]
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


def load_model(
    config: DiTConfig,
    ckpt: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiT:
    """Build `config`, fill it from `ckpt` (random init when None) in `dtype` on `device`, in eval mode."""
    if ckpt is None:
        return build_dit(config, device=device, dtype=dtype).eval()
    state = read_state_dict(ckpt)
    model = build_dit(config, device="meta", dtype=dtype)
    check_state_dict(model, state)
    release = _PageReleaser(Path(ckpt)) if not isinstance(state, SafetensorsStateDict) else lambda t: None
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
    model.pos_embed.requires_grad_(False)
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
    """The JSON written beside one of our safetensors files, if any."""
    sidecar = Path(ckpt).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise OpenDiTError(f"config {sidecar} is not valid JSON ({exc}); re-export the model") from exc
