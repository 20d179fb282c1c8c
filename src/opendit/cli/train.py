"""`opendit train` and `opendit eval`: argument parsers the main CLI registers, runnable on their own as
`python -m opendit.cli.train train|eval ...`."""

import argparse
import json
import shlex
import sys
from dataclasses import fields

from opendit.api.request import EngineRequest, call_model
from opendit.api.surfaces import add_field_flags
from opendit.errors import OpenDiTError

_HELP = {
    "out": "run directory: checkpoints/, log.jsonl, config.json",
    "model": "architecture preset (DiT-T/2, DiT-D/2, DiT-S/2 ...)",
    "data": "'digits' (scikit-learn) or a folder with one subfolder of images per class",
    "image_size": "training resolution in pixels (square)",
    "channels": "image channels: 1 grey, 3 RGB",
    "prediction": "flow (velocity, the sampler's convention) or epsilon (DDPM)",
    "learn_sigma": "epsilon only: also output (untrained) variance channels, like the official DiT",
    "time_sampling": "flow sigma distribution: uniform or logit-normal",
    "steps": "total optimiser steps (resume continues up to this)",
    "batch_size": "global batch size, split over --nproc processes",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear learning-rate warm-up steps",
    "grad_clip": "max gradient norm (0 = off)",
    "ema_decay": "EMA decay per step",
    "label_dropout": "fraction of labels replaced by the null class (enables CFG)",
    "seed": "seed of the init, batches, noise and times",
    "precision": "fp32, or bf16 autocast",
    "grad_checkpointing": "recompute block activations in backward (less memory, ~30%% slower)",
    "ckpt_every": "save a checkpoint every K steps",
    "keep": "numbered checkpoints to keep besides latest.pt",
    "log_every": "write a log.jsonl record every K steps",
    "nproc": "data-parallel processes (gloo on CPU, NCCL on GPU)",
    "threads": "CPU threads per process (0 = cores / nproc)",
    "device": "auto, cpu or cuda",
    "resume": "continue from <out>/checkpoints/latest.pt",
    "time_limit": "minutes after which to checkpoint and stop (0 = none)",
    "progress": "show a progress bar",
    "lr_schedule": "constant, or cosine decay to 0 over --steps",
    "video": "train a video DiT (default then: --model Latte-D/4 --data moving-digits)",
}
# --video is a mode: these flags default to the video model's values unless given
VIDEO_DEFAULTS = {"model": "Latte-D/4", "data": "moving-digits", "out": "runs/digits-video"}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` (one option per TrainConfig field) plus `--export PATH` for the EMA weights at the end."""
    from opendit.io.checkpoint import TRAINED_CFG_SCALE, TRAINED_STEPS
    from opendit.train.trainer import TrainConfig

    parser = subparsers.add_parser("train", help="train a class-conditional DiT (default: digits, DiT-D/2, 16x16)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{_HELP.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    parser.add_argument(
        "--export", default=None, help="after training, write the EMA weights to PATH.safetensors+.json"
    )
    # the same defaults a run directory or training checkpoint samples with (checkpoint.sampling_defaults)
    add_field_flags(parser, call_model(), {
        "cfg_scale": {"default": TRAINED_CFG_SCALE, "help": "CFG scale recorded in the export"}})  # fmt: skip
    parser.add_argument("--sample-steps", type=int, default=TRAINED_STEPS, help="sampling steps recorded in the export")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from opendit.train.trainer import TrainConfig, export_ema, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if values["video"]:
        defaults = TrainConfig()
        for name, video_default in VIDEO_DEFAULTS.items():
            if values[name] == getattr(defaults, name):
                values[name] = video_default
    cfg = TrainConfig(**values)
    result = train(cfg)
    if args.export:
        extra = {
            "scheduler": "flow-euler" if cfg.prediction == "flow" else "ddim",
            "steps": args.sample_steps,
            "cfg_scale": args.cfg_scale,
            "trained": {"command": command_line(), "steps": result["step"], "time_s": result["elapsed_s"]},
        }
        result["export"] = str(export_ema(result["checkpoint"], args.export, extra))
    print(json.dumps(result, indent=2))
    return 0


def command_line() -> str:
    """This invocation as `opendit train ...`, whether it came through the main CLI or `python -m`."""
    return " ".join(["opendit", *(shlex.quote(a) for a in sys.argv[1:])])


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval`: class accuracy, Fréchet distances and sampling time of a model's samples, as JSON."""
    parser = subparsers.add_parser("eval", help="measure a digits model: SVC accuracy, Fréchet distance, timing")
    add_field_flags(parser, EngineRequest, {"ckpt": {"help": (
        "weights: a run directory of opendit train, a training .pt, or .safetensors with its .json; default: the "
        "shipped digits model")}})  # fmt: skip
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    add_field_flags(parser, call_model(), {
        "steps": {"help": "sampling steps (default: the model JSON's, else 30)"},
        "cfg_scale": {"help": "CFG scale (default: the model JSON's, else 3)"},
        "seed": {"default": 0, "help": "noise seed (default: 0)"},
    })  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=50, help="images per sampler call (default: 50)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--use-model", choices=["ema", "model"], default="ema", help="for .pt: which weights")
    add_field_flags(parser, call_model(), {"out": {"default": None, "help": "also write the JSON report to this file"}})
    parser.add_argument(
        "--video", action="store_true", help="judge the digits VIDEO model (default: the bundled one): per-frame digit "
        "and direction accuracy over the 40 digit x direction conditions",
    )  # fmt: skip
    parser.add_argument("--per-condition", type=int, default=10, help="--video: videos per condition (default: 10)")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from opendit.digits.judges import evaluate, load_for_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt
    if args.video:
        from opendit.api.video import DEFAULT_VIDEO_CKPT

        if ckpt is None and not DEFAULT_VIDEO_CKPT.is_file():
            raise OpenDiTError(f"the bundled video model {DEFAULT_VIDEO_CKPT} does not exist; pass --ckpt")
        ckpt = ckpt or DEFAULT_VIDEO_CKPT
    model, meta = load_for_eval(ckpt, use=args.use_model)
    steps = args.steps or meta.get("steps", 30)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else meta.get("cfg_scale", 3.0)
    if args.video:
        from opendit.digits.judges import evaluate_video_model

        report = evaluate_video_model(model, args.per_condition, steps, cfg_scale, args.seed, min(args.batch_size, 40))
    else:
        report = evaluate(model, args.per_class, steps, cfg_scale, args.seed, args.batch_size)
    return _report(report, meta, args.out)


def _report(report: dict, meta: dict, out: str | None) -> int:
    report["model"] = meta.get("path")  # the weights file (the image report's config is not part of it)
    text = json.dumps(report, indent=2)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opendit.cli.train")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    from opendit.distributed.launch import WorkerFailed

    try:
        return args.func(args)
    except OpenDiTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # as the main CLI: the failing rank's traceback, then its message, exit 1
        if exc.traceback:
            print(exc.traceback.rstrip(), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
