"""Caching across steps: wall-clock speedup vs drift, on trained models -> JSON + Markdown table + PNG.

    .venv/bin/python benchmarks/cache.py                 # full run (~40 min on 2 cores)
    .venv/bin/python benchmarks/cache.py --quick         # 100 samples, 1 timing pass: a smoke test

Parts (one process, 1 thread, fp32, flow-euler, 30 steps, CFG 3, the same seeds in every setting):
  digits     the bundled digits DiT: uncached, PAB settings, fbcache thresholds. Per setting: sampling wall time of
             `--timing-samples` images (interleaved passes; per-pass minimum and median), and on `--samples` images
             (100 per class at 1000; the non-default curve points on the first `--curve-samples`) the project
             judge's class accuracy and the PSNR against the uncached images.
  diffusers  the same digits model converted to diffusers' DiTTransformer2DModel (testing/dit_to_diffusers.py,
             outputs equal to ours): diffusers' own `apply_first_block_cache` vs our fbcache on that same module,
             same thresholds, same sampler; speedup and PSNR vs that module's uncached images.
  video      the bundled digits video model: uncached, PAB and fbcache defaults; per-frame digit and direction
             accuracy on 40 conditions x `--video-per-condition` seeds, and sampling time.
Speedup = uncached time / cached time of the same images in the same run: what a user of `opendit sample` waits
for in the sampling loop (model load and PNG writing, identical in every setting, are outside the figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import CACHE_CFG as CFG
from common import CACHE_STEPS as STEPS
from common import cached_run, finish, psnr, render_only, report_args, timed
from opendit.cache import CacheConfig, install_cache, make_cache_config


def digits_settings() -> list[tuple[str, CacheConfig | None]]:
    default_threshold = make_cache_config("fbcache", "DiT").threshold
    settings = [("uncached", None), ("pab (default)", make_cache_config("pab", "DiT"))]
    settings += [("pab range 2 + mlp 2", make_cache_config("pab", "DiT", pab_mlp_range=2))]
    for threshold in (0.05, default_threshold, 0.3):
        label = f"fbcache {threshold:g}" + (" (default)" if threshold == default_threshold else "")
        settings.append((label, make_cache_config("fbcache", "DiT", threshold=threshold)))
    settings.append(("fbcache 0.4 reuse<=8", make_cache_config("fbcache", "DiT", threshold=0.4, max_reuse=8)))
    # past the useful range, to show where accuracy falls: reuse whenever the cap allows, no guard steps
    settings.append(("fbcache 1.0 reuse<=30 guard 0",
                     make_cache_config("fbcache", "DiT", threshold=1.0, max_reuse=30, guard_steps=0)))  # fmt: skip
    settings.append(("pab range 6 + mlp 6", make_cache_config("pab", "DiT", pab_range=6, pab_mlp_range=6,
                                                               pab_window=(0.05, 1.0))))  # fmt: skip
    # the far end: every attention and MLP output of step 0 reused on all later steps
    frozen = make_cache_config("pab", "DiT", pab_range=30, pab_mlp_range=30, pab_window=(0.0, 1.0))
    settings.append(("pab range 30 + mlp 30 (frozen after step 0)", frozen))
    return settings


def quality_row(part, label, images, labels, reference, seconds, times, **extra) -> dict:
    """One result row: the judge's class accuracy and the PSNR against the uncached images (same seeds)."""
    from opendit.digits.judges import score_samples

    score = score_samples(images.clamp(-1, 1), labels)
    row = {"part": part, "setting": label, "times_s": times[label], "quality_run_s": seconds,
           "accuracy": score["accuracy"], "samples": len(labels), "psnr_db": psnr(images, reference[: len(labels)]),
           **extra}  # fmt: skip
    print(f"[cache] {part} {label}: acc {row['accuracy']:.3f}, psnr {row['psnr_db']:.1f}", flush=True)
    return row


def run_digits(args) -> list[dict]:
    from opendit.digits.judges import load_for_eval

    model, _meta = load_for_eval()
    settings = digits_settings()
    shape = (model.config.in_channels, *model.config.input_size)
    # classes interleaved (0..9, 0..9, ...): the first n samples are n/10 per class with the same seeds as in the
    # whole run (sample i draws from seed + i), so a curve point on a prefix compares with the reference's prefix
    labels = torch.arange(10).repeat(args.samples // 10)
    timing_labels = torch.arange(10).repeat(max(1, args.timing_samples // 10))
    times = timed(settings, lambda _label: (model, model), timing_labels, args.batch, shape, args.passes)
    rows, reference = [], None
    for label, config in settings:
        # the uncached reference and the defaults on every sample; the other curve points on the first ones
        mine = labels if label == "uncached" or "default" in label else labels[: args.curve_samples]
        images, seconds, saved = cached_run(model, model, config, mine, args.batch, shape)
        reference = images if reference is None else reference
        rows.append(quality_row("digits", label, images, mine, reference, seconds, times, saved=saved,
                                cache=config.to_dict() if config else None))  # fmt: skip
    return with_speedups(rows)


def run_diffusers(args) -> list[dict]:
    import copy

    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    from opendit.digits.judges import load_for_eval
    from opendit.testing.dit_to_diffusers import DiffusersDiTFn, to_diffusers_dit

    model, _meta = load_for_eval()
    base = to_diffusers_dit(model)
    shape = (model.config.in_channels, *model.config.input_size)
    thresholds = (0.05, 0.1, 0.15, 0.25)
    settings = [("uncached", None)]
    for threshold in thresholds:
        settings.append((f"diffusers FBC {threshold:g}", lambda m, t=threshold: apply_first_block_cache(
            m, FirstBlockCacheConfig(threshold=t))))  # fmt: skip
        settings.append((f"ours fbcache {threshold:g}", make_cache_config("fbcache", threshold=threshold)))
        # diffusers' rule has no cap and no guard steps: ours with the same freedom, per sample
        uncapped = make_cache_config("fbcache", threshold=threshold, max_reuse=1000, guard_steps=0)
        settings.append((f"ours fbcache {threshold:g} uncapped", uncapped))
    modules = {}
    for label, config in settings:  # diffusers' cache is installed for good: one module copy per setting
        module = copy.deepcopy(base)
        if callable(config):
            config(module)
        modules[label] = module

    def make_fn(label):
        return DiffusersDiTFn(modules[label]), modules[label]

    labels = torch.arange(10).repeat(args.curve_samples // 10)
    timing_labels = torch.arange(10).repeat(max(1, args.timing_samples // 10))
    times = timed(settings, make_fn, timing_labels, args.batch, shape, args.passes)
    rows, reference = [], None
    with torch.no_grad():
        check = torch.randn(2, *shape)
        t, y = torch.tensor([500.0, 20.0]), torch.tensor([3, 10])
        conversion_err = float((DiffusersDiTFn(base)(check, t, y) - model(check, t, y)).abs().max())
    for label, config in settings:
        fn, module = make_fn(label)
        images, seconds, saved = cached_run(fn, module, config, labels, args.batch, shape)
        reference = images if reference is None else reference
        rows.append(quality_row("diffusers", label, images, labels, reference, seconds, times, saved=saved,
                                conversion_max_abs_err=conversion_err))  # fmt: skip
    return with_speedups(rows)


def run_video(args) -> list[dict]:
    from opendit.api.video import DEFAULT_VIDEO_CKPT
    from opendit.digits.judges import generate_videos, score_videos
    from opendit.io.checkpoint import inspect_checkpoint, load_model

    info = inspect_checkpoint(DEFAULT_VIDEO_CKPT)
    model = load_model(info.config, info.path)
    rows = []
    for label, config in (("uncached", None), ("pab (default)", make_cache_config("pab", "VideoDiT")),
                          ("fbcache (default)", make_cache_config("fbcache", "VideoDiT"))):  # fmt: skip
        cache = install_cache(model, config) if config is not None else None
        videos, labels, seconds = generate_videos(model, args.video_per_condition, STEPS, CFG,
                                                  hooks=[cache] if cache else ())  # fmt: skip
        saved = cache.summary()["saved"] if cache is not None else None
        if cache is not None:
            cache.remove()
        score = score_videos(videos.clamp(-1, 1), labels)
        score.pop("per_condition", None)
        rows.append({"part": "video", "setting": label, "times_s": [seconds], "saved": saved, **score})
        print(f"[cache] video {label}: {seconds:.1f} s, digit {score['digit_accuracy']:.3f}", flush=True)
    return with_speedups(rows)


def with_speedups(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        row["time_min_s"], row["time_median_s"] = min(row["times_s"]), statistics.median(row["times_s"])
        row["speedup_min"] = min(base["times_s"]) / row["time_min_s"]
        row["speedup_median"] = statistics.median(base["times_s"]) / row["time_median_s"]
        row["time_ratio"] = 1 / row["speedup_min"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| part | setting | time (min / median, s) | time ratio | accuracy | PSNR vs uncached (dB) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        acc = r.get("accuracy", r.get("digit_accuracy"))
        extra = f" (direction {r['direction_accuracy']:.3f})" if "direction_accuracy" in r else ""
        lines.append(f"| {r['part']} | {r['setting']} | {r['time_min_s']:.2f} / {r['time_median_s']:.2f} | "
                     f"{r['time_ratio']:.2f} | {acc:.3f}{extra} | {r.get('psnr_db', float('nan')):.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("digits", "diffusers") if any(r["part"] == p for r in rows)] or ["digits"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for family, marker in (("uncached", "s"), ("pab", "o"), ("fbcache", "^"), ("uncapped", "D"),
                               ("diffusers FBC", "v")):  # fmt: skip
            pts = [r for r in rows if r["part"] == part and family in r["setting"] and not (
                family == "fbcache" and ("diffusers" in r["setting"] or "uncapped" in r["setting"]))]  # fmt: skip
            if pts:
                ax.plot([r["speedup_min"] for r in pts], [min(r["psnr_db"], 60) for r in pts], marker, ls="-",
                        label=family)  # fmt: skip
                for r in pts:
                    ax.annotate(f"{r['accuracy']:.0%}", (r["speedup_min"], min(r["psnr_db"], 60)), fontsize=7)
        ax.set_xlabel("sampling speedup vs uncached (wall clock, per-pass minimum)")
        ax.set_ylabel("PSNR vs uncached (dB; 60 = identical)")
        ax.set_title(f"{part}: speed vs drift (labels: class accuracy)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(result: dict, out) -> dict:
    return finish(out, result, markdown(result["rows"]), plot=lambda path: plot(result["rows"], path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--curve-samples", type=int, default=300, help="samples of the non-default settings")
    parser.add_argument("--timing-samples", type=int, default=50)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--video-per-condition", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["digits", "diffusers", "video"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--merge", nargs="+", metavar="PART=JSON", help="re-render: take each part's rows from an earlier run's JSON"
    )
    report_args(parser, "cache")
    args = parser.parse_args()
    if render_only(args, render):
        return
    if args.quick:
        args.samples, args.curve_samples, args.timing_samples, args.passes = 100, 50, 20, 1
        args.video_per_condition = 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, meta_runs = [], {}
    runners = {"digits": run_digits, "diffusers": run_diffusers, "video": run_video}
    for entry in args.merge or ():
        part, path = entry.split("=", 1)
        earlier = json.loads(Path(path).read_text())
        rows += [r for r in earlier["rows"] if r["part"] == part]
        meta_runs[part] = {"from": path, **earlier["meta"]}
    for part in [] if args.merge else args.parts:
        rows += runners[part](args)
    meta = {"steps": STEPS, "cfg_scale": CFG, "threads": 1, "samples": args.samples, "passes": args.passes,
            "curve_samples": args.curve_samples, "batch": args.batch,
            "timing_samples": args.timing_samples, "torch": torch.__version__, "merged": meta_runs}  # fmt: skip
    render({"meta": meta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
