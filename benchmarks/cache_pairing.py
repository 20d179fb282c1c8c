"""Ablation: first-block-cache decisions per image (an image's cond and uncond rows decide together, the default)
vs per row (each branch alone), next to diffusers' own first-block cache, on the same diffusers module.

    .venv/bin/python benchmarks/cache_pairing.py [CLASS_REPEATS]     # -> benchmarks/results/cache_pairing.{json,md}

The bundled digits model converted to diffusers' DiTTransformer2DModel, our sampler (flow-euler, 30 steps, CFG 3),
one process x 1 thread, fp32. Time: 50 images per setting, 3 passes interleaved setting by setting, per-pass minimum;
ratio = cached / uncached minimum of the same run. PSNR: 10 x CLASS_REPEATS images (default 200) against the uncached
images of the same seeds. "per row" is the same code with the branch pairing switched off (StepCache._pair_branches
patched to the identity); "uncapped" = no reuse cap and no guard steps, diffusers' rule.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cache as bench  # noqa: E402  (benchmarks/cache.py: the sampler loop, timing and PSNR)
from opendit.cache import make_cache_config  # noqa: E402
from opendit.cache.runtime import StepCache  # noqa: E402

PAIRED = {"on": True}
_pair_branches = StepCache._pair_branches


def _switchable_pairing(self, values):
    return _pair_branches(self, values) if PAIRED["on"] else values


StepCache._pair_branches = _switchable_pairing


def settings():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    out = [("uncached", None, True)]
    for t in (0.1, 0.15, 0.2, 0.25):
        fbc = FirstBlockCacheConfig(threshold=t)
        out.append((f"diffusers FBC {t:g}", lambda m, c=fbc: apply_first_block_cache(m, c), True))
        uncapped = make_cache_config("fbcache", threshold=t, max_reuse=1000, guard_steps=0)
        out.append((f"ours {t:g} uncapped, per row", uncapped, False))
        out.append((f"ours {t:g} uncapped, per image", uncapped, True))
        out.append((f"ours {t:g} (cap 4, 2 guard steps), per image", make_cache_config("fbcache", threshold=t), True))
    return out


def main() -> None:
    from opendit.evaluate import load_for_eval
    from opendit.integrations.dit_to_diffusers import DiffusersDiTFn, to_diffusers_dit

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _meta = load_for_eval()
    base = to_diffusers_dit(model)
    shape = (model.config.in_channels, *model.config.input_size)
    table = settings()
    modules = {}
    for label, config, _paired in table:  # diffusers' cache is installed for good: one module copy per setting
        modules[label] = copy.deepcopy(base)
        if callable(config):
            config(modules[label])

    def run(label, config, paired, labels):
        PAIRED["on"] = paired
        return bench.cached_run(DiffusersDiTFn(modules[label]), modules[label], config, labels, 100, shape)

    timing_labels, labels = torch.arange(10).repeat(5), torch.arange(10).repeat(repeats)
    times = {label: [] for label, *_ in table}
    for _ in range(3):
        for label, config, paired in table:
            times[label].append(run(label, config, paired, timing_labels)[1])
    rows, reference = [], None
    for label, config, paired in table:
        images, _seconds, saved = run(label, config, paired, labels)
        reference = images if reference is None else reference
        saved_calls = (saved or {}).get("model_calls_saved")
        rows.append({"setting": label, "min_s": min(times[label]), "times": times[label],
                     "psnr": bench.psnr(images, reference), "calls_saved": saved_calls})  # fmt: skip
    for row in rows:
        row["ratio"] = row["min_s"] / rows[0]["min_s"]
    write(rows, {"psnr_images": len(labels), "timing_images": len(timing_labels), "torch": torch.__version__})


def write(rows: list[dict], meta: dict) -> None:
    out = ROOT / "benchmarks" / "results" / "cache_pairing"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| setting | time ratio (per-pass min) | PSNR vs uncached (dB) |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['ratio']:.3f} | {float(r['psnr']):.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
