"""Where the time goes: our fbcache vs diffusers' first-block cache, split into time inside the transformer blocks
and time outside them (embedding, final layer, sampler, and each cache's own bookkeeping).

    .venv/bin/python benchmarks/cache_block_time.py [--passes 5]   # -> results/cache_block_time.{json,md,png}

Same setup as benchmarks/cache_pairing.py --head-to-head (the digits model as diffusers' DiTTransformer2DModel, our
sampler, 30 steps, CFG 3, 50 images, 1 thread, fp32, uncapped: no reuse cap, no guard steps). Every block's own
forward is timed by one wrapper installed the same way in all three module copies (before either cache), so "in
blocks" is the blocks' compute and "outside" holds each cache's overhead. Interleaved per pass; medians reported.
Per-image decisions run more, smaller model calls through the skipped blocks (a call where some images compute);
on this CPU a block costs less per row at 25-50 rows than at 100 (memory traffic), which the split shows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from common import bar_plot, cached_run, finish, render_only, report_args
from opendit.cache import make_cache_config

CLOCK = {"in_blocks": 0.0, "calls": 0, "rows": 0}


def time_blocks(module) -> None:
    """Wrap every block's forward (as an instance attribute, which a cache installed later wraps in turn)."""
    for block in module.transformer_blocks:
        forward = block.forward

        def timed(*args, _forward=forward, **kwargs):
            start = time.perf_counter()
            out = _forward(*args, **kwargs)
            CLOCK["in_blocks"] += time.perf_counter() - start
            CLOCK["calls"] += 1
            CLOCK["rows"] += (args[0] if args else kwargs["hidden_states"]).shape[0]
            return out

        block.forward = timed


def main() -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    from opendit.digits.judges import load_for_eval
    from opendit.testing.dit_to_diffusers import DiffusersDiTFn, to_diffusers_dit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.25])
    report_args(parser, "cache_block_time")
    args = parser.parse_args()
    if render_only(args, write):
        return
    torch.set_num_threads(1)
    model, _meta = load_for_eval()
    base = to_diffusers_dit(model)
    shape = (model.config.in_channels, *model.config.input_size)
    labels = torch.arange(10).repeat(5)
    settings = [("uncached", None, None)]
    for t in args.thresholds:
        settings.append((f"diffusers FBC {t:g}", FirstBlockCacheConfig(threshold=t), None))
        settings.append((f"ours {t:g}", None, make_cache_config("fbcache", threshold=t, max_reuse=1000, guard_steps=0)))
    modules = {}
    for label, fbc, _ours in settings:
        modules[label] = copy.deepcopy(base)
        time_blocks(modules[label])
        if fbc is not None:
            apply_first_block_cache(modules[label], fbc)
    runs = {label: [] for label, *_ in settings}
    for _ in range(args.passes):
        for label, _fbc, ours in settings:
            CLOCK.update(in_blocks=0.0, calls=0, rows=0)
            _images, seconds, _saved = cached_run(DiffusersDiTFn(modules[label]), modules[label], ours, labels,
                                                        100, shape)  # fmt: skip
            runs[label].append({"total_s": seconds, **CLOCK})
    rows = []
    for label, *_ in settings:
        r = runs[label]
        med = {k: statistics.median(x[k] for x in r) for k in ("total_s", "in_blocks")}
        outside = statistics.median(x["total_s"] - x["in_blocks"] for x in r)
        rows.append({"setting": label, "total_s": med["total_s"], "in_blocks_s": med["in_blocks"],
                     "outside_s": outside, "block_calls": r[0]["calls"], "block_rows": r[0]["rows"],
                     "runs": r})  # fmt: skip
    write({"passes": args.passes, "torch": torch.__version__, "rows": rows}, args.out)


def write(result: dict, out) -> None:
    rows = result["rows"]
    lines = [
        "| setting | total (median s) | in blocks | outside | block calls | block rows |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['total_s']:.3f} | {r['in_blocks_s']:.3f} | {r['outside_s']:.3f} | "
                     f"{r['block_calls']} | {r['block_rows']} |")  # fmt: skip
    series = {"in blocks": [r["in_blocks_s"] for r in rows], "outside": [r["outside_s"] for r in rows]}
    title = "where the time goes: ours vs diffusers' first-block cache (median s per 50-image run)"
    finish(out, result, "\n".join(lines), plot=lambda path: bar_plot(
        path, [r["setting"] for r in rows], series, "seconds", title))  # fmt: skip


if __name__ == "__main__":
    main()
