"""What the configs of DiT-style models share (our DiT, the video DiT): the patch grid of one image or frame, the
image size behind a latent, the output channels, the dict round trip of checkpoints' config files, and presets by
name. PatchGridConfig: a mixin for frozen dataclasses with the fields patch_size, input_size (H, W), in_channels,
learn_sigma and latent; `label` names the model kind in error messages. DiTFamilyConfig: those fields and the rest
both configs declare, and another output size of the same architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

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


@dataclass(frozen=True)
class DiTFamilyConfig(PatchGridConfig):
    """The fields DiT and the video DiT share (the video DiT adds its frames; `input_size` is one image's or frame's
    model-space (H, W), latent or pixel), and another output size of the same architecture."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: tuple[int, int] = (32, 32)
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    latent: bool = True  # True: decoded by a VAE (image = 8 x input); False: pixel space (image = input)
    prediction: str = "epsilon"  # what the network predicts: "epsilon" (DDPM family) or "flow" (velocity)

    def with_image_size(self, height: int, width: int | None = None):
        """The same architecture (and frames) for another output image or frame size (pixels), validated with an
        actionable message."""
        width = height if width is None else width
        factor = (LATENT_DOWNSCALE if self.latent else 1) * self.patch_size
        what = f"8 x patch {self.patch_size} (latent model)" if self.latent else f"patch {self.patch_size}"
        for side in (height, width):
            if side <= 0 or side % factor:
                lower, upper = max(factor, side // factor * factor), (side // factor + 1) * factor
                raise OpenDiTError(
                    f"image size {side} must be a positive multiple of {factor} = {what}; try {lower} or {upper}"
                )
        scale = LATENT_DOWNSCALE if self.latent else 1
        return replace(self, input_size=(height // scale, width // scale))


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
