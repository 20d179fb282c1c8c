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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from opendit.errors import OpenDiTError
from opendit.parallel.cost import Link, Speeds

CACHE_DIR = Path(os.environ.get("OPENDIT_CACHE", Path.home() / ".cache" / "opendit"))
GIB = 1 << 30

# ------------------------------------------------------------------------------------------------ documented defaults
# Sustained (not peak) rates, bf16. Sources:
# - H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s bidirectional (NVIDIA H100 datasheet,
#   nvidia.com/en-us/data-center/h100); large cuBLAS GEMMs sustain ~70% of peak; FlashAttention-2 forward reaches
#   ~335-350 TFLOP/s at head dim 64-128 (FlashAttention-3 paper, Shah et al. 2024, fig. 5); nccl-tests on DGX H100
#   report ~360 GB/s bus bandwidth for all_gather, less for all-to-all; NCCL small-message latency ~10-20 us.
# - A100 SXM 80GB: 312 TFLOP/s dense bf16, 2.0 TB/s HBM2e, NVLink 3 600 GB/s bidirectional (A100 datasheet);
#   FlashAttention-2 forward ~180-190 TFLOP/s (FlashAttention-2 paper, Dao 2023, fig. 4); nccl-tests ~230 GB/s.
# - PCIe Gen4 x16: 32 GB/s per direction theoretical, ~20-25 GB/s achieved for P2P, ~12 GB/s per rank for
#   all-to-all among 8 GPUs behind shared switches (no NVLink).
# - 2-node InfiniBand NDR (DGX H100: one 400 Gb/s ConnectX-7 per GPU = 50 GB/s per direction; ~45 GB/s achieved,
#   all-to-all across nodes ~40 GB/s per rank in nccl-tests; inter-node latency ~25 us).
# The n_half values (rows / tokens where a kernel reaches half its sustained rate) and the per-block overhead are
# estimates for eager PyTorch (launch-bound below ~1k rows); they matter only for very small inputs.
_NVLINK_H100 = {"all_to_all": Link(15e-6, 300e9), "all_gather": Link(15e-6, 360e9), "p2p": Link(8e-6, 350e9)}
_NVLINK_A100 = {"all_to_all": Link(15e-6, 190e9), "all_gather": Link(15e-6, 230e9), "p2p": Link(8e-6, 230e9)}
_PCIE4 = {"all_to_all": Link(20e-6, 12e9), "all_gather": Link(20e-6, 15e9), "p2p": Link(12e-6, 20e9)}
_IB_NDR = {"all_to_all": Link(25e-6, 40e9), "all_gather": Link(25e-6, 45e9), "p2p": Link(20e-6, 45e9)}


def _gpu(name, matmul, attn, bw, mem_gib, links, source, **kw) -> Speeds:
    return Speeds(
        name=name,
        matmul_flops=matmul,
        matmul_half_rows=1024,
        attn_flops=attn,
        attn_half_tokens=1024,
        mem_bw=bw,
        block_overhead_s=60e-6,
        links=links,
        memory_bytes=mem_gib * GIB,
        reserved_bytes=1.5 * GIB,  # CUDA context + cuBLAS workspace + allocator fragmentation
        dtype_bytes=2,
        overlap={"ring": 0.9, "weights": 0.9},
        async_dispatch=True,
        source=source,
        **kw,
    )


DEFAULTS: dict[str, Speeds] = {
    "h100-nvlink": _gpu("8x H100 SXM, NVLink 4", 700e12, 350e12, 2.8e12, 80, _NVLINK_H100, "H100 datasheet, FA3 paper"),
    "h100-ib": _gpu(
        "H100 SXM, 8 per node (NVLink 4), nodes over IB NDR 400",
        700e12,
        350e12,
        2.8e12,
        80,
        _NVLINK_H100,
        "H100 datasheet, DGX H100 networking, nccl-tests",
        inter_links=_IB_NDR,
        ranks_per_node=8,
    ),
    "a100-nvlink": _gpu("8x A100 SXM 80GB, NVLink 3", 230e12, 185e12, 1.7e12, 80, _NVLINK_A100, "A100 datasheet, FA2"),
    "a100-pcie": _gpu("8x A100 80GB PCIe Gen4 (no NVLink)", 230e12, 185e12, 1.7e12, 80, _PCIE4, "A100 PCIe datasheet"),
}
# This class of machine (2 shared AMD EPYC cores, fp32, gloo over loopback): compute from a quick
# `opendit calibrate --quick` on 2026-11-25 while the machine was shared (load 4-9). Used when no
# calibration file exists for a CPU backend; run `opendit calibrate` on a quiet machine to replace it.
DEFAULTS["cpu-gloo"] = Speeds(
    name="CPU, 1 thread per rank, gloo loopback",
    matmul_flops=40e9,
    matmul_half_rows=30,
    attn_flops=30e9,
    attn_half_tokens=0,
    mem_bw=20e9,
    block_overhead_s=160e-6,
    # quick link fit on the loaded machine (p2p was the noisiest: its latency here is a rounded guess)
    links={"all_to_all": Link(250e-6, 1.1e9), "all_gather": Link(350e-6, 0.95e9), "p2p": Link(300e-6, 0.8e9)},
    memory_bytes=8 * GIB,
    reserved_bytes=0.3 * GIB,
    dtype_bytes=4,
    overlap={"ring": 0.3, "weights": 0.3},  # gloo's transport shares the one core with the compute
    source="estimate; run `opendit calibrate`",
)


def hardware(name: str, nodes: int = 1, memory_gib: float | None = None) -> Speeds:
    """Documented speeds by name (see DEFAULTS); nodes > 1 only for kinds with inter-node links."""
    if name not in DEFAULTS:
        raise OpenDiTError(f"unknown hardware {name!r}; choose one of {', '.join(DEFAULTS)} or a calibration JSON")
    spec = DEFAULTS[name]
    if nodes > 1 and spec.inter_links is None:
        raise OpenDiTError(f"hardware {name} describes one node; use h100-ib for several nodes")
    return spec if memory_gib is None else spec.with_memory(memory_gib * GIB)


# ------------------------------------------------------------------------------------------------ cache
def machine_key(backend: str, threads: int, nproc: int) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "")
    except OSError:
        cpu = platform.machine()
    ident = f"{socket.gethostname()}|{device}|{cpu}|{os.cpu_count()}|{torch.__version__}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
    return f"{socket.gethostname()}-{backend}-t{threads}-p{nproc}-{digest}"


def cache_path(backend: str = "gloo", threads: int = 1, nproc: int = 2) -> Path:
    return CACHE_DIR / f"calibration-{machine_key(backend, threads, nproc)}.json"


def load_speeds(spec: str | None = None, threads: int = 1, backend: str = "gloo", nproc: int = 2) -> Speeds:
    """Speeds from a name in DEFAULTS, a calibration JSON path, or (None / "auto") this machine's cached
    calibration, falling back to the documented default of its class with a note in `source`."""
    if spec and spec != "auto":
        if spec in DEFAULTS:
            return DEFAULTS[spec]
        path = Path(spec)
        if not path.is_file():
            raise OpenDiTError(f"speeds {spec!r} is neither a known hardware ({', '.join(DEFAULTS)}) nor a file")
        return Speeds.from_dict(json.loads(path.read_text())["speeds"])
    path = cache_path(backend, threads, nproc)
    if path.is_file():
        return Speeds.from_dict(json.loads(path.read_text())["speeds"])
    fallback = DEFAULTS["h100-nvlink" if torch.cuda.is_available() else "cpu-gloo"]
    return replace(fallback, source=fallback.source + f"; no calibration at {path}, run `opendit calibrate`")


# ------------------------------------------------------------------------------------------------ compute
def _timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
def measure_compute(threads: int = 1, hidden: int = 1152, heads: int = 16, quick: bool = False) -> dict:
    """Matmul and SDPA rates (fitted), elementwise bandwidth and per-block overhead, with `threads` threads."""
    from opendit.models.dit import DiTBlock

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reps = 3 if quick else 7
        w = torch.randn(hidden, 4 * hidden)
        rows = [16, 64, 256, 1024] if quick else [16, 64, 256, 1024, 4096]
        mm = []
        for n in rows:
            x = torch.randn(n, hidden)
            mm.append(2 * n * hidden * 4 * hidden / _timeit(lambda x=x: x @ w, reps))
        d = hidden // heads
        lengths = [64, 256, 1024] if quick else [64, 256, 1024, 2048]
        at = []
        for n in lengths:
            q = torch.randn(1, heads, n, d)
            sec = _timeit(lambda q=q: torch.nn.functional.scaled_dot_product_attention(q, q, q), reps)
            at.append(4 * heads * n * n * d / sec)
        a, b = torch.randn(1 << 22), torch.randn(1 << 22)
        out = torch.empty_like(a)
        mem_bw = 3 * a.numel() * 4 / _timeit(lambda: torch.add(a, b, out=out), reps)
        block = DiTBlock(64, 4, 4.0).eval()
        xs, cs = torch.randn(1, 4, 64), torch.randn(1, 64)
        overhead = _timeit(lambda: block(xs, cs), 20 if quick else 50, warmup=5)
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
        "raw": {"matmul": dict(zip(rows, mm)), "attention": dict(zip(lengths, at))},
    }


# ------------------------------------------------------------------------------------------------ links
LINK_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 22)  # bytes sent per rank


def _gather_single(out, shard):
    import torch.distributed as dist

    # torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; same semantics
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, shard)


def _link_worker(rank: int, nproc: int, backend: str, threads: int, init: str, sizes, reps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=nproc)
    results: dict[str, list] = {"all_to_all": [], "all_gather": [], "p2p": []}
    try:
        for nbytes in sizes:
            # all_to_all_single: a tensor of P chunks, P-1 of which leave -> per-rank sent = nbytes
            n = max(nproc, nbytes // 4 * nproc // (nproc - 1)) // nproc * nproc
            send, recv = torch.randn(n), torch.empty(n)
            sent = n // nproc * (nproc - 1) * 4

            def a2a(send=send, recv=recv):
                dist.all_to_all_single(recv, send)

            # all_gather of a shard of m elements: the shard goes to P-1 peers -> sent = m * 4 * (P - 1)
            m = max(1, nbytes // 4 // (nproc - 1))
            shard, full = torch.randn(m), torch.empty(m * nproc)

            def gather(shard=shard, full=full):
                _gather_single(full, shard)

            # ring P2P as RingAttention does it: send to r+1 while receiving from r-1 -> sent = k * 4
            k = max(1, nbytes // 4)
            psend, precv = torch.randn(k), torch.empty(k)

            def p2p(psend=psend, precv=precv):
                ops = [
                    dist.P2POp(dist.isend, psend, (rank + 1) % nproc),
                    dist.P2POp(dist.irecv, precv, (rank - 1) % nproc),
                ]
                for work in dist.batch_isend_irecv(ops):
                    work.wait()

            cases = (("all_to_all", a2a, sent), ("all_gather", gather, m * 4 * (nproc - 1)), ("p2p", p2p, k * 4))
            for kind, fn, nb in cases:
                dist.barrier()
                results[kind].append((nb, _timeit(fn, reps)))
        # every rank measured; the slowest rank's time is what a step waits for
        gathered = [None] * nproc
        dist.all_gather_object(gathered, results)
        if rank == 0:
            worst = {
                kind: [(nb, max(g[kind][i][1] for g in gathered)) for i, (nb, _) in enumerate(results[kind])]
                for kind in results
            }
            Path(out).write_text(json.dumps(worst))
    finally:
        dist.destroy_process_group()


def measure_links(
    nproc: int = 2, backend: str = "gloo", threads: int = 1, sizes=LINK_SIZES, reps: int = 10
) -> dict[str, dict]:
    """Spawn `nproc` local processes and fit latency + bandwidth per collective kind: {kind: {link, samples}}."""
    import torch.multiprocessing as mp

    if nproc < 2:
        raise OpenDiTError("measuring a link needs at least 2 processes; pass --nproc 2")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "links.json")
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.spawn(_link_worker, args=(nproc, backend, threads, init, list(sizes), reps, out), nprocs=nproc, join=True)
        samples = json.loads(Path(out).read_text())
    return {kind: {"link": fit_link([tuple(s) for s in rows]), "samples": rows} for kind, rows in samples.items()}


def calibrate(
    threads: int = 1,
    backend: str = "gloo",
    nproc: int = 2,
    quick: bool = False,
    force: bool = False,
    memory_gib: float | None = None,
) -> tuple[Speeds, Path]:
    """Measure (or reuse the cached) speeds of this machine; returns (speeds, cache file)."""
    path = cache_path(backend, threads, nproc)
    if path.is_file() and not force:
        return Speeds.from_dict(json.loads(path.read_text())["speeds"]), path
    compute = measure_compute(threads, quick=quick)
    links = measure_links(nproc, backend, threads, reps=4 if quick else 10)
    if memory_gib is None:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 8 * GIB
        memory = pages / nproc  # local processes share the host memory
    else:
        memory = memory_gib * GIB
    raw = compute.pop("raw")
    speeds = replace(
        DEFAULTS["cpu-gloo"],
        name=f"{platform.node()}: {threads} thread(s) per rank, {backend}, {nproc} local ranks",
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
