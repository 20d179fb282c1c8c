"""Results as JSON: base64 PNG per image (GIF per video), and the per-rank timeline of a call's record."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

GIF_FRAME_MS = 125


def _pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a PIL image (grey for one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gif_b64(frames: np.ndarray) -> str:
    """(F, H, W, C) uint8 -> an animated GIF, looping."""
    first, *rest = [_pil(frame) for frame in frames]
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=GIF_FRAME_MS, loop=0)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_result(result) -> tuple[str, list[str]]:
    """("png" | "gif", one base64 string per image or video)."""
    if result.frames is not None:
        return "gif", [gif_b64(video) for video in result.frames]
    return "png", [png_b64(image) for image in result.images]


def timeline(record: dict | None) -> list[dict]:
    """Per rank, the call's denoising steps laid end to end (from each rank's recorded step times) and, at the end
    of each step, the time that step spent waiting in communication (summed over ops: the record keeps per-step
    totals, not each op's start). Times in ms from the first step's start."""
    if not record:
        return []
    ranks = record.get("ranks") or [{"rank": 0, "per_step_s": record["timing"]["per_step_s"], "comm_per_step": []}]
    rows = []
    for rank in ranks:
        events, clock = [], 0.0
        comm = rank.get("comm_per_step") or []
        for step, seconds in enumerate(rank.get("per_step_s") or []):
            ms = seconds * 1000.0
            wait_ms = 1000.0 * sum(c.get("wait_s", 0.0) for c in comm[step].values()) if step < len(comm) else 0.0
            wait_ms = min(wait_ms, ms)
            events.append({"name": f"step {step + 1}", "cat": "compute", "start_ms": clock, "dur_ms": ms - wait_ms})
            if wait_ms > 0:
                ops = ", ".join(sorted(comm[step]))
                events.append({"name": f"comm wait ({ops})", "cat": "comm", "start_ms": clock + ms - wait_ms,
                               "dur_ms": wait_ms})  # fmt: skip
            clock += ms
        rows.append({"rank": rank["rank"], "events": events})
    return rows
