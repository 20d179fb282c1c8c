"""The model preset and the learning rate of a training run (trainer.py's TrainConfig), kept apart from the loop."""

from __future__ import annotations

import math

from opendit.errors import OpenDiTError
from opendit.models.dit import preset


def model_preset(cfg):
    """The architecture preset: an image DiT, or with --video a Latte-style video DiT (models/video_dit.py)."""
    if not cfg.video:
        if cfg.model.startswith("Latte-"):
            raise OpenDiTError(f"{cfg.model} is a video model: add --video (with --data moving-digits)")
        return preset(cfg.model)
    from opendit.models.video_dit import preset as video_preset

    if cfg.model.startswith("DiT-"):
        raise OpenDiTError(f"--video trains a video DiT; {cfg.model} is an image preset: use e.g. --model Latte-D/4")
    return video_preset(cfg.model)


def learning_rate(cfg, step: int) -> float:
    """The rate of optimiser step `step` (0-based): linear warm-up, then constant or cosine decay to 0 at --steps."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr
