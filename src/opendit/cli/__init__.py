"""`opendit` command line: thin wrappers over the Python API. Bad input exits with status 2 and one clear line on
stderr ("error: ..."), for bad flags (argparse) as for bad values (the request schema, request.py)."""

import argparse
import sys

from opendit.errors import OpenDiTError


class Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, "3.5" for an integer, a missing value) are one OpenDiTError line, as every
    other bad input, instead of the usage text plus a message (subcommand parsers inherit this class)."""

    def error(self, message: str):
        raise OpenDiTError(f"{message}; see `{self.prog} --help`")


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample", help="generate class-conditional images (or run a local diffusers pipeline: --diffusers DIR)"
    )
    parser.add_argument("--model", help="preset name (see `opendit models`); default: the shipped digits model")
    parser.add_argument("--ckpt", help="checkpoint: official DiT .pt, training .pt, or our .safetensors (+ .json)")
    parser.add_argument("--classes", type=int, nargs="+", help="one image per class id (default: 0 to 9)")
    parser.add_argument("--image-size", type=int, help="output size in pixels (default: the model's own)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation)")
    parser.add_argument("--scheduler", help="ddpm | ddim | dpm-solver | flow-euler (default: the model's)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 disables guidance")
    parser.add_argument(
        "--seed", type=int, default=0, help="image i uses seed + i (--diffusers: one generator seeded SEED for all)"
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        help="fp32 | bf16 | fp16 | auto (bf16 where calibrated fast and the model's drift is documented)",
    )
    parser.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models only)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--trace", metavar="FILE", help="write a Chrome trace JSON of the sampling loop, every rank (ui.perfetto.dev)"
    )
    add_diffusers_flags(parser)
    add_video_flags(parser)
    add_cache_flags(parser)
    add_parallel_flags(parser)
    parser.set_defaults(func=run_sample)
    return parser


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """`opendit sample --nproc N --dp/--ulysses/--ring ... ` (one device mesh)."""
    from opendit.parallel.registry import strategies

    par = parser.add_argument_group("parallel (one mesh: pipefusion x dp x cfg x ring x ulysses x tp = processes)")
    par.add_argument("--nproc", type=int, help="local worker processes to start (default 1; under torchrun: its world)")
    par.add_argument("--dp", type=int, help="data parallel: groups that each generate a share of the images")
    par.add_argument("--cfg-parallel", action="store_true", help="conditional / unconditional halves on 2 groups")
    par.add_argument("--ulysses", type=int, help="Ulysses (all-to-all, head-parallel) sequence degree")
    par.add_argument("--ring", type=int, help="ring-attention sequence degree")
    par.add_argument(
        "--tp", type=int, help="tensor parallel: attention heads, MLP and adaLN weights split over N ranks (innermost)"
    )
    par.add_argument("--pipefusion", type=int, help="PipeFusion: the blocks in N stages, image patches pipelined")
    par.add_argument("--patches", type=int, help="PipeFusion: patches M >= N (default: N)")
    par.add_argument("--warmup-steps", type=int, help="PipeFusion: synchronous (exact) first steps (default 1)")
    par.add_argument(
        "--sp-impl",
        choices=("auto", *strategies()),  # every registered strategy (opendit plan --list-strategies)
        default="auto",
        help="sequence-parallel strategy (default: the registry's for the degrees, ulysses-overlap on --ulysses; "
        "fastseq and ulysses use the --ulysses degree)",
    )
    par.add_argument("--comm-dtype", choices=("bf16", "fp16"), help="send activations in this dtype")
    par.add_argument("--shard-weights", action="store_true", help="shard weights over the sequence-parallel group")
    par.add_argument(
        "--balance-tokens",
        action="store_true",
        help="re-split the sequence by each rank's measured speed after the first steps (uneven devices; exact)",
    )
    par.add_argument(
        "--parallel",
        choices=("default", "auto"),
        default="default",
        help="with --nproc and no degrees: auto = the planner's fastest plan from the cost model (see `opendit plan`)",
    )
    par.add_argument(
        "--memory-gib",
        type=float,
        help="memory per rank (GiB): the plan's predicted whole-run peak must fit; without degrees the planner picks "
        "the fastest plan that fits (e.g. --shard-weights); if none fits, says how many ranks or which dtype would",
    )


def add_video_flags(parser: argparse.ArgumentParser) -> None:
    """`opendit sample --video [--motion ...] [--frames N]` (opendit/video.py)."""
    vid = parser.add_argument_group("video (a video DiT: the bundled moving-digits model, or --model Latte-*/p --ckpt)")
    vid.add_argument("--video", action="store_true", help="sample videos: GIF + lossless PNG frames per video")
    vid.add_argument(
        "--motion", nargs="+", help="digits video model: right | left | down | up, one per class or one for all"
    )
    vid.add_argument("--frames", type=int, help="frames per video: must be the model's own (checked)")


# the request's cache fields, each one flag (--cache, --pab-range, ...)
CACHE_FLAGS = ("cache", "pab_range", "pab_window", "pab_mlp_range", "cache_threshold", "cache_max_reuse",
               "cache_guard_steps")  # fmt: skip


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """`opendit sample --cache pab|fbcache ...` (opendit/cache/): reuse work across denoising steps."""
    cache = parser.add_argument_group("caching across steps (cache/config.py; defaults per model in the README)")
    cache.add_argument(
        "--cache", help="none | pab (pyramid attention broadcast) | fbcache (adaptive first-block cache)"
    )
    cache.add_argument("--pab-range", type=int, help="pab: self/spatial attention every N steps; temporal 2N, cross 3N")
    cache.add_argument(
        "--pab-window", type=float, nargs=2, metavar=("A", "B"), help="pab: reuse inside steps [A, B) (fractions)"
    )
    cache.add_argument("--pab-mlp-range", type=int, help="pab: reuse the MLPs too, every N steps (0: never)")
    cache.add_argument(
        "--cache-threshold", type=float, help="fbcache: relative L1 change under which blocks are reused"
    )
    cache.add_argument("--cache-max-reuse", type=int, help="fbcache: consecutive reuses before a full step")
    cache.add_argument("--cache-guard-steps", type=int, help="fbcache: first/last N steps always compute")


def add_diffusers_flags(parser: argparse.ArgumentParser) -> None:
    """`opendit sample --diffusers DIR --prompt TEXT ...` (opendit/pipelines.py)."""
    pipe = parser.add_argument_group("diffusers pipelines (their own loop and scheduler; the transformer parallelised)")
    pipe.add_argument("--diffusers", metavar="DIR", help="a local diffusers pipeline folder (save_pretrained layout)")
    pipe.add_argument(
        "--prompt",
        nargs="+",
        action="extend",
        metavar="TEXT",
        help="one image per prompt (repeatable); all prompts go into one pipeline call with one generator",
    )
    pipe.add_argument("--negative-prompt", metavar="TEXT", help="for pipelines that take one (guided ones)")


def parallel_config(args: argparse.Namespace):
    """The ParallelConfig the flags ask for, or None when no parallel flag was given (degrees chosen for --nproc)."""
    from opendit.distributed.config import ParallelConfig

    degrees = {"dp": args.dp, "ulysses": args.ulysses, "ring": args.ring, "tp": args.tp, "pipefusion": args.pipefusion}
    if args.patches is not None and args.patches < 1:  # 0 is ParallelConfig's "one per stage", not a count to ask
        raise OpenDiTError(f"--patches takes a count of patches >= 1 (leave it out for one per stage), got "
                           f"{args.patches}; e.g. --patches 4")  # fmt: skip
    degrees |= {"patches": args.patches, "warmup_steps": args.warmup_steps}
    given = {k: v for k, v in degrees.items() if v is not None}
    if (
        not given
        and not args.cfg_parallel
        and args.sp_impl == "auto"
        and not args.comm_dtype
        and not args.shard_weights
        and not args.balance_tokens
    ):
        return None
    return ParallelConfig(
        **given,
        cfg=2 if args.cfg_parallel else 1,
        sp_impl=args.sp_impl,
        shard_weights=args.shard_weights,
        comm_dtype=args.comm_dtype,
        balance_tokens=args.balance_tokens,
    )


def validate_sample(args: argparse.Namespace):
    """The request the flags ask for, validated (request.py) and resolved, with --out and the trace's folder created
    or refused: a generation.Job. Nothing is loaded and no process is started."""
    from opendit.generation import GenerationRequest, prepare

    # flags named as the request's fields pass straight through; the others are translated
    same = ("model", "ckpt", "image_size", "steps", "scheduler", "cfg_scale", "seed", "dtype", "vae", "diffusers")
    classes = args.classes
    if classes is None and args.diffusers is None and args.prompt is None:
        classes = list(range(10))  # the default of OpenDiT's DiT path
    request = GenerationRequest(
        **{name: getattr(args, name) for name in (*same, "device", "nproc", "trace", "memory_gib")},
        classes=classes,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        video=args.video,
        motion=args.motion,
        frames=args.frames,
        **{name: getattr(args, name) for name in CACHE_FLAGS},
        progress=not args.no_progress,
        parallel=parallel_config(args),
        parallel_auto=args.parallel == "auto",
    )
    return prepare(request, out=args.out)


def run_sample(args: argparse.Namespace) -> int:
    from opendit.distributed.env import in_distributed_env, quiet_unless_rank0

    if in_distributed_env():  # a torchrun worker
        quiet_unless_rank0()
    return execute_sample(args, validate_sample(args))  # every check first, then the compute


def execute_sample(args: argparse.Namespace, job) -> int:
    """Generate a validated job (`validate_sample`) and write its files."""
    from opendit.distributed.env import global_rank
    from opendit.engine import generate
    from opendit.outputs import save_outputs

    result = generate(job.request)  # a one-shot opendit.Engine (the plan chosen for this batch and guidance)
    if global_rank() != 0:  # under torchrun: rank 0 writes the files and prints
        return 0
    if result.frames is not None and job.request.video:
        from opendit.video import label_names
        from opendit.video_outputs import save_video_outputs

        written = save_video_outputs(result.frames, result.labels, args.out, label_names(job.config), result.record)
        timing = result.record["timing"]
        print(
            f"wrote {written['grid']} and {len(result.labels)} videos (GIF + PNG frames) to {args.out}/ "
            f"(sampling {timing['sampling_s']:.2f} s)"
        )
        return 0
    grid = save_outputs(result, args.out)
    timing = result.record["timing"]
    print(f"wrote {grid} and {len(result.labels)} images to {args.out}/ (sampling {timing['sampling_s']:.2f} s)")
    if args.trace:
        print(f"wrote the trace of every rank to {args.trace} (open it in ui.perfetto.dev or chrome://tracing)")
    if result.record.get("note"):
        print(f"note: {result.record['note']}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from opendit.checkpoint import build_model
    from opendit.models.dit import PRESETS
    from opendit.models.video_dit import PRESETS as VIDEO_PRESETS

    def table(presets: dict) -> None:
        for name, config in presets.items():
            params = sum(p.numel() for p in build_model(config, device="meta").parameters())
            print(
                f"{name:<10} {config.depth:>5} {config.hidden_size:>6} {config.num_heads:>5} {config.patch_size:>5} "
                f"{params:>22,}"
            )

    print(f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'params (256px latent)':>22}")
    table(PRESETS)
    print("\nvideo (--video; depth counts spatial + temporal blocks; params at 16 frames of 256 px latents)")
    table(VIDEO_PRESETS)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="opendit", description="Fast, exact multi-device Diffusion Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    models = subparsers.add_parser("models", help="list model presets")
    models.set_defaults(func=run_models)
    from opendit.cli.convert import add_convert_parser
    from opendit.cli.plan import add_calibrate_parser, add_plan_parser
    from opendit.cli.serve import add_serve_parser
    from opendit.cli.train import add_eval_parser, add_train_parser

    add_plan_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_convert_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from opendit.distributed.launch import WorkerFailed

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except OpenDiTError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # one worker of --nproc N raised: its traceback, then its message, exit 1
        if exc.traceback:
            print(exc.traceback.rstrip(), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def one_line(message: str) -> str:
    """A message on one line: a value echoed in it may hold line breaks (a path, a model name)."""
    return " ".join(message.splitlines())


if __name__ == "__main__":
    sys.exit(main())
