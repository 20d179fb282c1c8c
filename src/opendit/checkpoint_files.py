"""Finding and opening checkpoint files, with one message per way a file can be wrong (each naming the fix).

A source is a file or a run directory of `opendit train` (its checkpoints/latest.pt). `.pt` files are opened with
torch.load(weights_only=True): tensors and plain data only; a file whose pickle would run code is refused with a way
out (`resave_trusted`) that is only for files the user trusts. checkpoint.py builds on this (formats, loading).
"""

import argparse
import os
import re
from pathlib import Path

import torch

from opendit.errors import OpenDiTError

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
            f'keep just its tensors: python -c "from opendit.checkpoint import resave_trusted; '
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
