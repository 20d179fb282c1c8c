"""Speeds for the cost model: a short calibration of this machine, cached, or documented defaults for common GPUs.

`calibrate()` measures, in about a minute (`quick=True`: ~15 s):
- matmul FLOP/s at several row counts for a (rows x C) @ (C x 4C) product, fitted to peak * n / (n + n_half);
- fused attention (torch SDPA) FLOP/s at several sequence lengths, fitted the same way;
- elementwise bandwidth (a large out-of-place add) and the fixed cost of one tiny DiT block (dispatch overhead);
- latency and bandwidth of all_to_all / all_gather / P2P between `nproc` local processes on `backend`, fitted to
  time = latency + bytes_sent_per_rank / bandwidth (the CommStats byte convention);
all with `threads` threads per process, and caches the result to ~/.cache/opendit/calibration-<machine key>.json.
The key names the host, CPU/GPU model, torch version, backend, threads and process count, so another machine or
thread count never reuses a stale file.

On NCCL (`--backend nccl`) everything runs on the GPUs a job would use: compute on cuda:0 in the calling process,
each link rank on cuda:LOCAL_RANK (set as its current device before the process group, which gets `device_id`), its
messages CUDA tensors; every timed region is closed by torch.cuda.synchronize, so the times are the device's, not
the launch queue's. The file is saved under the nccl key, which `load_speeds` looks up on a machine with GPUs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from opendit.errors import OpenDiTError
from opendit.planning.speeds import CACHE_DIR, DEFAULTS, Link, Speeds, cache_path, machine_key

GIB = 1 << 30


# ------------------------------------------------------------------------------------------------ compute
def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA launches return at once); a no-op on CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, repeats: int, warmup: int = 2, device: torch.device | None = None) -> float:
    """Median seconds of fn() on `device`: on CUDA each run is closed by a synchronize (device time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_device(backend: str) -> torch.device:
    """The device a calibration rank measures on: on NCCL cuda:LOCAL_RANK, made the current device (before any
    CUDA work, so no rank creates a context on GPU 0); CPU on gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    from opendit.distributed.env import rank_gpu_index

    local = rank_gpu_index()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local >= gpus:
        raise OpenDiTError(
            f"calibrating NCCL needs a GPU per process: local rank {local} with {gpus} GPU(s) visible; use --nproc "
            f"{max(gpus, 1)} or --backend gloo"
        )
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


def fit_saturating(sizes: list[float], rates: list[float]) -> tuple[float, float]:
    """Fit rate = peak * n / (n + half) by least squares on 1/rate = 1/peak + (half/peak) / n."""
    xs, ys = [1.0 / n for n in sizes], [1.0 / r for r in rates]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    inv_peak = my - slope * mx
    if inv_peak <= 0:  # noisy samples: fall back to the best observed rate, no saturation
        return max(rates), 0.0
    return 1.0 / inv_peak, max(0.0, slope / inv_peak)


def fit_link(samples: list[tuple[float, float]]) -> Link:
    """Fit time = latency + bytes / bandwidth over (bytes, seconds) samples, least squares on RELATIVE error
    (weights 1 / t^2): plain least squares lets the largest message decide everything and leaves the latency
    to noise (it came out negative on a loaded machine)."""
    xs, ys = [b for b, _ in samples], [t for _, t in samples]
    ws = [1.0 / max(y, 1e-9) ** 2 for y in ys]
    sw = sum(ws)
    mx, my = sum(w * x for w, x in zip(ws, xs)) / sw, sum(w * y for w, y in zip(ws, ys)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx if sxx else 0.0
    slope = max(slope, 1e-15)
    latency = my - slope * mx
    if latency <= 0:  # noise: take the smallest message's time as latency, and bandwidth from the largest
        latency = min(ys)
        slope = max((ys[-1] - latency) / max(xs[-1], 1.0), 1e-15)
    return Link(latency_s=latency, bandwidth=1.0 / slope)


@torch.no_grad()
def half_precision_gain(
    hidden: int, heads: int, reps: int, tokens: int = 256, device: torch.device | None = None
) -> dict[str, float]:
    """Seconds of one DiT block (fp32 islands included) on `tokens` tokens in fp32 and in bf16 on `device`: --dtype
    auto and the planner's bf16 rates come from their ratio (Speeds.half_speedup)."""
    from opendit.models.dit import DiTBlock

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    block = DiTBlock(hidden, heads, 4.0).eval().to(device)
    x, c = torch.randn(1, tokens, hidden, device=device), torch.randn(1, hidden, device=device)  # (1, T, C), (1, C)
    out = {"fp32": _timeit(lambda: block(x, c), reps, device=device)}
    block = block.to(torch.bfloat16)
    xb, cb = x.bfloat16(), c.bfloat16()
    out["bf16"] = _timeit(lambda: block(xb, cb), reps, device=device)
    return out


@torch.no_grad()
def measure_compute(
    threads: int = 1, hidden: int = 1152, heads: int = 16, quick: bool = False, device: torch.device | None = None
) -> dict:
    """Matmul and SDPA rates (fitted), elementwise bandwidth and per-block overhead, with `threads` threads, on
    `device` (default CPU; on CUDA every timing is closed by a synchronize)."""
    from opendit.models.dit import DiTBlock

    device = device or torch.device("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reps = 3 if quick else 7
        w = torch.randn(hidden, 4 * hidden, device=device)  # (C, 4C)
        rows = [16, 64, 256, 1024] if quick else [16, 64, 256, 1024, 4096]
        mm = []
        for n in rows:
            x = torch.randn(n, hidden, device=device)  # (n, C)
            mm.append(2 * n * hidden * 4 * hidden / _timeit(lambda x=x: x @ w, reps, device=device))
        d = hidden // heads
        lengths = [64, 256, 1024] if quick else [64, 256, 1024, 2048]
        at = []
        for n in lengths:
            q = torch.randn(1, heads, n, d, device=device)  # (1, H, n, D)
            attend = lambda q=q: torch.nn.functional.scaled_dot_product_attention(q, q, q)  # noqa: E731
            at.append(4 * heads * n * n * d / _timeit(attend, reps, device=device))
        a, b = torch.randn(1 << 22, device=device), torch.randn(1 << 22, device=device)
        out = torch.empty_like(a)
        mem_bw = 3 * a.numel() * 4 / _timeit(lambda: torch.add(a, b, out=out), reps, device=device)
        block = DiTBlock(64, 4, 4.0).eval().to(device)
        xs, cs = torch.randn(1, 4, 64, device=device), torch.randn(1, 64, device=device)
        overhead = _timeit(lambda: block(xs, cs), 20 if quick else 50, warmup=5, device=device)
        block_s = half_precision_gain(hidden, heads, reps, device=device)
    finally:
        torch.set_num_threads(previous)
    mm_peak, mm_half = fit_saturating(rows, mm)
    at_peak, at_half = fit_saturating(lengths, at)
    return {
        "matmul_flops": mm_peak,
        "matmul_half_rows": mm_half,
        "attn_flops": at_peak,
        "attn_half_tokens": at_half,
        "mem_bw": mem_bw,
        "block_overhead_s": overhead,
        "half_speedup": block_s["fp32"] / block_s["bf16"],
        "raw": {"matmul": dict(zip(rows, mm)), "attention": dict(zip(lengths, at)), "block_s": block_s},
    }


# ------------------------------------------------------------------------------------------------ links
LINK_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 22)  # bytes sent per rank


def _link_worker(backend: str, threads: int, sizes, reps: int) -> dict | None:
    """One rank of measure_links (started by launch, which sets the torchrun environment). Rank 0 returns
    {kind: [(bytes sent per rank, slowest rank's seconds), ...]}; the others None."""
    import torch.distributed as dist

    torch.set_num_threads(threads)  # even under OMP_NUM_THREADS: the calibration is for exactly `threads`
    device = rank_device(backend)  # NCCL: cuda:LOCAL_RANK, current before the group exists
    if device.type == "cuda":
        dist.init_process_group(backend, device_id=device)  # env://
    else:
        dist.init_process_group(backend)  # env://
    from opendit.distributed.comm import Comm

    rank, nproc = dist.get_rank(), dist.get_world_size()
    comm = Comm(dist.group.WORLD)
    results: dict[str, list] = {"all_to_all": [], "all_gather": [], "p2p": []}
    try:
        for nbytes in sizes:
            # all_to_all_single: a tensor of P chunks, P-1 of which leave -> per-rank sent = nbytes
            n = max(nproc, nbytes // 4 * nproc // (nproc - 1)) // nproc * nproc
            send = torch.randn(n, device=device)  # (n,) on the rank's device: NCCL moves CUDA tensors only
            sent = n // nproc * (nproc - 1) * 4

            # through Comm, as the kernels send: the same-host transport (shared memory) where it applies
            def a2a(send=send, split=[n // nproc] * nproc):
                comm.all_to_all(send, 0, 0, split, split)

            # all_gather of a shard of m elements: the shard goes to P-1 peers -> sent = m * 4 * (P - 1)
            m = max(1, nbytes // 4 // (nproc - 1))
            shard = torch.randn(m, device=device)  # (m,)

            def gather(shard=shard, sizes=[m] * nproc):
                comm.all_gather(shard, 0, sizes)

            # ring P2P as RingAttention does it: send to r+1 while receiving from r-1 -> sent = k * 4
            k = max(1, nbytes // 4)
            psend = torch.randn(k, device=device)  # (k,)

            def p2p(psend=psend, k=k):
                comm.ring_exchange(psend, (k,)).wait()

            cases = (("all_to_all", a2a, sent), ("all_gather", gather, m * 4 * (nproc - 1)), ("p2p", p2p, k * 4))
            for kind, fn, nb in cases:
                dist.barrier()
                results[kind].append((nb, _timeit(fn, reps, device=device)))
        # every rank measured; the slowest rank's time is what a step waits for
        gathered = [None] * nproc
        dist.all_gather_object(gathered, results)
        if rank != 0:
            return None
        return {
            kind: [[nb, max(g[kind][i][1] for g in gathered)] for i, (nb, _) in enumerate(results[kind])]
            for kind in results
        }  # lists, not tuples: the samples are what a JSON round trip (the cache file) gives back
    finally:
        dist.destroy_process_group()


def measure_links(
    nproc: int = 2, backend: str = "gloo", threads: int = 1, sizes=LINK_SIZES, reps: int = 10
) -> dict[str, dict]:
    """Start `nproc` local processes and fit latency + bandwidth per collective kind: {kind: {link, samples}}."""
    from opendit.distributed.launch import launch

    if nproc < 2:
        raise OpenDiTError("measuring a link needs at least 2 processes; pass --nproc 2")
    samples = launch(_link_worker, nproc, (backend, threads, list(sizes), reps), threads_per_proc=threads)
    return {kind: {"link": fit_link([tuple(s) for s in rows]), "samples": rows} for kind, rows in samples.items()}


def calibrate(
    threads: int = 1,
    backend: str = "gloo",
    nproc: int = 2,
    quick: bool = False,
    force: bool = False,
    memory_gib: float | None = None,
) -> tuple[Speeds, Path]:
    """Measure (or reuse the cached) speeds of this machine; returns (speeds, cache file). backend "nccl" measures
    the GPUs (compute on cuda:0 here, links between `nproc` ranks on cuda:0..nproc-1), "gloo" the CPU."""
    if backend not in ("gloo", "nccl"):
        raise OpenDiTError(f"unknown backend {backend!r}; use --backend gloo (CPU) or --backend nccl (GPUs)")
    if backend == "nccl":
        from opendit.distributed.env import check_visible_gpus

        check_visible_gpus(nproc, "cuda")  # one GPU per link rank
    path = cache_path(backend, threads, nproc)
    if path.is_file() and not force:
        return Speeds.from_dict(json.loads(path.read_text())["speeds"]), path
    device = rank_device(backend)  # this process: cuda:0 (LOCAL_RANK unset) on NCCL
    compute = measure_compute(threads, quick=quick, device=device)
    links = measure_links(nproc, backend, threads, reps=4 if quick else 10)
    if memory_gib is not None:
        memory = memory_gib * GIB
    elif device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 8 * GIB
        memory = pages / nproc  # local processes share the host memory
    raw = compute.pop("raw")
    if device.type == "cuda":  # a GPU's fixed costs (context, workspaces, async launches), measured rates in fp32
        base = replace(DEFAULTS["h100-nvlink"], dtype_bytes=4)
        what = f"{torch.cuda.get_device_name(device)} x {nproc}"
    else:
        base, what = DEFAULTS["cpu-gloo"], f"{threads} thread(s) per rank"
    speeds = replace(
        base,
        name=f"{platform.node()}: {what}, {backend}, {nproc} local ranks",
        links={kind: v["link"] for kind, v in links.items()},
        memory_bytes=memory,
        source=f"opendit calibrate {time.strftime('%Y-%m-%d %H:%M')}",
        **compute,
    )
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "key": machine_key(backend, threads, nproc),
        "speeds": speeds.to_dict(),
        "raw": {"compute": raw, "links": {k: v["samples"] for k, v in links.items()}},
    }
    path.write_text(json.dumps(record, indent=2))
    return speeds, path
