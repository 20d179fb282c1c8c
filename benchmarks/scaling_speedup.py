"""The 2-rank speedup of issue 19, measured against the machine's own limit, with a per-step breakdown per rank.

    .venv/bin/python benchmarks/scaling_speedup.py                          # 1024 tokens, fp32 + bf16
    .venv/bin/python benchmarks/scaling_speedup.py --tokens 4096 --dtypes bf16
    .venv/bin/python benchmarks/scaling_speedup.py --quick                  # 256 tokens, 2 passes: a smoke test
    (`benchmarks/scaling.py --speedup ...` runs this script with the same options)
    -> benchmarks/results/scaling_speedup.{json,md,png}

Model and step as in scaling.py (DiT-XL/2 width, 4 blocks, random weights, batch 1, t = 500), in fp32 and in bf16
(`model.to(bf16)`, the documented fp32 islands stay). ONE pool of 2 spawned processes x 1 torch thread (gloo over
loopback) holds every configuration, built once; the parent asks for one configuration at a time:

  single   rank 0 alone runs the plain model; rank 1 sits idle in a pipe read (no CPU)       -> the 1-process time
  pair     both ranks run the plain model at once, independently (a barrier only to start together): two
           single-process jobs sharing the machine. limit = single / pair x 2 is the best any 2-rank split of
           this work can do here (shared caches and memory bandwidth), measured, not assumed to be 2.0
  <impl>   both ranks run the sequence-parallel model (ulysses = the default Ulysses strategy, ring, fastseq, ...)

Method (issue 19, fixed): --passes interleaved passes; pass i runs the configurations in an order rotated by i; each
configuration runs --repeats timed forwards in a row (2 ranks: a barrier before each forward, the slower rank's time
counts); per pass, each configuration's minimum. speedup = median over passes of (single min / impl min) of the same
pass; limit likewise with pair (2 x single / pair); fraction_of_limit = speedup / limit.

Breakdown (one extra instrumented forward per configuration and pass, never one of the timed ones; per rank, ms):
  blocks_compute   time inside the transformer blocks minus their communication waits
  outside_compute  the rest of the forward (patch + position embedding, timestep/label embedding, final layer,
                   unpatchify) minus its communication waits: work every rank does on its share or replicates
  comm_<kind>      exposed transfer per op kind: per op, the wait of the rank that arrived last (minimum over ranks)
  peer_wait        the rest of the waits: time a rank blocked because its peer was still computing (skew)
  dispatch         Python + op-dispatch overhead, estimated by the same forward on a NARROW model of identical code
                   path and op count (hidden 64, 16 heads x 4, same depth, 16 tokens) whose arithmetic is
                   negligible: its time minus its own waits. Part of blocks/outside compute above (not additive).
Timers come from forward hooks on every block (time.perf_counter) and from the runtime's CommStats event log (the
engine's tracer reads the same log, parallel/trace.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import (
    PLANS,
    bar_plot,
    finish,
    random_model,
    rel_err,
    render_only,
    report_args,
    xl_width_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ worker side
def _inputs(config, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, config.in_channels, *config.input_size, generator=gen).to(dtype)  # (1, 4, h, w)
    return x, torch.tensor([500.0]), torch.tensor([3])


_RUNTIMES: dict = {}  # (impl, transport) -> Runtime, shared by every model of this worker


def _runtime(impl: str, transport: str):
    """One runtime per plan and transport, as a user's engine holds one: every runtime adds its own gloo process groups,
    and each group's idle I/O thread takes CPU from the compute threads (measured: other_threads_cpu)."""
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime

    if (impl, transport) not in _RUNTIMES:
        os.environ["OPENDIT_CPU_TRANSPORT"] = transport  # Comm reads it when it is built
        _RUNTIMES[(impl, transport)] = build_runtime(ParallelConfig(**PLANS[impl]), "cpu")
        os.environ.pop("OPENDIT_CPU_TRANSPORT", None)
    return _RUNTIMES[(impl, transport)]


def _build(job: dict, tokens: int, dname: str, narrow: bool = False) -> dict:
    """{config: (callable, runtime or None)} for one (tokens, dtype): plain model (single, pair) and every impl."""
    from opendit.parallel.apply import parallelize

    config = xl_width_config(16 if narrow else tokens, job["depth"])
    if narrow:  # the dispatch probe: same code path and op count, negligible arithmetic (16 tokens, hidden 64)
        from dataclasses import replace

        config = replace(config, hidden_size=64, num_heads=16)
    base = random_model(config).to(DTYPES[dname])
    out = {"single": (base, None), "pair": (base, None)}
    for impl in job["impls"]:
        for transport in job["transports"]:
            runtime = _runtime(impl, transport)
            out[config_name(impl, transport)] = (parallelize(copy.deepcopy(base), runtime), runtime)
    out["_inputs"] = _inputs(config, DTYPES[dname])
    return out


def config_name(impl: str, transport: str) -> str:
    """ "ring" = the default same-host transport (shared memory); "ring/gloo" = every byte over gloo (before)."""
    return impl if transport == "shm" else f"{impl}/{transport}"


class BlockTimer:
    """Forward hooks on every block: the summed time spent inside blocks during one forward."""

    def __init__(self, blocks) -> None:
        self.inside_s, self._start = 0.0, 0.0
        self.handles = []
        for block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._enter))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, *_):
        self.inside_s += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def thread_times() -> dict[int, tuple[int, int, str]]:
    """{thread id: (ns on a CPU, ns runnable but waiting for one, name)} of this process (/proc schedstat)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            run_ns, wait_ns, _ = (int(v) for v in (task / "schedstat").read_text().split())
            name = (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        out[int(task.name)] = (run_ns, wait_ns, name)
    return out


def _cpu_split(before: dict, after: dict) -> dict:
    """Seconds the main thread ran / waited for a CPU, and the CPU the other threads (gloo's I/O) used."""
    main = os.getpid()  # the main thread's id is the process id
    delta = {t: (after[t][0] - before.get(t, (0, 0))[0], after[t][1] - before.get(t, (0, 0))[1]) for t in after}
    run, wait = delta.get(main, (0, 0))
    others = sum(d[0] for t, d in delta.items() if t != main)
    by_name: dict[str, float] = {}
    for t, d in delta.items():
        if t != main and d[0] > 0:
            by_name[after[t][2]] = by_name.get(after[t][2], 0.0) + d[0] / 1e9
    return {
        "main_cpu_s": run / 1e9,
        "main_runqueue_s": wait / 1e9,
        "other_threads_cpu_s": others / 1e9,
        "other_threads_by_name_s": by_name,
    }


def _plain(fn):
    return fn.model if hasattr(fn, "model") else fn


def _instrumented(fn, runtime, inputs, two_ranks: bool) -> dict:
    """One forward with block timers and the comm event log: this rank's raw spans (seconds)."""
    timer = BlockTimer(_plain(fn).blocks)
    log = runtime.stats.enable_events() if runtime is not None else None
    first = len(log) if log is not None else 0
    if two_ranks:
        dist.barrier()
    before = thread_times()
    start = time.perf_counter()
    fn(*inputs)
    wall = time.perf_counter() - start
    cpu = _cpu_split(before, thread_times())
    timer.remove()
    ops = []
    if log is not None:
        ops = [{"kind": e.kind, "blocked_s": e.blocked_s, "issued_s": e.issued_s - start} for e in log[first:]]
        runtime.stats.disable_events()
    return {"wall_s": wall, "blocks_s": timer.inside_s, "ops": ops, **cpu}


def _profiled(fn, inputs, two_ranks: bool) -> dict:
    """One forward under torch.profiler: {op name: [self CPU ms, calls]} (for --profile: which ops cost more)."""
    from torch.profiler import ProfilerActivity, profile

    if two_ranks:
        dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*inputs)
    return {e.key: [e.self_cpu_time_total / 1e3, e.count] for e in prof.key_averages()}


def speedup_worker(channel, job: dict) -> None:
    from opendit.distributed.env import init_from_env

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    rank = dist.get_rank()
    built = {(t, d): _build(job, t, d) for t in job["tokens"] for d in job["dtypes"]}
    probes = {(t, d): _build(job, t, d, narrow=True) for t in job["tokens"] for d in job["dtypes"]}
    channel.send({"rank": rank})
    with torch.no_grad():
        while True:
            command = channel.recv()
            if command == "stop":
                break
            what, tokens, dname, config, repeats = command
            table = probes if what == "probe" else built
            fn, runtime = table[(tokens, dname)][config]
            inputs = table[(tokens, dname)]["_inputs"]
            two = config != "single"
            if what == "profile":
                channel.send(_profiled(fn, inputs, two))
                continue
            if what in ("breakdown", "probe"):
                channel.send(_instrumented(fn, runtime, inputs, two))
                continue
            seconds, out = [], None
            for _ in range(repeats):
                if two:
                    dist.barrier()  # both start together; the parent takes the slower rank's time
                start = time.perf_counter()
                out = fn(*inputs)
                seconds.append(time.perf_counter() - start)
            answer = {"seconds": seconds}
            if what == "output" and rank == 0:
                answer["output"] = out.float().numpy()
            channel.send(answer)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ parent side
def ask(pool, command: tuple) -> list[dict]:
    """Send to rank 0 only (single) or to both ranks; every addressed rank's answer."""
    ranks = [0] if command[3] == "single" else [0, 1]
    for r in ranks:
        pool.send(command, r)
    return [pool.recv(r) for r in ranks]


def breakdown(raw: list[dict], probe: list[dict]) -> list[dict]:
    """Per rank ms: blocks/outside compute, exposed comm per kind, peer wait, dispatch (see the module docstring)."""
    n = len(raw[0]["ops"])
    if any(len(r["ops"]) != n for r in raw):
        raise RuntimeError("ranks logged different collectives")
    floor = [min(r["ops"][i]["blocked_s"] for r in raw) for i in range(n)]  # transfer: the last arrival's wait
    rows = []
    for r, p in zip(raw, probe):
        waits_in, waits_out, comm, peer = 0.0, 0.0, {}, 0.0
        block_window = r["blocks_s"]
        for i, op in enumerate(r["ops"]):
            comm[op["kind"]] = comm.get(op["kind"], 0.0) + floor[i]
            peer += op["blocked_s"] - floor[i]
            # token gather (the prediction) runs after the blocks; everything else is inside a block
            if op["kind"] == "all_gather" and i == n - 1:
                waits_out += op["blocked_s"]
            else:
                waits_in += op["blocked_s"]
        probe_dispatch = p["wall_s"] - sum(op["blocked_s"] for op in p["ops"])
        row = {
            "wall": r["wall_s"],
            "blocks_compute": block_window - waits_in,
            "outside_compute": r["wall_s"] - block_window - waits_out,
            "peer_wait": peer,
            "dispatch": probe_dispatch,
            "main_cpu": r["main_cpu_s"],
            "main_runqueue": r["main_runqueue_s"],
            "other_threads_cpu": r["other_threads_cpu_s"],
        }
        row.update({f"comm_{k}": v for k, v in sorted(comm.items())})
        rows.append({k: round(v * 1e3, 2) for k, v in row.items()})
        rows[-1]["other_threads_ms"] = {k: round(v * 1e3, 2) for k, v in r["other_threads_by_name_s"].items()}
    return rows


def measure(job: dict, log) -> dict:
    from opendit.distributed.launch import WorkerPool

    os.environ.setdefault("OPENDIT_PG_TIMEOUT_S", "1800")
    started = time.perf_counter()
    pool = WorkerPool(speedup_worker, 2, (job,), threads_per_proc=1)
    try:
        for r in range(2):
            pool.recv(r)
        log(f"built every configuration in {time.perf_counter() - started:.0f} s")
        configs = ["single", "pair", *(config_name(i, t) for i in job["impls"] for t in job["transports"])]
        keys = [(t, d, c) for t in job["tokens"] for d in job["dtypes"] for c in configs]
        for key in keys:  # warm-up, and the outputs for the error check
            ask(pool, ("output", *key, 1))
        outputs = {key: ask(pool, ("output", *key, 1))[0].get("output") for key in keys if key[2] != "pair"}
        mins = {key: [] for key in keys}
        every = {key: [] for key in keys}
        splits = {key: [] for key in keys}
        probes = {key: ask(pool, ("probe", *key, 1)) for key in keys}
        for i in range(job["passes"]):
            shift = (i * len(keys)) // job["passes"]
            for key in keys[shift:] + keys[:shift]:
                answers = ask(pool, ("time", *key, job["repeats"]))
                per_forward = [max(f) for f in zip(*(a["seconds"] for a in answers))]
                mins[key].append(min(per_forward))
                every[key].append(per_forward)
                splits[key].append(breakdown(ask(pool, ("breakdown", *key, 1)), probes[key]))
            log(f"pass {i + 1}/{job['passes']} ({time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f})")
        for r in range(2):
            pool.send("stop", r)
    finally:
        pool.close()
    return summarize(job, keys, mins, every, splits, outputs, time.perf_counter() - started)


def _median_rows(per_pass: list[list[dict]]) -> list[dict]:
    """Per rank, the median over passes of every breakdown field."""
    return [
        {
            k: round(statistics.median(p[r][k] for p in per_pass), 2) if k != "other_threads_ms" else per_pass[-1][r][k]
            for k in per_pass[0][r]
        }
        for r in range(len(per_pass[0]))
    ]


def summarize(job, keys, mins, every, splits, outputs, wall) -> dict:
    rows = []
    for tokens, dname, config in keys:
        single = mins[(tokens, dname, "single")]
        pair = mins[(tokens, dname, "pair")]
        mine = mins[(tokens, dname, config)]
        limit = [2 * s / p for s, p in zip(single, pair)]
        speed = [s / m for s, m in zip(single, mine)]
        row = {
            "tokens": tokens,
            "dtype": dname,
            "config": config,
            "pass_min_s": mine,
            "every_forward_s": every[(tokens, dname, config)],
            "median_pass_min_s": statistics.median(mine),
            "breakdown_ms": _median_rows(splits[(tokens, dname, config)]),
        }
        if config not in ("single", "pair"):
            ref = outputs[(tokens, dname, "single")]
            ref32 = outputs.get((tokens, "fp32", "single"))
            row.update(
                {
                    "speedup_per_pass": speed,
                    "speedup": statistics.median(speed),
                    "limit": statistics.median(limit),
                    "fraction_of_limit": statistics.median(s / lim for s, lim in zip(speed, limit)),
                    "max_rel_err_vs_1proc_same_dtype": rel_err(outputs[(tokens, dname, config)], ref),
                    "max_rel_err_vs_1proc_fp32": rel_err(outputs[(tokens, dname, config)], ref32)
                    if ref32 is not None
                    else None,
                }
            )
        elif config == "pair":
            row["limit_per_pass"] = limit
            row["limit"] = statistics.median(limit)
        rows.append(row)
    return {"rows": rows, "wall_s": wall, "job": job}


def table(rows: list[dict]) -> str:
    lines = [
        "| tokens | dtype | config | median pass-min (s) | speedup | limit | of limit | err vs 1 proc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup']:.3f}x" if "speedup" in r else "-"
        of = f"{r['fraction_of_limit']:.1%}" if "fraction_of_limit" in r else "-"
        lim = f"{r['limit']:.3f}x" if "limit" in r else "-"
        err = f"{r['max_rel_err_vs_1proc_same_dtype']:.1e}" if "max_rel_err_vs_1proc_same_dtype" in r else "-"
        lines.append(
            f"| {r['tokens']} | {r['dtype']} | {r['config']} | {r['median_pass_min_s']:.3f} | {sp} | {lim} | {of} "
            f"| {err} |"
        )
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    """Slowest rank's breakdown (ms, median over passes) per configuration."""
    kinds = sorted({k for r in rows for b in r["breakdown_ms"] for k in b if k.startswith("comm_")})
    fields = ["wall", "blocks_compute", "outside_compute", *kinds, "peer_wait", "dispatch"]
    fields += ["main_cpu", "main_runqueue", "other_threads_cpu"]
    lines = ["| tokens | dtype | config | rank | " + " | ".join(fields) + " |", "|" + "---|" * (4 + len(fields))]
    for r in rows:
        for rank, b in enumerate(r["breakdown_ms"]):
            cells = " | ".join(f"{b[f]:.1f}" if f in b else "-" for f in fields)
            lines.append(f"| {r['tokens']} | {r['dtype']} | {r['config']} | {rank} | {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Speedup and the measured limit per (tokens, dtype, strategy)."""
    mine = [r for r in rows if "speedup" in r]
    labels = [f"{r['tokens']} {r['dtype']} {r['config']}" for r in mine]
    series = {"speedup (median of per-pass)": [r["speedup"] for r in mine], "limit": [r["limit"] for r in mine]}
    bar_plot(path, labels, series, "speedup vs 1 process (x)", "2-rank speedup against this machine's limit")


def render(record: dict, out) -> dict[str, Path]:
    md = table(record["rows"]) + "\n\nBreakdown (ms per forward, median over passes):\n\n"
    md += breakdown_table(record["rows"])
    return finish(out, record, md, plot=lambda path: plot(record["rows"], path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--impls", nargs="+", default=["ulysses", "ring", "fastseq"], choices=sorted(PLANS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--transports", nargs="+", default=["shm", "gloo"], choices=["shm", "gloo"])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5, help="interleaved passes (median)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration and pass")
    parser.add_argument("--quick", action="store_true", help="256 tokens, 2 passes x 2 repeats: a smoke test")
    report_args(parser, "scaling_speedup")
    args = parser.parse_args(argv)
    if render_only(args, render):
        return 0
    if args.quick:
        args.tokens, args.passes, args.repeats = [256], 2, 2
    os.environ["OMP_NUM_THREADS"] = "1"
    job = {
        "tokens": args.tokens,
        "dtypes": args.dtypes,
        "impls": args.impls,
        "depth": args.depth,
        "passes": args.passes,
        "repeats": args.repeats,
        "transports": args.transports,
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    record = measure(job, log)
    record["loadavg_end"] = os.getloadavg()
    render(record, args.out)
    print(f"wall {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
