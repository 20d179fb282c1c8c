"""The planner's choices on hardware this machine cannot touch, next to what other systems published.

    .venv/bin/python benchmarks/planner.py    # -> benchmarks/results/planner.{json,md,png}

DiT-XL/2 (28 blocks, hidden 1152, 16 heads) at 256 / 512 / 1024 px (256 / 1024 / 4096 tokens) and a video-length
sequence (32,760 tokens, e.g. 13 latent frames x 2,520 spatial tokens), one image with CFG, 50 steps, on documented
speeds (opendit/planning/speeds.py DEFAULTS): 8x H100 NVLink, 8x A100 PCIe and 16x H100 over 2 nodes (IB NDR).
The `-2GiB` rows cap the memory per device (as if the model were ~30x larger than the device's share, which is where
tensor parallelism, sharded weights and PipeFusion compete); every row gives the best plan of all (PipeFusion's
stale K/V included, as `opendit plan` ranks them) and the best exact plan (`--exact-only`, what `--parallel auto`
runs).
Pure prediction: no devices are used. Published configurations: xDiT, VideoSys and DistriFusion papers and
READMEs, quoted next to each row.
"""

import argparse
from pathlib import Path

from common import bar_plot, finish, markdown_table, render_only, report_args
from opendit.errors import OpenDiTError
from opendit.models.dit import preset
from opendit.planning.planner import plan
from opendit.planning.speeds import named_hardware as hardware

SCENARIOS = [
    ("256px", 256, None, None),
    ("512px", 512, None, None),
    ("1024px", 1024, None, None),
    ("video", 512, 32760, None),
    ("512px-2GiB", 512, None, 2.0),
    ("1024px-2GiB", 1024, None, 2.0),
]
MACHINES = [
    ("8x H100 NVLink", "h100-nvlink", 1, 8),
    ("8x A100 PCIe", "a100-pcie", 1, 8),
    ("16x H100, 2 nodes IB", "h100-ib", 2, 16),
]
PUBLISHED = {
    "h100-nvlink": "xDiT: Flux.1 4x H100 Ulysses-4 best (1.63 s compiled, 2.6x); HunyuanVideo 720p 8x H100 5.6x "
    "(Ulysses x ring + CFG); cache-dit FLUX Ulysses-4",
    "a100-pcie": "VideoSys/OpenDiT users found 8 GPUs communication-bound on A100/A800 (#199, #227); "
    "DistriFusion 6.1x on 8 A100",
    "h100-ib": "VideoSys is single-node only; xDiT recommends Ulysses inside a node, ring/PipeFusion across nodes",
}


def rows_of(result) -> list[dict]:
    return result["rows"] if isinstance(result, dict) else result  # the run of 2026-12-02 is a bare list


def markdown(result) -> str:
    header = ["machine", "scenario", "tokens", "best plan", "ms/step (50-step mean)", "speedup vs 1 device",
              "best exact plan", "exact ms/step"]  # fmt: skip
    cells = [
        [r["machine"], r["scenario"], r["tokens"], r["best"]["plan"], f"{r['best']['request_s'] / 50 * 1e3:.2f}",
         f"{r['predicted_speedup']:.1f}x", r["best_exact"]["plan"], f"{r['best_exact']['request_s'] / 50 * 1e3:.2f}"]
        for r in rows_of(result)
    ]  # fmt: skip
    note = "Predicted by the cost model from documented speeds (no devices used); DiT-XL/2, one image with CFG."
    return note + "\n\n" + markdown_table(header, cells)


def plot(result, path: Path) -> None:
    rows = rows_of(result)
    labels = [f"{r['machine']} {r['scenario']}" for r in rows]
    series = {"best plan": [r["best"]["request_s"] / 50 * 1e3 for r in rows],
              "best exact plan": [r["best_exact"]["request_s"] / 50 * 1e3 for r in rows]}  # fmt: skip
    title = "planner: DiT-XL/2 on hardware we cannot touch"
    bar_plot(path, labels, series, "predicted ms per step (mean over 50; log scale)", title, log=True)


def render(result, out) -> dict[str, Path]:
    return finish(out, result, markdown(result), plot=lambda path: plot(result, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_args(parser, "planner")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--objective", default="latency", choices=("latency", "throughput"))
    args = parser.parse_args()
    if render_only(args, render):
        return
    rows = []
    for label, name, nodes, world in MACHINES:
        for scen, px, tokens, mem_gib in SCENARIOS:
            speeds = hardware(name, nodes)
            model = preset("DiT-XL/2").with_image_size(px)
            single = plan(model, 1, speeds, images=args.images, guided=True, tokens=tokens).best  # no cap
            speeds = speeds.with_memory(mem_gib * (1 << 30)) if mem_gib else speeds
            kwargs = {"images": args.images, "guided": True, "tokens": tokens, "objective": args.objective}
            try:
                result = plan(model, world, speeds, **kwargs)
                exact = plan(model, world, speeds, stale=False, **kwargs).best
            except OpenDiTError as exc:  # nothing fits the cap
                print(f"{label:<22} {scen:<11} {exc}")
                continue
            best = result.best
            rows.append(
                {
                    "machine": label,
                    "scenario": scen,
                    "tokens": result.request["tokens"],
                    "best": best.row(),
                    "runner_up": result.ranked[1].row() if len(result.ranked) > 1 else None,
                    "best_exact": exact.row(),
                    "memory_cap_gib": mem_gib,
                    "single_device_step_s": single.step.total_s,
                    "predicted_speedup": single.request_s / best.request_s,
                    "why": result.explain(),
                    "published": PUBLISHED[name],
                }
            )
            print(
                f"{label:<22} {scen:<11} {result.request['tokens']:>6} tok  {best.config.describe():<58} "
                f"{best.request_s / 50 * 1e3:8.2f} ms/step  x{rows[-1]['predicted_speedup']:.1f} vs 1 device; exact: "
                f"{exact.config.describe()} {exact.request_s / 50 * 1e3:.2f} ms"
            )
        print(f"{'':<22} published: {PUBLISHED[name]}")
    render({"images": args.images, "objective": args.objective, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
