"""Per-rank peak memory vs world size and token count, with and without --shard-weights, fp32 and bf16 -> JSON+MD+PNG.

    .venv/bin/python benchmarks/memory.py                      # the full grid (long on 2 CPU cores: see docs/memory.md)
    .venv/bin/python benchmarks/memory.py --tokens 1024 --depth 2 --worlds 1 2   # a quick look

Model: DiT-XL/2 width (hidden 1152, 16 heads, patch 2, 4 latent channels, learn_sigma) with `--depth` blocks (default
4; the real model has 28, measured at 16384 tokens) and random weights; T tokens = a (2*sqrt(T))^2 latent.
One forward pass of `--batch` images
(default 2: the conditional + unconditional halves of one guided image) under torch.no_grad(), through the project's own
runtime: `build_runtime(ParallelConfig(ulysses=P, shard_weights=...))` + `parallelize(model, runtime)`, i.e. exactly
what `opendit --nproc P --ulysses P [--shard-weights]` runs per denoising step, in P processes from
`opendit.distributed.launch` (gloo, one thread each).

How memory is measured (CPU; torch keeps no allocator statistics for CPU tensors): each rank fixes glibc's mmap
threshold at 64 KiB (`observe.memory.exact_malloc`), so every tensor is its own mapping and freeing returns it to the
OS; warms up the kernels with a one-block model; records its resident set (VmRSS) as the baseline (interpreter, torch,
gloo, kernels); builds and parallelizes (and shards) the model; resets the high-water mark (clear_refs) and runs
the forward. Reported per rank: `params` = resident set after setup - baseline (the parameters this rank holds), and
`peak` = high-water mark during the forward - baseline (parameters + activations + communication buffers). The table
gives the largest rank. Nothing here materialises the (S, S) attention matrix: attention is SDPA (flash kernel on CPU),
whose working memory is blockwise; a materialised (S, S) fp32 score matrix alone would be 16 heads x S^2 x 4 bytes =
17 GB at 16384 tokens, so the measured peaks prove its absence.

`--whole` measures something else: whole-command peaks of `opendit sample` (imports, loading, sampling, decoding): it
runs benchmarks/whole_command.py -> benchmarks/results/whole_command.{json,md,png}. The figures below are forward-only.

Results (benchmarks/results/memory.{json,md,png}; 2-core CPU, gloo, one thread per rank): at 16384 tokens with
sharded weights and the real 28 blocks, 4 ranks peak at 0.26x of 1 rank (fp32 1113 vs 4237 MiB; measured with
`--tokens 16384 --worlds 4 1 --dtypes fp32 --no-unsharded --depth 28`, 21 min of forward time for the one rank);
0.27x with 4 blocks (559 vs 2048 MiB). `projected_peak` (the measured peak plus the left-out blocks' parameters)
predicts the 28-block peak from the 4-block one within a few MiB. What got there: the model shards raw patches before
the embedding (no rank holds a full (B, T, C) tensor), the gloo weight all-gather broadcasts in place instead of
staging a second copy, the root unit is freed after the embedding, and pos_embed (1, T, C) is sharded along its hidden
dim (FSDP2 pads dim 0 to P rows, which left it whole on every rank: 0.33x at 28 blocks before). What still does not
shrink with P: the Ulysses send/receive buffers and about one gathered block. The Ulysses activations scale as 1/P
(1588 MiB at 1 rank, ~400 at 4).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import finish, machine, render_only, report_args


def dit_config(tokens: int, depth: int):
    from opendit.models.dit import DiTConfig, preset

    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} must be a square (a side x side token grid)")
    return DiTConfig(**{**preset("DiT-XL/2").to_dict(), "depth": depth, "input_size": (2 * side, 2 * side)})


def random_model(config, dtype: torch.dtype):
    """Random weights without the init's float64 temporaries: built on meta, then filled in place."""
    from opendit.models.dit import build_dit

    model = build_dit(config, device="meta", dtype=dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                model.reset_pos_embed()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    return model.eval()


# sequence parallel (+ sharded weights), tensor parallel, tp 2 x ulysses, PipeFusion over every rank (N patches)
LAYOUTS = ("ulysses", "tp", "tp-ulysses", "pipefusion")


def layout_plan(layout: str, world: int, shard: bool):
    """The plan of one layout on `world` ranks: Ulysses over all of them (sharded or not), tp over all of them, or
    tp 2 x Ulysses world/2 (tp innermost)."""
    from opendit.distributed.config import ParallelConfig

    if world == 1:
        return ParallelConfig()
    if layout == "tp":
        return ParallelConfig(tp=world)
    if layout == "tp-ulysses":
        return ParallelConfig(tp=2, ulysses=world // 2)
    if layout == "pipefusion":
        return ParallelConfig(pipefusion=world)
    return ParallelConfig(ulysses=world, shard_weights=shard)


def measure_rank(case: dict) -> dict:
    """Runs in every rank (launched): the memory of one forward pass for one configuration; rank 0 returns all."""
    import gc

    import torch.distributed as dist

    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.models.dit import build_dit
    from opendit.models.precision import parse_dtype
    from opendit.observe.memory import exact_malloc, peak_rss_bytes, reset_peak_rss, rss_bytes
    from opendit.parallel.apply import parallelize

    exact_malloc()
    init_from_env(torch.device("cpu"), "gloo")
    world = dist.get_world_size()
    dtype = parse_dtype(case["dtype"])
    config = dit_config(case["tokens"], case["depth"])
    plan = layout_plan(case.get("layout", "ulysses"), world, case["shard"])
    runtime = build_runtime(plan)
    b = case["batch"]
    x = torch.randn(b, config.in_channels, *config.input_size)
    t, y = torch.full((b,), 500.0), torch.arange(b) % config.num_classes
    small = dit_config(64, 1)
    with torch.no_grad():  # warm-up: kernels, thread pools, gloo buffers
        build_dit(small, dtype=dtype)(torch.randn(b, 4, *small.input_size), t, y)
        dist.barrier()
    gc.collect()
    base = rss_bytes()
    if plan.tp > 1 or plan.pipefusion > 1:  # as a run loads: built on meta, split, only the local part materialised
        model = build_dit(config, device="meta", dtype=dtype).eval()
        fn = parallelize(model, runtime)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(model.sincos_positions()) if name == "pos_embed" else p.normal_(0, 0.02)
    else:
        model = random_model(config, dtype)
        fn = parallelize(model, runtime)
    gc.collect()
    params = rss_bytes() - base
    dist.barrier()
    reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(x, t, y)  # (B, 8, H, W); PipeFusion: a warm-up step (whole sequence), filling the K/V caches
        if plan.pipefusion > 1:  # and a pipelined one: a run's peak covers both
            fn.step = plan.warmup_steps
            out = fn(x, t, y)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() - base
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2: this rank's shard
    held = sum(p.numel() * p.element_size() for p in local)  # exact, vs the resident-set delta
    mine = {"params": params, "peak": peak, "seconds": seconds, "finite": bool(torch.isfinite(out).all()), "held": held}
    every = [None] * world
    dist.all_gather_object(every, mine)
    dist.barrier()
    dist.destroy_process_group()
    return {"ranks": every}


def run_case(case: dict) -> dict:
    from opendit.distributed.launch import launch

    result = launch(measure_rank, nproc=case["world"], args=(case,), threads_per_proc=1)
    ranks = result["ranks"]
    return {
        **case,
        "per_rank": ranks,
        "peak_bytes": max(r["peak"] for r in ranks),
        "param_bytes": max(r["params"] for r in ranks),
        "held_param_bytes": max(r["held"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "finite": all(r["finite"] for r in ranks),
    }


def plot(results: list[dict], path: Path, depth: int = 4) -> None:
    """Lines: per-rank peak vs tokens at `depth` blocks; stars: any rows measured at the real 28 blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        series: dict[tuple, list] = {}
        for r in results:
            if r["dtype"] == dtype and r["depth"] in (depth, 28):
                series.setdefault((r["depth"], r["world"], r["shard"]), []).append(
                    (r["tokens"], r["peak_bytes"] / 2**30)
                )
        for (blocks, world, shard), points in sorted(series.items()):
            points.sort()
            label = f"{world} rank{'s' if world > 1 else ''}" + (", sharded weights" if shard else "")
            if blocks == 28:
                ax.plot(*zip(*points), marker="*", markersize=12, linestyle="none", label=label + ", 28 blocks")
            else:
                ax.plot(*zip(*points), marker="o", linestyle="--" if shard else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("per-rank peak memory (GiB)")
        ax.set_title(f"DiT-XL/2 width, {depth} blocks (stars: 28), batch {results[0]['batch']}, {dtype}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def projected_peak(r: dict, depth: int = 28) -> float:
    """The measured peak plus the resident bytes of the blocks the benchmark left out (1/P of each when sharded).

    Everything else in the peak (activations, gathered units, communication buffers) is per block, not per depth:
    checked by measuring 4 and 8 blocks (docs/memory.md)."""
    from opendit.models.dit import build_dit
    from opendit.models.precision import parse_dtype

    block = build_dit(dit_config(r["tokens"], 1), device="meta").blocks[0]
    per_block = sum(p.numel() for p in block.parameters()) * parse_dtype(r["dtype"]).itemsize
    layout = r.get("layout", "ulysses")
    split = r["world"] if r["shard"] else {"tp": r["world"], "tp-ulysses": 2, "pipefusion": r["world"]}.get(layout, 1)
    if layout == "pipefusion":  # a stage's blocks each keep K and V of the whole sequence: 2 x (B, T, C)
        per_block += (
            2 * r["batch"] * r["tokens"] * dit_config(r["tokens"], 1).hidden_size * parse_dtype(r["dtype"]).itemsize
        )
    return r["peak_bytes"] + (depth - r["depth"]) * per_block / split


def table(results: list[dict]) -> str:
    one = {(r["tokens"], r["dtype"], r["depth"]): r for r in results if r["world"] == 1}
    head = (
        "| dtype | tokens | blocks | ranks | layout | sharded | params/rank MiB | peak/rank MiB | vs 1 rank | "
        "peak @28 blocks MiB (projected below 28) | vs 1 rank @28 | forward s |"
    )
    lines = [head, "|" + "---|" * 12]
    order = {name: i for i, name in enumerate(LAYOUTS)}
    for r in sorted(
        results,
        key=lambda r: (r["dtype"], r["depth"], r["tokens"], r["world"], order[r.get("layout", "ulysses")], r["shard"]),
    ):
        ref = one.get((r["tokens"], r["dtype"], r["depth"]))
        ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "-"
        ratio28 = f"{projected_peak(r) / projected_peak(ref):.2f}" if ref else "-"
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {r['depth']} | {r['world']} | {r.get('layout', 'ulysses')} | "
            f"{'yes' if r['shard'] else 'no'} | "
            f"{r['param_bytes'] / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} | {ratio} | "
            f"{projected_peak(r) / 2**20:.0f} | {ratio28} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def render(record: dict, out) -> dict:
    results = record["results"]
    return finish(out, record, table(results), plot=lambda path: plot(results, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-unsharded", action="store_true", help="at P > 1 run only the sharded configuration")
    parser.add_argument("--layouts", nargs="+", default=["ulysses"], choices=LAYOUTS, help="plans at P > 1")
    parser.add_argument("--append", action="store_true", help="keep the results already in --out, skip those cases")
    report_args(parser, "memory")
    parser.add_argument("--whole", action="store_true", help="whole-command peaks of `opendit sample` (whole_command)")
    parser.add_argument("--whole-model", default="DiT-XL/2")
    parser.add_argument("--whole-image-size", type=int, default=512)
    parser.add_argument("--whole-passes", type=int, default=2)
    args = parser.parse_args()
    if render_only(args, render):
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.whole:  # its own benchmark script (no import between benchmark scripts)
        flags = ["--model", args.whole_model, "--image-size", str(args.whole_image_size)]
        flags += ["--passes", str(args.whole_passes)]
        sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("whole_command.py")), *flags]))
    sharding = (True,) if args.no_unsharded else (False, True)
    cases = [
        {"tokens": n, "world": w, "shard": s, "dtype": d, "depth": args.depth, "batch": args.batch, "layout": layout}
        for d in args.dtypes
        for n in args.tokens
        for w in args.worlds
        for layout in (args.layouts if w > 1 else ("ulysses",))
        for s in (sharding if w > 1 and layout == "ulysses" else (False,))
        if not (layout == "tp-ulysses" and w < 4)
    ]
    record = {"machine": machine(), "torch": torch.__version__, "method": "peak RSS delta, see docstring"}
    results, start, wall = [], time.perf_counter(), 0.0
    if args.append and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        results, wall = old["results"], old.get("wall_s", 0.0)

    def key(c: dict) -> tuple:
        return (*(c[k] for k in ("tokens", "world", "shard", "dtype", "depth", "batch")), c.get("layout", "ulysses"))

    done = {key(r) for r in results}
    for case in cases:
        if key(case) in done:
            continue
        results.append(run_case(case))
        r = results[-1]
        print(
            f"{r['dtype']} T={r['tokens']} P={r['world']} {r['layout']} shard={r['shard']}: "
            f"params {r['param_bytes'] / 2**20:.0f} MiB, peak {r['peak_bytes'] / 2**20:.0f} MiB, {r['seconds']:.1f} s",
            flush=True,
        )
        record |= {"results": results, "wall_s": wall + time.perf_counter() - start}
        out.with_suffix(".json").write_text(json.dumps(record, indent=2))  # partial results survive interruption
    render(record | {"results": results}, out)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
