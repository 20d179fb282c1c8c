"""--memory-gib on a diffusers pipeline counts the whole pipeline per rank (planning/pipeline_memory.py): the text
encoders a rank owns (each on one rank by default), the VAE and other weights, and the decode activation (a band
when the decode is split); a budget that only the default placement (encoders once, decode split) fits is planned,
and the same budget with every rank encoding and decoding whole is refused before start, in one line."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from opendit.api.pipelines import _output_geometry, choose_pipeline_plan, inspect_pipeline  # noqa: E402
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
