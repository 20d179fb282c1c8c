"""Tensor parallelism read from diffusers' `_tp_plan` (families/tp_plan.py) equals one process (fp32, gloo, tp=2).

Flux (double- and pre-only single-stream attention, packed-rowwise proj_out), Flux2 (packed SwiGLU linear_in, the
fused to_qkv_mlp_proj / to_out of its single-stream attention), QwenImage (joint attention, GELU MLPs) and
QwenImage21 (SwiGLU MLP, no joint stream), each with 4 heads (2 + 2) and 3 heads (2 + 1: uneven, exact all the same).
One 2-process world runs every case; the weights are random and perturbed (no zero-initialised gate hides a block).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow

KINDS = ("flux", "flux2", "qwenimage", "qwenimage21")
HEADS = (4, 3)
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def build_qwenimage21(heads: int):
    import diffusers
    from tests.diffusers_models import perturbed

    torch.manual_seed(0)
    model = diffusers.QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=12, num_attention_heads=heads,
        context_in_dim=16, mlp_ratio=3, axes_dims_rope=(4, 4, 4),
    )  # fmt: skip
    return perturbed(model)


def inputs_qwenimage21(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, 11, dtype=torch.bool)
    mask[:, 7:] = True  # 7 text slots, then 4 image slots of 2x2 latent tokens each (the 4x4 target)
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_shapes": [[(1, 4, 4)]] * batch,
        "img_mask": mask,
    }


def model_and_inputs(kind: str, heads: int):
    from tests import cp_plan_models

    if kind == "qwenimage21":
        return build_qwenimage21(heads), inputs_qwenimage21()
    return cp_plan_models.build(kind, seed=0, heads=heads), cp_plan_models.inputs(kind)


def block_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(BLOCKS))


def tp_world(rank: int, world: int) -> list[dict]:
    from tests.cp_plan_models import run

    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.mesh import build_runtime
    from opendit.families.tp_plan import tensor_split_from_tp_plan
    from opendit.parallel.tensor import RowParallelLinear, apply_tensor_parallel, tensor_layouts

    runtime = build_runtime(ParallelConfig(tp=world), "cpu")
    comm = runtime.comms["tp"]
    rows = []
    for kind in KINDS:
        for heads in HEADS:
            reference, kwargs = model_and_inputs(kind, heads)
            expected = run(reference, kwargs)
            model = copy.deepcopy(reference)
            record = apply_tensor_parallel(model, tensor_split_from_tp_plan(model), comm)
            runtime.stats.reset()
            out = run(model, kwargs)
            calls = runtime.stats.snapshot()
            layouts = tensor_layouts(model)
            local = dict(model.named_parameters())
            full = dict(reference.named_parameters())
            slices_ok = all(
                torch.equal(layout.take(full[name].detach()), local[name].detach()) for name, layout in layouts.items()
            )
            rows.append({
                "kind": kind, "heads": heads, "rank": rank, "record": record,
                "rel_err": ((out - expected).abs().max() / expected.abs().max()).item(),
                "out": out, "block_bytes": block_bytes(model), "full_block_bytes": block_bytes(reference),
                "calls": {k: v["calls"] for k, v in calls.items()},
                "row_parallel": sum(isinstance(m, RowParallelLinear) for m in model.modules()),
                "local_heads": sorted({m.heads for m in model.modules() if isinstance(getattr(m, "heads", None), int)}),
                "slices_ok": slices_ok, "split": len(layouts),
            })  # fmt: skip
    return rows, refusal(comm)


def refusal(comm) -> str:
    """Flux2 with 3 heads and 37 MLP features: its single-stream processor separates the fused q, k, v : MLP
    features by the global ratio, which only an MLP split in proportion to the heads (2 : 1) keeps; 37 has none."""
    import diffusers

    from opendit.errors import OpenDiTError
    from opendit.families.tp_plan import tensor_split_from_tp_plan
    from opendit.parallel.tensor import apply_tensor_parallel

    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=12, num_attention_heads=3,
        joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 4, 4), mlp_ratio=37 / 36,
    )  # fmt: skip
    try:
        apply_tensor_parallel(model, tensor_split_from_tp_plan(model), comm)
    except OpenDiTError as err:
        return str(err)
    return "no error"


@pytest.fixture(scope="module")
def world() -> list[tuple[list[dict], str]]:
    return run_distributed(tp_world, 2, timeout=240)


@pytest.fixture(scope="module")
def rows(world) -> list[dict]:
    return [row for per_rank, _refusal in world for row in per_rank]


def test_inexact_packed_split_is_refused(world):
    for _rows, message in world:
        assert "in proportion" in message and "37" in message, message


def cases(rows, kind, heads):
    return [r for r in rows if r["kind"] == kind and r["heads"] == heads]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("kind", KINDS)
def test_tp2_equals_single_process(rows, kind, heads):
    pair = cases(rows, kind, heads)
    assert len(pair) == 2
    for r in pair:
        assert r["rel_err"] <= 1e-5, (kind, heads, r["rank"], r["rel_err"])
    assert torch.equal(pair[0]["out"], pair[1]["out"])  # every tp rank holds the whole output


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("kind", KINDS)
def test_heads_split_and_recorded(rows, kind, heads):
    for r in cases(rows, kind, heads):
        share = [2, 2] if heads == 4 else [2, 1]
        assert r["record"]["head_split"] == share
        assert r["local_heads"] == [share[r["rank"]]]  # every attention module, packed Flux2 single ones included
        assert r["slices_ok"] and r["split"] > 0  # every split parameter is its layout's slice of the whole one
        if kind in ("flux", "flux2"):
            assert r["record"]["packed_modules"] > 0


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("kind", KINDS)
def test_tp_all_reduce_once_per_row_parallel_linear(rows, kind, heads):
    for r in cases(rows, kind, heads):
        assert r["row_parallel"] > 0
        assert r["calls"] == {"tp_all_reduce": r["row_parallel"]}  # one per row-parallel Linear, nothing gathered


@pytest.mark.parametrize("kind", KINDS)
def test_block_weights_per_rank(rows, kind):
    """Even heads: each rank holds < 0.7 of the blocks' bytes (the modulations inside Flux's and QwenImage's blocks
    stay whole). Uneven: rank 0 holds 2 of 3 heads and half the MLP, rank 1 less; together no more than the whole plus
    the replicated part, which rank 1's surplus over half bounds."""
    for r in cases(rows, kind, 4):
        assert r["block_bytes"] < 0.7 * r["full_block_bytes"], (kind, r["rank"], r["block_bytes"])
    first, second = sorted(cases(rows, kind, 3), key=lambda r: r["rank"])
    assert second["block_bytes"] < first["block_bytes"] < 0.75 * first["full_block_bytes"]
    assert second["block_bytes"] < 0.7 * second["full_block_bytes"]


def test_plan_conversion():
    """What the four classes' plans become, and the refusals."""
    import diffusers

    from opendit.errors import OpenDiTError
    from opendit.families.tp_plan import tensor_split_from_tp_plan

    flux = tensor_split_from_tp_plan(diffusers.FluxTransformer2DModel)
    assert flux.attention_kind == "diffusers_heads"
    assert flux.attention == ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")
    assert "single_transformer_blocks.*.proj_mlp" in flux.column
    assert [(p.pattern, p.dim) for p in flux.packed] == [("single_transformer_blocks.*.proj_out", 1)]
    flux2 = tensor_split_from_tp_plan(diffusers.Flux2Transformer2DModel)
    assert {(p.pattern, p.dim, p.blocks) for p in flux2.packed} == {
        ("transformer_blocks.*.ff.linear_in", 0, (1, 1)),
        ("transformer_blocks.*.ff_context.linear_in", 0, (1, 1)),
        ("single_transformer_blocks.*.attn.to_qkv_mlp_proj", 0, None),
        ("single_transformer_blocks.*.attn.to_out", 1, None),
    }
    assert tensor_split_from_tp_plan(diffusers.QwenImageTransformer2DModel).packed == ()
    assert tensor_split_from_tp_plan(diffusers.WanTransformer3DModel) is None  # no _tp_plan

    class Partial:
        _tp_plan = {"blocks.*.attn.to_q": "colwise", "blocks.*.attn.to_k": "colwise"}

    with pytest.raises(OpenDiTError, match="to_v"):
        tensor_split_from_tp_plan(Partial)

    class Fused:
        _tp_plan = {f"blocks.*.attn.{n}": "colwise" for n in ("to_q", "to_k", "to_v", "to_qkv")}

    with pytest.raises(OpenDiTError, match="to_qkv"):
        tensor_split_from_tp_plan(Fused)

    class Unknown:
        _tp_plan = {"blocks.*.attn.to_q": "sequence"}

    with pytest.raises(OpenDiTError, match="sequence"):
        tensor_split_from_tp_plan(Unknown)
