"""Sequence-parallel scaling on this machine: per-step latency, speedup, bytes, hidden communication, memory,
predicted vs measured, and the error of half-precision messages -> JSON + Markdown + PNG.

    .venv/bin/python benchmarks/scaling.py                   # full run (~15 min on 2 quiet cores)
    .venv/bin/python benchmarks/scaling.py --quick           # 256 tokens, 2 repeats (~1 min): a smoke test
    .venv/bin/python benchmarks/scaling.py --calibrate       # measure compute and link speeds for the prediction first

Model: DiT-XL/2 width (hidden 1152, 16 heads, patch 2, 4 latent channels, learned sigma) with depth reduced to 4
blocks and random weights (N(0, 0.02) added everywhere, so adaLN-Zero does not make the blocks identities). Token
counts 256 / 1024 / 4096 are 32x32 / 64x64 / 128x128 latents. One step = one call of the model on a batch of ONE
latent (no CFG pair: with guidance the batch doubles and cfg parallelism is the natural split) at t = 500, fp32.

Every configuration runs in fresh spawned processes (gloo over loopback, ONE torch thread per rank), so peak memory
(VmHWM) is per configuration. World 1 runs the plain model; world 2 runs each sequence-parallel kernel through the
real runtime (`build_runtime` + `parallelize`):
  ulysses          UlyssesAttention core (q, k, v packed in one all-to-all; no overlap)
  ulysses-overlap  UlyssesOverlapAttention (K/V sent before Q is projected, 2 head groups pipelined)
  ring             RingAttention (next K/V block in flight during the current block)
  fastseq          FastSeqAttention (all-gather in 2 chunks under the QKV matmul)
USP needs ulysses x ring >= 4 ranks and is skipped on 2.

Timing: all ranks meet at a barrier, then time one forward; the step time of a repeat is the slowest rank's; the
reported latency is the median over repeats after warm-up. Communication: `CommStats` per step (calls, bytes,
blocked wait). The run is then repeated with `Comm.sync = True` (every async op completed at issue: the same
messages with no overlap), whose total wait is the whole communication time; comm_hidden_fraction =
1 - exposed wait / synchronous wait. Waits are per op and skew-free: a rank's wait at a collective also contains its
peer's remaining compute, so each op counts the wait of the rank that arrived last (the minimum over ranks).
Half precision on the wire (`comm_dtype` bf16 / fp16) is
measured on one extra forward each (attention messages only; the gathered prediction stays fp32, as with
--comm-dtype): max relative error vs the 1-rank fp32 output and the byte ratio. If the digits
model (src/opendit/digits/weights/digits.safetensors) exists, the same errors are measured on its samples (whole
sampling loop, 2-rank Ulysses vs 1 process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import DIGITS_CKPT, PLANS, RESULTS, finish, machine, random_model, rel_err, render_only, rss_mib
from common import xl_width_config as model_config

IMPLS = ("ulysses", "ulysses-overlap", "ring", "fastseq")
DIGITS = DIGITS_CKPT


def _comms(runtime) -> list:
    seen = {}
    for comm in runtime.comms.values():
        if comm is not None:
            seen[id(comm)] = comm
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ worker
def worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
    result = run_config(rank, world, job, out_dir) if job["kind"] == "scaling" else run_digits(rank, world, job)
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def run_config(rank: int, world: int, job: dict, out_dir: str) -> dict:
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize

    tokens, impl = job["tokens"], job["impl"]
    base_rss = rss_mib("VmRSS")
    config = model_config(tokens, job["depth"])
    model = random_model(config)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, config.in_channels, *config.input_size, generator=gen)  # (1, 4, h, w), same on every rank
    t, y = torch.tensor([500.0]), torch.tensor([3])
    runtime = None
    fn = model
    if world > 1:
        runtime = build_runtime(ParallelConfig(**PLANS[impl]), "cpu")
        fn = parallelize(model, runtime)
        # the strategy comes from the registry by name (PLANS); the gathered prediction travels through
        # runtime.exact("sp"), a Comm of its own, so the comm-dtype runs below halve only the attention messages
        sizes, sp = fn.token_sizes, runtime.comms["sp"]

    def step() -> tuple[float, dict, torch.Tensor]:
        if world > 1:
            dist.barrier()  # ranks start together; the step ends when the slowest rank is done
        start = time.perf_counter()
        out = fn(x, t, y)
        elapsed = time.perf_counter() - start
        snap = runtime.stats.end_step() if runtime else {}
        if runtime is not None:  # per-op waits of this step, in call order (same order on every rank)
            snap = {**snap, "_trace": [w for _, w in runtime.stats.trace]}
            runtime.stats.trace.clear()
        return elapsed, snap, out

    if runtime is not None:
        runtime.stats.trace = []

    for _ in range(job["warmup"]):
        step()
    times, snaps = [], []
    for _ in range(job["repeats"]):
        dt, snap, out = step()
        times.append(dt)
        snaps.append(snap)
    res: dict = {"times": times}
    if runtime is not None:
        last = {k: v for k, v in snaps[-1].items() if k != "_trace"}
        res["bytes"] = sum(v["bytes"] for v in last.values())
        res["calls"] = {k: v["calls"] for k, v in last.items()}
        res["traces"] = [s["_trace"] for s in snaps]
        for comm in _comms(runtime):
            comm.sync = True
        sync_times, sync_traces = [], []
        for _ in range(job["sync_repeats"]):
            dt, snap, _ = step()
            sync_times.append(dt)
            sync_traces.append(snap["_trace"])
        for comm in _comms(runtime):
            comm.sync = False
        res["sync_times"], res["sync_traces"] = sync_times, sync_traces
        ref = torch.load(Path(out_dir).parent / f"ref_{tokens}.pt")
        res["fp32_err"] = rel_err(out, ref)
        res["comm_dtype"] = {}
        gather_bytes = (
            sizes[sp.rank] * config.patch_size**2 * config.out_channels * 4 * (world - 1)
        )  # (1, S_r, p*p*out)
        for name in job["comm_dtypes"]:
            for comm in _comms(runtime):
                comm.comm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
            _, snap, out16 = step()
            wire_bytes = sum(v["bytes"] for k, v in snap.items() if k != "_trace")
            res["comm_dtype"][name] = {
                "err": rel_err(out16, ref),
                "bytes": wire_bytes,
                "bytes_ratio": wire_bytes / res["bytes"],
                # without the fp32 token gather of the prediction: the attention messages alone
                "attention_bytes_ratio": (wire_bytes - gather_bytes) / (res["bytes"] - gather_bytes),
            }
            for comm in _comms(runtime):
                comm.comm_dtype = None
    elif rank == 0:
        torch.save(out, Path(out_dir).parent / f"ref_{tokens}.pt")
    res["peak_rss_mib"], res["base_rss_mib"] = rss_mib("VmHWM"), base_rss
    per_rank = _gather(res, world)
    return {"ranks": per_rank}


@torch.no_grad()
def run_digits(rank: int, world: int, job: dict) -> dict:
    """Whole sampling loop of the digits model: 2-rank Ulysses with fp32 / bf16 / fp16 messages vs 1 process."""
    from opendit.api.generation import GenerationRequest, resolve_model
    from opendit.diffusion.sampler import sample
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import sample_images
    from opendit.io.checkpoint import load_model
    from opendit.parallel.apply import parallelize

    config, ckpt, defaults, _ = resolve_model(GenerationRequest(classes=[0], ckpt=str(job["ckpt"])))
    labels = torch.arange(10) % config.num_classes
    kwargs = {
        "num_classes": config.num_classes,
        "scheduler_name": defaults["scheduler"],
        "prediction": config.prediction,
        "learn_sigma": config.learn_sigma,
        "steps": defaults["steps"],
        "cfg_scale": defaults["cfg_scale"],
        "seed": 0,
    }
    shape = (config.in_channels, *config.input_size)
    ref = sample(load_model(config, ckpt), labels, shape, **kwargs).samples  # one process, fp32
    out = {"steps": defaults["steps"], "cfg_scale": defaults["cfg_scale"], "images": len(labels)}
    for name in ("fp32", "bf16", "fp16"):
        plan = ParallelConfig(ulysses=world, comm_dtype=None if name == "fp32" else name)
        runtime = build_runtime(plan, "cpu")
        pmodel = parallelize(load_model(config, ckpt), runtime)
        got = sample_images(pmodel, labels, shape, **kwargs).samples  # closes a CommStats step per denoising step
        step_bytes = sum(v["bytes"] for v in runtime.stats.history[-1].values())
        out[name] = {
            "samples_err": rel_err(got, ref),
            "mean_abs_err": float((got - ref).abs().mean()),
            "bytes": step_bytes,
        }
    return out


# ------------------------------------------------------------------------------------------------ parent
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, job: dict, tmp: Path) -> dict:
    out_dir = Path(tempfile.mkdtemp(dir=tmp))
    mp.start_processes(worker, args=(world, free_port(), job, str(out_dir)), nprocs=world, start_method="spawn")
    return json.loads((out_dir / "result.json").read_text())


def predict(tokens: int, depth: int, impl: str | None, speeds) -> float:
    from opendit.distributed.config import ParallelConfig
    from opendit.planning.cost import predict_step_time

    plan = ParallelConfig(**PLANS[impl]) if impl else ParallelConfig()
    return predict_step_time(model_config(tokens, depth), tokens, 1, plan, speeds, guided=False).total_s


def comm_wait(ranks: list[dict], key: str) -> tuple[float, list[float]]:
    """(communication wait per step without skew, per-rank raw wait per step), averaged over repeats.

    A rank's wait at a collective = time its peers still computed (skew) + the transfer. Per op, the rank that arrived
    last waited only for the transfer, so the skew-free time of an op is the minimum over ranks of its wait."""
    steps = range(len(ranks[0][key]))
    per_step = [sum(min(ws) for ws in zip(*(r[key][i] for r in ranks))) for i in steps]
    raw = [statistics.fmean(sum(r[key][i]) for i in steps) for r in ranks]
    return statistics.fmean(per_step), raw


def summarize(tokens: int, impl: str, raw: dict, base_s: float | None, predicted: float) -> dict:
    ranks = raw["ranks"]
    n = len(ranks)
    step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"])))
    row = {
        "tokens": tokens,
        "world": n,
        "impl": impl,
        "step_s": step_s,
        "step_s_repeats": [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))],
        "speedup": (base_s / step_s) if base_s else 1.0,
        "efficiency": (base_s / step_s / n) if base_s else 1.0,
        "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
        "base_rss_mib": [r["base_rss_mib"] for r in ranks],
        "predicted_s": predicted,
        "predicted_over_measured": predicted / step_s,
    }
    if n > 1:
        sync_s = statistics.median(max(r["sync_times"][i] for r in ranks) for i in range(len(ranks[0]["sync_times"])))
        exposed, exposed_raw = comm_wait(ranks, "traces")
        total, total_raw = comm_wait(ranks, "sync_traces")
        row.update(
            {
                "bytes_per_step": [r["bytes"] for r in ranks],
                "calls_per_step": ranks[0]["calls"],
                "comm_exposed_s": exposed,
                "comm_sync_s": total,
                "comm_hidden_fraction": max(0.0, 1 - exposed / total) if total > 0 else 0.0,
                "comm_wait_with_skew_s": {"overlapped": exposed_raw, "sync": total_raw},
                "step_s_sync": sync_s,
                "fp32_err_vs_1rank": max(r["fp32_err"] for r in ranks),
                "comm_dtype": {
                    name: {
                        "err_vs_1rank_fp32": max(r["comm_dtype"][name]["err"] for r in ranks),
                        "bytes_ratio": max(r["comm_dtype"][name]["bytes_ratio"] for r in ranks),
                        "attention_bytes_ratio": [r["comm_dtype"][name]["attention_bytes_ratio"] for r in ranks],
                    }
                    for name in ranks[0]["comm_dtype"]
                },
            }
        )
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(("none", *IMPLS), ("black", "C0", "C1", "C2", "C3")))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    token_list = sorted({r["tokens"] for r in rows})
    for impl, color in colors.items():
        pts = [r for r in rows if r["impl"] == impl]
        if pts:
            label = "1 rank" if impl == "none" else f"2 ranks, {impl}"
            xs = [r["tokens"] for r in pts]
            ax1.plot(xs, [r["step_s"] for r in pts], marker="o", color=color, label=label)
            ax1.plot(xs, [r["predicted_s"] for r in pts], ls=":", marker="x", color=color)
    ax1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds per step (dotted: cost model)")
    ax1.set_title("DiT-XL/2 width, 4 blocks, batch 1, fp32")
    ax1.set_xticks(token_list, [str(t) for t in token_list])
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend(fontsize=8)
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        pts = {r["tokens"]: r["speedup"] for r in rows if r["impl"] == impl}
        xs = [j + (i - (len(IMPLS) - 1) / 2) * width for j, t in enumerate(token_list) if t in pts]
        ax2.bar(xs, [pts[t] for t in token_list if t in pts], width, label=impl, color=colors[impl])
    ax2.axhline(2.0, color="k", lw=0.8)
    ax2.axhline(1.85, color="r", ls="--", lw=0.8, label="1.85x target")
    ax2.set_xticks(range(len(token_list)), [str(t) for t in token_list])
    ax2.set(xlabel="tokens", ylabel="speedup, 2 ranks vs 1", ylim=(0, 2.4))
    ax2.set_title("2 ranks x 1 thread vs 1 rank x 1 thread (gloo)")
    ax2.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    head = (
        "| tokens | ranks | sp-impl | step (s) | speedup | efficiency | MB sent/step/rank | calls/step | comm hidden "
        "| predicted (s) | pred/meas | peak RSS/rank (MiB) | bf16 err | fp16 err |\n|" + "---|" * 14
    )
    lines = [head]
    for r in rows:
        cd = r.get("comm_dtype", {})
        lines.append(
            f"| {r['tokens']} | {r['world']} | {r['impl']} | {r['step_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['efficiency']:.0%} | {max(r.get('bytes_per_step', [0])) / 1e6:.2f} | "
            f"{sum(r.get('calls_per_step', {}).values())} | "
            + (f"{r['comm_hidden_fraction']:.0%}" if "comm_hidden_fraction" in r else "-")
            + f" | {r['predicted_s']:.3f} | {r['predicted_over_measured']:.2f} | {max(r['peak_rss_mib']):.0f} | "
            + " | ".join(f"{cd[k]['err_vs_1rank_fp32']:.1e}" if k in cd else "-" for k in ("bf16", "fp16"))
            + " |"
        )
    return "\n".join(lines)


def render(record: dict, out) -> dict:
    rows = record["results"]
    return finish(out, record, table(rows), plot=lambda path: plot(rows, path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sync-repeats", type=int, default=2, help="forwards with every async op forced sync")
    parser.add_argument("--comm-dtypes", nargs="*", default=["bf16", "fp16"])
    parser.add_argument("--comm-dtype-max-tokens", type=int, default=1024, help="measure comm-dtype errors up to here")
    parser.add_argument("--speeds", default="auto", help="cost-model speeds: auto (calibration cache), name, or JSON")
    parser.add_argument("--calibrate", action="store_true", help="run `opendit calibrate` first (~1 min)")
    parser.add_argument("--quick", action="store_true", help="256 tokens, 2 repeats: a smoke test, not a measurement")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits model's comm-dtype errors")
    parser.add_argument("--out", default=None, help="OUT.{json,md,png} (default results/scaling[_speedup])")
    parser.add_argument("--render", "--from-json", dest="render", metavar="JSON", help="only rewrite the .md and .png")
    parser.add_argument("--speedup", action="store_true", help="issue 19's interleaved speedup vs the measured limit")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="--speedup")
    parser.add_argument("--passes", type=int, default=5, help="--speedup: interleaved passes (median)")
    parser.add_argument("--transports", nargs="+", default=["shm", "gloo"], choices=["shm", "gloo"], help="--speedup")
    args = parser.parse_args()
    if render_only(args, render):
        return 0
    if args.speedup:  # scaling_speedup.py: one pool, interleaved passes, per-pass minima, the per-rank breakdown
        cmd = [sys.executable, str(Path(__file__).with_name("scaling_speedup.py"))]
        if args.tokens != [256, 1024, 4096]:
            cmd += ["--tokens", *map(str, args.tokens)]
        if args.impls != list(IMPLS):
            cmd += ["--impls", *args.impls]
        cmd += ["--dtypes", *args.dtypes, "--transports", *args.transports, "--depth", str(args.depth)]
        cmd += ["--passes", str(args.passes), "--repeats", str(args.repeats)] + ["--quick"] * args.quick
        cmd += ["--out", args.out] if args.out else []
        return subprocess.call(cmd)
    args.out = args.out or str(RESULTS / "scaling")
    if args.quick:
        args.tokens, args.repeats, args.sync_repeats = [256], 2, 1
    os.environ["OMP_NUM_THREADS"] = "1"
    from opendit.planning.calibrate import calibrate
    from opendit.planning.speeds import load_speeds

    start = time.perf_counter()
    record = {"machine": machine(), "settings": vars(args).copy()}
    speeds = calibrate(threads=1, nproc=2, quick=args.quick, force=True)[0] if args.calibrate else None
    speeds = speeds or load_speeds(args.speeds, threads=1, backend="gloo", nproc=2)
    record["speeds"] = speeds.to_dict()
    record["settings"]["model"] = f"DiT-XL/2 width (hidden 1152, 16 heads), depth {args.depth}, random weights"
    record["settings"]["step"] = "one model forward, batch 1 (no CFG pair), fp32, 1 torch thread per rank"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for tokens in args.tokens:
            common = {"kind": "scaling", "tokens": tokens, "depth": args.depth, "warmup": args.warmup}
            big = tokens >= 4096  # ~15 s per 1-rank step: fewer repeats
            reps = {"repeats": max(2, args.repeats - 2 * big), "sync_repeats": max(1, args.sync_repeats - big)}
            base = summarize(
                tokens,
                "none",
                launch(1, {**common, **reps, "impl": None}, tmp),
                None,
                predict(tokens, args.depth, None, speeds),
            )
            rows.append(base)
            print(
                f"{tokens:5d} tokens  1 rank   {base['step_s']:.3f} s (predicted {base['predicted_s']:.3f})", flush=True
            )
            for impl in args.impls:
                dtypes = args.comm_dtypes if tokens <= args.comm_dtype_max_tokens else []
                job = {**common, **reps, "impl": impl, "comm_dtypes": dtypes}
                row = summarize(
                    tokens, impl, launch(2, job, tmp), base["step_s"], predict(tokens, args.depth, impl, speeds)
                )
                rows.append(row)
                print(
                    f"{tokens:5d} tokens  2 ranks  {impl:<16} {row['step_s']:.3f} s  {row['speedup']:.2f}x  "
                    f"hidden {row['comm_hidden_fraction']:.0%}  predicted {row['predicted_s']:.3f}",
                    flush=True,
                )
        if not args.no_digits and DIGITS.is_file():
            record["digits"] = launch(2, {"kind": "digits", "ckpt": str(DIGITS)}, tmp)
        else:
            record["digits"] = {"skipped": f"{DIGITS} not found" if not DIGITS.is_file() else "--no-digits"}
    record["results"] = rows
    at = [r for r in rows if r["world"] == 2 and r["tokens"] == 1024]
    if at:
        best = max(at, key=lambda r: r["speedup"])
        record["best_at_1024"] = {"impl": best["impl"], "speedup": best["speedup"], "target": 1.85}
    record["prediction_within_25pct"] = all(abs(r["predicted_over_measured"] - 1) <= 0.25 for r in rows)
    record["machine"]["loadavg_end"] = os.getloadavg()
    record["seconds"] = time.perf_counter() - start
    render(record, args.out)
    print(f"wall {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
