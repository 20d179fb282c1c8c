"""`--cache` through the CLI: our digits DiT on 1 process and on 2-4 (Ulysses, cfg-parallel, dp, FastSeq on 3,
USP on 4) gives the same PNGs with the same cache, record.json lists what was reused; a diffusers pipeline takes both
caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from opendit.cli import main

CACHES = {
    "fbcache": [
        "--cache",
        "fbcache",
        "--cache-threshold",
        "1000",
        "--cache-max-reuse",
        "2",
        "--cache-guard-steps",
        "1",
    ],
    "pab": ["--cache", "pab", "--pab-range", "2", "--pab-window", "0", "1", "--pab-mlp-range", "3"],
}


def digits(out, extra) -> tuple[np.ndarray, dict]:
    argv = ["sample", "--classes", "2", "7", "9", "--steps", "8", "--seed", "1", "--out", str(out), "--no-progress"]
    assert main(argv + extra) == 0
    files = sorted(out.glob("[0-9][0-9][0-9]_class-*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files]).astype(int), json.loads(
        (out / "record.json").read_text()
    )


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_one_process_cache_is_recorded(cache, tmp_path):
    plain, plain_record = digits(tmp_path / "plain", [])
    cached, record = digits(tmp_path / "cached", CACHES[cache])
    assert plain_record["cache"] is None
    summary = record["cache"]
    assert summary["config"]["kind"] == cache and len(summary["steps"]) == 8
    saved = summary["saved"]
    if cache == "fbcache":
        assert saved["blocks_skipped"] > 0 and saved["samples_reused"] > 0
        assert any(call["reused_samples"] for step in summary["steps"] for call in step["calls"])
    else:
        assert saved["attention_reused"] > 0 and saved["mlp_reused"] > 0
    assert np.abs(cached - plain).max() > 0  # reuse changed something


@pytest.mark.slow
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize(
    "plan",
    [
        ["--nproc", "2", "--ulysses", "2"],
        ["--nproc", "2", "--cfg-parallel"],
        ["--nproc", "2", "--dp", "2"],  # 3 images: 2 + 1
        ["--nproc", "3", "--sp-impl", "fastseq"],  # uneven token split
        ["--nproc", "4", "--ulysses", "2", "--ring", "2"],  # USP
    ],
    ids=["ulysses", "cfg", "dp", "fastseq-3", "usp-4"],
)
def test_n_processes_with_a_cache_equal_one(cache, plan, tmp_path):
    one, one_record = digits(tmp_path / "one", CACHES[cache])
    many, many_record = digits(tmp_path / "many", [*CACHES[cache], *plan])
    assert np.abs(one - many).max() <= 1
    assert many_record["parallel"]["world_size"] == int(plan[1])
    # rank 0's record: under cfg-parallel it holds half of each call's rows, under dp only its images; under
    # sequence parallelism every rank holds every sample, so its totals are the one process's
    if "--cfg-parallel" not in plan and "--dp" not in plan:
        assert many_record["cache"]["saved"] == one_record["cache"]["saved"]
    else:  # this rank's share still reused something
        saved = many_record["cache"]["saved"]
        assert (saved["samples_reused"] if cache == "fbcache" else saved["attention_reused"]) > 0, saved


def test_bad_cache_input_is_one_error_line(tmp_path, capsys):
    for extra, fragment in [
        (["--cache", "pab", "--cache-threshold", "0.1"], "--cache-threshold belongs to --cache fbcache"),
        (["--cache", "fbcache", "--cache-max-reuse", "0"], "(--cache-max-reuse) must be an integer >= 1"),
        (["--cache", "fbcache", "--nproc", "2", "--ring", "2", "--balance-tokens"], "--cache with --balance-tokens"),
        (["--cache", "fbcache", "--nproc", "2", "--pipefusion", "2", "--patches", "2"], "--cache with --pipefusion"),
    ]:
        code = main(["sample", "--classes", "1", "--out", str(tmp_path / "x"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and "Traceback" not in err, err


def test_a_diffusers_pipeline_takes_both_caches(tmp_path):
    pytest.importorskip("transformers")
    from opendit.testing.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("pixart", tmp_path / "pixart", seed=0)
    base = ["sample", "--diffusers", str(folder), "--prompt", "a cat", "--steps", "6", "--cfg-scale", "4.5",
            "--no-progress"]  # fmt: skip
    for name, flags in CACHES.items():
        out = tmp_path / name
        assert main([*base, "--out", str(out), *flags]) == 0
        record = json.loads((out / "record.json").read_text())
        saved = record["cache"]["saved"]
        assert (saved["blocks_skipped"] if name == "fbcache" else saved["attention_reused"]) > 0, saved
        assert len(record["cache"]["steps"]) == 6


def test_engine_generate_takes_the_cache_per_call(tmp_path):
    """Engine.generate(cache=..., cache_threshold=...) is the CLI's cache; one engine, cached and uncached calls."""
    import opendit
    from opendit.errors import OpenDiTError

    cli, _record = digits(tmp_path / "cli", CACHES["fbcache"])
    options = {"cache_threshold": 1000.0, "cache_max_reuse": 2, "cache_guard_steps": 1}
    with opendit.Engine() as engine:
        plain = engine.generate(classes=[2, 7, 9], steps=8, seed=1)
        cached = engine.generate(classes=[2, 7, 9], steps=8, seed=1, cache="fbcache", **options)
        again = engine.generate(classes=[2, 7, 9], steps=8, seed=1)
        with pytest.raises(OpenDiTError, match="unknown field 'cache_size'"):
            engine.generate(classes=[1], cache="fbcache", cache_size=3)
    assert np.abs(cached.images.astype(int).reshape(cli.shape) - cli).max() == 0
    assert cached.record["cache"]["saved"]["blocks_skipped"] > 0 and plain.record["cache"] is None
    assert np.array_equal(plain.images, again.images)  # the cache was removed after its call
    assert np.abs(plain.images.astype(int) - cached.images.astype(int)).max() > 0


@pytest.mark.slow
def test_cache_with_sharded_weights_equals_one_process(tmp_path, capsys):
    """--cache fbcache with --shard-weights: the blocks a sample skips still gather their shards (every rank the
    same), and the images equal one process with the same cache; reuse really happens (10 steps, loose threshold)."""
    common = ["sample", "--classes", "3", "7", "--steps", "10", "--seed", "0", "--no-progress", "--cache", "fbcache",
              "--cache-guard-steps", "1", "--cache-threshold", "0.5"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--nproc", "2", "--ulysses", "2", "--shard-weights", "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["cache"]["saved"]["samples_reused"] > 0, record["cache"]["saved"]
    for name in sorted(p.name for p in (tmp_path / "one").glob("0*.png")):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("one", "two"))
        assert np.abs(a - b).max() <= 1, name
