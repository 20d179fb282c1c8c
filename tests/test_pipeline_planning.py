"""--memory-gib on a diffusers pipeline counts the whole pipeline per rank (planning/pipeline_memory.py): the text
encoders a rank owns (each on one rank by default), the VAE and other weights, and the decode activation (a band
when the decode is split); a budget that only the default placement (encoders once, decode split) fits is planned,
and the same budget with every rank encoding and decoding whole is refused before start, in one line."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from opendit.api.pipelines import _output_geometry, choose_pipeline_plan, inspect_pipeline, plan_pipeline  # noqa: E402
from opendit.api.request import EngineRequest  # noqa: E402
from opendit.errors import OpenDiTError  # noqa: E402
from opendit.planning.pipeline_memory import encoder_bytes_per_rank, pipeline_memory  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return inspect_pipeline(save_tiny_pipeline("flux", tmp_path_factory.mktemp("plan") / "flux", seed=0))


def test_encoders_spread_over_the_ranks_in_the_count():
    sizes = {"text_encoder": 10, "text_encoder_2": 30, "text_encoder_3": 5, "vae": 7}
    assert encoder_bytes_per_rank(sizes, 1, False) == 45
    assert encoder_bytes_per_rank(sizes, 2, True) == 45  # --encode-every-rank
    assert encoder_bytes_per_rank(sizes, 2, False) == 30  # rank 0: 10 + 5, rank 1: 30
    assert encoder_bytes_per_rank(sizes, 3, False) == 30


def test_the_decode_band_and_the_encoder_placement_are_what_fits(flux):
    height, width, frames = _output_geometry(flux)
    every_whole = pipeline_memory(flux, 2, True, False, height, width, frames, 4)
    once_split = pipeline_memory(flux, 2, False, True, height, width, frames, 4)
    assert once_split.encoders < every_whole.encoders and once_split.decode * 2 == every_whole.decode
    assert once_split.others == every_whole.others > 0
    base = {"diffusers": flux["folder"], "nproc": 2}

    def plans(memory_gib: float, **extra) -> bool:
        try:
            choose_pipeline_plan(EngineRequest.build({**base, "memory_gib": memory_gib, **extra}), flux, 2)
        except OpenDiTError as exc:
            assert "\n" not in str(exc)
            return False
        return True

    low, high = 0.0, 4.0  # GiB: the least budget the default placement plans, to 64 KiB
    assert plans(high) and not plans(2**-20)
    while high - low > 2**-14:
        low, high = (low, (low + high) / 2) if plans((low + high) / 2) else ((low + high) / 2, high)
    plan, notes = choose_pipeline_plan(EngineRequest.build({**base, "memory_gib": high}), flux, 2)
    assert plan.world_size == 2 and any("decode split over the ranks" in note for note in notes), notes
    # the same budget with every rank encoding, or decoding whole, leaves the transformer too little: refused
    assert (every_whole.encoders - once_split.encoders) / 2**30 > 2 * 2**-14  # T5 and CLIP on their own ranks
    assert not plans(high, encode_every_rank=True, vae_parallel=False) and not plans(high, vae_parallel=False)
    assert not plans(high, encode_every_rank=True)


def test_sharded_encoders_are_counted_as_a_share_of_each_plus_a_gathered_part():
    sizes = {"text_encoder": 10, "text_encoder_2": 32 * 30, "vae": 7}
    assert encoder_bytes_per_rank(sizes, 2, False, sharded=True) == 485 + 60  # ceil(970 / 2) + 960 // 16
    assert encoder_bytes_per_rank(sizes, 4, False, sharded=True) == 243 + 60
    assert encoder_bytes_per_rank(sizes, 1, False, sharded=True) == 970  # one process: whole


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return inspect_pipeline(save_tiny_pipeline("pixart", tmp_path_factory.mktemp("plan") / "pixart", seed=0))


def _least_budget(fits, high: float = 64.0) -> float:
    """The least --memory-gib (to 2^-20 GiB) under which `fits(gib)` holds (it must at `high`)."""
    low = 0.0
    assert fits(high)
    while high - low > 2**-20:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def test_only_sharded_encoders_fit_and_the_planner_shards_them(pixart):
    """PixArt with its T5 pretended 3 GiB (T5-XXL size in bf16 is ~9 GiB): each encoder on one rank leaves rank 0
    the whole T5; sharded over 2 ranks each holds half of it plus one gathered part. At the least budget that
    plans, only the sharded placement fits: the planner takes it and says why, in its first note."""
    big = 3 * 2**30
    own = pixart["component_bytes"]["text_encoder"]
    info = {**pixart, "component_bytes": {**pixart["component_bytes"], "text_encoder": big},
            "weight_bytes": pixart["weight_bytes"] - own + big}  # fmt: skip
    base = {"diffusers": pixart["folder"], "nproc": 2}

    def planned(gib: float, **extra):
        try:
            return plan_pipeline(EngineRequest.build({**base, "memory_gib": gib, **extra}), info, 2)
        except OpenDiTError as exc:
            assert "\n" not in str(exc)
            return None

    least = _least_budget(lambda gib: planned(gib) is not None)
    settings, plan, notes = planned(least)
    assert settings.encoder_shard and plan.world_size == 2
    why = "text encoders sharded over the 2 ranks (--encoder-shard), as each encoder on one rank does not fit"
    assert notes[0].startswith(f"{why}: --memory-gib {least:g}: besides the transformer"), notes
    assert any("GiB of text encoders (sharded over the ranks)" in note for note in notes), notes
    once = pipeline_memory(info, 2, False, True, *_output_geometry(info), 4)
    sharded = pipeline_memory(info, 2, False, True, *_output_geometry(info), 4, encoder_shard=True)
    assert sharded.encoders == big // 2 + big // 16 < once.encoders == big
    # the same budget: each encoder on one rank is refused (what the planner saw), and a placement the user gave is
    # kept, so --encode-every-rank is refused too
    with pytest.raises(OpenDiTError, match=f"--memory-gib {least:g}: besides the transformer, a rank holds 3 GiB"):
        choose_pipeline_plan(EngineRequest.build({**base, "memory_gib": least}), info, 2)
    assert planned(least, encode_every_rank=True) is None
    # where each encoder on one rank fits, it stays the default
    roomy, _plan, roomy_notes = planned(least + (once.encoders - sharded.encoders) / 2**30 + 0.01)
    assert not roomy.encoder_shard and not any("--encoder-shard" in note for note in roomy_notes)
    # too little even sharded: one line naming both placements
    with pytest.raises(OpenDiTError, match="; with the text encoders sharded over the ranks \\(--encoder-shard\\): "):
        plan_pipeline(EngineRequest.build({**base, "memory_gib": least / 2}), info, 2)


@pytest.mark.slow
def test_the_cli_runs_the_sharded_encoders_the_planner_chose(pixart, tmp_path, capsys):
    """The real tiny PixArt at the least budget that plans at 2 ranks: its T5 sharded (record.json), images made."""
    import json

    from opendit.cli import main

    base = {"diffusers": pixart["folder"], "nproc": 2}

    def fits(gib: float) -> bool:
        try:
            plan_pipeline(EngineRequest.build({**base, "memory_gib": gib}), pixart, 2)
        except OpenDiTError:
            return False
        return True

    least = _least_budget(fits)
    settings, _plan, _notes = plan_pipeline(EngineRequest.build({**base, "memory_gib": least}), pixart, 2)
    assert settings.encoder_shard  # the tiny T5 sharded saves ~90 KiB of the one rank that would hold it whole
    out = tmp_path / "out"
    argv = ["sample", "--diffusers", str(pixart["folder"]), "--nproc", "2", "--memory-gib", repr(least), "--steps",
            "2", "--prompt", "a red cat", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    assert record["ranks"][0]["loading"]["text_encoders"] == {"text_encoder": "sharded over every rank"}
    assert record["resolved"]["encoder_placement"] == "sharded over every rank (--encoder-shard)"
    assert record["request"]["encoder_shard"] is False  # as asked: the planner chose it
    notes = record["parallel"]["notes"]
    assert any(note.startswith("text encoders sharded over the 2 ranks (--encoder-shard)") for note in notes), notes
