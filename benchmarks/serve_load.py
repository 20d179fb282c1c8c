"""Serving load: does `opendit serve` batching raise throughput under concurrent clients? Starts two real servers
(`opendit serve --nproc 2`, the shipped digits model) on loopback, one batching (--max-batch 16) and one running one
request at a time (--max-batch 1), and loads them with N concurrent clients, each sending R one-image requests back
to back (`POST /v1/generate`, classes [i % 10], distinct seeds).

    .venv/bin/python benchmarks/serve_load.py                       # 8 clients x 6 requests, 3 passes per mode
    .venv/bin/python benchmarks/serve_load.py --clients 1 8         # the committed run
    .venv/bin/python benchmarks/serve_load.py --clients 8 --passes 1 --steps 10   # quicker

Fairness on a small, noisy VM: both servers are started once at the beginning and stay up for the whole run, but only
one is loaded at a time; passes alternate (batching, one-at-a-time, batching, ...) so slow drift in the machine's
load hits both modes alike. Per mode we report the best pass and the median of passes. The idle server's process tree
CPU time during each pass is recorded too (an idle server that spins would steal CPU from the loaded one).

Figures per pass: throughput = images returned / pass wall time; p50 / p99 of the client-measured per-request latency;
failures = non-200 answers or exceptions (timeouts included); mean batch = mean of record.batch.requests over the
successful requests (1 when the record has no batch entry: the request ran alone).

Bounded: loopback only, every request has a timeout, the whole run has a deadline (passes not started by then are
skipped), and each server is ended with SIGTERM, then SIGKILL, in a finally.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from common import ROOT, bar_plot, finish, machine, render_only, report_args

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0
MODES = ("batching", "one-at-a-time")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """One `opendit serve` process on a free loopback port; its output goes to a log file."""

    def __init__(self, mode: str, max_batch: int, nproc: int, queue_size: int, log_dir: Path):
        self.mode, self.max_batch, self.port = mode, max_batch, free_port()
        self.url = f"http://{HOST}:{self.port}"
        command = [sys.executable, "-m", "opendit", "serve", "--nproc", str(nproc), "--host", HOST, "--port",
                   str(self.port), "--max-batch", str(max_batch), "--queue-size", str(queue_size)]  # fmt: skip
        self.command = command
        self.log_path = log_dir / f"serve_load.{mode}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started = time.monotonic()
        self.ready_s: float | None = None
        self.health: dict = {}

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=5.0)
                if response.status_code == 200 and response.json().get("status") == "ok":
                    self.ready_s, self.health = time.monotonic() - self.started, response.json()
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.mode} server not healthy in time; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and all its descendants (the worker processes) so far."""
        total = 0.0
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def stop(self) -> int | None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            return self.process.returncode
        finally:
            self._log.close()


def one_request(client: httpx.Client, url: str, body: dict, timeout: float) -> dict:
    start = time.monotonic()
    row: dict = {"seed": body["seed"], "ok": False}
    try:
        response = client.post(f"{url}/v1/generate", json=body, timeout=timeout)
        row["status"] = response.status_code
        data = response.json()
        if response.status_code == 200 and len(data.get("images", [])) == len(body["classes"]):
            batch = (data.get("record") or {}).get("batch") or {}
            row.update(ok=True, batch_requests=int(batch.get("requests", 1)), timing=data.get("timing"))
        else:
            row["error"] = str((data.get("error") or {}).get("message", data))[:300]
    except Exception as exc:  # timeouts, refused connections, bad JSON: all count as failures
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["latency_s"] = time.monotonic() - start
    return row


def body_for(index: int, seed: int, steps: int | None) -> dict:
    body = {"classes": [index % 10], "seed": seed}
    if steps is not None:
        body["steps"] = steps
    return body


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def run_pass(server: Server, idle: Server, clients: int, requests: int, steps: int | None, seed0: int,
             timeout: float, deadline: float) -> dict:  # fmt: skip
    """`clients` threads, each sending `requests` requests back to back; wall time from the first send to the last
    answer."""
    rows: list[list[dict]] = [[] for _ in range(clients)]
    idle_cpu0, busy_cpu0 = idle.cpu_seconds(), server.cpu_seconds()
    load0 = os.getloadavg()
    barrier = threading.Barrier(clients + 1)

    def client_loop(c: int) -> None:
        with httpx.Client() as client:
            barrier.wait()
            for r in range(requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    rows[c].append({"ok": False, "error": "run deadline passed", "latency_s": 0.0})
                    continue
                index = c * requests + r
                rows[c].append(
                    one_request(client, server.url, body_for(index, seed0 + index, steps), min(timeout, left))
                )

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + timeout + 5)
    wall = time.monotonic() - start
    flat = [row for client_rows in rows for row in client_rows]
    ok = [row for row in flat if row["ok"]]
    latencies = [row["latency_s"] for row in ok]
    batches = [row["batch_requests"] for row in ok]
    queued = [row["timing"]["queued_s"] for row in ok if row.get("timing")]
    run = [row["timing"]["run_s"] for row in ok if row.get("timing")]
    return {
        "mode": server.mode,
        "clients": clients,
        "requests": len(flat),
        "images": len(ok),
        "failures": len(flat) - len(ok),
        "wall_s": wall,
        "throughput_img_s": len(ok) / wall if wall > 0 else 0.0,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
        "mean_batch": statistics.fmean(batches) if batches else None,
        "batch_histogram": {str(k): batches.count(k) for k in sorted(set(batches))},
        "mean_queued_s": statistics.fmean(queued) if queued else None,
        "mean_run_s": statistics.fmean(run) if run else None,
        "server_cpu_s": server.cpu_seconds() - busy_cpu0,
        "idle_server_cpu_s": idle.cpu_seconds() - idle_cpu0,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "errors": sorted({row["error"] for row in flat if not row["ok"]})[:5],
        "latencies_s": [round(x, 4) for x in latencies],
        "batch_requests": batches,
    }


def summarize(passes: list[dict]) -> dict:
    through = [p["throughput_img_s"] for p in passes]
    best = max(passes, key=lambda p: p["throughput_img_s"])
    med = lambda key: statistics.median([p[key] for p in passes if p[key] is not None]) if passes else None  # noqa: E731
    return {
        "passes": len(passes),
        "throughput_best": max(through),
        "throughput_median": statistics.median(through),
        "p50_s_best_pass": best["p50_s"],
        "p99_s_best_pass": best["p99_s"],
        "p50_s_median": med("p50_s"),
        "p99_s_median": med("p99_s"),
        "failures": sum(p["failures"] for p in passes),
        "mean_batch": med("mean_batch"),
    }


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# `opendit serve` under load: batching vs one request at a time",
        "",
        f"Digits model, `--nproc {s['nproc']}`, {s['requests_per_client']} one-image requests per client back to back, "
        f"steps {s['steps'] or 'model default'}, {s['passes']} interleaved passes per mode (both servers up for the "
        f"whole run, one loaded at a time). Machine: {result['machine']['cpu_count']} CPUs, torch "
        f"{result['machine']['torch']}. Run took {result['run_wall_s']:.0f} s.",
        "",
        "Throughput in images/s (best pass / median of passes); latency p50 / p99 in seconds (median over passes); "
        "failures summed over passes; mean batch = mean record.batch.requests (median over passes).",
        "",
        "| clients | mode | throughput best | throughput median | p50 s | p99 s | failures | mean batch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, per_mode in result["summary"].items():
        for mode in MODES:
            m = per_mode.get(mode)
            if m:
                lines.append(f"| {clients} | {mode} | {fmt(m['throughput_best'])} | {fmt(m['throughput_median'])} | "
                             f"{fmt(m['p50_s_median'])} | {fmt(m['p99_s_median'])} | {m['failures']} | "
                             f"{fmt(m['mean_batch'])} |")  # fmt: skip
    lines += ["", "| clients | speedup best | speedup median |", "|---:|---:|---:|"]
    for clients, speed in result["speedup"].items():
        lines.append(f"| {clients} | {fmt(speed['best'])}x | {fmt(speed['median'])}x |")
    lines += ["", "Batch sizes seen (record.batch.requests: how many requests, summed over passes):", ""]
    for clients in result["summary"]:
        for mode in MODES:
            seen: dict[str, int] = {}
            for p in result["passes"]:
                if str(p["clients"]) == clients and p["mode"] == mode:
                    for size, count in p["batch_histogram"].items():
                        seen[size] = seen.get(size, 0) + count
            if seen:
                sizes = ", ".join(
                    f"{count} in batches of {size}" for size, count in sorted(seen.items(), key=lambda x: int(x[0]))
                )
                lines.append(f"- {clients} clients, {mode}: {sizes}")
    target = result.get("target")
    if target:
        verdict = "met" if target["met"] else "NOT met"
        lines += ["", f"Target: batching >= {target['ratio']}x one-at-a-time throughput at {target['clients']} "
                      f"clients (median of passes): {verdict} ({fmt(target['median'])}x)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Throughput (median of passes) per client count, batching vs one at a time."""
    clients = sorted(result["summary"], key=int)
    series = {mode: [result["summary"][c].get(mode, {}).get("throughput_median") for c in clients] for mode in MODES}
    labels = [f"{c} client(s)" for c in clients]
    bar_plot(path, labels, series, "images/s (median of passes)", "opendit serve: batching vs one request at a time")


def render(result: dict, out) -> dict:
    return finish(out, result, markdown(result), plot=lambda path: plot(result, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients (a list: 1 8)")
    parser.add_argument("--requests", type=int, default=6, help="requests per client, back to back (6)")
    parser.add_argument("--passes", type=int, default=3, help="passes per mode and client count (3)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's, 30)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch (16)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s (300)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="whole-run deadline, s (3600)")
    report_args(parser, "serve_load")
    args = parser.parse_args()
    if render_only(args, render):
        return

    t0 = time.monotonic()
    deadline = t0 + args.deadline
    queue_size = max(64, max(args.clients) * 2)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    servers: dict[str, Server] = {}
    passes: list[dict] = []
    warmups: dict[str, list[dict]] = {}
    exit_codes: dict[str, int | None] = {}
    try:
        # start both at once (each loads its model), then wait for both
        servers["batching"] = Server("batching", args.max_batch, args.nproc, queue_size, log_dir)
        servers["one-at-a-time"] = Server("one-at-a-time", 1, args.nproc, queue_size, log_dir)
        for server in servers.values():
            server.wait_healthy(min(deadline, time.monotonic() + START_TIMEOUT_S))
            print(f"{server.mode}: ready in {server.ready_s:.1f} s on port {server.port}", flush=True)
        for mode, server in servers.items():
            with httpx.Client() as client:
                warmups[mode] = [one_request(client, server.url, body_for(i, 10**6 + i, args.steps), args.timeout)
                                 for i in range(2)]  # fmt: skip
            print(f"{mode}: warm-up " + ", ".join(f"{w['latency_s']:.2f} s ok={w['ok']}" for w in warmups[mode]))
        seed = 0
        for clients in args.clients:
            for p in range(args.passes):
                for mode in MODES:
                    if time.monotonic() >= deadline:
                        print(f"deadline passed: skipping clients={clients} pass {p} {mode}", flush=True)
                        continue
                    idle = servers[MODES[1 - MODES.index(mode)]]
                    row = run_pass(
                        servers[mode], idle, clients, args.requests, args.steps, seed, args.timeout, deadline
                    )
                    row["pass"] = p
                    seed += clients * args.requests
                    passes.append(row)
                    print(f"clients={clients} pass={p} {mode:>13}: {row['throughput_img_s']:.2f} img/s, "
                          f"p50 {fmt(row['p50_s'])} s, p99 {fmt(row['p99_s'])} s, fail {row['failures']}, "
                          f"mean batch {fmt(row['mean_batch'])}, idle server cpu {row['idle_server_cpu_s']:.1f} s, "
                          f"wall {row['wall_s']:.1f} s", flush=True)  # fmt: skip
    finally:
        for mode, server in servers.items():
            exit_codes[mode] = server.stop()

    summary: dict[str, dict] = {}
    speedup: dict[str, dict] = {}
    for clients in args.clients:
        of = {mode: [p for p in passes if p["clients"] == clients and p["mode"] == mode] for mode in MODES}
        per_mode = {mode: summarize(rows) for mode, rows in of.items() if rows}
        summary[str(clients)] = per_mode
        if len(per_mode) == 2:
            b, o = per_mode["batching"], per_mode["one-at-a-time"]
            speedup[str(clients)] = {"best": b["throughput_best"] / o["throughput_best"],
                                     "median": b["throughput_median"] / o["throughput_median"]}  # fmt: skip
    result = {
        "benchmark": "serve_load",
        "settings": {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "passes": args.passes,
            "steps": args.steps,
            "max_batch": args.max_batch,
            "nproc": args.nproc,
            "timeout_s": args.timeout,
            "deadline_s": args.deadline,
            "queue_size": queue_size,
            "commands": {mode: server.command for mode, server in servers.items()},
        },  # fmt: skip
        "machine": machine(loadavg_end=os.getloadavg()),
        "servers": {
            mode: {"ready_s": s.ready_s, "health": s.health, "exit_code": exit_codes.get(mode)}
            for mode, s in servers.items()
        },  # fmt: skip
        "warmup": warmups,
        "passes": passes,
        "summary": summary,
        "speedup": speedup,
        "run_wall_s": time.monotonic() - t0,
    }
    if "8" in speedup:
        result["target"] = {"clients": 8, "ratio": 1.5, "median": speedup["8"]["median"], "best": speedup["8"]["best"],
                            "met": speedup["8"]["median"] >= 1.5}  # fmt: skip
    print()
    render(result, args.out)


if __name__ == "__main__":
    main()
