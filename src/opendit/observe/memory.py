"""Process memory: resident-set readers and per-phase peaks (load, sampling, decode, whole process) for record.json.

torch keeps no allocator statistics for CPU tensors, so host memory is read from the kernel: the resident set (VmRSS)
and its high-water mark (VmHWM, resettable through /proc/self/clear_refs). `exact_malloc()` makes glibc serve every
allocation >= 64 KiB with its own mmap and unmap it on free (fixing the threshold also stops glibc from raising it
dynamically), so the resident set follows live tensor bytes instead of keeping freed heap. Linux only; elsewhere the
readers return None and the phase peaks fall back to getrusage's process-wide maximum (not resettable).

Why a tracker (`PhasePeaks`) and not getrusage: resetting VmHWM to measure one phase also lowers what getrusage and the
parent's wait() report as the process's maximum, so the whole-process peak is kept here, as the maximum of every
phase's high-water mark read just before each reset. On CUDA the device allocator's peaks are recorded beside the
host's (torch.cuda.max_memory_allocated, reset per phase).
"""

from __future__ import annotations

import resource
import sys

import torch


def exact_malloc(threshold: int = 1 << 16) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold) for this process; True if it took effect (glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set now."""
    return _status("VmRSS")


def peak_rss_bytes() -> int | None:
    """The resident set's high-water mark since the process started or since reset_peak_rss()."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """getrusage's maximum resident set of this process (KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def peak_memory_bytes(device: torch.device) -> int:
    """The device allocator's peak on CUDA, else the process's maximum resident set."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else max_rss_bytes()


class PhasePeaks:
    """Peak memory of each phase of a process's life, and of the whole process.

    `end(name)` closes the phase that ran since the previous `end` (or since the process started, for the first one):
    it records that interval's host high-water mark (and, on CUDA, the device allocator's peak), folds it into the
    whole-process peak and resets both marks for the next phase. A phase that runs again (sampling, once per call)
    keeps its latest value; `whole` keeps the maximum over everything so far."""

    def __init__(self, device: torch.device | None = None, reset: bool = True):
        self.device = device if device is not None and device.type == "cuda" else None
        self.host: dict[str, int] = {}
        self.device_peaks: dict[str, int] = {}
        self.whole_host = 0
        self.whole_device = 0
        # reset=False (a caller's own process, whose high-water mark is not ours to reset): every phase reports the
        # process peak so far
        self.resettable = reset and peak_rss_bytes() is not None

    def end(self, name: str) -> int:
        """Close phase `name`; returns its host peak in bytes."""
        peak = peak_rss_bytes() if self.resettable else max_rss_bytes()
        self.host[name] = int(peak)
        self.whole_host = max(self.whole_host, int(peak))
        if self.device is not None:
            dev = int(torch.cuda.max_memory_allocated(self.device))
            self.device_peaks[name] = dev
            self.whole_device = max(self.whole_device, dev)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.resettable:
            reset_peak_rss()
        return int(peak)

    def record(self) -> dict:
        """For record.json: bytes per phase and for the whole process (host resident set; device allocator)."""
        out = {
            "convention": "peak resident set (host) of this process during each phase; whole = since it started"
            + (
                ""
                if self.resettable
                else " (in the caller's process, or no resettable high-water mark: every phase "
                "shows the process peak so far)"
            ),
            **{f"{name}_peak_bytes": value for name, value in self.host.items()},
            "process_peak_bytes": max(self.whole_host, peak_rss_bytes() or 0),
        }
        if self.device is not None:
            out["device"] = {
                **{f"{name}_peak_bytes": value for name, value in self.device_peaks.items()},
                "process_peak_bytes": self.whole_device,
            }
        return out
