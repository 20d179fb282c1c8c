"""Moving digits: scikit-learn's 8x8 digits sliding across a small canvas, one pixel per frame, for video models.

Every video is one real digit pasted at its native 8x8 (no resizing) on a `canvas` x `canvas` background of -1, moving
with a constant velocity of exactly one pixel per frame to the right (+x), left (-x), down (+y) or up (-y). The start is
chosen so the whole path stays inside the canvas: no bounce, no clipping. Along the motion axis the digit's top-left
corner visits `frames` consecutive positions, so the start has canvas - 8 - (frames - 1) + 1 values (2 at the defaults
16 / 8); across it, canvas - 8 + 1 values (9). The class is digit + 10 * direction index (40 classes).

The index space enumerates every (digit sample, direction, start along, start across) combination, 1797 * 4 * 2 * 9 =
129,384 videos at the defaults; a video is composed on the fly from its index in `batch`, so nothing is materialised
and a batch is a pure function of its indices (BatchSampler's stateless resume carries over unchanged).
"""

import torch

from opendit.digits.data import digits_to_unit
from opendit.errors import OpenDiTError

DIRECTIONS = ("right", "left", "down", "up")  # index 0..3; label = digit + 10 * index
FRAMES = 8
CANVAS = 16
DIGIT = 8  # load_digits images are 8x8
NUM_DIGITS = 10
# (dy, dx) per frame of each direction, in DIRECTIONS order; y grows downwards as in an image array
VELOCITY = ((0, 1), (0, -1), (1, 0), (-1, 0))


def direction_index(direction: str | int) -> int:
    """A direction name ("right", ...) or index 0..3 -> its index; anything else raises OpenDiTError."""
    if isinstance(direction, str) and direction in DIRECTIONS:
        return DIRECTIONS.index(direction)
    if isinstance(direction, int) and not isinstance(direction, bool) and 0 <= direction < len(DIRECTIONS):
        return direction
    raise OpenDiTError(
        f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)} (or its index 0..{len(DIRECTIONS) - 1})"
    )


def label_for(digit: int, direction: str | int) -> int:
    """(digit 0..9, direction name or index) -> class label digit + 10 * direction index, 0..39."""
    if not 0 <= int(digit) < NUM_DIGITS:
        raise OpenDiTError(f"digit {digit} is out of range; use 0..{NUM_DIGITS - 1}")
    return int(digit) + NUM_DIGITS * direction_index(direction)


def describe(label: int) -> tuple[int, str]:
    """Class label 0..39 -> (digit, direction name)."""
    if not 0 <= int(label) < NUM_DIGITS * len(DIRECTIONS):
        raise OpenDiTError(
            f"label {label} is out of range; moving-digits labels are 0..{NUM_DIGITS * len(DIRECTIONS) - 1}"
        )
    return int(label) % NUM_DIGITS, DIRECTIONS[int(label) // NUM_DIGITS]


def start_counts(frames: int = FRAMES, canvas: int = CANVAS) -> tuple[int, int]:
    """(start positions along the motion axis, across it) that keep a `frames`-long path inside the canvas."""
    if frames < 2:
        raise OpenDiTError(f"a moving digit needs at least 2 frames, got {frames}")
    minimum = DIGIT + frames - 1
    if canvas < minimum:
        raise OpenDiTError(
            f"canvas {canvas} is too small for an 8x8 digit moving 1 px/frame over {frames} frames; "
            f"use canvas >= {minimum} (8 + frames - 1) or fewer frames"
        )
    return canvas - minimum + 1, canvas - DIGIT + 1


def positions(
    directions: torch.Tensor, along: torch.Tensor, across: torch.Tensor, frames: int = FRAMES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corner (y, x) of the digit in every frame: (N,) directions / starts -> two (N, F) int64 tensors.

    A forward move (right, down) starts at `along` and ends at along + frames - 1; a backward one (left, up) covers
    the same positions in reverse, so `along` indexes the same set of paths for both signs.
    """
    directions, along, across = (torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (directions, along, across))
    t = torch.arange(frames)  # (F,)
    forward = directions % 2 == 0  # right, down
    moving = torch.where(forward[:, None], along[:, None] + t, along[:, None] + frames - 1 - t)  # (N, F)
    still = across[:, None].expand(-1, frames)  # (N, F)
    horizontal = (directions < 2)[:, None]  # right, left move along x
    return torch.where(horizontal, still, moving), torch.where(horizontal, moving, still)


def compose(
    digits: torch.Tensor,
    directions: torch.Tensor,
    along: torch.Tensor,
    across: torch.Tensor,
    frames: int = FRAMES,
    canvas: int = CANVAS,
) -> torch.Tensor:
    """Digits (N, 8, 8) in [-1, 1] (background -1) -> videos (N, F, 1, canvas, canvas) float32 in [-1, 1].

    `directions` (N,) are indices 0..3, `along` / `across` (N,) the start positions (see `start_counts`). Use
    `digits_to_unit(x) * 2 - 1` for load_digits pixels 0..16.
    """
    digits = torch.as_tensor(digits, dtype=torch.float32)
    n = digits.shape[0]
    if digits.shape[1:] != (DIGIT, DIGIT):
        raise OpenDiTError(f"digits must be (N, 8, 8) in [-1, 1], got shape {tuple(digits.shape)}")
    n_along, n_across = start_counts(frames, canvas)
    directions, along, across = (torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (directions, along, across))
    if not (len(directions) == len(along) == len(across) == n):
        raise OpenDiTError(f"need one direction and start per digit: {n} digits, got {len(directions)}/{len(along)}")
    if n and not (
        0 <= int(directions.min()) <= int(directions.max()) < len(DIRECTIONS)
        and 0 <= int(along.min()) <= int(along.max()) < n_along
        and 0 <= int(across.min()) <= int(across.max()) < n_across
    ):
        raise OpenDiTError(
            f"directions must be 0..{len(DIRECTIONS) - 1}, starts along 0..{n_along - 1} and across 0..{n_across - 1} "
            f"for {frames} frames on a {canvas}x{canvas} canvas"
        )
    y0, x0 = positions(directions, along, across, frames)  # (N, F) each
    offset = torch.arange(DIGIT)  # (8,)
    # broadcast every (video, frame, row, col) of the pasted digit to its canvas pixel: index tensors (N, F, 8, 8)
    rows = (y0[:, :, None, None] + offset[None, None, :, None]).expand(n, frames, DIGIT, DIGIT)
    cols = (x0[:, :, None, None] + offset[None, None, None, :]).expand(n, frames, DIGIT, DIGIT)
    video = torch.arange(n)[:, None, None, None].expand_as(rows)
    frame = torch.arange(frames)[None, :, None, None].expand_as(rows)
    out = torch.full((n, frames, canvas, canvas), -1.0)  # (N, F, H, W) background
    out[video, frame, rows, cols] = digits[:, None].expand(n, frames, DIGIT, DIGIT)
    return out[:, :, None]  # (N, F, 1, H, W)


class MovingDigitsDataset:
    """Every load_digits sample in every direction and start position; videos (B, F, 1, H, W) composed per batch."""

    def __init__(self, frames: int = FRAMES, canvas: int = CANVAS):
        from sklearn.datasets import load_digits  # deferred, as in DigitsDataset: the import costs ~1 s

        self.n_along, self.n_across = start_counts(frames, canvas)
        self._frames, self.canvas = frames, canvas
        digits = load_digits()
        self.digits = digits_to_unit(digits.images)[:, 0] * 2 - 1  # (1797, 8, 8) in [-1, 1], background -1
        self.digit_labels = torch.as_tensor(digits.target, dtype=torch.int64)  # (1797,)
        self.class_names = [f"{d} {name}" for name in DIRECTIONS for d in range(NUM_DIGITS)]  # label order

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.canvas, self.canvas)

    @property
    def frames(self) -> int:
        return self._frames

    def __len__(self) -> int:
        return len(self.digits) * len(DIRECTIONS) * self.n_along * self.n_across

    def decode(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) dataset indices -> (digit sample, direction, start along, start across), each (B,) int64.

        index = ((sample * 4 + direction) * n_along + along) * n_across + across: mixed radix, across fastest.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise OpenDiTError(
                f"indices must be in 0..{len(self) - 1} (the dataset's size), got {indices.tolist()[:8]}"
            )
        across = indices % self.n_across
        rest = indices // self.n_across
        along = rest % self.n_along
        rest = rest // self.n_along
        return rest // len(DIRECTIONS), rest % len(DIRECTIONS), along, across

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) indices -> videos (B, F, 1, H, W) float32 in [-1, 1], labels (B,) int64."""
        sample, direction, along, across = self.decode(indices)
        videos = compose(self.digits[sample], direction, along, across, self._frames, self.canvas)
        return videos, self.digit_labels[sample] + NUM_DIGITS * direction

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        videos, labels = self.batch(torch.tensor([index]))
        return videos[0], int(labels[0])

    def describe(self, label: int) -> tuple[int, str]:
        """Class label -> (digit, direction name)."""
        return describe(label)
