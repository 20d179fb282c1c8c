"""Speeds the cost model reads: one device kind and its links, documented defaults for common GPUs, and this
machine's cached calibration (written by `opendit calibrate`, planning/calibrate.py).

`resolve_speeds(hardware, nodes, memory_gib)` is what `opendit plan`, `--parallel auto` and the planner's callers use.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from opendit.errors import OpenDiTError

CACHE_DIR = Path(os.environ.get("OPENDIT_CACHE", Path.home() / ".cache" / "opendit"))
GIB = 1 << 30


@dataclass(frozen=True)
class Link:
    """One collective kind on one kind of link: time = calls * latency + bytes_sent_per_rank / bandwidth."""

    latency_s: float
    bandwidth: float  # bytes per second that one rank pushes to the others (CommStats convention)

    def time(self, nbytes: float, calls: int = 1) -> float:
        return calls * self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Speeds:
    """Measured (calibrate.py) or documented (calibrate.DEFAULTS) speeds of one device kind and its links."""

    name: str
    matmul_flops: float  # peak FLOP/s of one rank on large matmuls, in `dtype_bytes` precision
    matmul_half_rows: float  # rows (batch * tokens) at which a (rows x C) @ (C x N) matmul reaches half the peak
    attn_flops: float  # peak FLOP/s of fused attention (QK^T + PV counted as 4 * Sq * Sk * D per head)
    attn_half_tokens: float  # key length at which attention reaches half its peak
    mem_bw: float  # bytes/s of elementwise kernels
    block_overhead_s: float  # fixed time per transformer block (dispatch / kernel launches), independent of size
    links: dict[str, Link]  # within a node, per collective kind (all_to_all, all_gather, p2p)
    inter_links: dict[str, Link] | None = None  # across nodes; None: one node
    ranks_per_node: int = 1 << 30
    memory_bytes: float = float("inf")  # per device
    reserved_bytes: float = 0.0  # per device, not available to the model (CUDA context, allocator slack)
    process_bytes: float = 0.0  # per process, in the same memory: the interpreter, torch, diffusers (host RAM only)
    dtype_bytes: int = 4  # activation / weight element size these rates were measured with
    overlap: dict[str, float] = field(default_factory=lambda: {"ring": 1.0, "weights": 1.0})
    rank_speeds: tuple[float, ...] | None = None  # relative speed of each rank of a group (1.0 = as measured)
    fused_attention: bool = True  # False: the math path materialises (Sq, Sk) fp32 scores
    async_dispatch: bool = False  # True on GPUs: kernel launches overlap device work
    # a DiT block's time in a 4-byte dtype (fp32) / in bf16 on this device; 1.0 = not measured, or no gain.
    # speeds_in_dtype turns the rates (measured in dtype_bytes) into the other dtype's; --dtype auto reads it.
    half_speedup: float = 1.0
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Speeds:
        data = dict(data)
        data["links"] = {k: Link(**v) for k, v in data["links"].items()}
        if data.get("inter_links"):
            data["inter_links"] = {k: Link(**v) for k, v in data["inter_links"].items()}
        if data.get("rank_speeds") is not None:
            data["rank_speeds"] = tuple(data["rank_speeds"])
        return cls(**data)

    def with_memory(self, memory_bytes: float) -> Speeds:
        return replace(self, memory_bytes=memory_bytes)


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


def speeds_in_dtype(speeds: Speeds, itemsize: int) -> Speeds:
    """The same device computing in a dtype of `itemsize` bytes: matmul and attention rates scaled by half_speedup
    between 4-byte and 2-byte dtypes (the rates are measured in speeds.dtype_bytes), element sizes switched (bytes
    moved, memory held). The planner ranks plans for the dtype the request runs in, fp32 or bf16 alike."""
    if itemsize == speeds.dtype_bytes:
        return speeds
    factor = speeds.half_speedup if itemsize < speeds.dtype_bytes else 1.0 / speeds.half_speedup
    return replace(
        speeds, matmul_flops=speeds.matmul_flops * factor, attn_flops=speeds.attn_flops * factor, dtype_bytes=itemsize
    )


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
        # dense bf16 tensor-core rate / plain fp32 rate of the datasheets (H100 SXM 989 / 67, A100 312 / 19.5)
        half_speedup=kw.pop("half_speedup", 14.8 if "H100" in name else 16.0),
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
    reserved_bytes=0.05 * GIB,  # allocator slack and kernels' workspaces
    process_bytes=0.45 * GIB,  # python + torch + diffusers + gloo groups of one engine worker (record.json: load)
    dtype_bytes=4,
    overlap={"ring": 0.3, "weights": 0.3},  # gloo's transport shares the one core with the compute
    source="estimate; run `opendit calibrate`",
)


def named_hardware(name: str, nodes: int = 1, memory_gib: float | None = None) -> Speeds:
    """Documented speeds by name (see DEFAULTS); nodes > 1 only for kinds with inter-node links."""
    if name not in DEFAULTS:
        raise OpenDiTError(f"unknown hardware {name!r}; choose one of {', '.join(DEFAULTS)} or a calibration JSON")
    spec = DEFAULTS[name]
    if nodes > 1 and spec.inter_links is None:
        raise OpenDiTError(f"hardware {name} describes one node; use h100-ib for several nodes")
    return spec if memory_gib is None else spec.with_memory(memory_gib * GIB)


# ------------------------------------------------------------------------------------------------ cache
def device_name() -> str:
    """The accelerator model of this process's GPU (cuda:LOCAL_RANK), or the CPU's. Never asks GPU 0 on every rank:
    under torchrun this runs before torch.cuda.set_device, and a query of GPU 0 from every rank can put a context
    there from each of them."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        from opendit.distributed.env import rank_gpu_index

        local = rank_gpu_index()
        return torch.cuda.get_device_name(local if local < torch.cuda.device_count() else 0)
    return platform.processor() or "cpu"


def machine_key(backend: str, threads: int, nproc: int) -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "")
    except OSError:
        cpu = platform.machine()
    ident = f"{socket.gethostname()}|{device_name()}|{cpu}|{os.cpu_count()}|{torch.__version__}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
    return f"{socket.gethostname()}-{backend}-t{threads}-p{nproc}-{digest}"


def cache_path(backend: str = "gloo", threads: int = 1, nproc: int = 2) -> Path:
    return CACHE_DIR / f"calibration-{machine_key(backend, threads, nproc)}.json"


def default_backend() -> str:
    """The backend a job on this machine runs on: NCCL where GPUs are visible, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def find_calibration(backend: str, threads: int = 1, nproc: int = 2) -> Path:
    """This machine's calibration file for `backend`: the one for (threads, nproc) if there is one, else the newest
    for the same backend with other thread or process counts (the same host, device, CPU and torch), else the path
    the exact one would have (not a file)."""
    path = cache_path(backend, threads, nproc)
    if path.is_file():
        return path
    digest = machine_key(backend, threads, nproc).rsplit("-", 1)[-1]  # host, device, CPU, torch: not the counts
    pattern = f"calibration-{socket.gethostname()}-{backend}-t*-p*-{digest}.json"
    others = sorted(CACHE_DIR.glob(pattern), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else path


def load_speeds(spec: str | None = None, threads: int = 1, backend: str | None = None, nproc: int = 2) -> Speeds:
    """Speeds from a name in DEFAULTS, a calibration JSON path, or (None / "auto") this machine's cached
    calibration for `backend` (default: the one a job here runs on, NCCL where GPUs are visible, else gloo),
    falling back to the documented default of its class with a note in `source`."""
    if spec and spec != "auto":
        if spec in DEFAULTS:
            return DEFAULTS[spec]
        path = Path(spec)
        if not path.is_file():
            raise OpenDiTError(f"speeds {spec!r} is neither a known hardware ({', '.join(DEFAULTS)}) nor a file")
        return Speeds.from_dict(json.loads(path.read_text())["speeds"])
    backend = backend or default_backend()
    path = find_calibration(backend, threads, nproc)
    if path.is_file():
        return Speeds.from_dict(json.loads(path.read_text())["speeds"])
    fallback = DEFAULTS["h100-nvlink" if backend == "nccl" else "cpu-gloo"]
    return replace(
        fallback, source=fallback.source + f"; no calibration at {path}, run `opendit calibrate --backend {backend}`"
    )


def resolve_speeds(hardware: str = "auto", nodes: int = 1, memory_gib: float | None = None) -> Speeds:
    """Speeds by documented name, calibration JSON path, or "auto" (this machine's cache, else its class default),
    with the per-device memory overridden when memory_gib is given."""
    speeds = named_hardware(hardware, nodes) if hardware in DEFAULTS else load_speeds(hardware)
    return speeds if memory_gib is None else speeds.with_memory(memory_gib * GIB)
