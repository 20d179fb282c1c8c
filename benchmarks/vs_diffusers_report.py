"""Markdown table and PNG plot of a benchmarks/vs_diffusers.py result (also re-rendered by its --from-json)."""

from __future__ import annotations

from pathlib import Path

PARALLEL = ("diffusers-ulysses", "diffusers-ring", "ours-ulysses", "ours-ring")


def fmt_bytes(n) -> str:
    if n is None:
        return "not counted"
    return f"{n / 2**20:.1f} MiB"


def write_markdown(result: dict, path: Path) -> None:
    job, mach = result["job"], result["machine"]
    lines = [
        "# OpenDiT vs diffusers' own context parallelism (2 gloo ranks x 1 thread vs 1 process x 1 thread)",
        "",
        f"Machine: {mach['cpu']} ({mach['cpu_count']} cores, {mach['cpu_flags']}), torch {mach['torch']}, "
        f"diffusers {mach['diffusers']}; load average (1 min) at start {mach['loadavg_at_start'][0]:.1f}, after each "
        f"pass {', '.join(f'{x[0]:.1f}' for x in result.get('loadavg_after_each_pass', []))} (other jobs share the "
        "2 cores: single timings are noisy, hence per-pass minima and the median over passes). "
        f"{job['passes']} interleaved passes, wall time {result['wall_s'] / 60:.1f} min"
        + (" (--quick smoke run)" if job["size"] == "quick" else "")
        + ".",
        "",
        "Speedup = median over passes of (1-process minimum / 2-rank minimum of the pass), "
        f"{job.get('repeats', 1)} "
        "timed forwards per configuration and pass (overall min / overall min in brackets). "
        "Error = max|out - ref| / max|ref| "
        "of rank 0's output vs the single-process output of the same model and dtype. Bytes = what rank 0 sends per "
        "forward (ours: CommStats; diffusers: counted by a TorchDispatchMode on its functional collectives).",
        "diffusers ring = diffusers ring + benchmark-local CPU LSE workaround (b); both diffusers modes need "
        "workaround (a) (CPU device / mesh). See the script's docstring.",
        "",
        "| model | dtype | mode | diffusers speedup | ours speedup | diffusers max rel err | ours max rel err "
        "| diffusers bytes | ours bytes | ours >= diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["model"], r["dtype"], r["config"]): r for r in result["rows"]}
    for kind in job["models"]:
        for dname in job["dtypes"]:
            for mode in ("ulysses", "ring"):
                d, o = rows[(kind, dname, f"diffusers-{mode}")], rows[(kind, dname, f"ours-{mode}")]
                lines.append(
                    f"| {kind} | {dname} | {mode} | {d['speedup']:.2f}x ({d['speedup_min']:.2f}x) | "
                    f"{o['speedup']:.2f}x ({o['speedup_min']:.2f}x) | {d['max_rel_err']:.2e} | "
                    f"{o['max_rel_err']:.2e} | {fmt_bytes(d['bytes_per_forward_rank0'])} | "
                    f"{fmt_bytes(o['bytes_per_forward_rank0'])} | {'yes' if o['speedup'] >= d['speedup'] else 'NO'} |"
                )
    lines += [
        "",
        "Times (seconds; min / median over passes of the per-pass minima):",
        "",
        "| model | dtype | config | min | median |",
        "|---|---|---|---|---|",
    ]
    for kind in job["models"]:
        for dname in job["dtypes"]:
            first = rows[(kind, dname, "diffusers-ulysses")]
            lines.append(
                f"| {kind} | {dname} | single | {first['single_min_s']:.2f} | {first['single_median_s']:.2f} |"
            )
            for config in PARALLEL:
                r = rows[(kind, dname, config)]
                lines.append(
                    f"| {kind} | {dname} | {config} | {r['parallel_min_s']:.2f} | {r['parallel_median_s']:.2f} |"
                )
    lines += ["", "Stock diffusers failures on CPU-only torch (raw):", ""]
    for kind, fails in result["stock_failures"].items():
        for call, info in fails.items():
            error = (info.get("error") or "").splitlines()[0]  # the JSON has the full text
            error = error if len(error) <= 200 else error[:200] + " ..."
            where = info.get("library_frame") or info.get("raised_at", "")
            lines.append(f"- {kind}, `{call}`: `{error}` (innermost diffusers frame: `{where}`)")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job = result["job"]
    rows = {(r["model"], r["dtype"], r["config"]): r for r in result["rows"]}
    groups = [(m, d, mode) for m in job["models"] for d in job["dtypes"] for mode in ("ulysses", "ring")]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.38
    for j, (impl, color) in enumerate((("diffusers", "tab:orange"), ("ours", "tab:blue"))):
        xs = [i + (j - 0.5) * width for i in range(len(groups))]
        ys = [rows[(m, d, f"{impl}-{mode}")]["speedup"] for m, d, mode in groups]
        label = "diffusers (own CP; ring with CPU-LSE workaround)" if impl == "diffusers" else "OpenDiT parallelize"
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    top = max(r["speedup"] for r in result["rows"])
    ax.set_ylim(0, max(2.0, top) * 1.25)  # room for the legend above the bars
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(2.0, color="gray", lw=0.5, ls=":")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{d}\n{mode}" for m, d, mode in groups], fontsize=8)
    ax.set_ylabel("speedup vs 1 process\n(median over passes of per-pass min/min)")
    ax.set_title("2 gloo ranks x 1 thread vs 1 process x 1 thread" + (" [--quick]" if job["size"] == "quick" else ""))
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
