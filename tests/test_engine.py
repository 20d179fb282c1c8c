"""opendit.Engine: one model load (and one worker start) for many calls, each equal to one-shot `opendit.generate`.

The multi-process tests share engines where the meaning allows: starting 2 processes costs ~5-10 s on this machine.
Reference images come from one-shot `opendit.generate` with the same call arguments on one process (parallel plans
are exact, <= 1/255 on uint8 images, as tests/test_parallel_equivalence.py checks plan by plan).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import opendit
from opendit import Engine, OpenDiTError
from opendit.api.generation import DEFAULT_CKPT, GenerationRequest, resolve_call, resolve_engine
from opendit.distributed.config import ParallelConfig

pytestmark = pytest.mark.skipif(not DEFAULT_CKPT.is_file(), reason="the shipped digits model is not installed")

# Different classes, seeds, steps, guidance, schedulers and batch sizes; the 10-image 30-step call is not the first.
CALLS = [
    {"classes": [0, 3, 7], "seed": 5, "steps": 4},
    {"classes": list(range(10)), "seed": 1, "steps": 12, "cfg_scale": 3.0},
    {"classes": [2, 2], "seed": 9, "steps": 3, "cfg_scale": 1.0, "scheduler": "flow-euler"},
    {"classes": list(range(10)), "seed": 2, "steps": 12},
]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def one_shot(**call) -> np.ndarray:
    return opendit.generate(**call, progress=False).images


def clean_env(**extra: str) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------------------------------------ in the caller
def test_bad_calls_are_rejected_in_the_caller_before_anything_is_sent():
    """Validation needs no processes: resolve_call checks a call against the engine's model and plan."""
    spec = resolve_engine(GenerationRequest(classes=[], nproc=2, parallel=ParallelConfig(ulysses=2)))
    call = resolve_call(spec, GenerationRequest(classes=[1, 2], steps=3))
    assert call.steps == 3 and call.cfg_scale == 2.0 and call.scheduler == "flow-euler"  # the model's defaults
    bad = [
        ({"classes": [10]}, "class id 10 is outside this model's range 0..9"),
        ({"classes": []}, "no classes given"),
        ({"classes": [1], "steps": 0}, "steps must be an integer from 1 to 1000"),
        ({"classes": [1], "cfg_scale": 0.5}, r"cfg_scale \(--cfg-scale\) must be a finite number from 1 to 100"),
        ({"classes": [1], "scheduler": "ddpm"}, "scheduler ddpm needs a model that predicts epsilon"),
        ({"classes": [1], "image_size": 15}, "image size 15 must be a positive multiple of 2"),
        ({"classes": [1], "image_size": 2}, "sequence-parallel degree 2 exceeds the 1 tokens"),
    ]
    for fields, message in bad:
        with pytest.raises(OpenDiTError, match=message):
            resolve_call(spec, GenerationRequest(**fields))
    cfg = resolve_engine(GenerationRequest(classes=[], nproc=2, parallel=ParallelConfig(cfg=2)))
    with pytest.raises(OpenDiTError, match="cfg parallel needs guidance"):
        resolve_call(cfg, GenerationRequest(classes=[1], cfg_scale=1.0))
    dp = resolve_engine(GenerationRequest(classes=[], nproc=2, parallel=ParallelConfig(dp=2)))
    with pytest.raises(OpenDiTError, match="dp degree 2 exceeds the 1 images requested"):
        resolve_call(dp, GenerationRequest(classes=[1]))
    sharded = resolve_engine(
        GenerationRequest(classes=[], nproc=2, parallel=ParallelConfig(ulysses=2, shard_weights=True))
    )
    with pytest.raises(OpenDiTError, match="image size is fixed when weights are sharded.*start a new engine"):
        resolve_call(sharded, GenerationRequest(classes=[1], image_size=32))


def test_in_process_engine_serves_two_image_sizes():
    """nproc 1: the model is loaded once; a 32 px call (pixel model, patch 2: 256 tokens) between two 16 px calls;
    the 16 px calls equal one-shot generate, and bad calls leave the engine usable."""
    call16 = {"classes": [1, 4], "seed": 3, "steps": 3}
    with Engine() as engine:
        assert engine.mode == "in-process" and engine.is_main
        first = engine.generate(**call16)
        big = engine.generate(classes=[5], steps=3, image_size=32)
        for bad in ({"classes": [10]}, {"classes": [1], "steps": 0}, {"classes": [1], "image_size": 15}):
            with pytest.raises(OpenDiTError):
                engine.generate(**bad)
        again = engine.generate(**call16)
    assert big.images.shape == (1, 32, 32, 1) and tuple(big.record["model"]["input_size"]) == (32, 32)
    assert big.images.std() > 10  # content, not a flat field
    reference = one_shot(**call16)
    assert first.images.shape == (2, 16, 16, 1) and max_diff(first.images, reference) <= 1
    assert max_diff(again.images, reference) <= 1
    assert "with_launch_s" in first.record["timing"] and "with_launch_s" not in again.record["timing"]
    assert first.record["checkpoint_sha256"] and first.record["utilisation"]["per_rank"][0]["steps"] == 3
    with pytest.raises(OpenDiTError, match="engine is closed: close\\(\\) was called"):
        engine.generate(classes=[1])


# ------------------------------------------------------------------------------------------------ 2 processes
@pytest.fixture(scope="class")
def engine2():
    """One 2-process engine (ulysses 2) for every test of TestPoolEngine: started once, closed after the last one."""
    with Engine(nproc=2, parallel=ParallelConfig(ulysses=2)) as engine:
        yield engine


@pytest.mark.slow
class TestPoolEngine:
    def test_pool_engine_calls_equal_one_shot_generate(self, engine2):
        """4 calls on one 2-process engine (ulysses 2), each equal to one-shot generate; from the second call on the
        engine adds at most 0.15 s to the sampling time of a 10-image 12-step call."""
        overheads = []
        for index, call in enumerate(CALLS):
            start = time.perf_counter()
            result = engine2.generate(**call)
            wall = time.perf_counter() - start
            record = result.record
            assert result.labels == call["classes"] and len(record["timing"]["per_step_s"]) == call["steps"]
            assert record["parallel"]["world_size"] == 2 and len(record["ranks"]) == 2
            assert all(len(rank["comm_per_step"]) == call["steps"] for rank in record["ranks"])  # this call's only
            assert len(record["utilisation"]["per_rank"]) == 2
            assert ("with_launch_s" in record["timing"]) == (index == 0)
            assert max_diff(result.images, one_shot(**call)) <= 1, call
            overhead = wall - record["timing"]["sampling_s"]
            overheads.append(round(overhead, 4))
            if index > 0 and len(call["classes"]) == 10 and call["steps"] == 12:
                assert overhead <= 0.15, (call, overhead)
        print(f"per-call overhead (wall - sampling_s), seconds: {overheads}")
        # and with exactly the same arguments, engine-level ones included: a one-shot 2-process generate
        same = opendit.generate(**CALLS[1], nproc=2, parallel=ParallelConfig(ulysses=2), progress=False)
        assert max_diff(engine2.generate(**CALLS[1]).images, same.images) <= 1

    def test_pool_engine_rejects_a_bad_call_and_serves_the_next(self, engine2):
        with pytest.raises(OpenDiTError, match="class id 10 is outside this model's range 0..9"):
            engine2.generate(classes=[10])
        with pytest.raises(OpenDiTError, match="sequence-parallel degree 2 exceeds the 1 tokens"):
            engine2.generate(classes=[1], image_size=2)
        result = engine2.generate(classes=[6], seed=4, steps=3)
        assert max_diff(result.images, one_shot(classes=[6], seed=4, steps=3)) <= 1

    def test_pool_engine_new_image_size_on_every_rank(self, engine2):
        big = engine2.generate(classes=[3, 8], seed=1, steps=3, image_size=32)
        assert big.images.shape == (2, 32, 32, 1) and big.record["parallel"]["token_split"] == [128, 128]
        reference = one_shot(classes=[3, 8], seed=1, steps=3, image_size=32)
        assert max_diff(big.images, reference) <= 1
        back = engine2.generate(classes=[3], seed=1, steps=3)  # back to the default size
        assert back.images.shape == (1, 16, 16, 1) and back.record["parallel"]["token_split"] == [32, 32]


@pytest.mark.slow
def test_dp_engine_places_images_over_groups_as_one_process():
    """dp=2: 3 images split [2, 1] (image i still seeded seed + i), then 2 images [1, 1]: equal to one process."""
    with Engine(nproc=2, parallel=ParallelConfig(dp=2)) as engine:
        three = engine.generate(classes=[1, 5, 9], seed=7, steps=3)
        two = engine.generate(classes=[0, 4], seed=2, steps=3, cfg_scale=1.5)
    assert three.record["parallel"]["images_per_dp_group"] == [2, 1]
    assert two.record["parallel"]["images_per_dp_group"] == [1, 1]
    assert max_diff(three.images, one_shot(classes=[1, 5, 9], seed=7, steps=3)) <= 1
    assert max_diff(two.images, one_shot(classes=[0, 4], seed=2, steps=3, cfg_scale=1.5)) <= 1


@pytest.mark.slow
def test_failing_worker_ends_the_engine_with_its_message(monkeypatch):
    from opendit.distributed.launch import WorkerFailed

    monkeypatch.setenv("OPENDIT_FAULT_INJECT", "rank=1,step=1")  # the workers inherit it
    start = time.monotonic()
    with Engine(nproc=2, parallel=ParallelConfig(ulysses=2)) as engine:
        with pytest.raises(WorkerFailed, match="rank 1 failed: InjectedFault: injected fault on rank 1 at step 1"):
            engine.generate(classes=[1, 2], steps=20)
        with pytest.raises(OpenDiTError, match="engine is closed: rank 1 failed: InjectedFault"):
            engine.generate(classes=[1, 2], steps=2)
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_cli_trace_has_both_ranks_and_record_has_utilisation(tmp_path, capsys):
    from opendit.cli import main

    out, trace = tmp_path / "out", tmp_path / "trace.json"
    args = ["sample", "--classes", "1", "2", "--steps", "3", "--nproc", "2", "--ulysses", "2", "--no-progress"]
    assert main([*args, "--out", str(out), "--trace", str(trace)]) == 0
    assert str(trace) in capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e.get("cat") == "step"]
    assert {e["pid"] for e in steps} == {0, 1} and len(steps) == 2 * 3
    assert any(e.get("cat") == "comm" and e["pid"] == 1 for e in events)
    record = json.loads((out / "record.json").read_text())
    utilisation = record["utilisation"]
    assert [r["rank"] for r in utilisation["per_rank"]] == [0, 1]
    assert all(abs(r["busy_fraction"] + r["waiting_fraction"] - 1) < 1e-9 for r in utilisation["per_rank"])
    assert record["trace"] == str(trace) and all("trace_events" not in r for r in record["ranks"])


TORCHRUN_SCRIPT = """
import sys
import numpy as np
from opendit import Engine

with Engine() as engine:                     # ranks > 0 serve inside the constructor until rank 0 closes
    first = engine.generate(classes=[0, 3, 7], seed=5, steps=3)
    second = engine.generate(classes=[2, 9], seed=1, steps=4, cfg_scale=3.0)
    print("rank main:", engine.is_main, "world:", engine.world_size, "plan:", engine.plan.describe())
    if engine.is_main:
        np.savez(sys.argv[1], first=first.images, second=second.images)
    else:
        assert first is None and second is None
"""


@pytest.mark.slow
def test_torchrun_script_constructs_the_engine_on_every_rank(tmp_path):
    script, images = tmp_path / "script.py", tmp_path / "images.npz"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    proc = subprocess.run(
        [*torchrun, str(script), str(images)], env=clean_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank main: True world: 2 plan: cfg=2" in proc.stdout
    saved = np.load(images)
    assert max_diff(saved["first"], one_shot(classes=[0, 3, 7], seed=5, steps=3)) <= 1
    assert max_diff(saved["second"], one_shot(classes=[2, 9], seed=1, steps=4, cfg_scale=3.0)) <= 1
