"""The VAE decode split over ranks in row bands (parallel/vae.py, `--vae-parallel`) equals the one-process decode.

Tiny random AutoencoderKL (with its mid-block attention and group norms) and AutoencoderKLWan (a few frames through
its causal time cache) on 2, 3 and 4 gloo processes, latent heights that do not divide by the world (uneven bands,
1-row bands included), fp32: the split decode is within 1e-4 of the one-process decode ([-1, 1] output; measured
~4e-6), and 0 or 1 of 255 after the uint8 conversion. A VAE with no split plan is refused in one line, and
`opendit sample --diffusers DIR --vae-parallel` at 2 processes writes the images of 1 process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from opendit.errors import OpenDiTError
from opendit.parallel.vae import AUTO_MIN_ROWS, check_vae_parallel, install_vae_split, vae_refusal

pytest.importorskip("diffusers")

TOLERANCE = 1e-4  # fp32, [-1, 1] decoder output: measured ~4e-6 (convs and sums in another order at band edges)


def make_vae(kind: str):
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.manual_seed(0)
    if kind == "kl":  # x4 up-sampling, mid-block attention, group norms of 8 groups
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        ).eval()  # fmt: skip
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()  # x8, causal time


def latent(kind: str, rows: int) -> torch.Tensor:
    """(2, 4, rows, 7) images, or (1, 4, 3, rows, 6) video latents (3 latent frames -> 9 frames)."""
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4, rows, 7) if kind == "kl" else (1, 4, 3, rows, 6)
    return torch.randn(*shape, generator=generator)


def split_decode(rank: int, world: int, kind: str, rows: int, mode):
    import torch.distributed as dist

    from opendit.distributed.comm import Comm

    vae = make_vae(kind)
    split = install_vae_split(vae, Comm(dist.group.WORLD), mode=mode)
    with torch.no_grad():
        out = vae.decode(latent(kind, rows)).sample
        tupled = vae.decode(latent(kind, rows), return_dict=False)[0]
    split.remove()
    return out, tupled, split.band.last, split.band.comm.stats.snapshot()


def whole_decode(kind: str, rows: int) -> torch.Tensor:
    with torch.no_grad():
        return make_vae(kind).decode(latent(kind, rows)).sample


def uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().astype(int)


CASES = [  # (kind, world, latent rows): uneven bands; 4 ranks over 5 rows gives 1-row bands (the thin-band path)
    ("kl", 2, 11),
    pytest.param("kl", 3, 10, marks=pytest.mark.slow),
    pytest.param("kl", 4, 5, marks=pytest.mark.slow),
    ("wan", 2, 7),
    pytest.param("wan", 3, 8, marks=pytest.mark.slow),
    pytest.param("wan", 4, 6, marks=pytest.mark.slow),
]


@pytest.mark.slow  # multi-process
@pytest.mark.parametrize(("kind", "world", "rows"), CASES)
def test_split_decode_equals_one_process(kind, world, rows):
    expected = whole_decode(kind, rows)
    results = run_distributed(split_decode, world, kind, rows, True, timeout=240)
    for rank, (out, tupled, last, comm) in enumerate(results):
        assert out.shape == expected.shape, (rank, out.shape, expected.shape)
        error = (out - expected).abs().max().item()
        assert error <= TOLERANCE, (rank, error)
        print(f"{kind} world {world} rank {rank}: max |split - whole| = {error:.2e}")
        assert np.abs(uint8(out) - uint8(expected)).max() <= 1
        assert torch.equal(tupled, out)  # return_dict=False: the same decode, as a tuple
        assert last["split"] and sum(last["latent_rows"]) == rows and len(last["latent_rows"]) == world
        # the halos, the group norms' statistics (Wan: RMS norms, row-local: none), the attention's keys/values and
        # the bands really went over the wire
        sent = ("vae_halo", "vae_attention", "vae_gather", *(("vae_norm",) if kind == "kl" else ()))
        assert all(comm[name]["calls"] > 0 for name in sent) and ("vae_norm" in comm) == (kind == "kl"), comm


@pytest.mark.slow
def test_auto_splits_large_latents_only_and_too_few_rows_are_refused():
    """Auto (mode None): a latent under AUTO_MIN_ROWS rows per rank decodes whole; off (False) never splits; on
    (True) over fewer latent rows than ranks is one error line."""
    small, large = AUTO_MIN_ROWS * 2 - 1, AUTO_MIN_ROWS * 2
    for whole_small, split_large, off_large, refused in run_distributed(_modes, 2, small, large, timeout=240):
        assert not whole_small["split"] and "auto" in whole_small["why"]
        assert split_large["split"] and split_large["latent_rows"] == [AUTO_MIN_ROWS, AUTO_MIN_ROWS]
        assert not off_large["split"]
        assert "the latent has 1 rows, fewer than the 2 ranks" in refused, refused


def _modes(rank: int, world: int, small: int, large: int) -> list:
    import torch.distributed as dist

    from opendit.distributed.comm import Comm

    results: list = []
    for rows, mode in ((small, None), (large, None), (large, False), (1, True)):
        vae = make_vae("kl")
        split = install_vae_split(vae, Comm(dist.group.WORLD), mode=mode)
        try:
            with torch.no_grad():
                vae.decode(torch.zeros(1, 4, rows, 2))
        except OpenDiTError as exc:
            results.append(str(exc))
            continue
        results.append(split.band.last)
    return results


def test_other_vaes_are_refused(tmp_path):
    """A VAE with no split plan: one line naming it and the fix, before start (from the folder's JSON)."""
    assert vae_refusal("AutoencoderKL") is None and vae_refusal("AutoencoderKLWan") is None
    assert "no row-split plan" in vae_refusal("AutoencoderKL", {"norm_type": "spatial"})
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}))
    with pytest.raises(OpenDiTError, match=r"AutoencoderKLHunyuanVideo has no exact row-split plan.*drop --vae-par"):
        check_vae_parallel(True, tmp_path, 2)
    notes = check_vae_parallel(None, tmp_path, 2)  # auto: decoded whole, said in a note
    assert notes and "decoded whole" in notes[0]
    assert check_vae_parallel(False, tmp_path, 2) == []


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    pytest.importorskip("transformers")
    from opendit.testing.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("pixart", tmp_path_factory.mktemp("pipelines") / "pixart", seed=0)


def _sample(capsys, folder, out, *extra) -> tuple[int, str]:
    from opendit.cli import main

    argv = ["sample", "--diffusers", str(folder), "--steps", "2", "--seed", "3", "--prompt", "a red cat", "--prompt",
            "a dog", "--out", str(out), "--no-progress", *extra]  # fmt: skip
    code = main(argv)
    return code, capsys.readouterr().err


def _images(out) -> np.ndarray:
    from PIL import Image

    files = sorted(out.glob("[0-9][0-9][0-9]_prompt-*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(int)


@pytest.mark.slow
def test_cli_vae_parallel_two_processes_equal_one(pixart, tmp_path, capsys):
    code, err = _sample(capsys, pixart, tmp_path / "one")
    assert code == 0, err
    code, err = _sample(capsys, pixart, tmp_path / "two", "--nproc", "2", "--vae-parallel")
    assert code == 0, err
    assert np.abs(_images(tmp_path / "two") - _images(tmp_path / "one")).max() <= 1
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["request"]["vae_parallel"] is True
    assert record["parallel"]["vae_decode"]["split"] and len(record["parallel"]["vae_decode"]["latent_rows"]) == 2
    assert all(rank["comm_after_sampling"]["vae_halo"]["calls"] > 0 for rank in record["ranks"])


def test_cli_refuses_an_unsplittable_vae_before_start(pixart, tmp_path, capsys, monkeypatch):
    import shutil

    import opendit.distributed.launch

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started for a request that is refused")

    monkeypatch.setattr(opendit.distributed.launch.WorkerPool, "__init__", no_pool)
    folder = tmp_path / "other"
    shutil.copytree(pixart, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    code, err = _sample(capsys, folder, tmp_path / "out", "--nproc", "2", "--vae-parallel")
    assert code == 2 and err.startswith("error: --vae-parallel: AutoencoderTiny has no exact row-split plan"), err
    assert err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("size, flags, rows", [(64, ["--vae-parallel"], [4, 4]), (256, [], [16, 16])])
def test_cli_dit_vae_parallel_two_processes_equal_one(tiny_vae, tmp_path, capsys, size, flags, rows):
    """OpenDiT's own sampler path: under --vae-parallel, or by default (auto) once every rank gets 16 latent rows,
    every rank loads the VAE and decodes a band."""
    from opendit.cli import main
    from opendit.models.dit import build_dit, preset

    ckpt = tmp_path / "dit-t2.pt"
    torch.save(build_dit(preset("DiT-T/2").with_image_size(size)).state_dict(), ckpt)
    argv = ["sample", "--model", "DiT-T/2", "--image-size", str(size), "--ckpt", str(ckpt), "--steps", "2",
            "--scheduler", "ddim", "--vae", str(tiny_vae), "--classes", "5", "7", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    two = [*argv, "--out", str(tmp_path / "two"), "--nproc", "2", "--ulysses", "2", *flags]
    assert main(two) == 0, capsys.readouterr().err
    files = {name: sorted((tmp_path / name).glob("[0-9][0-9][0-9]_class-*.png")) for name in ("one", "two")}
    from PIL import Image

    pixels = {name: np.stack([np.asarray(Image.open(f)) for f in fs]).astype(int) for name, fs in files.items()}
    assert pixels["one"].shape == pixels["two"].shape and np.abs(pixels["one"] - pixels["two"]).max() <= 1
    record = json.loads((tmp_path / "two" / "record.json").read_text())
    assert record["parallel"]["vae_decode"]["split"] and record["parallel"]["vae_decode"]["latent_rows"] == rows


def test_a_pixel_space_model_refuses_vae_parallel():
    from opendit.api.generation import GenerationRequest, resolve_engine

    with pytest.raises(OpenDiTError, match="this model is pixel-space \\(no VAE\\); drop it"):
        resolve_engine(GenerationRequest(vae_parallel=True, nproc=2))  # the shipped digits model: pixels
    assert resolve_engine(GenerationRequest(vae_parallel=False, nproc=2)).world == 2


def _meta_vae_folder(path, channels=(128, 256, 512, 512)):
    """A VAE folder holding only its config.json (the memory planner builds the model on meta and reads no weights)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                            up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4)  # fmt: skip
    vae.save_config(path)
    return path, sum(p.numel() for p in vae.parameters()) * 4


def test_the_memory_planner_counts_a_band_of_the_decode_per_rank(tmp_path):
    """vae_memory_bytes: split over N ranks, the decode's feature maps are a 1/N band (rows) on each rank, the
    weights whole; the DiT path's --memory-gib plans that band when the decode will run split (auto, 2 ranks)."""
    from opendit.api.generation import GenerationRequest, prepare
    from opendit.io.outputs import vae_memory_bytes

    folder, weights = _meta_vae_folder(tmp_path / "vae")
    whole, halves, thirds = (vae_memory_bytes(folder, (1024, 1024), 1, bands) for bands in (1, 2, 3))
    assert halves - weights == pytest.approx((whole - weights) / 2)
    assert thirds - weights == pytest.approx((whole - weights) * 342 / 1024)  # the tallest band: 342 of 1024 rows
    request = {"classes": [207], "model": "DiT-XL/2", "image_size": 512, "cfg_scale": 1.0, "steps": 1,
               "vae": str(folder), "nproc": 2, "memory_gib": 64.0}  # fmt: skip
    notes = " ".join(prepare(GenerationRequest(**request), out=tmp_path / "a").plan_notes)
    assert "the VAE decode split over the 2 ranks" in notes, notes
    off = prepare(GenerationRequest(**request, vae_parallel=False), out=tmp_path / "b").plan_notes
    assert not any("VAE decode split" in note for note in off), off


@pytest.mark.slow
def test_an_engine_splits_per_call_size_on_the_sampler_path(tiny_vae, tmp_path):
    """A 2-process engine at 256² (auto: every rank loads the VAE) decodes a 256² call split and a 64² call whole on
    the output rank (8 latent rows < 16 per rank), each equal to one process."""
    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.models.dit import build_dit, preset

    ckpt = tmp_path / "dit-t2.pt"
    torch.save(build_dit(preset("DiT-T/2").with_image_size(256)).state_dict(), ckpt)
    model = {"model": "DiT-T/2", "ckpt": str(ckpt), "vae": str(tiny_vae), "progress": False}
    call = {"classes": [3], "steps": 2, "scheduler": "ddim", "seed": 1}
    with opendit.Engine(**model, image_size=256, nproc=2, parallel=ParallelConfig(ulysses=2)) as engine:
        big, small = (engine.generate(**call, image_size=size) for size in (256, 64))
    assert big.record["parallel"]["vae_decode"]["latent_rows"] == [16, 16]
    assert small.record["parallel"]["vae_decode"] == {
        "split": False,
        "why": "auto: 8 latent rows < 16 per rank x 2 ranks",
    }
    with opendit.Engine(**model, image_size=256) as one:  # the checkpoint is at 256²: one engine, two sizes
        for result, size in ((big, 256), (small, 64)):
            reference = one.generate(**call, image_size=size).images.astype(int)
            assert np.abs(result.images.astype(int) - reference).max() <= 1
