"""Ablation: first-block-cache decisions per image (an image's cond and uncond rows decide together, the default)
vs per row (each branch alone), next to diffusers' own first-block cache, on the same diffusers module.

    .venv/bin/python benchmarks/cache_pairing.py [CLASS_REPEATS]     # -> benchmarks/results/cache_pairing.{json,md,png}
    .venv/bin/python benchmarks/cache_pairing.py --head-to-head --passes 7 --out cache_vs_diffusers_per_image

The bundled digits model converted to diffusers' DiTTransformer2DModel, our sampler (flow-euler, 30 steps, CFG 3),
one process x 1 thread, fp32. Time: 50 images per setting, 3 passes interleaved setting by setting, per-pass minimum;
ratio = cached / uncached minimum of the same run (and the median over passes of each pass's cached / uncached
time). PSNR: 10 x CLASS_REPEATS images (default 200) against the uncached images of the same seeds. "per row" is the
same code with the branch pairing switched off (StepCache._pair_branches
patched to the identity); "uncapped" = no reuse cap and no guard steps, diffusers' rule.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from common import RESULTS, cached_run, finish, psnr, render_only, report_args
from opendit.cache import make_cache_config
from opendit.cache.runtime import StepCache

PAIRED = {"on": True}
_pair_branches = StepCache._pair_branches


def _switchable_pairing(self, values):
    return _pair_branches(self, values) if PAIRED["on"] else values


def settings(head_to_head: bool):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    out = [("uncached", None, True)]
    for t in (0.1, 0.15, 0.2, 0.25):
        fbc = FirstBlockCacheConfig(threshold=t)
        out.append((f"diffusers FBC {t:g}", lambda m, c=fbc: apply_first_block_cache(m, c), True))
        uncapped = make_cache_config("fbcache", threshold=t, max_reuse=1000, guard_steps=0)
        if not head_to_head:
            out.append((f"ours {t:g} uncapped, per row", uncapped, False))
        out.append((f"ours {t:g} uncapped, per image", uncapped, True))
        if not head_to_head:
            default_rule = make_cache_config("fbcache", threshold=t)
            out.append((f"ours {t:g} (cap 4, 2 guard steps), per image", default_rule, True))
    return out


def count_diffusers_decisions() -> dict:
    """Patch diffusers' head-block decision to count how often it reuses (its record has no such counter)."""
    import diffusers.hooks.first_block_cache as fbc

    counts = {"compute": 0, "reuse": 0}
    decide = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def counted(self, residual):
        compute = decide(self, residual)
        counts["compute" if compute else "reuse"] += 1
        return compute

    fbc.FBCHeadBlockHook._should_compute_remaining_blocks = counted
    return counts


def main() -> None:
    import argparse
    import statistics

    from opendit.digits.judges import load_for_eval
    from opendit.testing.dit_to_diffusers import DiffusersDiTFn, to_diffusers_dit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repeats", nargs="?", type=int, default=20, help="PSNR images per class")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--head-to-head", action="store_true", help="only uncached, diffusers FBC, ours per image")
    report_args(parser, "cache_pairing")
    args = parser.parse_args()
    if render_only(args, lambda result, path: write(result["rows"], result["meta"], path)):
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    StepCache._pair_branches = _switchable_pairing  # "per row" runs switch the branch pairing off (PAIRED)
    counts = count_diffusers_decisions()
    model, _meta = load_for_eval()
    base = to_diffusers_dit(model)
    shape = (model.config.in_channels, *model.config.input_size)
    table = settings(args.head_to_head)
    modules = {}
    for label, config, _paired in table:  # diffusers' cache is installed for good: one module copy per setting
        modules[label] = copy.deepcopy(base)
        if callable(config):
            config(modules[label])

    def run(label, config, paired, labels):
        PAIRED["on"] = paired
        return cached_run(DiffusersDiTFn(modules[label]), modules[label], config, labels, 100, shape)

    timing_labels, labels = torch.arange(10).repeat(5), torch.arange(10).repeat(args.repeats)
    times = {label: [] for label, *_ in table}
    for _ in range(args.passes):
        for label, config, paired in table:
            times[label].append(run(label, config, paired, timing_labels)[1])
    rows, reference = [], None
    for label, config, paired in table:
        counts.update(compute=0, reuse=0)
        images, _seconds, saved = run(label, config, paired, labels)
        reference = images if reference is None else reference
        if saved is not None:  # ours: image-rows that reused / all image-row steps
            share = saved["samples_reused"] / max(1, saved["sample_steps"])
        else:  # diffusers decides for the whole batch: reusing calls / calls
            share = counts["reuse"] / max(1, counts["reuse"] + counts["compute"])
        rows.append({"setting": label, "min_s": min(times[label]), "median_s": statistics.median(times[label]),
                     "times": times[label], "psnr": psnr(images, reference), "reuse_share": share})  # fmt: skip
    for row in rows:
        row["ratio"] = row["min_s"] / rows[0]["min_s"]
        row["median_ratio"] = row["median_s"] / rows[0]["median_s"]
        # each pass times every setting back to back: its own uncached time is the fairest baseline on a noisy VM
        row["pass_ratio_median"] = statistics.median(t / u for t, u in zip(row["times"], rows[0]["times"]))
    meta = {"psnr_images": len(labels), "timing_images": len(timing_labels), "passes": args.passes}
    write(rows, {**meta, "torch": torch.__version__}, args.out)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | time ratio, per-pass min (median) | median of per-pass ratios | PSNR vs uncached (dB) "
        "| reuse share |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        median = f" ({r['median_ratio']:.3f})" if "median_ratio" in r else ""
        paired = f"{r['pass_ratio_median']:.3f}" if "pass_ratio_median" in r else "-"
        share = f"{r['reuse_share']:.3f}" if r.get("reuse_share") is not None else "-"
        lines.append(f"| {r['setting']} | {r['ratio']:.3f}{median} | {paired} | {float(r['psnr']):.2f} | {share} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time ratio and PSNR per setting (PSNR capped at 60 dB: the uncached reference is identical to itself)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = ("diffusers FBC", "per row", "uncapped, per image", "(cap 4")
    for kind, marker in zip(kinds, ("v", "o", "D", "^")):
        pts = [r for r in rows if kind in r["setting"]]
        if pts:
            ax.plot([r["ratio"] for r in pts], [min(float(r["psnr"]), 60) for r in pts], marker, ls="-", label=kind)
    ax.set_xlabel("time ratio vs uncached (per-pass minimum)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title("first-block cache: per image vs per row vs diffusers FBC (thresholds 0.1-0.25)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], meta: dict, out: str | Path = RESULTS / "cache_pairing") -> None:
    out = Path(out)
    out = out if out.is_absolute() or out.parent != Path(".") else RESULTS / out  # a bare name: under results/
    finish(out, {"meta": meta, "rows": rows}, markdown(rows), plot=lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
