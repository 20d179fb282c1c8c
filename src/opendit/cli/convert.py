"""`opendit convert CKPT OUT.safetensors`: a DiT checkpoint -> our safetensors + .json config, streamed (convert.py).

Wire into cli.build_parser: `add_convert_parser(subparsers)`.
"""

from __future__ import annotations

import argparse

from opendit.api.request import EngineRequest
from opendit.api.surfaces import add_field_flags


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert an official DiT .pt or a training checkpoint to .safetensors + .json (streaming)"
    )
    parser.add_argument("ckpt", help="official DiT .pt, training .pt of opendit train (or its run directory), or ours")
    parser.add_argument("out", help="output weights file, ending in .safetensors (its config goes beside it as .json)")
    add_field_flags(parser, EngineRequest, {
        "model": {"help": "preset name (see `opendit models`) for a file without a config; default: from shapes"},
        "image_size": {"help": "image size in pixels (default: from pos_embed, or the config)"},
    })  # fmt: skip
    parser.add_argument("--use", choices=("ema", "model"), help="weights of a training checkpoint (default: ema)")
    stored = {"choices": ("fp32", "bf16", "fp16"), "default": None, "help": "store in this dtype (default: the file's)"}
    add_field_flags(parser, EngineRequest, {"dtype": stored})
    parser.add_argument("--force", action="store_true", help="overwrite OUT and its .json if they exist")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    from opendit.io.convert import convert_checkpoint, describe

    summary = convert_checkpoint(
        args.ckpt,
        args.out,
        model=args.model,
        image_size=args.image_size,
        use=args.use,
        dtype=args.dtype,
        force=args.force,
    )
    print(describe(summary))
    return 0
