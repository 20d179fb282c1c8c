"""What the benchmarks share: paths, the machine description, model builders and plans, process-pool helpers,
error measures, digits sampling with a cache, and the one report writer (JSON + Markdown + PNG).

Every script in benchmarks/ imports this module (`import common`: a script's own folder is on sys.path when it runs
as `python benchmarks/NAME.py`) and no other benchmark script, so there is no import cycle between them. Importing it
is cheap: torch, opendit and matplotlib are imported inside the functions that need them.

    result = {"meta": {...}, "rows": [...]}
    common.write_report(common.RESULTS / "name", result, markdown_text, plot=fn)   # name.json, name.md, name.png
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS_CKPT = ROOT / "src" / "opendit" / "digits" / "weights" / "digits.safetensors"
if str(ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))


# ------------------------------------------------------------------------------------------------ the machine
def machine(**extra) -> dict:
    """This machine as every result records it: platform, CPU model and flags, cores, load, torch (and diffusers)."""
    import torch

    cpu, flags = "unknown", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text)
    except OSError:
        pass
    out = {
        "platform": platform.platform(),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return {**out, **extra}


def rss_mib(field: str = "VmHWM") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ models and plans
LATENT = {256: 32, 1024: 64, 4096: 128}  # tokens -> latent side of DiT-XL/2 (patch 2)
PLANS = {  # sequence-parallel strategy -> ParallelConfig kwargs at world 2
    "ulysses": {"ulysses": 2, "sp_impl": "ulysses"},
    "ulysses-overlap": {"ulysses": 2, "sp_impl": "ulysses-overlap"},
    "ring": {"ring": 2},
    "fastseq": {"ulysses": 2, "sp_impl": "fastseq"},
}


def xl_width_config(tokens: int, depth: int):
    """DiT-XL/2's width (hidden 1152, 16 heads, patch 2) at `depth` blocks, with a latent of `tokens` tokens."""
    from dataclasses import replace

    from opendit.models.dit import preset

    side = LATENT.get(tokens) or int(round((tokens**0.5) * 2))
    return replace(preset("DiT-XL/2"), depth=depth, input_size=(side, side))


def random_model(config, seed: int = 0):
    """A DiT of `config` with random weights, N(0, 0.02) added everywhere so adaLN-Zero does not make the blocks
    identities; eval mode."""
    import torch

    from opendit.models.dit import build_dit, perturb_weights

    torch.manual_seed(seed)
    return perturb_weights(build_dit(config).eval(), std=0.02, seed=seed + 1)


# ------------------------------------------------------------------------------------------------ process pools
def shared_copy(model):
    """A copy with its own modules (hooks and processors are per module) sharing the parameter and buffer tensors."""
    import copy

    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def ask_pools(pool1, pool2, command: tuple, single: bool) -> tuple[dict, list[dict]]:
    """Send `command` to the 1-process pool (single) or to both ranks of the 2-rank pool, and return (answer,
    every rank's answer). A worker answers {"seconds": [one per forward], ...}; for 2 ranks the answer is rank 0's
    with "seconds" the slower rank's time forward by forward (a forward ends when both are done) and
    "rank_seconds" both ranks' lists."""
    if single:
        pool1.send(command)
        answer = pool1.recv(0)
        return answer, [answer]
    for r in range(2):
        pool2.send(command, r)
    answers = [pool2.recv(r) for r in range(2)]
    answer = dict(answers[0])
    answer["rank_seconds"] = [a["seconds"] for a in answers]
    answer["seconds"] = [max(pair) for pair in zip(*answer["rank_seconds"])]
    return answer, answers


@contextmanager
def side_by_side_pools(parallel_worker, single_worker, job: dict):
    """A 2-rank pool and a 1-process pool running the same job, one thread per process: yields (pool1, pool2, the
    2 ranks' setup reports, the single process's report) once every process holds the same weights (the reports'
    "checksums" agree); sends "stop" to every worker when the body ends normally, closes both pools always."""
    from opendit.distributed.launch import WorkerPool

    pool2 = WorkerPool(parallel_worker, 2, (job,), threads_per_proc=1)
    pool1 = WorkerPool(single_worker, 1, (job,), threads_per_proc=1)
    try:
        reports = [pool2.recv(r) for r in range(2)]
        single = pool1.recv(0)
        for key, value in single["checksums"].items():
            if any(rep["checksums"][key] != value for rep in reports):
                raise RuntimeError(f"weights of {key} differ between processes")
        yield pool1, pool2, reports, single
        for r in range(2):
            pool2.send("stop", r)
        pool1.send("stop")
    finally:
        pool2.close()
        pool1.close()


def interleaved_passes(keys: list[tuple], passes: int, run_one, log, started: float) -> tuple[list, list]:
    """`run_one(pass_index, key)` for every key in every pass, the order rotated from pass to pass so slow drift of
    the machine hits every configuration alike. Returns (the order of each pass, the load average after each)."""
    import time

    order_log, loads, n = [], [], len(keys)
    for i in range(passes):
        shift = (i * n) // passes
        order = keys[shift:] + keys[:shift]
        order_log.append(["/".join(k) for k in order])
        for key in order:
            run_one(i, key)
        loads.append(os.getloadavg())
        log(f"pass {i + 1}/{passes} done ({time.perf_counter() - started:.0f} s), load {loads[-1][0]:.1f}")
    return order_log, loads


def ask_all(pool, command: tuple) -> list[dict]:
    """Send `command` to every rank of `pool` and return every rank's answer, rank by rank."""
    for r in range(pool.nproc):
        pool.send(command, r)
    return [pool.recv(r) for r in range(pool.nproc)]


# ------------------------------------------------------------------------------------------------ errors
def rel_err(a, b) -> float:
    """Max absolute difference over the reference's max magnitude (fp64); tensors or arrays."""
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def psnr(images, reference, data_range: float = 2.0, clamp: bool = True) -> float:
    """PSNR (dB) of images against a reference in [-1, 1] (data_range 2), clamped to it first unless `clamp` is
    False (raw samples); inf when equal."""
    a, b = images.double(), reference.double()
    if clamp:
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


# ------------------------------------------------------------------------------------------------ digits + cache
CACHE_STEPS, CACHE_CFG = 30, 3.0  # the cache benchmarks' sampling: flow-euler, 30 steps, CFG 3


def sample_digits(model_fn, labels, cache, batch: int, channels_hw):
    """(samples, seconds) of sampling `labels` with OpenDiT's sampler in chunks of `batch` (sample i from seed i)."""
    import time

    import torch

    from opendit.diffusion.sampler import sample

    chunks, start = [], time.perf_counter()
    for first in range(0, len(labels), batch):
        if hasattr(model_fn, "reset"):  # diffusers' cache state: a new trajectory
            model_fn.reset()
        result = sample(
            model_fn, labels[first : first + batch], channels_hw, num_classes=10, scheduler_name="flow-euler",
            prediction="flow", learn_sigma=False, steps=CACHE_STEPS, cfg_scale=CACHE_CFG, seed=0, first_index=first,
            hooks=[cache] if cache is not None else [],
        )  # fmt: skip
        chunks.append(result.samples)
    return torch.cat(chunks), time.perf_counter() - start


def cached_run(fn, module, config, labels, batch, shape):
    """(images, seconds, what the cache saved) of sampling `labels` with our cache `config` installed on `module`
    for the run (None, or diffusers' own cache, which the caller applied to its module copy for good: nothing here)."""
    from opendit.cache import CacheConfig, install_cache

    cache = install_cache(module, config) if isinstance(config, CacheConfig) else None
    images, seconds = sample_digits(fn, labels, cache, batch, shape)
    saved = cache.summary()["saved"] if cache is not None else None
    if cache is not None:
        cache.remove()
    return images, seconds, saved


def timed(settings, make_fn, labels, batch, shape, passes) -> dict[str, list[float]]:
    """Per setting, `passes` wall times of sampling `labels`, interleaved setting by setting within each pass."""
    times: dict[str, list[float]] = {label: [] for label, _c in settings}
    for _ in range(passes):
        for label, config in settings:
            fn, module = make_fn(label)
            times[label].append(cached_run(fn, module, config, labels, batch, shape)[1])
    return times


# ------------------------------------------------------------------------------------------------ reports
def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: `header` and one list of cells per row (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_plot(
    path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, log: bool = False
) -> None:
    """A grouped bar chart: one group per label, one bar per series (values None are left out); `log`: log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(series)) / 2 + 3), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.bar([x for x, _ in pts], [v for _, v in pts], width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_args(parser, name: str) -> None:
    """The two output options every benchmark takes: --out (OUT.json, OUT.md, OUT.png; default results/NAME) and
    --render JSON (--from-json): rewrite the .md and .png of an existing result, no measurement."""
    parser.add_argument("--out", default=str(RESULTS / name), help=f"OUT.{{json,md,png}} (default results/{name})")
    parser.add_argument(
        "--render", "--from-json", dest="render", metavar="JSON", help="only rewrite the .md and .png of a result JSON"
    )


def render_only(args, render: Callable[[dict, Path], object]) -> bool:
    """With --render JSON: `render(result, path)` from that file and True (the caller returns); else False."""
    if not getattr(args, "render", None):
        return False
    path = Path(args.render)
    render(json.loads(path.read_text()), path)
    return True


def finish(out: Path | str, result: dict, markdown: str, plot: Callable[[Path], None] | None = None) -> dict:
    """write_report, then print the table and where it went."""
    paths = write_report(out, result, markdown, plot)
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def speedup_bars(path: Path, labels: list[str], series: dict[str, tuple[list[float], str]], title: str) -> None:
    """2-rank speedups as labelled bars, one group per label and one bar per series ({name: (values, color)}), with
    the 1.0 (no gain) and 2.0 (ideal for 2 ranks) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, (1.0 + 0.3 * len(series)) * len(labels)), 4))
    width = 0.76 / max(1, len(series))
    for j, (name, (values, color)) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar_label(ax.bar(xs, values, width, label=name, color=color), fmt="%.2f", fontsize=7)
    top = max(v for values, _ in series.values() for v in values)
    ax.set_ylim(0, max(2.0, top) * 1.25)  # room for the legend above the bars
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(2.0, color="gray", lw=0.8, ls=":", label="2.0 (ideal for 2 ranks)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup vs 1 process\n(median over passes of per-pass min/min)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(series) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path | str, result: dict, markdown: str, plot: Callable[[Path], None] | None = None
) -> dict[str, Path]:
    """Write a benchmark's one current result: OUT.json (`result`), OUT.md (`markdown`) and OUT.png (`plot(path)`;
    without one, the Markdown's first table drawn as a figure), OUT without a suffix. Returns the three paths."""
    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {kind: out.parent / f"{out.name}.{kind}" for kind in ("json", "md", "png")}
    text = json.dumps(result, indent=1, default=str) + "\n"
    if not (paths["json"].is_file() and json.loads(paths["json"].read_text()) == json.loads(text)):
        paths["json"].write_text(text)  # a re-render (--render) leaves the measured file as it was
    paths["md"].write_text(markdown.rstrip("\n") + "\n")
    (plot or (lambda p: table_figure(p, markdown, out.name)))(paths["png"])
    return paths


def table_figure(path: Path, markdown: str, title: str) -> None:
    """The first Markdown table of `markdown` drawn as a figure (for results whose numbers are a table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [ln.strip().strip("|").split("|") for ln in markdown.splitlines() if ln.strip().startswith("|")]
    rows = [[c.strip().replace("**", "") for c in r] for r in rows if not set("".join(r)) <= set("-: ")]
    if not rows:
        rows = [["(no table)"]]
    ncols = max(len(r) for r in rows)
    rows = [r + [""] * (ncols - len(r)) for r in rows]
    fig, ax = plt.subplots(figsize=(min(24.0, 1.6 * ncols + 2), 0.32 * len(rows) + 0.9))
    ax.axis("off")
    table = ax.table(cellText=rows[1:] or [[""] * ncols], colLabels=rows[0], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(ncols)))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
