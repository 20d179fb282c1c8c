"""The capability matrix: every family x every capability through `opendit sample`, as a user runs it.

Each cell either equals the one-process run of the same request (every image / frame PNG; exact methods <= 2/255,
bf16 <= 8/255 against one bf16 process (rounding order differs), PipeFusion's stale activations <= 8/255 mean, the
bound tests/test_pipefusion.py states) or is refused before any process starts (exit code 2, one `error:` line) with
a reason that is not "not supported". The run writes docs/capabilities.md, the table users read.

    make test-matrix          # OPENDIT_MATRIX=1 pytest tests/matrix (~25 min on 2 cores); not part of `make test`

Families: OpenDiT's digits DiT and digits video DiT (the bundled models) and tiny random diffusers pipelines saved
to disk (opendit.testing.tiny_pipelines: diffusers DiT, PixArt, SD3, Flux, Wan; tiny_video_families: Wan 2.2, LTX-Video,
CogVideoX, Latte, HunyuanVideo-1.5; tiny_image_families: Qwen-Image, FLUX.2, Z-Image). 4 denoising steps, 2 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("OPENDIT_MATRIX") != "1", reason="the matrix tier: make test-matrix"),
]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "capabilities.md"
OPENDIT = [sys.executable, "-m", "opendit"]

# a cache that reuses within a short run: 10 steps, one guard step at each end, a loose threshold
CACHED = ["--cache", "fbcache", "--steps", "10", "--cache-guard-steps", "1", "--cache-threshold", "0.5"]
# capability -> (flags, world, how it is judged: "exact" | "bf16" | "stale"); the reference run drops the parallel
# flags but keeps dtype and cache
CAPABILITIES = {
    "Ulysses": (["--ulysses", "2"], 2, "exact"),
    "ring": (["--ring", "2"], 2, "exact"),
    "USP 2x2": (["--ulysses", "2", "--ring", "2"], 4, "exact"),
    "FastSeq": (["--ulysses", "2", "--sp-impl", "fastseq"], 2, "exact"),
    "DSP": (["--ulysses", "2", "--sp-impl", "dsp"], 2, "exact"),
    "cfg-parallel": (["--cfg-parallel"], 2, "exact"),
    "dp": (["--dp", "2"], 2, "exact"),
    "tp": (["--tp", "2"], 2, "exact"),
    "PipeFusion": (["--pipefusion", "2"], 2, "stale"),
    "shard-weights": (["--ulysses", "2", "--shard-weights"], 2, "exact"),
    "balance-tokens": (["--ring", "2", "--balance-tokens"], 2, "exact"),
    "bf16": (["--ulysses", "2", "--dtype", "bf16"], 2, "bf16"),
    "fbcache": (["--ulysses", "2", *CACHED], 2, "exact"),
    "PAB": (["--ulysses", "2", "--cache", "pab", "--steps", "10"], 2, "exact"),
    "cache + shard": (["--ulysses", "2", "--shard-weights", *CACHED], 2, "exact"),
    "trace": (["--ulysses", "2", "--trace", "{out}/trace.json"], 2, "exact"),
    "memory-gib": (["--memory-gib", "8"], 2, "exact"),
    "auto plan": (["--parallel", "auto"], 2, "exact"),
}
PARALLEL_FLAGS = {"--ulysses", "--ring", "--sp-impl", "--cfg-parallel", "--dp", "--tp", "--pipefusion",
                  "--shard-weights", "--balance-tokens", "--trace", "--memory-gib", "--parallel"}  # fmt: skip
BOUNDS = {"exact": (2, None), "bf16": (8, None), "stale": (255, 8.0)}  # (max, mean) in 1/255


def _families(root: Path) -> dict[str, list[str]]:
    """The `opendit sample` flags of every family (the tiny pipelines saved under root)."""
    from opendit.testing.tiny_pipelines import _DIT_LABELS, save_tiny_pipeline

    common = ["--steps", "4", "--seed", "0", "--no-progress"]
    families = {
        "OpenDiT DiT (digits)": ["--classes", "3", "7", *common],
        "OpenDiT video DiT (digits)": ["--video", "--classes", "3", "7", "--motion", "right", "up", *common],
    }
    for kind, name in (("dit", "diffusers DiT"), ("pixart", "PixArt"), ("sd3", "SD3"), ("flux", "Flux"),
                       ("wan", "Wan 2.1"), *VIDEO_FAMILIES.items()):  # fmt: skip
        folder = save_tiny_pipeline(kind, root / "pipelines" / kind, seed=0)
        # DiTPipeline is class-conditional: its prompts are label names (model_index.json's id2label)
        names = list(_DIT_LABELS.values())[1:3] if kind == "dit" else ["a red fox", "a blue car"]
        what = ["--prompt", *names]
        # the video folders' own defaults (opendit_call_defaults.json): a few frames at 32-64 px
        size = ["--image-size", "64", "--frames", "5"] if kind == "wan" else []
        guidance = [] if kind == "hunyuan15" else ["--cfg-scale", "3"]  # HunyuanVideo-1.5: its guider's scale
        families[name] = ["--diffusers", str(folder), *what, *guidance, *size, *common]
    families.update(_image_families(root, common))
    return families


def _image_families(root: Path, common: list[str]) -> dict[str, list[str]]:
    """Qwen-Image, FLUX.2 and Z-Image (opendit.testing.tiny_image_families): their folders' own small sizes; a long
    and a short prompt, so that Z-Image's and Qwen-Image's batches carry a key padding mask."""
    from opendit.testing.tiny_image_families import save_tiny_image_pipeline

    prompts = ["--prompt", " ".join(["a red fox in a garden at sunset"] * 5), "--prompt", "a blue car"]
    families = {}
    for kind, name in IMAGE_FAMILIES.items():
        folder = save_tiny_image_pipeline(kind, root / "pipelines" / kind, seed=0)
        guidance = ["--negative-prompt", "blurry"] if kind == "qwenimage" else ["--cfg-scale", "3"]
        families[name] = ["--diffusers", str(folder), *prompts, *guidance, *common]
    return families


def _pictures(out: Path) -> list[np.ndarray]:
    files = sorted(p for p in out.rglob("*.png") if p.name != "samples.png")
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in files]


def _run(args: list[str], out: Path) -> tuple[int, str, float]:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*OPENDIT, "sample", *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)  # fmt: skip
    return done.returncode, done.stderr.strip(), time.perf_counter() - start


def _reference_args(flags: list[str]) -> list[str]:
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in PARALLEL_FLAGS:
            skip = flag not in ("--cfg-parallel", "--shard-weights", "--balance-tokens")
            continue
        kept.append(flag)
    return kept


def _cell(family_args, capability, tmp: Path, references: dict) -> dict:
    flags, world, judge = CAPABILITIES[capability]
    out = tmp / "cell"
    flags = [f.replace("{out}", str(tmp)) for f in flags]
    code, err, wall = _run([*family_args, "--nproc", str(world), *flags], out)
    if code == 2:
        lines = err.splitlines()
        return {"status": "refused", "reason": lines[-1].removeprefix("error: "), "one_line": len(lines) == 1,
                "generic": "not supported" in err, "wall": wall}  # fmt: skip
    if code != 0:
        return {"status": "failed", "reason": err.splitlines()[-1] if err else f"exit {code}", "wall": wall}
    reference_flags = tuple(_reference_args(flags))
    if reference_flags not in references:
        ref_out = tmp / f"ref{len(references)}"
        ref_code, ref_err, _ = _run([*family_args, *reference_flags], ref_out)
        assert ref_code == 0, (family_args, reference_flags, ref_err)
        references[reference_flags] = _pictures(ref_out)
    got, expected = _pictures(out), references[reference_flags]
    assert len(got) == len(expected) > 0, (capability, len(got), len(expected))
    diffs = [np.abs(a - b) for a, b in zip(got, expected)]
    worst, mean = max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
    bound_max, bound_mean = BOUNDS[judge]
    ok = worst <= bound_max and (bound_mean is None or mean <= bound_mean)
    extra = {"trace": (tmp / "trace.json").is_file()} if capability == "trace" else {}
    return {"status": "equal" if ok else "differs", "max": worst, "mean": mean, "judge": judge, "wall": wall,
            **extra}  # fmt: skip


def _write(results: dict) -> None:
    capabilities = list(CAPABILITIES)
    lines = [
        "# Capabilities × families",
        "",
        "Generated by `make test-matrix` (tests/matrix/test_capability_matrix.py): every cell is `opendit sample` on "
        "the stated processes compared with one process running the same request (4 steps, 2 images, every output "
        "PNG). ✓ = equal (max pixel difference in 1/255 shown: exact methods ≤ 2, bf16 ≤ 8; PipeFusion's stale "
        "activations: mean ≤ 8, shown as max/mean); ✗ = refused before any process starts, with the reason below the "
        "table. Processes: 2 (USP: 4).",
        "",
        "| family | " + " | ".join(capabilities) + " |",
        "|---|" + "---|" * len(capabilities),
    ]
    reasons: list[str] = []
    for family, row in results.items():
        cells = []
        for capability in capabilities:
            cell = row.get(capability, {"status": "not run"})
            if cell["status"] == "equal":
                stale = f"/{cell['mean']:.1f}" if cell["judge"] == "stale" else ""
                cells.append(f"✓ {cell['max']}{stale}")
            elif cell["status"] == "refused":
                reasons.append(f"- **{family} × {capability}**: {cell['reason']}")
                cells.append(f"✗ [{len(reasons)}]")
            else:
                cells.append(f"{cell['status']} {cell.get('max', '')}".strip())
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", "Refusals (the reason each gives, in the method's terms):", ""]
    lines += [f"{i}. {reason[2:]}" for i, reason in enumerate(reasons, 1)]
    DOC.write_text("\n".join(lines) + "\n")
    DOC.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


# the video families of issue 34 (opendit.testing.tiny_video_families): kind -> row name
VIDEO_FAMILIES = {"wan22": "Wan 2.2 (two experts)", "ltx": "LTX-Video", "cogvideox": "CogVideoX", "latte": "Latte",
                  "hunyuan15": "HunyuanVideo-1.5"}  # fmt: skip
# the image families of issue 34 (opendit.testing.tiny_image_families): kind -> row name
IMAGE_FAMILIES = {"qwenimage": "Qwen-Image", "flux2": "FLUX.2", "zimage": "Z-Image"}
FAMILIES = ("OpenDiT DiT (digits)", "OpenDiT video DiT (digits)", "diffusers DiT", "PixArt", "SD3", "Flux", "Wan 2.1",
            *VIDEO_FAMILIES.values(), *IMAGE_FAMILIES.values())  # fmt: skip


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return _families(tmp_path_factory.mktemp("pipelines"))


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("family", FAMILIES)
def test_capability_matrix(family, families, tmp_path):
    """One family's row: every capability; the table is rewritten with every row measured so far (JSON beside it)."""
    results = json.loads(DOC.with_suffix(".json").read_text()) if DOC.with_suffix(".json").is_file() else {}
    results = {name: row for name, row in results.items() if name in FAMILIES}
    references: dict = {}
    row, problems = {}, []
    for capability in CAPABILITIES:
        cell_dir = tmp_path / capability.replace(" ", "_")
        cell_dir.mkdir(parents=True)
        cell = _cell(families[family], capability, cell_dir, references)
        row[capability] = cell
        if cell["status"] in ("failed", "differs"):
            problems.append((capability, cell))
        if cell["status"] == "refused" and (cell["generic"] or not cell["one_line"]):
            problems.append((capability, cell))
        if capability == "trace" and cell["status"] == "equal" and not cell["trace"]:
            problems.append((capability, "no trace file"))
    results[family] = row
    _write({name: results[name] for name in FAMILIES if name in results})
    assert not problems, problems
