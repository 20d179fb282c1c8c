"""Quality of the shipped digits model (or --ckpt): SVC class accuracy, Fréchet distances, sampling time -> JSON+MD+PNG.

python benchmarks/quality.py                       # 100 samples per class, the model's own steps / CFG scale
python benchmarks/quality.py --cfg-scale 2 --out /tmp/quality_cfg2   # not the current result
"""

import argparse
import sys

import torch

from common import finish, markdown_table, render_only, report_args
from opendit.digits.judges import evaluate, load_for_eval
from opendit.errors import OpenDiTError


def render(result: dict, out) -> dict:
    header = ["CFG", "class accuracy", "Frechet (SVC features)", "Frechet (pixels)", "sampling s"]
    cells = [[r.get("cfg_scale", "-"), f"{r['accuracy']:.2%}", f"{r['frechet']['svc_features']:.3f}",
              f"{r['frechet'].get('pixels', float('nan')):.1f}", f"{r['timing']['sampling_s']:.1f}"]
             for r in result["reports"]]  # fmt: skip
    note = f"{result['per_class']} samples per class, {result['steps']} steps, seed {result['seed']}."
    return finish(out, result, note + "\n\n" + markdown_table(header, cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt", default=None, help="weights (.safetensors + .json, or training .pt); default: shipped"
    )
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: the model JSON's")
    parser.add_argument("--cfg-scale", type=float, nargs="+", default=None, help="one or more; default: the JSON's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    report_args(parser, "quality")
    args = parser.parse_args(argv)
    if render_only(args, render):
        return 0
    torch.set_num_threads(args.threads)
    try:
        model, meta = load_for_eval(args.ckpt)
        steps = args.steps or meta.get("steps", 30)
        reports = []
        for scale in args.cfg_scale or [meta.get("cfg_scale", 3.0)]:
            report = evaluate(model, per_class=args.per_class, steps=steps, cfg_scale=scale, seed=args.seed)
            report["weights"] = meta["path"]
            reports.append(report)
            print(f"cfg {scale}: accuracy {report['accuracy']:.4f}  FD(svc) {report['frechet']['svc_features']:.3f}  "
                  f"sampling {report['timing']['sampling_s']:.1f} s", file=sys.stderr)  # fmt: skip
    except OpenDiTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    render({"per_class": args.per_class, "steps": steps, "seed": args.seed, "reports": reports}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
