"""`opendit plan ...` (the planner's top plans and why) and `opendit calibrate` (measure and cache this machine).

Wire into cli.build_parser: `add_plan_parser(subparsers)` and `add_calibrate_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import json

from opendit.api.request import EngineRequest, call_model
from opendit.api.surfaces import add_field_flags
from opendit.errors import OpenDiTError

GIB = 1 << 30


def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hardware",
        default="auto",
        help="h100-nvlink | h100-ib | a100-nvlink | a100-pcie | cpu-gloo | a calibration JSON | auto (this "
        "machine's cached calibration, else the documented default)",
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes (h100-ib only)")
    add_field_flags(parser, EngineRequest, {"memory_gib": {"help": "memory per device (default: the hardware's)"}})


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plan", help="rank the parallel plans for a request (predicted, no devices used)")
    # the request's own fields (request.py) with the planner's defaults: a full-size preset, guided, 50 steps
    add_field_flags(parser, EngineRequest, {
        "model": {"default": "DiT-XL/2", "help": "preset name (see `opendit models`; Latte-*: video)"},
        "image_size": {},
        "nproc": {"help": "devices / processes (required unless --list-strategies)"},
    })  # fmt: skip
    add_field_flags(
        parser,
        call_model(),
        {"cfg_scale": {"default": 4.0}, "steps": {"default": 50, "help": "denoising steps (default 50)"}},
    )
    parser.add_argument("--tokens", type=int, help="sequence length instead of an image size (e.g. video latents)")
    parser.add_argument("--images", type=int, default=1, help="images in the request")
    add_field_flags(parser, EngineRequest, {"dtype": {"default": None, "help": (
        "fp32 | bf16 | fp16 | auto: rank the plans for this compute dtype (auto: as `opendit sample --dtype auto` "
        "would choose; default: the speeds' own, bf16 for the GPU kinds, fp32 for a CPU calibration)")}})  # fmt: skip
    parser.add_argument("--objective", default="latency", choices=("latency", "throughput"))
    parser.add_argument("--top", type=int, default=5, help="plans to print")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--exact-only", action="store_true", help="leave out plans whose outputs drift (PipeFusion's stale K/V)"
    )
    parser.add_argument(
        "--list-strategies", action="store_true", help="list the registered sequence-parallel strategies and exit"
    )
    _add_speed_args(parser)
    parser.set_defaults(func=run_plan)
    return parser


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("calibrate", help="measure compute and link speeds of this machine (cached)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    add_field_flags(
        parser, EngineRequest, {"nproc": {"default": 2, "help": "local processes for the link measurement"}}
    )
    parser.add_argument("--backend", default="gloo", help="gloo | nccl")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (~15 s)")
    parser.add_argument("--force", action="store_true", help="measure again even if a cached file exists")
    add_field_flags(
        parser, EngineRequest, {"memory_gib": {"help": "memory per rank to record (default: host RAM / nproc)"}}
    )
    parser.set_defaults(func=run_calibrate)
    return parser


def list_strategies() -> int:
    from opendit.parallel.registry import strategies

    for name, strategy in strategies().items():
        default = " (default for this layout)" if strategy.auto else ""
        print(f"{name:<16} runs on: {' x '.join(strategy.uses)}{default}\n{'':<16} {strategy.summary}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    if args.list_strategies:
        return list_strategies()
    if args.nproc is None:
        raise OpenDiTError("opendit plan needs --nproc N (the devices to plan for)")
    from opendit.models.dit import preset
    from opendit.planning.planner import plan

    if args.model.startswith("Latte-"):  # a video DiT: tokens are the positions per frame, DSP is a candidate
        from opendit.models.video_dit import preset as video_preset

        model = video_preset(args.model)
    else:
        model = preset(args.model)
    if args.image_size:
        model = model.with_image_size(args.image_size)
    from opendit.models.precision import AUTO, choose_dtype, parse_dtype
    from opendit.models.spec import spec_for
    from opendit.planning.speeds import resolve_speeds, speeds_in_dtype

    speeds = resolve_speeds(args.hardware, args.nodes, args.memory_gib)
    dtype, why = args.dtype or {2: "bf16", 4: "fp32"}.get(speeds.dtype_bytes, "fp32"), None
    if dtype == AUTO:
        dtype, why = choose_dtype(speeds.half_speedup, spec_for(model).bf16_drift, speeds.source or speeds.name)
    speeds = speeds_in_dtype(speeds, parse_dtype(dtype).itemsize)
    result = plan(
        model,
        args.nproc,
        speeds,
        images=args.images,
        guided=args.cfg_scale != 1.0,
        tokens=args.tokens,
        steps=args.steps,
        objective=args.objective,
        stale=not args.exact_only,
    )
    if args.json:
        print(json.dumps(result.to_dict(top=args.top), indent=2, default=str))
        return 0
    req = result.request
    print(
        f"{args.model}, {req['tokens']} tokens, {req['images']} image(s){' with CFG' if req['guided'] else ''}, "
        f"{req['steps']} steps on {args.nproc} x [{speeds.name}] ({speeds.memory_bytes / GIB:.3g} GiB each; "
        f"speeds: {speeds.source or 'calibrated'})"
    )
    print(f"dtype {dtype}" + (f" (--dtype auto: {why})" if why else ""))
    print(result.table(args.top))
    print(result.explain())
    best = result.best.config
    flags = [f"--{k} {getattr(best, k)}" for k in ("dp", "ulysses", "ring", "tp") if getattr(best, k) > 1]
    flags += ["--cfg-parallel"] * (best.cfg == 2) + [f"--sp-impl {best.impl}"] * (best.sp_degree > 1)
    flags += ["--shard-weights"] * best.shard_weights
    flags += [f"--pipefusion {best.pipefusion} --patches {best.patch_count}"] * (best.pipefusion > 1)
    flags += ["--video"] * args.model.startswith("Latte-")
    flags += [f"--dtype {dtype}"] * (dtype != "fp32")
    print(f"run it: opendit sample --nproc {args.nproc} {' '.join(flags)}".rstrip())
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from opendit.planning.calibrate import calibrate

    speeds, path = calibrate(args.threads, args.backend, args.nproc, args.quick, args.force, args.memory_gib)
    print(f"{speeds.name}  ({speeds.source})")
    print(
        f"matmul {speeds.matmul_flops / 1e9:.1f} GFLOP/s (half at {speeds.matmul_half_rows:.0f} rows), attention "
        f"{speeds.attn_flops / 1e9:.1f} GFLOP/s, elementwise {speeds.mem_bw / 1e9:.1f} GB/s, "
        f"block overhead {speeds.block_overhead_s * 1e6:.0f} us"
    )
    for kind, link in speeds.links.items():
        print(f"{kind:<11} latency {link.latency_s * 1e6:8.1f} us  bandwidth {link.bandwidth / 1e9:6.2f} GB/s")
    print(f"cached in {path}")
    return 0
