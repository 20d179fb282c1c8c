"""What the configs of DiT-style models share (our DiT, the video DiT): the patch grid of one image or frame, the
image size behind a latent, the output channels, the dict round trip of checkpoints' config files, and presets by
name. A mixin for frozen dataclasses with the fields patch_size, input_size (H, W), in_channels, learn_sigma and
latent; `label` names the model kind in error messages."""

from __future__ import annotations

from dataclasses import asdict, fields, replace

from opendit.errors import OpenDiTError

LATENT_DOWNSCALE = 8  # stabilityai/sd-vae-ft-* maps H x W pixels to 4 x H/8 x W/8 latents


class PatchGridConfig:
    label = "model"

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def image_size(self) -> tuple[int, int]:
        factor = LATENT_DOWNSCALE if self.latent else 1
        return self.input_size[0] * factor, self.input_size[1] * factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OpenDiTError(f"unknown {cls.label} config keys {sorted(unknown)}; known keys are {sorted(known)}")
        data = dict(data)
        data["input_size"] = tuple(data.get("input_size", (32, 32)))
        return cls(**data)


def build_presets(cls, prefix: str, archs: dict[str, tuple[int, int, int]]) -> dict:
    """{prefix-size/patch: cls(depth, hidden, heads, patch)} for every (depth, hidden, heads) and patch 2, 4, 8."""
    return {
        f"{prefix}-{size}/{patch}": cls(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
        for size, (d, h, n) in archs.items()
        for patch in (2, 4, 8)
    }


def pick_preset(presets: dict, name: str, what: str = "model", hint: str = ""):
    if name not in presets:
        raise OpenDiTError(f"unknown {what} {name!r}; choose one of: {', '.join(presets)}{hint}")
    return presets[name]


def pixel_space(config, size: int, channels: int, num_classes: int, prediction: str = "flow", **changes):
    """A preset's architecture as a pixel-space model (no VAE, no learned sigma) on size x size x channels inputs."""
    return replace(config, input_size=(size, size), in_channels=channels, num_classes=num_classes, learn_sigma=False,
                   latent=False, prediction=prediction, **changes)  # fmt: skip
