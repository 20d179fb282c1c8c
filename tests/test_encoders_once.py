"""Text encoders once (parallel/encoders.py): each text encoder of a diffusers pipeline is loaded and run on one rank
and its output broadcast; the images equal the every-rank-encodes path bit for bit and the one-process run, and the
ranks that do not own an encoder hold none of its weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from dist_utils import run_distributed  # noqa: E402
from helpers import sample_folder  # noqa: E402
from opendit.parallel.encoders import broadcast_output, encoder_owners, text_encoder_names  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402


def _structures(rank: int, world: int):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch.manual_seed(7)
    hidden = torch.randn(2, 5, 8)
    owned = (
        BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=hidden[:, 0], hidden_states=(hidden * 2, hidden * 3)
        ),  # fmt: skip
        [torch.arange(6, dtype=torch.int64).view(2, 3), None, "text"],
        {"mask": torch.ones(2, 5, dtype=torch.bool), "scale": 1.5},
        hidden.to(torch.bfloat16),
    )
    got = [broadcast_output(item if rank == owner else None, owner, torch.device("cpu"))
           for owner, item in zip((1, 0, world - 1, 0), owned)]  # fmt: skip
    assert type(got[0]) is BaseModelOutputWithPooling and got[0].attentions is None
    assert torch.equal(got[0].hidden_states[1], hidden * 3) and torch.equal(got[0].pooler_output, hidden[:, 0])
    assert torch.equal(got[1][0], owned[1][0]) and got[1][1:] == [None, "text"] and isinstance(got[1], list)
    assert got[2]["mask"].dtype == torch.bool and got[2]["scale"] == 1.5
    assert got[3].dtype == torch.bfloat16 and torch.equal(got[3], owned[3])
    return dist.get_rank()


@pytest.mark.slow  # multi-process
@pytest.mark.parametrize("world", [2, 3])
def test_broadcast_output_rebuilds_model_outputs_tuples_and_dicts(world):
    assert run_distributed(_structures, world) == list(range(world))


def test_owners_spread_the_encoders_over_the_ranks(tmp_path):
    flux = save_tiny_pipeline("flux", tmp_path / "flux", seed=0)
    assert text_encoder_names(flux) == ["text_encoder", "text_encoder_2"]  # CLIP, T5
    assert encoder_owners(["text_encoder", "text_encoder_2"], 2) == {"text_encoder": 0, "text_encoder_2": 1}
    assert encoder_owners(["a", "b", "c"], 2) == {"a": 0, "b": 1, "c": 0}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("enc") / "flux", seed=0)


@pytest.mark.slow
def test_each_encoder_on_one_rank_equals_every_rank_encoding(flux, tmp_path):
    one = sample_folder(flux, tmp_path / "one")
    once = sample_folder(flux, tmp_path / "once", "--nproc", "2", "--ulysses", "2")
    every = sample_folder(flux, tmp_path / "every", "--nproc", "2", "--ulysses", "2", "--encode-every-rank")
    assert np.array_equal(once, every)  # the broadcast embeddings are the ones every rank computes, bit for bit
    assert np.abs(once - one).max() <= 1
    ranks = {r["rank"]: r["loading"] for r in json.loads((tmp_path / "once" / "record.json").read_text())["ranks"]}
    assert ranks[0]["text_encoders"] == {"text_encoder": "rank 0", "text_encoder_2": "rank 1"}
    every_ranks = json.loads((tmp_path / "every" / "record.json").read_text())["ranks"]
    both = every_ranks[0]["loading"]["text_encoder_bytes"]
    assert all(r["loading"]["text_encoder_bytes"] == both for r in every_ranks) and both > 0
    # each rank holds only its own encoder: CLIP on rank 0, T5 on rank 1, together what every rank held before
    assert 0 < ranks[0]["text_encoder_bytes"] < both and 0 < ranks[1]["text_encoder_bytes"] < both
    assert ranks[0]["text_encoder_bytes"] + ranks[1]["text_encoder_bytes"] == both


# every tiny family with text encoders: PixArt's T5, SD3's CLIP-L + CLIP-G + T5 (over 2 ranks: 0, 1, 0), Wan's UMT5
FAMILIES = {"pixart": ([], 1), "sd3": ([], 3), "wan": (["--frames", "5"], 1)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_encoders_once_equal_every_rank_encoding_on_each_family(kind, tmp_path):
    folder = save_tiny_pipeline(kind, tmp_path / kind, seed=0)
    flags, count = FAMILIES[kind]
    assert len(text_encoder_names(folder)) == count

    def run(out, *extra):  # the family's own guidance and size
        images = sample_folder(folder, tmp_path / out, "--nproc", "2", *flags, *extra, call=())
        return images, json.loads((tmp_path / out / "record.json").read_text())

    once, record = run("once")
    every, _ = run("every", "--encode-every-rank")
    assert np.array_equal(once, every)  # bit for bit
    owners = encoder_owners(text_encoder_names(folder), 2)
    assert record["ranks"][0]["loading"]["text_encoders"] == {n: f"rank {r}" for n, r in owners.items()}
