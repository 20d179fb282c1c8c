"""Measure the link between local processes: latency and bandwidth per collective kind -> JSON (planner input).

    .venv/bin/python benchmarks/comm.py --nproc 2 --threads 1 --out benchmarks/results/comm.json

Bytes follow the CommStats convention (payload one rank sends to the others). Each kind is fitted to
time = latency + bytes / bandwidth over sizes 4 KiB .. 4 MiB (the slowest rank's median time per size). `--full`
also measures compute rates and writes the calibration cache that `opendit plan --hardware auto` reads.
"""

import argparse
import json
import platform
import time
from pathlib import Path

from opendit.planning.calibrate import LINK_SIZES, calibrate, measure_links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="full calibration (compute too), cached for the planner")
    parser.add_argument("--out", default="benchmarks/results/comm.json")
    args = parser.parse_args()
    start = time.perf_counter()
    record = {"machine": platform.node(), "backend": args.backend, "nproc": args.nproc, "threads": args.threads}
    if args.full:
        speeds, path = calibrate(args.threads, args.backend, args.nproc, force=True)
        record["calibration"] = {"speeds": speeds.to_dict(), "cache": str(path)}
        links = {k: {"latency_s": v.latency_s, "bandwidth_Bps": v.bandwidth} for k, v in speeds.links.items()}
    else:
        measured = measure_links(args.nproc, args.backend, args.threads, LINK_SIZES, args.reps)
        links = {
            k: {"latency_s": v["link"].latency_s, "bandwidth_Bps": v["link"].bandwidth, "samples": v["samples"]}
            for k, v in measured.items()
        }
    record["links"] = links
    record["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for kind, v in links.items():
        print(f"{kind:<11} latency {v['latency_s'] * 1e6:8.1f} us  bandwidth {v['bandwidth_Bps'] / 1e9:6.2f} GB/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
