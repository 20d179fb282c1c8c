"""Quality of the shipped digits model (or --ckpt): SVC class accuracy, Fréchet distances, sampling time -> JSON.

python benchmarks/quality.py                       # 100 samples per class, the model's own steps / CFG scale
python benchmarks/quality.py --cfg-scale 2 --out benchmarks/results/quality_cfg2.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from opendit.digits.judges import evaluate, load_for_eval
from opendit.errors import OpenDiTError


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
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    args = parser.parse_args(argv)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
