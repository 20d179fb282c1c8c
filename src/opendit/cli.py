"""`opendit` command line: thin wrappers over the Python API. Bad input exits with status 2 and one clear line."""

import argparse
import sys

from opendit.errors import OpenDiTError


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sample", help="generate class-conditional images")
    parser.add_argument("--model", help="preset name (see `opendit models`); default: the shipped digits model")
    parser.add_argument("--ckpt", help="checkpoint: official DiT .pt, training .pt, or our .safetensors (+ .json)")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="one image per class id")
    parser.add_argument("--image-size", type=int, help="output size in pixels (default: the model's own)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation)")
    parser.add_argument("--scheduler", help="ddpm | ddim | dpm-solver | flow-euler (default: the model's)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 disables guidance")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    parser.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models only)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_sample)
    return parser


def run_sample(args: argparse.Namespace) -> int:
    from opendit.pipeline import GenerationRequest, generate, save_outputs

    request = GenerationRequest(
        classes=args.classes,
        model=args.model,
        ckpt=args.ckpt,
        image_size=args.image_size,
        steps=args.steps,
        scheduler=args.scheduler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        dtype=args.dtype,
        vae=args.vae,
        device=args.device,
        progress=not args.no_progress,
    )
    result = generate(request)
    grid = save_outputs(result, args.out)
    timing = result.record["timing"]
    print(f"wrote {grid} and {len(result.labels)} images to {args.out}/ (sampling {timing['sampling_s']:.2f} s)")
    if result.record.get("note"):
        print(f"note: {result.record['note']}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from opendit.models.dit import PRESETS

    print(f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'params (256px latent)':>22}")
    for name, config in PRESETS.items():
        from opendit.models.dit import build_dit

        params = sum(p.numel() for p in build_dit(config, device="meta").parameters())
        print(
            f"{name:<10} {config.depth:>5} {config.hidden_size:>6} {config.num_heads:>5} {config.patch_size:>5} "
            f"{params:>22,}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opendit", description="Fast, exact multi-device Diffusion Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    models = subparsers.add_parser("models", help="list model presets")
    models.set_defaults(func=run_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OpenDiTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
