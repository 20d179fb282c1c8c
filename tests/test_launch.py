"""Launching: a failing rank ends the job with its message; two torchrun "nodes" (c10d rendezvous) equal one process.

The multi-process tests run the real `opendit` entry points as subprocesses, as users do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opendit.distributed.env import InjectedFault, parse_fault
from opendit.distributed.launch import FailureReport, WorkerFailed, exit_message, root_cause
from opendit.errors import OpenDiTError

CLASSES = ["0", "3", "7"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random checkpoint with non-zero adaLN/output layers, so that images depend on every rank's work."""
    from opendit.io.checkpoint import save_safetensors
    from opendit.models.dit import build_dit, perturb_weights, pixel_config

    config = pixel_config("DiT-T/2", 16)
    torch.manual_seed(0)
    model = perturb_weights(build_dit(config), std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    return save_safetensors(model, path, {"steps": 4, "scheduler": "flow-euler", "cfg_scale": 2.0})


def sample_args(ckpt: Path, out: Path, steps: int = 4) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--classes", *CLASSES, "--steps", str(steps), "--seed", "3",
            "--out", str(out), "--no-progress"]  # fmt: skip


def read_images(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / f"{i:03d}_class-{c}.png")) for i, c in enumerate(CLASSES)]).astype(int)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fast units
def test_parse_fault_hook():
    assert parse_fault("rank=1,step=2") == (1, 2)
    assert parse_fault("") is None and parse_fault(None) is None
    with pytest.raises(OpenDiTError, match="expected e.g. 'rank=1,step=2'"):
        parse_fault("rank=one")


def test_root_cause_prefers_the_cause_over_peers_that_lost_their_connection():
    """Rank 1 raised; rank 0 then lost its connection to it and rank 2 timed out waiting (earlier clock, still a
    symptom): the report is rank 1's, with its traceback."""
    reports = [
        FailureReport(0, "DistBackendError: [gloo] Connection closed by peer [127.0.0.1]:1211", "tb0", 100.0, 1),
        FailureReport(1, "InjectedFault: injected fault on rank 1 at step 2", "Traceback\nInjectedFault", 101.0, 1),
        FailureReport(2, "RuntimeError: [gloo] Timed out waiting 60000ms for recv", "tb2", 99.0, 1),
    ]
    failed = root_cause(reports).error()
    assert isinstance(failed, WorkerFailed) and failed.rank == 1 and failed.exitcode == 1
    assert str(failed) == "rank 1 failed: InjectedFault: injected fault on rank 1 at step 2"
    assert failed.traceback.startswith("Traceback") and failed.input_error is None
    # a death by signal is a root cause too, and among root causes the earliest wins
    killed = FailureReport(3, exit_message(-signal.SIGKILL), "", 100.5, -signal.SIGKILL)
    assert root_cause([*reports, killed]).rank == 3
    # only secondary failures: the earliest of them
    assert root_cause([reports[0], reports[2]]).rank == 2


def test_fault_hook_raises_on_its_rank_and_step_only():
    from opendit.diffusion.hooks import HookList, StepContext
    from opendit.distributed.comm import CommStats
    from opendit.parallel.hooks import CommAccounting, FaultInjection

    stats = CommStats()
    # accounting first here, to check that each step closed its comm counters before the fault is raised
    hooks = HookList([CommAccounting(stats), FaultInjection(0, (0, 2)), FaultInjection(1, (0, 2))])
    hooks.on_step_end(StepContext(0, 3, 999.0, 0.0))
    hooks.on_step_end(StepContext(1, 3, 500.0, 0.0))
    with pytest.raises(InjectedFault, match="injected fault on rank 0 at step 2"):
        hooks.on_step_end(StepContext(2, 3, 1.0, 0.0))
    assert len(stats.history) == 3


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_failing_rank_ends_the_job_with_its_message(tmp_path, ckpt):
    """Rank 1 raises at step 2 of 40 while rank 0 waits on it in an all-to-all: exit 1 in < 60 s, rank 1's message."""
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "opendit", *sample_args(ckpt, out, steps=40), "--nproc", "2", "--ulysses", "2"],
        env=clean_env(OPENDIT_FAULT_INJECT="rank=1,step=2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert elapsed < 60
    last = proc.stderr.strip().splitlines()[-1]
    fault = "injected fault on rank 1 at step 2 (OPENDIT_FAULT_INJECT=rank=1,step=2)"
    assert last == f"error: rank 1 failed: InjectedFault: {fault}"
    # nothing printed by any rank and no result written (the --out folder itself is created, empty, at validation)
    assert proc.stdout == "" and (not out.exists() or not any(out.iterdir()))


@pytest.mark.slow
def test_two_torchrun_nodes_with_c10d_rendezvous_equal_one_process(tmp_path, ckpt):
    """Two `torchrun --nnodes 2 --nproc-per-node 1` agents meet at a c10d store on localhost: ring attention across
    the two "nodes", with weights sharded (each rank loads only its shards from the file), gives the images of one
    process; only rank 0 writes and prints."""
    from opendit.cli import main

    single = tmp_path / "single"
    assert main(sample_args(ckpt, single)) == 0
    out, port = tmp_path / "nodes", free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"t{port}"]  # fmt: skip
    cmd = [*torchrun, "-m", "opendit", *sample_args(ckpt, out), "--ring", "2", "--shard-weights"]
    nodes = [subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    nodes.append(subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    wrote = [line for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1  # rank 0 only
    assert np.abs(read_images(out) - read_images(single)).max() <= 1 and read_images(single).std() > 10
    record = json.loads((out / "record.json").read_text())
    assert record["parallel"]["describe"] == "ring=2 (sequence parallel: ring), sharded weights"
    assert [r["loading"]["mode"] for r in record["ranks"]] == ["sharded", "sharded"]
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and record["comm"]["rank0_per_step"][0]["p2p"]["calls"] > 0
