"""What the GPU smoke scripts share: the GPU gate, timed checks with a JSON summary, `opendit` runs, image diffs.

A check is a function returning a dict (its figures, with "ok": bool unless it only reports); an exception fails the
check (its message is recorded) and the script goes on with the next one. Checks past the time budget are skipped, so
one command stays within 10 minutes. See docs/gpu.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

CLI = "import sys; from opendit.cli import main; sys.exit(main())"  # `opendit` without relying on the entry point


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def need_gpus(count: int, script: str) -> int:
    """The number of visible GPUs; with fewer than `count`, prints one line and exits 0 (nothing to check here)."""
    gpus = visible_gpus()
    if gpus < count:
        print(f"{script}: needs {count} CUDA GPU(s), {gpus} visible; nothing run (see docs/gpu.md)")
        sys.exit(0)
    return gpus


class Smoke:
    """Runs checks in order within `budget_s` seconds; `finish()` prints the JSON summary and returns the exit code."""

    def __init__(self, script: str, budget_s: float = 560.0):
        import torch

        self.script, self.budget_s, self.start = script, budget_s, time.perf_counter()
        self.checks: list[dict] = []
        self.header = {
            "script": script,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpus": visible_gpus(),
            "device": torch.cuda.get_device_name(0) if visible_gpus() else None,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn, *args, **kwargs) -> dict:
        entry: dict = {"name": name}
        if self.elapsed() > self.budget_s:
            entry.update(ok=None, skipped=f"time budget of {self.budget_s:.0f} s spent")
        else:
            began = time.perf_counter()
            try:
                entry.update(fn(*args, **kwargs))
            except Exception as exc:  # a failed check is a result: recorded, and the next check runs
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}", where=traceback.format_exc(limit=3))
            entry["seconds"] = round(time.perf_counter() - began, 2)
        self.checks.append(entry)
        status = {True: "ok", False: "FAIL", None: "info"}[entry.get("ok")]
        print(f"[{self.elapsed():6.1f}s] {name}: {status}", file=sys.stderr, flush=True)
        return entry

    def finish(self) -> int:
        failed = [c["name"] for c in self.checks if c.get("ok") is False]
        summary = {**self.header, "seconds": round(self.elapsed(), 1), "ok": not failed, "failed": failed,
                   "checks": self.checks}  # fmt: skip
        print(json.dumps(summary, indent=2, default=str))
        return 1 if failed else 0


def opendit(args: list[str], timeout: float = 300.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """`opendit ARGS` in a fresh process (the current interpreter), output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)  # fmt: skip


def sample_cli(out: Path, flags: list[str], timeout: float = 300.0, env: dict | None = None) -> dict:
    """`opendit sample FLAGS --out OUT` that must succeed; returns its record.json."""
    done = opendit(["sample", "--no-progress", *flags, "--out", str(out)], timeout, env)
    if done.returncode != 0:
        raise RuntimeError(f"opendit sample {' '.join(flags)} exited {done.returncode}: {done.stderr.strip()[-600:]}")
    return json.loads((out / "record.json").read_text())


def read_images(folder: Path) -> dict[str, np.ndarray]:
    """Every per-image PNG (and every GIF, frame by frame) of an `opendit sample` output folder, as int arrays."""
    from PIL import Image, ImageSequence

    images = {}
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.gif")):
        if path.name == "samples.png":  # the labelled grid repeats the images
            continue
        with Image.open(path) as img:
            frames = [np.asarray(frame.convert("RGB"), dtype=np.int16) for frame in ImageSequence.Iterator(img)]
        images[path.name] = np.stack(frames)  # (F, H, W, 3); F = 1 for a PNG
    if not images:
        raise RuntimeError(f"no images in {folder}")
    return images


def image_diff(a: Path, b: Path) -> dict:
    """Max and mean 8-bit difference between two output folders' images (same file names)."""
    left, right = read_images(a), read_images(b)
    if left.keys() != right.keys():
        raise RuntimeError(f"different outputs: {sorted(left)} vs {sorted(right)}")
    diffs = [np.abs(left[k] - right[k]) for k in left]
    return {"max_levels": int(max(d.max() for d in diffs)), "mean_levels": float(np.mean([d.mean() for d in diffs]))}


def array_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_levels": int(d.max()), "mean_levels": float(d.mean())}
