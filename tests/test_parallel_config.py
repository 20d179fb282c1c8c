"""Parallel plans: validation messages, automatic plans, mesh groups, and bad requests at the CLI (exit 2, no spawn).

Every bad request here is rejected by `prepare()` in the calling process, before any worker starts, so these tests
are fast and a bad request can never hang in a half-started job.
"""

from __future__ import annotations

import pytest

from opendit.api.generation import GenerationRequest, prepare
from opendit.cli import main
from opendit.distributed.config import ParallelConfig, default_plan, suggest_plans
from opendit.distributed.mesh import mesh_groups
from opendit.errors import OpenDiTError
from opendit.parallel.sequence import head_sizes

T2 = {"model": "DiT-T/2", "image_size": 128}  # 16x16 latents: 64 tokens, 4 heads, guidance 4 by default


def test_degrees_must_multiply_to_the_world_and_the_message_lists_valid_plans():
    with pytest.raises(OpenDiTError) as err:
        ParallelConfig(ulysses=2).validate(3, num_heads=4, num_tokens=64, num_images=2, guided=True)
    text = str(err.value)
    assert "= 2 must equal the number of processes 3" in text
    assert "ring=3 (sequence parallel: ring)" in text  # a valid plan for 3 processes is suggested


def test_ulysses_above_heads_suggests_ulysses_times_ring():
    with pytest.raises(OpenDiTError, match="ulysses degree 8 exceeds num_heads 4; try --ulysses 4 --ring 2"):
        ParallelConfig(ulysses=8).validate(8, num_heads=4, num_tokens=64, num_images=2, guided=True)


def test_uneven_heads_are_exact_and_noted():
    notes = ParallelConfig(ulysses=3).validate(3, num_heads=4, num_tokens=64, num_images=1, guided=False)
    assert head_sizes(4, 3) == [2, 1, 1]
    assert notes == [
        "ulysses degree 3 does not divide 4 heads: heads are split unevenly (2, 1, 1), exact but less balanced"
    ]


def test_default_plans_for_small_worlds():
    assert default_plan(1, 4, True)[0] == ParallelConfig()
    assert default_plan(2, 4, True)[0] == ParallelConfig(cfg=2)
    assert default_plan(2, 4, False)[0] == ParallelConfig(ulysses=2)
    assert default_plan(3, 4, True)[0] == ParallelConfig(ring=3)  # ulysses 3 would split 4 heads unevenly
    assert default_plan(4, 4, True)[0] == ParallelConfig(cfg=2, ulysses=2)
    assert all(p.world_size == 6 for p in suggest_plans(6, 16, True))


def test_mesh_groups_follow_dp_cfg_ring_ulysses_order():
    groups = mesh_groups(ParallelConfig(dp=2, ring=2, ulysses=2), list(range(8)))
    assert groups["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # innermost: adjacent ranks
    assert groups["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # sequence index = ring_i * ulysses + ulysses_i
    assert "cfg" not in groups and groups["all"] == [list(range(8))]
    sub = mesh_groups(ParallelConfig(cfg=2), [5, 9])  # a runtime over a subset of the world keeps global ranks
    assert sub == {"cfg": [[5, 9]], "all": [[5, 9]]}


def test_mesh_groups_put_tensor_parallel_innermost():
    groups = mesh_groups(ParallelConfig(ulysses=2, tp=2), list(range(4)))
    assert groups["tp"] == [[0, 1], [2, 3]] and groups["ulysses"] == [[0, 2], [1, 3]]
    assert groups["sp"] == [[0, 2], [1, 3]]  # the sequence ranks share a tp coordinate
    groups = mesh_groups(ParallelConfig(ring=2, ulysses=2, tp=2), list(range(8)))
    assert groups["sp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_uneven_tensor_parallel_heads_are_exact_and_noted():
    notes = ParallelConfig(tp=3).validate(3, 4, 64, 1, True)
    assert notes == ["tp degree 3 does not divide 4 heads: heads split 2, 1, 1 (exact, less even)"]


def test_prepare_picks_a_plan_for_nproc_and_says_so():
    job = prepare(GenerationRequest(**T2, classes=[1, 2], steps=2, nproc=2))
    assert job.world == 2 and job.plan == ParallelConfig(cfg=2)
    assert job.plan_notes[0].startswith("plan chosen automatically: cfg=2")
    job = prepare(GenerationRequest(**T2, classes=[1, 2], steps=2, nproc=3, parallel=ParallelConfig(sp_impl="fastseq")))
    assert job.plan == ParallelConfig(ulysses=3, sp_impl="fastseq")
    job = prepare(GenerationRequest(**T2, classes=[1], steps=2, parallel=ParallelConfig(ring=2, ulysses=2)))
    assert job.world == 4  # no nproc: the product of the degrees


def test_nproc_conflicting_with_torchrun_world(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OpenDiTError, match="--nproc 4 conflicts with the 2 processes torchrun started"):
        prepare(GenerationRequest(**T2, classes=[1], steps=2, nproc=4))


BAD_PARALLEL = [
    (["--nproc", "3", "--ulysses", "2"], "= 2 must equal the number of processes 3"),
    (["--nproc", "8", "--ulysses", "8"], "ulysses degree 8 exceeds num_heads 4"),
    (["--nproc", "2", "--cfg-parallel", "--cfg-scale", "1"], "cfg parallel needs guidance: pass --cfg-scale > 1"),
    (["--nproc", "4", "--dp", "4", "--classes", "1", "2"], "dp degree 4 exceeds the 2 images requested; use --dp 2"),
    (["--nproc", "0"], "nproc must be an integer from 1 to 256 (local processes), got 0"),
    (["--nproc", "2", "--sp-impl", "usp"], "sp-impl usp needs both --ulysses > 1 and --ring > 1"),
    (["--ring", "2", "--ulysses", "2", "--sp-impl", "fastseq"], "fastseq does not combine with ring"),
    (["--nproc", "2", "--cfg-parallel", "--shard-weights"], "--shard-weights shards over the sequence-parallel"),
    (["--nproc", "2", "--cfg-parallel", "--balance-tokens"], "--balance-tokens re-splits the sequence; add --ulysses"),
    (["--ring", "65"], "sequence-parallel degree 65 exceeds the 64 tokens"),
    (
        ["--nproc", "8", "--tp", "8"],
        "tp degree 8 exceeds num_heads 4: tensor parallelism splits attention by heads; try --tp 2 or --tp 4",
    ),
    (["--nproc", "4", "--tp", "2", "--ulysses", "2", "--shard-weights"], "--shard-weights with --tp is not supported"),
    (
        ["--nproc", "8", "--tp", "2", "--ulysses", "4"],
        "ulysses degree 4 exceeds num_heads 2 (heads per tensor-parallel rank at --tp 2)",
    ),
    (["--nproc", "3", "--tp", "2"], "x tp=2 = 2 must equal the number of processes 3"),
    (["--nproc", "2", "--pipefusion", "2", "--patches", "1"], "--patches 1 must be at least --pipefusion 2"),
    (["--nproc", "4", "--pipefusion", "2", "--ulysses", "2"], "--pipefusion 2 does not combine with ulysses=2 yet"),
    (["--patches", "4"], "--patches and --warmup-steps are PipeFusion's; add --pipefusion N"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_PARALLEL)
def test_bad_parallel_requests_exit_2_with_the_message(tmp_path, capsys, flags, message):
    code = main(
        [
            "sample",
            "--model",
            "DiT-T/2",
            "--image-size",
            "128",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "record.json").exists()


def test_parallel_auto_takes_the_planners_choice():
    from opendit.api.generation import GenerationRequest, prepare

    job = prepare(GenerationRequest(classes=list(range(4)), steps=2, nproc=2, parallel_auto=True))
    assert job.plan.world_size == 2
    assert any(note.startswith("plan chosen automatically") and "best" in note for note in job.plan_notes)
    manual = prepare(GenerationRequest(classes=list(range(4)), steps=2, nproc=2))
    assert manual.plan.world_size == 2 and not any("best" in note for note in manual.plan_notes)


def test_tensor_parallel_refusals_on_diffusers_classes_name_the_fix():
    from tests.diffusers_models import build

    from opendit.families.apply import check_family

    with pytest.raises(OpenDiTError, match="declares no tensor split yet"):
        check_family(build("sd3"), ParallelConfig(tp=2))
    with pytest.raises(OpenDiTError, match="tp degree 4 exceeds PixArtTransformer2DModel's 3 attention heads"):
        check_family(build("pixart"), ParallelConfig(tp=4))
    check_family(build("pixart"), ParallelConfig(tp=2))  # 3 heads split 2, 1: exact
