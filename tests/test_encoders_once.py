"""Text encoders once (engine/pipeline_runner.py): on N processes a pipeline's text encoders load and run on rank 0
only, and what its `encode_prompt` returns reaches every rank by broadcast. Exact: the images equal those of every
rank encoding (--no-encoders-once) bit for bit, on each tiny family with text encoders (PixArt's T5, SD3's CLIP-L,
CLIP-G and T5, Flux's CLIP and T5, Wan's UMT5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from opendit.engine.pipeline_runner import encoders_once  # noqa: E402
from opendit.generation import GenerationRequest, resolve_engine  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402

ENCODERS = {"pixart": ["text_encoder"], "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"],
            "flux": ["text_encoder", "text_encoder_2"], "wan": ["text_encoder"]}  # fmt: skip
FLAGS = {"pixart": [], "sd3": [], "flux": ["--image-size", "32"],
         "wan": ["--frames", "5"]}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in ENCODERS}


def test_which_encoders_run_once(folders):
    for kind, names in ENCODERS.items():
        spec = resolve_engine(GenerationRequest(diffusers=str(folders[kind]), nproc=2))
        assert encoders_once(spec) == names, kind
    one = resolve_engine(GenerationRequest(diffusers=str(folders["pixart"])))
    every = resolve_engine(GenerationRequest(diffusers=str(folders["pixart"]), nproc=2, encoders_once=False))
    assert encoders_once(one) == [] and encoders_once(every) == []


def _sample(capsys, folder, out, *extra):
    from opendit.cli import main

    argv = ["sample", "--diffusers", str(folder), "--steps", "2", "--seed", "3", "--prompt", "a red cat",
            "--prompt", "a dog", "--out", str(out), "--no-progress", "--nproc", "2", *extra]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    from PIL import Image

    files = sorted(out.glob("[0-9][0-9][0-9]_prompt-*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), json.loads(
        (out / "record.json").read_text()
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_encoders_once_equal_every_rank_encoding(kind, folders, tmp_path, capsys):
    once, record = _sample(capsys, folders[kind], tmp_path / "once", *FLAGS[kind])
    every, record_every = _sample(capsys, folders[kind], tmp_path / "every", *FLAGS[kind], "--no-encoders-once")
    assert np.array_equal(once, every)  # bit for bit
    assert record["parallel"]["text_encoders"] == {"once_on_rank": 0, "encoders": ENCODERS[kind]}
    assert "text_encoders" not in record_every["parallel"]
    sent = [rank["comm_per_step"] for rank in record["ranks"]]
    assert sent  # the broadcast happened before the first step: counted in rank 0's first step
    assert "encoder_broadcast" in record["ranks"][0]["comm_per_step"][0], record["ranks"][0]["comm_per_step"][0]
