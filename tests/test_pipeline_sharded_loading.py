"""Lean loading of a diffusers pipeline (parallel/lean_pipeline.py): under --shard-weights the transformer is built and
FSDP2-sharded on meta and each rank reads only its shards from the folder's safetensors; under --encoder-shard each
text encoder is too, every rank running it with gathered weights. The images equal the one-process run's, and each
rank holds about 1/N of the parameters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from helpers import sample_folder  # noqa: E402
from opendit.errors import OpenDiTError  # noqa: E402
from opendit.parallel.lean_pipeline import FolderState, build_on_meta, encoder_units  # noqa: E402
from opendit.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    return {kind: save_tiny_pipeline(kind, root / kind, seed=0) for kind in ("flux", "pixart")}


def _ranks(out) -> dict:
    return {r["rank"]: r for r in json.loads((out / "record.json").read_text())["ranks"]}


def test_folder_state_reads_an_index_of_files_row_by_row(tmp_path):
    a, b = torch.arange(12.0).view(4, 3), torch.ones(2, 2)
    save_file({"a": a}, tmp_path / "m-00001.safetensors")
    save_file({"b": b}, tmp_path / "m-00002.safetensors")
    index = {"weight_map": {"a": "m-00001.safetensors", "b": "m-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    state = FolderState(tmp_path)
    assert sorted(state) == ["a", "b"] and "a" in state and "c" not in state and state.shape("a") == (4, 3)
    assert torch.equal(state.read_rows("a", 1, 2), a[1:3]) and torch.equal(state["b"], b)
    with pytest.raises(OpenDiTError, match="safetensors"):
        FolderState(tmp_path / "missing")


def test_meta_build_has_no_weights_and_finds_encoder_blocks(folders):
    flux = folders["flux"]
    t5 = build_on_meta(flux, "text_encoder_2", torch.float32)
    assert all(p.is_meta for p in t5.parameters())
    units = encoder_units(t5)
    # each block as its parts (sharding.split_block_units): the feed-forward holds 2/3 of a block, so its wi_0,
    # wi_1, wo are units of their own; the attention (q, k, v, o) stays one unit. Every block parameter is in a
    # unit; the tied embedding table (shared, encoder.embed_tokens) stays in the root unit.
    ids = {id(u) for u in units}
    for block in t5.encoder.block:
        ff, attention = block.layer[1].DenseReluDense, block.layer[0].SelfAttention
        assert {id(ff.wi_0), id(ff.wi_1), id(ff.wo)} <= ids and id(attention.q) not in ids
    covered = {id(p) for u in units for p in u.parameters()}
    assert covered == {id(p) for p in t5.encoder.block.parameters()} and id(t5.shared.weight) not in covered
    clip = build_on_meta(flux, "text_encoder", torch.float32)
    clip_units = encoder_units(clip)
    tables = [u for u in clip_units if isinstance(u, torch.nn.Embedding)]
    assert tables == [clip.embeddings.token_embedding, clip.embeddings.position_embedding]
    layers = clip.encoder.layers  # each layer (holding its norms, under 1/16 of it) and its parts
    assert [u for u in clip_units if u in list(layers)] == list(layers)
    assert {id(p) for u in clip_units for p in u.parameters()} >= {id(p) for p in layers.parameters()}
    assert not clip.embeddings.position_ids.is_meta  # buffers are built real
    names = set(load_file(flux / "transformer" / "diffusion_pytorch_model.safetensors"))
    meta = build_on_meta(flux, "transformer", torch.float32)
    assert {n for n, _p in meta.named_parameters()} <= names


def test_transformer_blocks_shard_as_their_parts_and_the_root_keeps_only_its_own(folders):
    """PixArt's units (families/apply.py shard_units -> sharding.split_block_units): each block's attn1, attn2 and
    its feed-forward's two linears (the feed-forward holds about half the block) as units, the block itself for
    what is left (scale_shift_table, norms); adaln_single and caption_projection as units of their own
    (sharding.root_parts), so the root, gathered all forward, keeps only its own small parameters."""
    from opendit.families.apply import shard_units
    from opendit.families.registry import require_family
    from opendit.parallel.sharding import root_parts

    model = build_on_meta(folders["pixart"], "transformer", torch.float32)
    units = shard_units(model, require_family(model))
    ids = {id(u) for u in units}
    for block in model.transformer_blocks:
        parts = [block, block.attn1, block.attn2, block.ff.net[0], block.ff.net[2]]
        assert [u for u in units if id(u) in {id(p) for p in parts}] == parts  # in forward order
        assert id(block.ff) not in ids and id(block.attn1.to_q) not in ids
    side = root_parts(model, units)
    assert side == [model.adaln_single, model.caption_projection], side
    covered = {id(p) for u in [*units, *side] for p in u.parameters()}
    rest = [name for name, p in model.named_parameters() if id(p) not in covered]
    assert all("." not in name or name.startswith(("pos_embed", "norm_out", "proj_out")) for name in rest), rest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux", "pixart"])
def test_lean_sharded_pipeline_equals_one_process(folders, kind, tmp_path):
    folder = folders[kind]
    one = sample_folder(folder, tmp_path / "one")
    lean = sample_folder(
        folder, tmp_path / "lean", "--nproc", "2", "--ulysses", "2", "--shard-weights", "--encoder-shard"
    )
    assert np.abs(lean - one).max() <= 1
    whole = json.loads((tmp_path / "one" / "record.json").read_text())["loading"]
    state = FolderState(folder / "transformer")
    transformer_bytes = sum(math.prod(state.shape(key)) * 4 for key in state)  # fp32: the whole transformer
    ranks = _ranks(tmp_path / "lean")
    assert len(ranks) == 2
    for record in ranks.values():
        loading = record["loading"]
        assert loading["mode"] == "lean" and set(loading["sharded_encoders"]) >= {"text_encoder"}
        # each rank holds about half of the transformer and of the text encoders (FSDP2 pads dim 0 to 2 rows)
        assert 0.4 * transformer_bytes <= record["parameter_bytes"] <= 0.55 * transformer_bytes
        assert loading["denoisers"]["transformer"]["local_bytes"] == record["parameter_bytes"]
        assert 0.4 * whole["text_encoder_bytes"] <= loading["text_encoder_bytes"] <= 0.55 * whole["text_encoder_bytes"]
