"""Whole-command memory: what decides whether a job fits. Runs `opendit sample` as a user would (a fresh command per
configuration, interleaved passes) and reports each process's peak resident set for loading, sampling, decoding and
the whole process, from the record.json every rank writes into (opendit/observe/memory.py's PhasePeaks).

    .venv/bin/python benchmarks/whole_command.py                  # DiT-XL/2, 512 px, official-format fp32 .pt
    .venv/bin/python benchmarks/whole_command.py --model DiT-B/2 --passes 1                # quicker
    (`benchmarks/memory.py --whole` runs this script) -> benchmarks/results/whole_command.{json,md,png}

Setup (under benchmarks/results/whole_cache/, reused): an official-format checkpoint (a raw state dict of random
weights, torch.save, 2.7 GB fp32 for DiT-XL/2 — no weights can be downloaded here) and a small diffusers
AutoencoderKL (4 latent channels, 8x downsampling, 32-channel blocks). One denoising step, one image, guidance off:
memory does not depend on the step count, and the acceptance of issue 13 is about the peak.

Figures: `whole` is the largest rank's whole-process peak (imports, process group, loading, sampling and, on rank 0,
decoding) — the number to compare with a device's memory; `load`, `sampling`, `decode` are that phase's own peak.
The parent `opendit` process (it only waits for the workers and writes PNGs) is reported as `parent` from getrusage.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, bar_plot, finish, machine, render_only, report_args

CACHE = RESULTS / "whole_cache"
MIB = 2**20


def small_vae(directory: Path) -> Path:
    """A small AutoencoderKL with the DiT latent layout (4 channels, /8): decodes 512 px in well under a second."""
    from diffusers import AutoencoderKL

    if (directory / "config.json").is_file():
        return directory
    kinds = 4
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * kinds,
        up_block_types=("UpDecoderBlock2D",) * kinds,
        block_out_channels=(32,) * kinds,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    vae.save_pretrained(directory)
    return directory


def official_checkpoint(model: str, image_size: int, path: Path) -> Path:
    """An official-format DiT checkpoint (raw fp32 state dict) of random weights, written once."""
    import torch

    from opendit.models.dit import build_dit, preset

    if path.is_file():
        return path
    config = preset(model).with_image_size(image_size)
    net = build_dit(config, device="meta").to_empty(device="cpu")  # no init temporaries: filled below
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "pos_embed":
                p.copy_(net.sincos_positions().float())
            else:
                p.normal_(0, 0.02, generator=generator)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.rename(path)
    return path


def run_sample(name: str, flags: list[str], ckpt: Path, vae: Path, model: str, image_size: int, out: Path) -> dict:
    """One `opendit sample` command; its record's per-rank phase peaks, its wall time and its first image."""
    from PIL import Image

    cmd = [sys.executable, "-m", "opendit", "sample", "--model", model, "--ckpt", str(ckpt), "--image-size",
           str(image_size), "--vae", str(vae), "--steps", "1", "--cfg-scale", "1", "--classes", "207",
           "--no-progress", "--out", str(out), *flags]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = json.loads((out / "record.json").read_text())
    ranks = record["ranks"] or [{"rank": 0, "memory": record["memory"], "loading": record.get("loading")}]
    rows = []
    for rank in ranks:
        mem = rank["memory"] if rank["rank"] else record["memory"]  # rank 0's includes its decode
        rows.append({k.removesuffix("_peak_bytes"): v / MIB for k, v in mem.items() if k.endswith("_peak_bytes")})
    largest = max(rows, key=lambda r: r["process"])
    image = np.asarray(Image.open(next(out.glob("000_*.png"))))
    return {
        "name": name,
        "flags": flags,
        "wall_s": wall,
        "ranks_mib": rows,
        "whole_mib": largest["process"],
        "loading": [rank.get("loading") for rank in ranks],
        # getrusage's children maximum is only a lower bound: the workers reset their high-water marks per phase
        "children_maxrss_lower_bound_mib": max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
        "image": image,
    }


CONFIGS = {
    "1 process": [],
    "2 ranks sharded": ["--nproc", "2", "--ulysses", "2", "--shard-weights"],
    "4 ranks sharded": ["--nproc", "4", "--ulysses", "4", "--shard-weights"],
    "4 ranks unsharded": ["--nproc", "4", "--ulysses", "4"],
}


def whole_command(model: str, image_size: int, passes: int, out_dir: Path) -> dict:
    """Every configuration `passes` times, interleaved; per configuration the minimum and median of the largest
    rank's whole-process peak, the phase peaks of the minimum pass, and the image's distance to one process's."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = model.replace("/", "-")
    ckpt = official_checkpoint(model, image_size, CACHE / f"{tag}-{image_size}.pt")
    vae = small_vae(CACHE / "small-vae")
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for index in range(passes):
        for name, flags in CONFIGS.items():
            out = out_dir / f"{name.replace(' ', '_')}-{index}"
            runs[name].append(run_sample(name, flags, ckpt, vae, model, image_size, out))
            print(f"pass {index} {name}: whole {runs[name][-1]['whole_mib']:.0f} MiB, {runs[name][-1]['wall_s']:.1f} s")
    reference = runs["1 process"][0]["image"].astype(int)
    summary = {}
    for name, items in runs.items():
        best = min(items, key=lambda r: r["whole_mib"])
        summary[name] = {
            "whole_min_mib": best["whole_mib"],
            "whole_median_mib": float(np.median([r["whole_mib"] for r in items])),
            "wall_min_s": min(r["wall_s"] for r in items),
            "ranks_mib": best["ranks_mib"],
            "loading": best["loading"],
            "children_maxrss_lower_bound_mib": best["children_maxrss_lower_bound_mib"],
            "max_image_diff_vs_1_process": int(np.abs(best["image"].astype(int) - reference).max()),
        }
    one = summary["1 process"]["whole_min_mib"]
    for entry in summary.values():
        entry["ratio_vs_1_process"] = entry["whole_min_mib"] / one
    return {"model": model, "image_size": image_size, "passes": passes, "configs": summary}


def table(result: dict) -> str:
    lines = [
        f"Whole-command peaks, {result['model']} {result['image_size']} px, official-format fp32 .pt, small VAE, "
        f"1 step (largest rank; min of {result['passes']} pass(es)):",
        "",
        "| configuration | whole (MiB) | ratio | load | sampling | decode (rank 0) | image diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["configs"].items():
        rank0 = entry["ranks_mib"][0]
        big = max(entry["ranks_mib"], key=lambda r: r["process"])
        lines.append(
            f"| {name} | {entry['whole_min_mib']:.0f} | {entry['ratio_vs_1_process']:.2f} | {big['load']:.0f} | "
            f"{big['sampling']:.0f} | {rank0.get('decode', 0):.0f} | {entry['max_image_diff_vs_1_process']} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Per configuration: the largest rank's whole-process peak and its load / sampling / decode phase peaks."""
    names = list(result["configs"])
    big = [max(result["configs"][n]["ranks_mib"], key=lambda r: r["process"]) for n in names]
    rank0 = [result["configs"][n]["ranks_mib"][0] for n in names]
    series = {
        "whole process": [result["configs"][n]["whole_min_mib"] for n in names],
        "loading": [b["load"] for b in big],
        "sampling": [b["sampling"] for b in big],
        "decode (rank 0)": [r.get("decode") for r in rank0],
    }
    title = f"whole-command peak per rank, {result['model']} {result['image_size']} px (largest rank, min of passes)"
    bar_plot(path, names, series, "MiB", title)


def render(result: dict, out) -> dict:
    return finish(out, result, table(result), plot=lambda path: plot(result, path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2)
    report_args(parser, "whole_command")
    args = parser.parse_args(argv)
    if render_only(args, render):
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        result = whole_command(args.model, args.image_size, args.passes, Path(scratch))
    result |= {"machine": machine()}
    render(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
