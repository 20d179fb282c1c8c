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
    from opendit.api.surfaces import add_request_flags, request_models

    parser = subparsers.add_parser(
        "sample", help="generate class-conditional images (or run a local diffusers pipeline: --diffusers DIR)"
    )
    # every flag is a request field (request.py declares each one, with its help): engine, plan, call, cache
    parser.set_defaults(func=run_sample, fields=add_request_flags(parser, request_models()))
    return parser


def request_values(args: argparse.Namespace) -> dict:
    """The engine's and the call's fields the flags give (request.py names), the plan's degrees as `parallel` (None
    when no plan flag was given: the degrees are chosen for --nproc)."""
    from opendit.api.request import EngineRequest, ParallelRequest, call_model
    from opendit.api.surfaces import flag_values
    from opendit.distributed.config import ParallelConfig

    if getattr(args, "patches", None) is not None and args.patches < 1:  # 0 is "one per stage", not a count to ask
        raise OpenDiTError(f"--patches takes a count of patches >= 1 (leave it out for one per stage), got "
                           f"{args.patches}; e.g. --patches 4")  # fmt: skip
    values = flag_values(args, args.fields, EngineRequest)
    plan = flag_values(args, args.fields, ParallelRequest)
    values["parallel"] = ParallelConfig(**plan) if plan else None
    return values | flag_values(args, args.fields, call_model())


def validate_sample(args: argparse.Namespace):
    """The request the flags ask for, validated (request.py) and resolved, with --out and the trace's folder created
    or refused: a generation.Job. Nothing is loaded and no process is started."""
    from opendit.api.generation import GenerationRequest, prepare

    values = request_values(args)
    out = values.pop("out")
    if values.get("classes") is None and values.get("diffusers") is None and values.get("prompt") is None:
        values["classes"] = list(range(10))  # the default of OpenDiT's DiT path
    return prepare(GenerationRequest(**values), out=out)


def run_sample(args: argparse.Namespace) -> int:
    from opendit.distributed.env import in_distributed_env, quiet_unless_rank0

    if in_distributed_env():  # a torchrun worker
        quiet_unless_rank0()
    return execute_sample(args, validate_sample(args))  # every check first, then the compute


def execute_sample(args: argparse.Namespace, job) -> int:
    """Generate a validated job (`validate_sample`) and write its files."""
    from opendit.distributed.env import global_rank
    from opendit.engine.engine import run_job
    from opendit.io.outputs import save_outputs

    result = run_job(job)  # a one-shot opendit.Engine (the plan chosen for this batch and guidance)
    if global_rank() != 0:  # under torchrun: rank 0 writes the files and prints
        return 0
    if result.frames is not None and job.request.video:
        from opendit.api.video import label_names
        from opendit.io.outputs import save_video_outputs

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
    from opendit.io.checkpoint import build_model
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
