"""Failures explained: a killed worker is named (rank, signal) within seconds, the standalone train CLI reports worker
failures like the main CLI, and too many processes for this machine's cores or memory are warned about up front."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed

from opendit.cli import train as train_cli
from opendit.distributed import resources
from opendit.distributed.launch import WorkerFailed, WorkerPool
from opendit.distributed.resources import PROCESS_BASE_BYTES, resource_warnings

GIB = 2**30


def _noop(channel):
    pass


@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: set(cores, available bytes) replaces what os.cpu_count and /proc/meminfo say."""

    def set_machine(cores, available):
        monkeypatch.setattr(resources.os, "cpu_count", lambda: cores)
        monkeypatch.setattr(resources, "mem_available", lambda: available)

    return set_machine


def test_oversubscribed_cpus_are_warned_about(machine):
    machine(2, 64 * GIB)
    assert resource_warnings(4, cpu=True) == []  # up to two processes per core: no warning
    (note,) = resource_warnings(5, cpu=True)
    assert "--nproc 5 on 2 CPU core(s)" in note and "about 0.40 of a core" in note and "--nproc 2" in note
    assert resource_warnings(5, cpu=False) == []  # GPU ranks do not share the cores' compute


def test_memory_beyond_what_is_available_is_warned_about_with_a_count_that_fits(machine):
    model = GIB // 5
    machine(64, 2 * GIB)
    (note,) = resource_warnings(4, model_bytes=model, cpu=True)
    per_proc = (PROCESS_BASE_BYTES + model) / GIB
    assert f"needs about {4 * per_proc:.1f} GiB" in note and "2.0 GiB is available" in note and "SIGKILL" in note
    fits = int(note.split("use --nproc ")[1].split()[0])
    assert fits == 3 and resource_warnings(fits, model_bytes=model, cpu=True) == []  # the suggestion is quiet


def test_memory_check_falls_back_where_meminfo_cannot_be_read(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr(resources, "open", no_proc, raising=False)
    assert resources.mem_available() is None
    monkeypatch.setattr(resources.os, "cpu_count", lambda: 64)
    assert resource_warnings(100, model_bytes=100 * GIB, cpu=True) == []  # 10 TB "needed": no estimate to compare
    monkeypatch.undo()
    assert resources.mem_available() > 0  # this machine has /proc/meminfo


def test_the_pool_warns_once_before_starting_anything(machine, monkeypatch, capsys):
    machine(1, GIB)

    def refuse(*args, **kwargs):
        raise RuntimeError("stopped before the rendezvous store")

    monkeypatch.setattr(torch.distributed, "TCPStore", refuse)
    with pytest.raises(RuntimeError, match="stopped before"):
        WorkerPool(_noop, 3, model_bytes=GIB)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: --nproc 3") for line in lines), err
    assert "of a core" in lines[0] and "GiB of memory" in lines[1]
    assert multiprocessing.active_children() == []


def test_the_train_cli_reports_a_worker_failure(monkeypatch, capsys, tmp_path):
    def failing_train(cfg):
        raise WorkerFailed(1, "killed by signal SIGKILL (out of memory?)", -9)

    monkeypatch.setattr("opendit.train.trainer.train", failing_train)
    assert train_cli.main(["train", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: rank 1 failed: killed by signal SIGKILL (out of memory?)\n"

    def raising_train(cfg):
        raise WorkerFailed(0, "ValueError: boom", 1, "Traceback (most recent call last):\nValueError: boom\n")

    monkeypatch.setattr("opendit.train.trainer.train", raising_train)
    assert train_cli.main(["train", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: rank 0 failed: ValueError: boom\n")


def _ranks(pid: int) -> list[int]:
    """The spawned worker processes of `pid`, in rank order (started one after another)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


@pytest.mark.slow
def test_a_worker_killed_during_sampling_is_named_within_seconds(tmp_path):
    """SIGKILL rank 1 of `opendit sample --nproc 2 --ulysses 2` mid-loop: rank and signal named, exit 1, <= 10 s."""
    cmd = [sys.executable, "-W", "error::ResourceWarning", "-m", "opendit", "sample", "--nproc", "2", "--ulysses",
           "2", "--steps", "1000", "--classes", "0", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 4096), b"")))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while b"sampling" not in b"".join(chunks) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # rank 0's progress bar: every rank is in the denoising loop
        assert proc.poll() is None and b"sampling" in b"".join(chunks), b"".join(chunks).decode()[-2000:]
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2
        killed = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=30)
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 1, output[-2000:]
    assert "error: rank 1 failed: killed by signal SIGKILL (out of memory?)" in output, output[-2000:]
    assert ended <= 10, ended
    assert "ResourceWarning" not in output and "leaked" not in output, output[-2000:]
    assert not (tmp_path / "out" / "samples.png").exists()
