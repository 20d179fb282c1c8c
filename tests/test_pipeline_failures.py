"""A rank that fails while a diffusers pipeline encodes its prompts or decodes its latents ends the whole job with its
own message, in bounded time: `opendit sample --diffusers DIR --nproc 2` on tiny pipelines, one rank made to raise
by the OPENDIT_FAULT_INJECT test hook (distributed/env.py: "rank=R,phase=encode|decode") while its peer waits in
that phase's collective (the encoder output's broadcast, a sharded encoder's all-gather, the split VAE's halo
exchange). The process-group timeout is raised far past the bound, so only the launcher's ending of the waiting
peer (not a collective timing out) can end the job in time."""

from __future__ import annotations

import time

import pytest

from opendit.distributed.env import ENV_FAULT, ENV_TIMEOUT, parse_fault
from opendit.errors import OpenDiTError

BOUND_S = 90  # start (2 spawned ranks importing torch + diffusers on 2 shared cores), load, fail, end: measured 8-12 s


def test_the_fault_hook_names_a_step_or_a_phase():
    assert parse_fault("rank=1,step=2") == (1, 2)
    assert parse_fault("rank=0,phase=encode") == (0, "encode") and parse_fault("rank=1,phase=decode") == (1, "decode")
    assert parse_fault("") is None and parse_fault(None) is None
    for bad in ("rank=1,phase=denoise", "rank=1", "phase=encode", "rank=x,step=1"):
        with pytest.raises(OpenDiTError, match="is malformed; expected e.g. 'rank=1,step=2' or 'rank=1,phase="):
            parse_fault(bad)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from opendit.testing.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("failing")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in ("flux", "pixart")}


CASES = {  # name: (pipeline, OPENDIT_FAULT_INJECT, flags)
    # FLUX's T5 (text_encoder_2) is owned by rank 1 (encoder i on rank i mod 2): rank 0 waits for its broadcast
    "encoder-owner": ("flux", "rank=1,phase=encode", ["--ulysses", "2"]),
    # every rank runs the FSDP2-sharded encoders: rank 0 waits in the first unit's all-gather
    "sharded-encoder": ("flux", "rank=1,phase=encode", ["--ulysses", "2", "--encoder-shard"]),
    # the decode split in row bands: rank 0 decodes its band and waits for rank 1's halo rows
    "split-decode": ("pixart", "rank=1,phase=decode", ["--vae-parallel"]),
    "split-decode-rank0": ("pixart", "rank=0,phase=decode", ["--vae-parallel"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_rank_failing_in_encode_or_decode_ends_the_job_with_its_message(case, folders, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    from opendit.cli import main

    kind, fault, flags = CASES[case]
    monkeypatch.setenv(ENV_FAULT, fault)  # the spawned workers inherit it
    monkeypatch.setenv(ENV_TIMEOUT, "600")  # a hang would outlive BOUND_S: the peer must be ended, not time out
    rank, phase = parse_fault(fault)
    argv = ["sample", "--diffusers", str(folders[kind]), "--steps", "2", "--seed", "3", "--prompt", "a red cat",
            "--out", str(tmp_path / "out"), "--no-progress", "--nproc", "2", *flags]  # fmt: skip
    start = time.monotonic()
    code = main(argv)
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert f"error: rank {rank} failed: InjectedFault: injected fault on rank {rank} during {phase}" in err, err[-3000:]
    assert took < BOUND_S, took
    assert not list((tmp_path / "out").glob("*.png"))  # nothing written for a failed call
