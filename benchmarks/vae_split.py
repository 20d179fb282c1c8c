"""The VAE decode split over 2 ranks (parallel/vae.py, `--vae-parallel`) vs 1 process: wall time and decode-phase
peak memory -> benchmarks/results/vae_split.{json,md,png}; the method and the numbers are in docs/vae_split.md.

    .venv/bin/python benchmarks/vae_split.py                        # 1024x1024, the SD/Flux VAE config, 2 passes
    .venv/bin/python benchmarks/vae_split.py --size 512 --passes 3  # quicker

Model: diffusers AutoencoderKL with the SD / Flux VAE decoder config (block_out_channels 128, 256, 512, 512; 2 layers
per block + 1; 32 groups; mid-block attention; 16 latent channels as Flux's), random weights (seed 0), fp32, one
(1, 16, size/8, size/8) latent -> (1, 3, size, size) image. `--channels` / `--layers` shrink the decoder when the
machine is too slow for the real one (the JSON records what ran).

One job of 3 gloo processes, one torch thread each, glibc's mmap threshold fixed (observe.memory.exact_malloc, so
freed tensors leave the resident set): rank 0 decodes whole (today's path: the VAE's own decode), ranks 1 and 2
decode split (`install_vae_split` over their own group). The two configurations alternate, pass by pass (whole, split,
whole, split, ...), never at the same time: the idle side waits in a gloo barrier (blocked, not spinning). Per pass
and per decoding rank: the wall time from a barrier of the decoding ranks to the gathered image (the split's time is
its slower rank's), the resident set before the decode, and its high-water mark during the decode (VmHWM reset
first). "decode peak" is that high-water mark (the whole process: interpreter, torch, the VAE's weights, the decode),
"decode working" that mark minus the resident set before the decode; both are reported as the maximum over the
decoding ranks. The split is checked against the whole decode (max |difference| on the [-1, 1] output).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, finish, machine, render_only, report_args

sys.path.insert(0, str(ROOT / "tests"))  # dist_utils.run_distributed: the tests' launcher of a gloo job
MIB = 2**20


def build_vae(channels: tuple[int, ...], layers: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = len(channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=channels, layers_per_block=layers, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip


def worker(rank: int, world: int, args: dict) -> dict:
    import torch.distributed as dist

    from opendit.distributed.comm import Comm
    from opendit.observe.memory import exact_malloc, peak_rss_bytes, reset_peak_rss, rss_bytes
    from opendit.parallel.vae import install_vae_split

    exact_malloc()
    split_ranks = [1, 2]
    split_group = dist.new_group(split_ranks)  # every rank creates it (new_group is collective)
    vae = build_vae(tuple(args["channels"]), args["layers"])
    del vae.encoder  # decode only: what a pipeline's decoding rank needs of the encoder is nothing (not measured)
    latent_side = args["size"] // 2 ** (len(args["channels"]) - 1)
    z = torch.randn(1, 16, latent_side, latent_side, generator=torch.Generator().manual_seed(1))
    comm = Comm(split_group) if rank in split_ranks else None
    if comm is not None:
        install_vae_split(vae, comm, mode=True)
    passes, image = [], None
    for index in range(args["passes"]):
        for config in ("whole", "split"):
            dist.barrier()  # both sides: the other configuration is done
            decoding = (config == "whole" and rank == 0) or (config == "split" and rank in split_ranks)
            if decoding:
                if config == "split":
                    dist.barrier(group=split_group)
                    comm.stats.reset()
                before = rss_bytes()
                reset_peak_rss()
                start = time.perf_counter()
                with torch.no_grad():
                    out = vae.decode(z).sample  # (1, 3, size, size)
                seconds = time.perf_counter() - start
                peak = peak_rss_bytes()
                passes.append({"pass": index, "config": config, "seconds": seconds, "rss_before": before,
                               "decode_peak": peak, "decode_working": peak - before,  # fmt: skip
                               "comm": comm.stats.snapshot() if config == "split" else None})  # fmt: skip
                image = out
            dist.barrier()
    return {"rank": rank, "passes": passes, "image": image}


def summarise(results: list[dict]) -> dict:
    """Per configuration: per pass the slowest decoding rank's time and the largest rank's memory; min and median."""
    table: dict[str, dict] = {}
    for config, ranks in (("whole", [0]), ("split", [1, 2])):
        by_pass: dict[int, list[dict]] = {}
        for result in results:
            if result["rank"] in ranks:
                for p in result["passes"]:
                    if p["config"] == config:
                        by_pass.setdefault(p["pass"], []).append(p)
        rows = []
        for index in sorted(by_pass):
            entries = by_pass[index]
            rows.append({key: max(e[key] for e in entries) for key in ("seconds", "decode_peak", "decode_working")})
            if config == "split":  # seconds blocked in the split's collectives (halos, norms, ...), per rank
                rows[-1]["comm_wait_s"] = [sum(v["wait_s"] for v in e["comm"].values()) for e in entries]
                rows[-1]["comm_calls"] = {k: v["calls"] for k, v in entries[0]["comm"].items()}
        table[config] = {
            "ranks": ranks,
            "per_pass": rows,
            **{
                f"{key}_{stat}": fn([r[key] for r in rows])
                for key in ("seconds", "decode_peak", "decode_working")
                for stat, fn in (("min", min), ("median", statistics.median))
            },  # fmt: skip
        }
    whole, split = table["whole"], table["split"]
    table["speedup_min"] = whole["seconds_min"] / split["seconds_min"]
    table["speedup_median"] = whole["seconds_median"] / split["seconds_median"]
    table["decode_peak_ratio"] = split["decode_peak_median"] / whole["decode_peak_median"]
    table["decode_working_ratio"] = split["decode_working_median"] / whole["decode_working_median"]
    return table


def render(record: dict, out) -> dict:
    s, w, p = record["summary"]["split"], record["summary"]["whole"], record["summary"]
    lines = [
        f"VAE decode of a {record['size']}x{record['size']} image (AutoencoderKL, channels {record['channels']}, "
        f"{record['layers']} layers per block, fp32, random weights), {record['passes']} interleaved passes; "
        f"max |split - whole| = {record['max_abs_diff']:.2e}. Load average {record['loadavg_start']} before, "
        f"{record['loadavg_end']} after (2 cores shared).",
        "",
        "| configuration | wall s (min) | wall s (median) | decode peak MiB (median, max over ranks) | "
        "decode working MiB (median, max over ranks) |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("1 process x 1 thread", w), ("2 ranks x 1 thread (--vae-parallel)", s)):
        lines.append(f"| {name} | {row['seconds_min']:.1f} | {row['seconds_median']:.1f} | "
                     f"{row['decode_peak_median'] / MIB:.0f} | {row['decode_working_median'] / MIB:.0f} |")  # fmt: skip
    waits = [max(r["comm_wait_s"]) for r in s["per_pass"]]
    lines += [
        "",
        f"The split's ranks were blocked in its collectives (halo exchanges, group-norm statistics, attention keys and "
        f"values, the final gather) {statistics.median(waits):.1f} s per pass (median of the slower rank), calls "
        f"per decode: {s['per_pass'][0]['comm_calls']}.",
        "",
        f"Speedup {p['speedup_min']:.2f}x (minima), {p['speedup_median']:.2f}x (medians); decode peak "
        f"{p['decode_peak_ratio']:.2f}x, decode working memory {p['decode_working_ratio']:.2f}x of one process.",
    ]
    return finish(out, record, "\n".join(lines), plot=lambda path: plot(record, path))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, w = record["summary"]["split"], record["summary"]["whole"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = ["1 process", "2 ranks split"]
    for axis, key, label in ((left, "seconds", "decode wall time (s)"), (right, "decode_working", "decode MiB")):
        scale = 1 if key == "seconds" else 1 / MIB
        for i, row in enumerate((w, s)):
            values = [r[key] * scale for r in row["per_pass"]]
            axis.bar(i, statistics.median(values), color=("#888", "#3a7")[i], width=0.6)
            axis.plot([i] * len(values), values, "k.", ms=6)
        axis.set_xticks([0, 1], names)
        axis.set_ylabel(label + (" (working: peak - before)" if key != "seconds" else ""))
    fig.suptitle(f"VAE decode {record['size']}x{record['size']}: bars = median, dots = passes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes of each configuration")
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 512, 512])
    parser.add_argument("--layers", type=int, default=2, help="layers per block (the decoder runs this + 1)")
    report_args(parser, "vae_split")
    args = parser.parse_args()
    if render_only(args, render):
        return
    from dist_utils import run_distributed

    job = {"size": args.size, "passes": args.passes, "channels": args.channels, "layers": args.layers}
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load0, start = os.getloadavg(), time.perf_counter()
    results = run_distributed(worker, 3, job, timeout=3600)
    images = {r["rank"]: r["image"] for r in results}
    record = {
        **job,
        "model": "AutoencoderKL (SD/Flux VAE decoder layout), 16 latent channels, fp32, random weights",
        "method": "3 gloo processes x 1 thread: rank 0 whole, ranks 1-2 split; configurations interleaved per pass",
        "max_abs_diff": max(float((images[r] - images[0]).abs().max()) for r in (1, 2)),
        "summary": summarise(results),
        "ranks": [{k: v for k, v in r.items() if k != "image"} for r in results],
        "uptime_before": uptime,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "benchmark_s": time.perf_counter() - start,
        "machine": machine(),
    }
    render(record, args.out)


if __name__ == "__main__":
    main()
