"""DSP vs Ulysses on OpenDiT's video DiT: 2 gloo ranks x 1 thread vs 1 process x 1 thread -> JSON + Markdown + PNG.

    .venv/bin/python benchmarks/video_scaling.py                 # full run (~10 min on 2 quiet cores)
    .venv/bin/python benchmarks/video_scaling.py --quick         # tiny model + digits config, 2 passes: smoke test
    .venv/bin/python benchmarks/video_scaling.py --passes 7 --repeats 3 --models latte-xl-width
    .venv/bin/python benchmarks/video_scaling.py --from-json benchmarks/results/video_scaling.json   # re-render

What is measured: the wall time of one no-grad fp32 forward of a VideoDiT (models/video_dit.py), batch 1 video (no
CFG pair), t = 500, as
  single    1 process x 1 thread, the plain model (the reference for speedup and error);
  dsp       2 gloo ranks x 1 thread, `parallelize(model, build_runtime(ParallelConfig(ulysses=2, sp_impl="dsp")))`:
            spatial blocks split over frames, temporal ones over positions, one all-to-all per switch;
  ulysses   2 gloo ranks x 1 thread, sp_impl="ulysses": positions split, head all-to-alls in every spatial block.
Models: latte-xl-width = VideoDiTConfig(depth 4 (2 spatial + temporal pairs; Latte-XL's 28 cut for CPU time), hidden
1152, 16 heads, patch 2, 16 frames x 32 x 32 latent = 16 x 256 = 4096 tokens, 4 channels, 101 classes, learned
sigma); digits-video = the bundled moving-digits model if src/opendit/digits/weights/digits_video.json exists (trained
weights), else pixel_video_config("Latte-D/4", 16, 8, motion=True) with random weights (the output says which);
tiny (--quick) = depth 2, hidden 64, 4 heads, 4 frames, 8 x 8, patch 2. Random weights: torch.manual_seed(0), then
perturb_weights(model, 0.02), since adaLN-Zero makes a fresh model's blocks identities and its output zero. Weights
are identical in every process (parameter checksums compared).

How (the method of benchmarks/vs_diffusers.py): persistent workers (a 2-rank WorkerPool and a 1-process pool) build
every model and configuration once; the parent sends commands. One warm-up forward per configuration, then
`--passes` interleaved passes, the configuration order rotated by i * n / passes in pass i, each configuration
`--repeats` timed forwards in a row (2 ranks: both leave a barrier before each forward, the slower rank's time
counts). Per pass each configuration's minimum; SPEEDUP = median over passes of (1-process minimum / 2-rank minimum
of the same pass), so a busy moment of the shared machine spoils one pass, not the figure; min / median times too.
Recorded per 2-rank configuration, and ASSERTED after the outputs are written: the bytes and calls per forward
CommStats records on rank 0 and rank 1 equal the cost model's formula (`predict_step_comm`), and the max relative
error max|out - ref| / max|ref| of rank 0's output vs the single-process output is <= 1e-5. Also the ratio of DSP's
bytes to Ulysses' (both ranks, every collective, the output gather included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import (
    ask_pools,
    finish,
    interleaved_passes,
    machine,
    rel_err,
    render_only,
    report_args,
    shared_copy,
    side_by_side_pools,
    speedup_bars,
)

SEED = 0
PERTURB_STD = 0.02
T_VALUE = 500.0
CONFIGS = ("single", "dsp", "ulysses")
PARALLEL = CONFIGS[1:]
MAX_REL_ERR = 1e-5
FULL_MODELS = ("latte-xl-width", "digits-video")
QUICK_MODELS = ("tiny", "digits-video")


# ------------------------------------------------------------------------------------------------ models, inputs
def model_specs(names: list[str]) -> dict:
    """{name: {"config": VideoDiTConfig dict, "ckpt": path or None, "weights": text}}; JSON-able for the workers."""
    from opendit.api.video import DEFAULT_VIDEO_CKPT
    from opendit.models.video_dit import VideoDiTConfig, pixel_video_config

    out = {}
    for name in names:
        ckpt, weights = None, f"random (seed {SEED}, perturbed {PERTURB_STD})"
        if name == "latte-xl-width":
            config = VideoDiTConfig(
                depth=4, hidden_size=1152, num_heads=16, patch_size=2, frames=16, input_size=(32, 32),
                in_channels=4, num_classes=101, learn_sigma=True,
            )  # fmt: skip
        elif name == "tiny":
            config = VideoDiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, frames=4, input_size=(8, 8))
        elif DEFAULT_VIDEO_CKPT.with_suffix(".json").is_file():
            from opendit.io.checkpoint import config_from_dict

            config = config_from_dict(json.loads(DEFAULT_VIDEO_CKPT.with_suffix(".json").read_text())["model"])
            ckpt, weights = str(DEFAULT_VIDEO_CKPT), f"bundled trained weights ({DEFAULT_VIDEO_CKPT.name})"
        else:
            config = pixel_video_config("Latte-D/4", 16, 8, motion=True)
            weights += f"; no bundled {DEFAULT_VIDEO_CKPT.with_suffix('.json').name}"
        out[name] = {"config": config.to_dict(), "ckpt": ckpt, "weights": weights}
    return out


def dims(spec: dict) -> dict:
    from opendit.models.video_dit import VideoDiTConfig

    c = VideoDiTConfig.from_dict(spec["config"])
    keys = ("depth", "hidden_size", "num_heads", "patch_size", "frames", "positions")
    return {**{k: getattr(c, k) for k in keys}, "weights": spec["weights"]}


def build(spec: dict):
    """The model of one spec, identical in every process (the parent compares checksums)."""
    from opendit.io.checkpoint import load_model
    from opendit.models.dit import perturb_weights
    from opendit.models.video_dit import VideoDiTConfig, build_video_dit

    config = VideoDiTConfig.from_dict(spec["config"])
    if spec["ckpt"] is not None:
        return config, load_model(config, spec["ckpt"])
    torch.manual_seed(SEED)  # xavier init draws from the global generator
    return config, perturb_weights(build_video_dit(config), PERTURB_STD).eval()


def make_inputs(config) -> tuple:
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(1, config.in_channels, config.frames, *config.input_size, generator=gen)  # (B, C, F, H, W)
    return x, torch.full((1,), T_VALUE), torch.tensor([3 % config.num_classes])


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def plan_of(config_name: str):
    from opendit.distributed.config import ParallelConfig

    return ParallelConfig(ulysses=2, sp_impl=config_name)


def counts(comm: dict) -> dict:
    """CommStats snapshot -> {kind: {"bytes", "calls"}} of the kinds used (the shape predict_step_comm returns)."""
    return {k: {"bytes": int(v["bytes"]), "calls": int(v["calls"])} for k, v in comm.items() if v["calls"]}


# ------------------------------------------------------------------------------------------------ workers
def serve(channel, models: dict, inputs: dict) -> None:
    """Answer the parent's (model, config, what, repeats) until "stop": seconds per forward; for 2 ranks also the
    CommStats of the last forward; the output (rank 0) when asked."""
    while (command := channel.recv()) != "stop":
        name, cname, what, repeats = command
        model = models[(name, cname)]
        runtime = getattr(model, "runtime", None)  # a ParallelModel's; None for the plain model
        seconds = []
        for _ in range(repeats):
            if runtime is not None:
                runtime.stats.reset()  # the snapshot below is of the last forward alone
                dist.barrier()  # both ranks start each forward together; the parent takes the slower rank's time
            with torch.no_grad():
                start = time.perf_counter()
                out = model(*inputs[name])
                seconds.append(time.perf_counter() - start)
        answer = {"seconds": seconds}
        if runtime is not None:
            snap = runtime.stats.snapshot()
            answer.update(comm=counts(snap), wait_s=sum(v["wait_s"] for v in snap.values()))
        if what == "output" and (runtime is None or runtime.index == 0):
            answer["output"] = out.numpy()
        channel.send(answer)


def parallel_worker(channel, job: dict) -> None:
    """One of 2 ranks: every model x {dsp, ulysses} built once (own modules, shared weights), then commands."""
    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    models, inputs, report = {}, {}, {"rank": dist.get_rank(), "checksums": {}, "notes": {}}
    for name, spec in job["specs"].items():
        config, base = build(spec)
        report["checksums"][name] = checksum(base)
        inputs[name] = make_inputs(config)
        for cname in PARALLEL:
            runtime = build_runtime(plan_of(cname), "cpu")  # collective: same order on both ranks
            models[(name, cname)] = parallelize(shared_copy(base), runtime)
            report["notes"][f"{name}/{cname}"] = models[(name, cname)].notes
    channel.send(report)
    serve(channel, models, inputs)
    dist.barrier()
    dist.destroy_process_group()


def single_worker(channel, job: dict) -> None:
    """1 process x 1 thread: the plain models."""
    torch.set_num_threads(1)
    models, inputs, report = {}, {}, {"checksums": {}}
    for name, spec in job["specs"].items():
        config, models[(name, "single")] = build(spec)
        report["checksums"][name] = checksum(models[(name, "single")])
        inputs[name] = make_inputs(config)
    channel.send(report)
    serve(channel, models, inputs)


# ------------------------------------------------------------------------------------------------ parent
def formula(spec: dict, cname: str, sp_rank: int) -> dict:
    """The cost model's bytes and calls per forward of one rank (batch 1 video, fp32), rounded as CommStats counts."""
    from opendit.models.video_dit import VideoDiTConfig
    from opendit.planning.cost import predict_step_comm

    config = VideoDiTConfig.from_dict(spec["config"])
    raw = predict_step_comm(config, config.positions, 1, plan_of(cname), sp_rank)
    return {k: {"bytes": round(v["bytes"]), "calls": round(v["calls"])} for k, v in raw.items() if v["calls"]}


def run(job: dict, log) -> dict:
    os.environ.setdefault("OPENDIT_PG_TIMEOUT_S", "1800")  # an XL-width forward on a busy 2-core box is slow
    started = time.perf_counter()
    with side_by_side_pools(parallel_worker, single_worker, job) as (pool1, pool2, reports, single_report):
        log(f"setup done in {time.perf_counter() - started:.0f} s")

        def ask(name, cname, what, repeats=1):
            answer, answers = ask_pools(pool1, pool2, (name, cname, what, repeats), cname == "single")
            answer["comm_ranks"] = [a.get("comm") for a in answers]
            answer["wait_s_ranks"] = [a.get("wait_s") for a in answers]
            return answer

        keys = [(m, c) for m in job["models"] for c in CONFIGS]
        warm = {key: ask(*key, "warmup") for key in keys}
        for key, answer in warm.items():
            log(f"warm-up {'/'.join(key)}: {answer['seconds'][0]:.2f} s")
        times, all_times = {k: [] for k in keys}, {k: [] for k in keys}
        comms = {k: [warm[k]["comm_ranks"]] for k in keys if k[1] != "single"}  # every answer's, for the check
        outputs, waits = {}, {}

        def timed_pass(i, key):
            answer = ask(*key, "output" if i == 0 else "time", job["repeats"])
            times[key].append(min(answer["seconds"]))
            all_times[key].append(answer["seconds"])
            if "output" in answer:
                outputs[key] = answer["output"]
            if key[1] != "single":
                comms[key].append(answer["comm_ranks"])
                waits.setdefault(key, []).append(answer["wait_s_ranks"])

        order_log, loads = interleaved_passes(keys, job["passes"], timed_pass, log, started)

    rows, checks = [], []
    for name in job["models"]:
        ref_key, spec = (name, "single"), job["specs"][name]
        ref_t = times[ref_key]
        for cname in PARALLEL:
            key, t = (name, cname), times[(name, cname)]
            per_pass = [s / p for s, p in zip(ref_t, t)]  # same pass: 1-process minimum / 2-rank minimum
            predicted = [formula(spec, cname, r) for r in range(2)]
            recorded = comms[key][-1]
            same = all(ranks == predicted for ranks in comms[key])  # warm-up and every timed answer, both ranks
            err = rel_err(outputs[key], outputs[ref_key])
            checks.append({"what": f"{name}/{cname} bytes+calls == formula (both ranks, every forward)", "ok": same})
            checks.append({"what": f"{name}/{cname} max rel err {err:.2e} <= {MAX_REL_ERR}", "ok": err <= MAX_REL_ERR})
            rows.append(
                {
                    "model": name,
                    "config": cname,
                    "speedup": statistics.median(per_pass),  # THE figure
                    "speedup_per_pass": per_pass,
                    "speedup_min": min(ref_t) / min(t),  # overall min / overall min, for reference
                    "single_min_s": min(ref_t),
                    "single_median_s": statistics.median(ref_t),
                    "parallel_min_s": min(t),
                    "parallel_median_s": statistics.median(t),
                    "single_pass_min_s": ref_t,
                    "parallel_pass_min_s": t,
                    "single_all_s": all_times[ref_key],
                    "parallel_all_s": all_times[key],
                    "parallel_rank_seconds_warmup": warm[key]["rank_seconds"],
                    "comm_wait_s_per_pass": waits[key],  # CommStats wait_s of each pass's last forward, per rank
                    "max_rel_err": err,
                    "recorded": recorded,
                    "formula": predicted,
                    "bytes_per_forward": [sum(v["bytes"] for v in c.values()) for c in recorded],
                    "notes": reports[0]["notes"][f"{name}/{cname}"],
                }
            )
        dsp, uly = (next(r for r in rows if r["model"] == name and r["config"] == c) for c in PARALLEL)
        for row in (dsp, uly):
            row["dsp_over_ulysses_bytes"] = sum(dsp["bytes_per_forward"]) / sum(uly["bytes_per_forward"])
    return {
        "rows": rows,
        "checks": checks,
        "single_warmup_s": {m: warm[(m, "single")]["seconds"][0] for m in job["models"]},
        "order_per_pass": order_log,
        "loadavg_after_each_pass": loads,
        "wall_s": time.perf_counter() - started,
        "checksums": single_report["checksums"],
    }


# ------------------------------------------------------------------------------------------------ report
def fmt_comm(recorded: dict, predicted: dict, field: str) -> str:
    rec, pred = sum(v[field] for v in recorded.values()), sum(v[field] for v in predicted.values())
    return f"{rec} / {pred}" + ("" if recorded == predicted else " **MISMATCH**")


def markdown(result: dict) -> str:
    job, mach = result["job"], result["machine"]
    loads = ", ".join(f"{x[0]:.1f}" for x in result["loadavg_after_each_pass"])
    lines = [
        "# DSP vs Ulysses on the video DiT (2 gloo ranks x 1 thread vs 1 process x 1 thread, fp32, batch 1)",
        "",
        f"Machine: {mach['cpu']} ({mach['cpu_count']} cores), torch {mach['torch']}; load average (1 min) at start "
        f"{mach['loadavg_at_start'][0]:.1f}, after each pass {loads}. {job['passes']} interleaved passes x "
        f"{job['repeats']} timed forwards per configuration, wall time {result['wall_s'] / 60:.1f} min"
        + (" (--quick smoke run, not a measurement)" if job["quick"] else "")
        + ".",
        "",
        "Speedup = median over passes of (1-process minimum / 2-rank minimum of the pass); overall min / min in "
        "brackets. Error = max|out - ref| / max|ref| of rank 0's output vs the single-process output. Bytes and "
        "calls per forward: recorded by CommStats / the formula (`predict_step_comm`), every collective including "
        "the output gather. DSP/Ulysses = the ratio of their bytes (both ranks).",
        "",
        "| model | tokens (F x T) | strategy | speedup | max rel err | bytes r0 (rec / formula) "
        "| bytes r1 (rec / formula) | calls r0 | calls r1 | DSP/Ulysses bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        dims = job["dims"][row["model"]]
        rec, pred = row["recorded"], row["formula"]
        lines.append(
            f"| {row['model']} | {dims['frames'] * dims['positions']} ({dims['frames']} x {dims['positions']}) "
            f"| {row['config']} | {row['speedup']:.2f}x ({row['speedup_min']:.2f}x) | {row['max_rel_err']:.2e} "
            f"| {fmt_comm(rec[0], pred[0], 'bytes')} | {fmt_comm(rec[1], pred[1], 'bytes')} "
            f"| {fmt_comm(rec[0], pred[0], 'calls')} | {fmt_comm(rec[1], pred[1], 'calls')} "
            f"| {row['dsp_over_ulysses_bytes']:.3f} |"
        )
    lines += ["", "Times (seconds; min / median over passes of the per-pass minima):", ""]
    lines += ["| model | config | min | median |", "|---|---|---|---|"]
    for name in job["models"]:
        first = next(r for r in result["rows"] if r["model"] == name)
        lines.append(f"| {name} | single | {first['single_min_s']:.3f} | {first['single_median_s']:.3f} |")
        for row in (r for r in result["rows"] if r["model"] == name):
            lines.append(f"| {name} | {row['config']} | {row['parallel_min_s']:.3f} | {row['parallel_median_s']:.3f} |")
    lines += ["", "Models:", ""]
    for name in job["models"]:
        d = job["dims"][name]
        lines.append(
            f"- {name}: depth {d['depth']}, hidden {d['hidden_size']}, {d['num_heads']} heads, patch "
            f"{d['patch_size']}, {d['frames']} frames x {d['positions']} positions; weights: {d['weights']}"
        )
    lines += ["", "Checks:", ""] + [f"- {'ok' if c['ok'] else 'FAILED'}: {c['what']}" for c in result["checks"]]
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    models = result["job"]["models"]
    rows = {(r["model"], r["config"]): r for r in result["rows"]}
    colors = {"dsp": "tab:blue", "ulysses": "tab:orange"}
    series = {c: ([rows[(m, c)]["speedup"] for m in models], color) for c, color in colors.items()}
    quick = " [--quick]" if result["job"]["quick"] else ""
    speedup_bars(path, models, series, f"video DiT fp32: 2 gloo ranks x 1 thread vs 1 process{quick}")


def render(result: dict, out: Path) -> dict[str, Path]:
    """The result's JSON, Markdown table and plot: OUT.{json,md,png}."""
    return finish(out, result, markdown(result), plot=lambda path: write_plot(result, path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=None, help="interleaved timed passes (default 5; --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per config and pass (3; --quick 1)")
    parser.add_argument("--models", nargs="+", default=None, choices=["latte-xl-width", "digits-video", "tiny"])
    parser.add_argument("--quick", action="store_true", help="tiny model + digits config: a smoke test only")
    report_args(parser, "video_scaling")
    args = parser.parse_args()
    if render_only(args, render):
        return 0
    models = args.models or list(QUICK_MODELS if args.quick else FULL_MODELS)
    specs = model_specs(models)
    job = {
        "models": models,
        "specs": specs,
        "passes": args.passes or (2 if args.quick else 5),
        "repeats": args.repeats or (1 if args.quick else 3),
        "quick": args.quick,
        **{"seed": SEED, "t": T_VALUE, "batch": 1, "dtype": "fp32", "perturb_std": PERTURB_STD},
    }
    job["dims"] = {name: dims(s) for name, s in specs.items()}

    def log(msg: str) -> None:
        print(f"[video_scaling] {msg}", flush=True)

    log(f"models {models}, passes {job['passes']}, repeats {job['repeats']}")
    mach = machine(threads_per_process=1, backend="gloo over loopback")
    result = {"job": job, "machine": mach, **run(job, log), "loadavg_at_end": os.getloadavg()}
    render(result, Path(args.out))
    log(f"wall {result['wall_s']:.0f} s")
    # asserted after writing, so a failed check still leaves its evidence on disk
    failed = [c["what"] for c in result["checks"] if not c["ok"]]
    assert not failed, f"checks failed: {failed}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
