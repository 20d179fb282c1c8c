"""Checkpoint I/O: official DiT `.pt` files, training checkpoints, and our own safetensors + JSON config.

Loading is memory-lean: the model is built on the `meta` device (no memory, no init), tensors are read one at a time
(safetensors through mmap, `.pt` through torch.load(mmap=True)), cast to the target dtype and device, and adopted by
`load_state_dict(assign=True)`, so no second copy of the model is ever held.
"""

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
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


class SafetensorsStateDict(Mapping):
    """A read-only state dict over a safetensors file: tensors are read (through mmap) only when asked for."""

    def __init__(self, path: Path):
        self._handle = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())


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
    # One tensor at a time: read (mmap) -> cast -> device -> adopted, so the peak is the model plus one tensor.
    for key in list(model.state_dict()):
        model.load_state_dict({key: state[key].to(device=device, dtype=dtype)}, strict=False, assign=True)
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
