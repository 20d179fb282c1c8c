"""Measure the link between local processes: latency and bandwidth per collective kind -> JSON+MD+PNG (planner input).

    .venv/bin/python benchmarks/comm.py --nproc 2 --threads 1 --out benchmarks/results/comm   # -> comm.{json,md,png}

Bytes follow the CommStats convention (payload one rank sends to the others). Each kind is fitted to
time = latency + bytes / bandwidth over sizes 4 KiB .. 4 MiB (the slowest rank's median time per size). `--full`
also measures compute rates and writes the calibration cache that `opendit plan --hardware auto` reads.
"""

import argparse
import time

from common import bar_plot, finish, machine, markdown_table, render_only, report_args
from opendit.planning.calibrate import LINK_SIZES, calibrate, measure_links


def render(record: dict, out) -> dict:
    links = record["links"]
    cells = [[k, f"{v['latency_s'] * 1e6:.1f}", f"{v['bandwidth_Bps'] / 1e9:.2f}"] for k, v in links.items()]
    md = markdown_table(["collective", "latency (us)", "bandwidth (GB/s)"], cells)
    series = {"bandwidth": [v["bandwidth_Bps"] / 1e9 for v in links.values()]}
    title = f"links between {record['nproc']} local processes ({record['backend']})"
    return finish(out, record, md, plot=lambda path: bar_plot(path, list(links), series, "GB/s", title))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="full calibration (compute too), cached for the planner")
    report_args(parser, "comm")
    args = parser.parse_args()
    if render_only(args, render):
        return
    start = time.perf_counter()
    record = {"machine": machine(), "backend": args.backend, "nproc": args.nproc, "threads": args.threads}
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
    render(record, args.out)


if __name__ == "__main__":
    main()
