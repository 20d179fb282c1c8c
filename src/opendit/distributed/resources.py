"""What starting N local worker processes will cost on this machine, said before any of them starts (the launcher
prints these warnings once, from the parent): CPU oversubscription, and memory beyond what is available."""

from __future__ import annotations

import os
import sys

# Resident memory of one worker before any model: 393 MiB after importing torch + diffusers + opendit's worker, 423 MiB
# peak of a rank sampling the 8 MB digits model (CPU wheel of torch 2.13, measured); 0.45 GiB leaves some headroom.
PROCESS_BASE_BYTES = int(0.45 * 2**30)
OVERSUBSCRIBE = 2  # CPU processes per core above which --nproc warns


def mem_available() -> int | None:
    """Bytes of memory available to new processes (MemAvailable of /proc/meminfo), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            found = [line.split()[1] for line in meminfo if line.startswith("MemAvailable:")]
        return int(found[0]) * 1024 if found else None  # reported in kB
    except (OSError, ValueError, IndexError):
        return None


def resource_warnings(nproc: int, model_bytes: int = 0, cpu: bool | None = None) -> list[str]:
    """What starting `nproc` workers will cost when it is too much for this machine: CPU oversubscription (CPU
    backend), and memory beyond MemAvailable (PROCESS_BASE_BYTES + `model_bytes` per process). [] when it fits."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    notes = []
    cores = os.cpu_count()
    if cpu and cores and nproc > OVERSUBSCRIBE * cores:
        notes.append(
            f"--nproc {nproc} on {cores} CPU core(s): each process gets about {cores / nproc:.2f} of a core and they "
            f"wait on each other in every collective, so this likely runs slower than --nproc {cores}, not faster"
        )
    available, per_proc = mem_available(), PROCESS_BASE_BYTES + model_bytes
    if available is not None and nproc * per_proc > available:
        base, model, need, free = (n / 2**30 for n in (PROCESS_BASE_BYTES, model_bytes, nproc * per_proc, available))
        notes.append(
            f"--nproc {nproc} needs about {need:.1f} GiB of memory ({nproc} x ({base:.2f} GiB per process + "
            f"{model:.2f} GiB of model)) but {free:.1f} GiB is available: the out-of-memory killer may stop workers "
            f"(SIGKILL); use --nproc {max(1, available // per_proc)} or fewer"
        )
    return notes


def warn_resources(nproc: int, model_bytes: int = 0) -> None:
    """Print resource_warnings to stderr (the parent, once per pool, before any process starts)."""
    for note in resource_warnings(nproc, model_bytes):
        print(f"warning: {note}", file=sys.stderr, flush=True)
