"""DiT architecture: official parameter layout, shapes, init, checkpoint formats."""

import pytest
import torch

from opendit.errors import OpenDiTError
from opendit.io.checkpoint import load_model, save_safetensors
from opendit.models.dit import PRESETS, DiTConfig, build_dit, preset
from opendit.models.layers import sincos_2d


def official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """The official DiT-XL/2 256x256 state dict layout, written out from the paper's architecture."""
    hidden, depth, out_per_token = 1152, 28, 2 * 2 * 8  # patch 2, learn_sigma -> 8 output channels
    shapes = {
        "pos_embed": (1, 256, hidden),
        "x_embedder.proj.weight": (hidden, 4, 2, 2),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (1001, hidden),
        "final_layer.linear.weight": (out_per_token, hidden),
        "final_layer.linear.bias": (out_per_token,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * hidden, hidden),
            f"blocks.{i}.attn.qkv.bias": (3 * hidden,),
            f"blocks.{i}.attn.proj.weight": (hidden, hidden),
            f"blocks.{i}.attn.proj.bias": (hidden,),
            f"blocks.{i}.mlp.fc1.weight": (4 * hidden, hidden),
            f"blocks.{i}.mlp.fc1.bias": (4 * hidden,),
            f"blocks.{i}.mlp.fc2.weight": (hidden, 4 * hidden),
            f"blocks.{i}.mlp.fc2.bias": (hidden,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * hidden, hidden),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * hidden,),
        }
    return shapes


def test_xl2_on_meta_matches_official_layout():
    model = build_dit(preset("DiT-XL/2"), device="meta")
    state = model.state_dict()
    expected = official_xl2_shapes()
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert all(p.is_meta for p in model.parameters())


def test_presets_cover_paper_sizes():
    for size, (depth, hidden, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }.items():
        for patch in (2, 4, 8):
            cfg = PRESETS[f"DiT-{size}/{patch}"]
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, patch)


def test_pos_embed_matches_reference_formula():
    """DiT's get_2d_sincos_pos_embed: first half encodes the column, second half the row, [sin | cos] each."""
    pos = sincos_2d(8, 3, 3)  # (9, 8)
    col, row = 2, 1  # token index row*3+col = 5
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    expected = torch.cat(
        [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
    )
    torch.testing.assert_close(torch.from_numpy(pos[5]), expected)


def test_forward_shapes_and_adaln_zero(tiny_config):
    model = build_dit(tiny_config)
    x = torch.randn(3, 1, 16, 16)
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 1, 16, 16)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained network's output layer is zero


def _official_style_model(tmp_path, fmt: str):
    config = preset("DiT-T/2").with_image_size(64)  # latent 8x8, learn_sigma, 1000 classes, like the official
    model = build_dit(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    if fmt == "raw":
        torch.save(state, path)
    else:
        torch.save(
            {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {}, "args": None}, path
        )
    return config, model, path


@pytest.mark.parametrize("fmt", ["raw", "training"])
def test_official_checkpoint_round_trip(tmp_path, fmt):
    config, model, path = _official_style_model(tmp_path, fmt)
    loaded = load_model(config, path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([7, 1000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)
    assert not any(p.is_meta for p in loaded.parameters())


def test_safetensors_round_trip_and_dtype(tmp_path, tiny_config):
    model = build_dit(tiny_config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = save_safetensors(model, tmp_path / "m.safetensors", {"steps": 10})
    loaded = load_model(tiny_config, path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.to(torch.bfloat16))


def test_wrong_architecture_names_the_right_model(tmp_path):
    small = build_dit(preset("DiT-T/2").with_image_size(64))
    path = tmp_path / "t.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(OpenDiTError, match=r"depth expected 12 found 2.*pass --model DiT-T/2"):
        load_model(preset("DiT-S/2").with_image_size(64), path)


def test_shape_mismatch_lists_keys_and_shapes(tmp_path):
    model = build_dit(preset("DiT-T/2").with_image_size(64))
    state = model.state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    del state["blocks.1.attn.proj.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(OpenDiTError) as info:
        load_model(preset("DiT-T/2").with_image_size(64), path)
    message = str(info.value)
    assert "blocks.1.attn.proj.bias" in message and "extra.weight" in message
    assert "blocks.0.mlp.fc1.weight: expected (256, 64) found (7, 64)" in message


def test_image_size_of_checkpoint_is_explained(tmp_path):
    model = build_dit(preset("DiT-T/2").with_image_size(64))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(OpenDiTError, match="4x4 token grid"):
        load_model(preset("DiT-T/2").with_image_size(128), path)


def test_config_round_trip_and_unknown_keys():
    cfg = preset("DiT-B/4").with_image_size(512)
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.input_size == (64, 64) and cfg.num_tokens == 256
    with pytest.raises(OpenDiTError, match="unknown DiT config keys"):
        DiTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
