"""Training data: scikit-learn's handwritten digits, or a folder of images with one subfolder per class.

Both datasets hold every image in memory as one (N, C, H, W) float tensor in [-1, 1] (the digits are 1,797 8x8 images;
a folder dataset is meant for similarly small sets). Batches are drawn by `BatchSampler`, a pure function of
(seed, step): resuming at step k therefore sees exactly the batches an uninterrupted run sees, with no sampler state
to save, and N data-parallel ranks slice the same global batch.
"""

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opendit.errors import OpenDiTError

DIGITS_MAX = 16.0  # load_digits pixels are integers 0..16
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageDataset:
    """The interface the trainer needs: `images` (N, C, H, W) in [-1, 1], `labels` (N,) int64, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) indices -> images (B, C, H, W), labels (B,)."""
        return self.images[indices], self.labels[indices]


def digits_to_unit(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """load_digits pixels 0..16, (N, 64) or (N, 8, 8) -> (N, 1, 8, 8) float32 in [0, 1]."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    return x / DIGITS_MAX


def upsample(unit: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> (N, C, r, r) bilinear (align_corners=False keeps the mean intensity), clamped."""
    if unit.shape[-1] == resolution and unit.shape[-2] == resolution:
        return unit
    return F.interpolate(unit, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)


@functools.lru_cache(maxsize=8)
def _upsample_inverse(resolution: int) -> torch.Tensor:
    """(64, r*r) least-squares inverse of `upsample` from 8x8 to r x r, a linear map (bilinear weights; the clamp is
    a no-op on [0, 1] inputs). Its smallest singular value is 0.56 at r=16, 1.35 at r=32: well conditioned."""
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)  # one 8x8 image per source pixel
    forward = F.interpolate(basis, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return torch.linalg.pinv(forward.reshape(64, -1).T)  # pinv of (r*r, 64) -> (64, r*r)


def to_digits_scale(images: torch.Tensor) -> np.ndarray:
    """Model-space images (N, 1, r, r) in [-1, 1] -> (N, 64) in the 0..16 scale of load_digits, for its classifier.

    Inverts `upsample` by least squares, so a real digit that went up to r x r comes back exactly; a generated image
    comes back as the 8x8 digit whose upsampling is closest to it. (Area averaging would blur: mean error 1.1 of 16.)
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise OpenDiTError(f"expected grey images (N, 1, H, W), got shape {tuple(images.shape)}; digits are 1-channel")
    h, w = images.shape[-2:]
    if h != w or h < 8:
        raise OpenDiTError(f"image size {h}x{w} must be square and at least 8x8 to compare with the 8x8 digits")
    unit = ((images.double().clamp(-1, 1) + 1) / 2).cpu().reshape(len(images), -1)  # (N, r*r) in [0, 1]
    small = unit @ _upsample_inverse(h).T if h != 8 else unit  # (N, 64)
    return (small.clamp(0, 1) * DIGITS_MAX).numpy()  # (N, 64)


class DigitsDataset(ImageDataset):
    """sklearn.datasets.load_digits upsampled to `resolution` x `resolution`, one channel, scaled to [-1, 1]."""

    def __init__(self, resolution: int = 16):
        if resolution < 8:
            raise OpenDiTError(f"digits resolution {resolution} is below the source's 8x8; use 8, 16 or 32")
        from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s and sampling never needs it

        digits = load_digits()
        unit = upsample(digits_to_unit(digits.images), resolution)  # (1797, 1, r, r) in [0, 1]
        self.images = unit * 2 - 1  # (N, 1, r, r) in [-1, 1]
        self.labels = torch.as_tensor(digits.target, dtype=torch.int64)
        self.class_names = [str(i) for i in range(10)]


class ImageFolderDataset(ImageDataset):
    """root/<class>/<image>: classes sorted by folder name (as torchvision's ImageFolder), resized to a square.

    Every image is loaded up front, converted to grey ("L", channels=1) or RGB (channels=3), resized with bilinear
    filtering to `resolution` x `resolution` and scaled to [-1, 1].
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3):
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise OpenDiTError(f"data folder {root} does not exist; pass --data digits or a folder of class subfolders")
        if channels not in (1, 3):
            raise OpenDiTError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise OpenDiTError(f"{root} has no class subfolders; lay it out as {root}/<class name>/<image files>")
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in files:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((resolution, resolution), Image.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)  # (H, W, C)
                images.append(torch.from_numpy(arr).permute(2, 0, 1))  # (C, H, W)
                labels.append(label)
        if not images:
            raise OpenDiTError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under the class folders of {root}")
        self.images = torch.stack(images) / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.class_names = classes


def build_dataset(data: str, resolution: int, channels: int = 1) -> ImageDataset:
    """ "digits" or a path to an ImageFolder-style directory."""
    if data == "digits":
        if channels != 1:
            raise OpenDiTError(f"the digits are grey; use --channels 1 (got {channels})")
        return DigitsDataset(resolution)
    return ImageFolderDataset(data, resolution, channels)


def step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, stream ...): nearby steps get unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BatchSampler:
    """Global batch `step` = positions [step*B, (step+1)*B) of an endless stream of per-epoch permutations.

    Each epoch's permutation is seeded by (seed, epoch), so batches depend only on (seed, step, B): stateless resume.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise OpenDiTError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # batches only ever move forward: forget old epochs
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0xDA7A))
            self._perms[epoch] = torch.randperm(self.size, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """(B,) dataset indices of global batch `step`."""
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.size, positions % self.size
        return torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets)])
