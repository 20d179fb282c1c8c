"""PipeFusion's drift on the bundled digits model at its own sampling settings, on many samples.

    .venv/bin/python benchmarks/pipefusion_quality.py    # -> benchmarks/results/pipefusion_quality.{json,md,png}

One process samples `--images` digits (classes 0-9 in turn) with the model's own scheduler, steps and CFG scale (the
exact reference); then, in 4 gloo processes, PipeFusion with 2 and 4 stages and several patch / warm-up settings
samples the same images from the same seed (each setting in its own launch of N processes). Per setting: the
project's judge's class accuracy (evaluate.py), PSNR
and max relative error vs the exact samples, and the sampling wall time of the slowest rank (4 processes share 2
cores here, so 4-stage times compare settings with each other, not with a real 4-device run).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import bar_plot, finish, markdown_table, psnr, render_only, report_args

SETTINGS = [(2, 2, 1), (2, 4, 1), (2, 8, 1), (2, 8, 3), (4, 4, 1), (4, 8, 1), (4, 8, 3)]  # (stages, patches, warm-up)


def _kwargs(model, meta: dict, seed: int) -> dict:
    return {"num_classes": model.config.num_classes, "scheduler_name": meta.get("scheduler", "flow-euler"),
            "prediction": model.config.prediction, "learn_sigma": False, "steps": meta.get("steps", 30),
            "cfg_scale": meta.get("cfg_scale", 2.0), "seed": seed}  # fmt: skip


def world(images: int, seed: int, reference: torch.Tensor, setting: tuple[int, int, int]) -> list[dict]:
    import copy

    import torch.distributed as dist

    from opendit.digits.judges import load_for_eval, score_samples
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import sample_images
    from opendit.parallel.apply import parallelize

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    model, meta = load_for_eval()
    labels = torch.arange(images) % model.config.num_classes
    shape = (model.config.in_channels, *model.config.input_size)
    rows = []
    for stages, patches, warmup in [setting]:  # one setting per launch: idle ranks would time out in gloo
        plan = ParallelConfig(pipefusion=stages, patches=patches, warmup_steps=warmup)
        runtime = build_runtime(plan, "cpu")
        pmodel = parallelize(copy.deepcopy(model), runtime)
        start = time.perf_counter()
        samples = sample_images(pmodel, labels, shape, **_kwargs(model, meta, seed)).samples
        seconds = time.perf_counter() - start
        if runtime.index == 0:
            rows.append({"stages": stages, "patches": patches, "warmup_steps": warmup, "sampling_s": seconds,
                         "accuracy": score_samples(samples.clamp(-1, 1), labels)["accuracy"],
                         "psnr_db": psnr(samples, reference, clamp=False),
                         "max_rel_err": float((samples - reference).abs().max() / reference.abs().max())})  # fmt: skip
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return [r for part in everyone for r in part]


def render(result: dict, out) -> dict:
    rows, exact = result["pipefusion"], result["one_process"]
    header = ["stages", "patches", "warm-up steps", "class accuracy", "PSNR vs 1 process (dB)", "max rel err",
              "sampling s"]  # fmt: skip
    cells = [[r["stages"], r["patches"], r["warmup_steps"], f"{r['accuracy']:.1%}", f"{r['psnr_db']:.1f}",
              f"{r['max_rel_err']:.3f}", f"{r['sampling_s']:.1f}"] for r in rows]  # fmt: skip
    md = f"One process: accuracy {exact['accuracy']:.1%}, {exact['sampling_s']:.1f} s.\n\n"
    labels = [f"{r['stages']} stages x {r['patches']} patches, {r['warmup_steps']} warm-up" for r in rows]
    series, title = {"PSNR": [r["psnr_db"] for r in rows]}, "PipeFusion drift on the digits model"
    return finish(out, result, md + markdown_table(header, cells), plot=lambda path: bar_plot(
        path, labels, series, "PSNR vs 1 process (dB)", title))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    report_args(parser, "pipefusion_quality")
    args = parser.parse_args()
    if render_only(args, render):
        return

    from opendit.diffusion.sampler import sample
    from opendit.digits.judges import load_for_eval, score_samples
    from opendit.distributed.launch import launch

    torch.set_num_threads(1)
    model, meta = load_for_eval()
    labels = torch.arange(args.images) % model.config.num_classes
    shape = (model.config.in_channels, *model.config.input_size)
    start = time.perf_counter()
    reference = sample(model, labels, shape, **_kwargs(model, meta, args.seed)).samples
    exact = {"sampling_s": time.perf_counter() - start,
             "accuracy": score_samples(reference.clamp(-1, 1), labels)["accuracy"]}  # fmt: skip
    rows = [
        row
        for setting in SETTINGS
        for row in launch(world, setting[0], (args.images, args.seed, reference, setting), threads_per_proc=1)
    ]
    out = {"images": args.images, "steps": meta.get("steps"), "cfg_scale": meta.get("cfg_scale"),
           "scheduler": meta.get("scheduler"), "one_process": exact, "pipefusion": rows}  # fmt: skip
    print(f"one process: accuracy {exact['accuracy']:.1%}, {exact['sampling_s']:.1f} s")
    for r in rows:
        print(f"pipefusion {r['stages']} stages, {r['patches']} patches, {r['warmup_steps']} warm-up: accuracy "
              f"{r['accuracy']:.1%}, PSNR {r['psnr_db']:.1f} dB, max rel err {r['max_rel_err']:.3f}, "
              f"{r['sampling_s']:.1f} s")  # fmt: skip
    render(out, args.out)


if __name__ == "__main__":
    main()
