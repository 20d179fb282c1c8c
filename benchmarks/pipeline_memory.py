"""Whole-process peak memory of a diffusers pipeline whose weights dominate, today's path (every rank loads
everything) vs lean sharded loading (`--shard-weights --encoder-shard`, parallel/lean_pipeline.py)
-> benchmarks/results/pipeline_memory.{json,md,png}; the method and the numbers are in docs/memory.md.

    .venv/bin/python benchmarks/pipeline_memory.py                  # 2 passes, the sizes below
    .venv/bin/python benchmarks/pipeline_memory.py --passes 1 --t5-layers 4 --layers 2   # quick (not a result)

Pipeline: the tiny PixArt-alpha folder (opendit.testing.tiny_pipelines: its tokenizer, scheduler and tiny VAE) with
its transformer and text encoder replaced by big ones with random weights (seed 0, normal std 0.02, norms 1), built
from configs with diffusers / transformers classes and saved with save_pretrained (T5 in 500 MB safetensors shards
with an index): PixArtTransformer2DModel, 12 heads x 64 (width 768), `--layers` blocks (26: 1.0 GB fp32), and
T5EncoderModel, d_model 768, 12 heads x 64, gated-GELU d_ff 2048, `--t5-layers` blocks (71: 2.0 GB fp32, 2.0x the
transformer: the sizes issue 35's acceptance names, transformer >= 1 GB and a T5 >= 2x it; results before the change
from 24 / 60 blocks, 0.93 / 1.7 GB, are in docs/memory.md), vocabulary 1000 (the tiny tokenizer's). fp32 storage.
Many thin blocks rather than a few wide ones: a block is 1/26 of the transformer and 1/71 of the encoder, near the
real models' shares (PixArt-alpha 28 blocks, FLUX.1 57; T5-XXL 24 blocks of 0.4 GB in bf16, a larger share than
here), since the sharded path holds one or two gathered parts of a block on top of its shards. The
machine this ran on has 24 GiB shared with others: the sizes keep 4 ranks of today's path under 16 GiB, and a
"today" run that would not fit in the memory available when it starts is skipped (recorded, not estimated).

Each configuration is the whole command, `opendit sample --diffusers DIR` (32x32 image, 2 steps, as PixArt-alpha
takes 1 step as its DMD one-step path; 1 prompt), a fresh job; configurations alternate within a pass (today 1,
today 2, lean 2, today 4, lean 4, then again). "today N": `--nproc N --ulysses N --encode-every-rank` (every rank loads
the whole pipeline); "lean N": `--nproc N --ulysses N --shard-weights --encoder-shard` (no rank ever holds the
transformer or the encoder whole). The figure per run is the
MAXIMUM over ranks of record.json's `process_peak_bytes` (each rank's whole-process resident-set high-water mark, from
its start: interpreter, torch, diffusers, transformers, weights, loading transients, the call); the launcher process
(`--nproc` parent, no weights) is not counted. Ratios divide by today's 1-process peak (the per-process baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import ROOT, bar_plot, finish, machine, markdown_table, render_only, report_args

MIB = 2**20
CONFIGS = {  # label -> (ranks, extra flags)
    "today 1": (1, []),
    "today 2": (2, ["--ulysses", "2", "--encode-every-rank"]),
    "lean 2": (2, ["--ulysses", "2", "--shard-weights", "--encoder-shard"]),
    "today 4": (4, ["--ulysses", "4", "--encode-every-rank"]),
    "lean 4": (4, ["--ulysses", "4", "--shard-weights", "--encoder-shard"]),
}
TARGETS = {"lean 2": 0.6, "lean 4": 0.4}


def _randomise(model, seed: int) -> None:
    """Random weights, quickly: normal(0, 0.02) matrices, norms' weights 1 (a random T5 stays finite)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name or name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_folder(folder: Path, layers: int, t5_layers: int) -> dict:
    """The benchmark pipeline saved in `folder` (see the module docstring); returns its sizes in bytes."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from opendit.testing.tiny_pipelines import save_tiny_pipeline

    save_tiny_pipeline("pixart", folder, seed=0)
    t5_config = T5Config(vocab_size=1000, d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=t5_layers,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
                         relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, use_cache=False,
                         is_encoder_decoder=False)  # fmt: skip
    tiny = json.loads((folder / "transformer" / "config.json").read_text())
    keep = {k: v for k, v in tiny.items() if not k.startswith("_")}
    keep.update(num_layers=layers, num_attention_heads=12, attention_head_dim=64, caption_channels=768,
                cross_attention_dim=768, norm_num_groups=32)  # fmt: skip
    sizes = {}
    with init_empty_weights():
        t5 = T5EncoderModel(t5_config)
        transformer = PixArtTransformer2DModel(**keep)
    for name, model, seed in (("text_encoder", t5, 1), ("transformer", transformer, 2)):
        model.to_empty(device="cpu")
        _randomise(model, seed)
        shutil.rmtree(folder / name)
        shard = {"max_shard_size": "500MB"} if name == "text_encoder" else {}
        model.save_pretrained(folder / name, safe_serialization=True, **shard)
        sizes[name] = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
    del t5, transformer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return sizes


def run_one(folder: Path, label: str, out: Path, env: dict) -> dict:
    """One whole command; the per-rank peaks from its record.json."""
    ranks, extra = CONFIGS[label]
    cmd = [sys.executable, "-m", "opendit", "sample", "--diffusers", str(folder), "--steps", "2", "--seed", "0",
           "--image-size", "32", "--prompt", "a red cat", "--no-progress", "--out", str(out),
           "--dtype", "fp32"]  # fmt: skip
    cmd += ["--nproc", str(ranks), *extra] if ranks > 1 else []
    begin = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((out / "record.json").read_text())
    per_rank = [r for r in record.get("ranks") or [] if r.get("memory")] or [{"rank": 0, **record}]
    peaks = [r["memory"]["process_peak_bytes"] for r in per_rank]
    loads = [r["memory"]["load_peak_bytes"] for r in per_rank]
    return {"label": label, "ranks": ranks, "wall_s": round(wall, 1), "peak_max_mib": max(peaks) / MIB,
            "peaks_mib": [p / MIB for p in peaks], "load_peak_max_mib": max(loads) / MIB,
            "parameter_bytes": [r.get("parameter_bytes") for r in per_rank],
            "text_encoder_bytes": [r.get("loading", {}).get("text_encoder_bytes") for r in per_rank],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}  # fmt: skip


def fits(label: str, runs: list[dict]) -> bool:
    """Whether a run of `label` fits now: N ranks x today's 1-process peak (+ the launcher) under MemAvailable less
    2 GiB (lean runs hold less than today's; a first run is allowed)."""
    ranks = CONFIGS[label][0]
    base = [r["peak_max_mib"] for r in runs if r["label"] == "today 1" and "peak_max_mib" in r]
    if ranks == 1 or not base:
        return True
    # today: every rank holds it all; lean: the weights once over the ranks, plus ~600 MiB per process
    need = (ranks * max(base) if label.startswith("today") else max(base) + ranks * 600) + 600
    available = next(int(ln.split()[1]) // 1024 for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))
    return need <= available - 2048


def summarise(runs: list[dict]) -> list[dict]:
    runs = [r for r in runs if "peak_max_mib" in r]
    ones = [r["peak_max_mib"] for r in runs if r["label"] == "today 1"]
    base = statistics.median(ones) if ones else None  # a run without today 1 has no ratios
    rows = []
    for label in CONFIGS:
        mine = [r["peak_max_mib"] for r in runs if r["label"] == label]
        if not mine:
            continue
        rows.append({"label": label, "runs": len(mine), "min_mib": min(mine), "median_mib": statistics.median(mine),
                     "ratio_median": statistics.median(mine) / base if base else None,
                     "ratio_min": min(mine) / base if base else None,
                     "target": TARGETS.get(label)})  # fmt: skip
    return rows


def table(result: dict) -> str:
    rows = []
    for row in result["rows"]:
        target = row["target"]
        ratio = row["ratio_median"]
        verdict = "" if target is None or ratio is None else ("met" if ratio <= target else "missed")
        rows.append([row["label"], row["runs"], f"{row['min_mib']:.0f}", f"{row['median_mib']:.0f}",
                     "–" if ratio is None else f"{ratio:.2f}", f"<= {target}" if target else "", verdict])  # fmt: skip
    sizes = result["meta"]["sizes_bytes"]
    head = (f"Pipeline weights: transformer {sizes['transformer'] / MIB:.0f} MiB, T5 "
            f"{sizes['text_encoder'] / MIB:.0f} MiB (fp32). Max over ranks of the whole-process peak RSS; "
            "ratio = median / median of today 1.\n\n")  # fmt: skip
    return head + markdown_table(
        ["config", "runs", "min MiB", "median MiB", "ratio", "target", "verdict"], rows
    )  # fmt: skip


def plot(result: dict, path: Path) -> None:
    labels = [r["label"] for r in result["rows"]]
    bar_plot(
        path,
        labels,
        {
            "median": [r["median_mib"] for r in result["rows"]],
            "min": [r["min_mib"] for r in result["rows"]],
        },  # fmt: skip
        "max over ranks of peak RSS (MiB)",
        "pipeline memory: today's path vs lean sharded loading",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--t5-layers", type=int, default=71)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    report_args(parser, "pipeline_memory")
    args = parser.parse_args()
    if render_only(args, render):
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    meta = machine(uptime_before=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="pipeline_memory_") as tmp:
        folder = Path(tmp) / "pipe"
        meta["sizes_bytes"] = build_folder(folder, args.layers, args.t5_layers)
        runs = []
        for index in range(args.passes):
            for label in args.configs:
                if not fits(label, runs):
                    runs.append({"label": label, "skipped": "memory: would not fit in MemAvailable - 2 GiB"})
                    print(json.dumps(runs[-1]), flush=True)
                    continue
                run = run_one(folder, label, Path(tmp) / f"{label.replace(' ', '_')}_{index}", env)
                print(json.dumps(run), flush=True)
                runs.append(run)
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta.update(passes=args.passes, layers=args.layers, t5_layers=args.t5_layers)
    result = {"meta": meta, "runs": runs, "rows": summarise(runs)}
    render(result, args.out)


def render(result: dict, out) -> dict:
    """The table and the plot of a result (a fresh one, or a saved JSON with --render)."""
    text = f"# Pipeline memory: today's path vs lean sharded loading\n\n{table(result)}\n"
    return finish(Path(out).with_suffix("") if str(out).endswith(".json") else out, result, text,
                  plot=lambda path: plot(result, path))  # fmt: skip


if __name__ == "__main__":
    assert common.ROOT == ROOT
    main()
