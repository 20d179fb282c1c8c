"""Tiny diffusers pipelines: built from configs, saved, reloaded offline, and deterministic end to end."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import DiffusionPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.utils import is_accelerate_available  # noqa: E402

from opendit.testing.tiny_pipelines import (  # noqa: E402
    TINY_KINDS,
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_call_kwargs,
)

# (batch, [frames,] height, width, rgb) of one tiny call with `output_type="np"`.
EXPECTED_SHAPES = {
    "pixart": (1, 32, 32, 3),
    "sd3": (1, 32, 32, 3),
    "flux": (1, 32, 32, 3),
    "wan": (1, 5, 64, 64, 3),
    "dit": (1, 32, 32, 3),
    "wan22": (1, 5, 64, 64, 3),  # the video families (tiny_video_families.py) at their folder defaults
    "ltx": (1, 9, 64, 64, 3),
    "cogvideox": (1, 9, 32, 32, 3),
    "latte": (1, 4, 32, 32, 3),
    "hunyuan15": (1, 5, 32, 32, 3),
}


def _own_memory(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Copy every loaded tensor into memory of its own.

    Loaded tensors are views into the safetensors buffer at arbitrary byte offsets, and the CPU BLAS takes other
    vector paths for unaligned operands, moving some outputs by one float32 ulp (~1e-7). Fresh copies are aligned as
    freshly built weights are, so the reloaded pipeline can be held to bitwise equality.
    """
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()
    return pipe


def _load(directory, monkeypatch) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained`, made to work for Wan without `accelerate`.

    WanTransformer3DModel lists `_keep_in_fp32_modules`, and diffusers loads such a model only with
    `low_cpu_mem_usage=True`, which needs accelerate (passing `transformer=` does not help: WanPipeline marks it
    optional, so it is loaded anyway). Everything here is float32 already, so dropping the list changes nothing but
    the loading path.
    """
    if not is_accelerate_available():
        monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    return DiffusionPipeline.from_pretrained(directory)


def _generate(pipe: DiffusionPipeline, kind: str, **sizes) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**tiny_call_kwargs(kind, **sizes), generator=torch.Generator().manual_seed(0))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def test_kinds_are_documented():
    assert set(TINY_KINDS) == set(EXPECTED_SHAPES)
    assert all(isinstance(text, str) and text for text in TINY_KINDS.values())


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_round_trip_is_deterministic(kind, tmp_path, monkeypatch):
    pipe = build_tiny_pipeline(kind, seed=0)
    first, second = _generate(pipe, kind), _generate(pipe, kind)
    assert first.shape == EXPECTED_SHAPES[kind]
    assert np.isfinite(first).all()
    assert first.std() > 0  # random weights still give a non-constant image
    np.testing.assert_array_equal(first, second)

    directory = save_tiny_pipeline(kind, tmp_path / kind, seed=0)
    loaded = _load(directory, monkeypatch)
    assert type(loaded) is type(pipe)
    np.testing.assert_allclose(_generate(loaded, kind), first, rtol=0, atol=1e-5)
    loaded = _own_memory(loaded)
    np.testing.assert_array_equal(_generate(loaded, kind), first)
    np.testing.assert_array_equal(_generate(loaded, kind), first)


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_same_seed_same_weights(kind):
    a, b, c = (build_tiny_pipeline(kind, seed=s) for s in (0, 0, 1))
    modules = [name for name, module in a.components.items() if isinstance(module, torch.nn.Module)]
    assert "transformer" in modules and "vae" in modules
    for name in modules:
        state_a, state_b = a.components[name].state_dict(), b.components[name].state_dict()
        assert state_a.keys() == state_b.keys(), name
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
    assert any(not torch.equal(a.transformer.state_dict()[k], v) for k, v in c.transformer.state_dict().items())


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("dit")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("heads, head_dim", [(3, 16), (6, 8)])
@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_head_counts_a_degree_does_not_divide(kind, heads, head_dim):
    if kind in ("cogvideox", "hunyuan15") and head_dim % 16:
        pytest.skip("a 3D rotary embedding split 1/4 + 3/8 + 3/8 needs a head dim of 16k")
    pipe = build_tiny_pipeline(kind, num_heads=heads, attention_head_dim=head_dim, num_layers=1)
    assert pipe.transformer.config.num_attention_heads == heads
    assert pipe.transformer.config.attention_head_dim == head_dim
    image = _generate(pipe, kind, num_heads=heads, attention_head_dim=head_dim, num_layers=1)
    assert image.shape == EXPECTED_SHAPES[kind]
    assert np.isfinite(image).all()


@pytest.mark.skipif(not is_accelerate_available(), reason="diffusers loads WanTransformer3DModel only with accelerate")
def test_wan_loads_with_plain_from_pretrained(tmp_path):
    loaded = DiffusionPipeline.from_pretrained(save_tiny_pipeline("wan", tmp_path))
    assert type(loaded.transformer) is WanTransformer3DModel


def test_dit_labels_survive_reload(tmp_path):
    loaded = DiffusionPipeline.from_pretrained(save_tiny_pipeline("dit", tmp_path))
    assert loaded.get_label_ids(["dog", "cat"]) == [1, 0]


def test_prompt_words_are_single_tokens_within_the_text_length():
    pipe = build_tiny_pipeline("sd3")
    prompt = tiny_call_kwargs("sd3")["prompt"]
    words = len(prompt.split())
    # CLIP wraps the words in bos and eos; T5 appends eos only.
    for tokenizer, specials in ((pipe.tokenizer, 2), (pipe.tokenizer_2, 2), (pipe.tokenizer_3, 1)):
        ids = tokenizer(prompt).input_ids
        assert len(ids) == words + specials <= tokenizer.model_max_length == 16


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown tiny pipeline kind"):
        build_tiny_pipeline("unet")
    with pytest.raises(TypeError, match="unknown size overrides"):
        build_tiny_pipeline("dit", hidden=64)
    with pytest.raises(ValueError, match="attention_head_dim >= 8"):
        build_tiny_pipeline("dit", attention_head_dim=4)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_pipeline("wan", image_size=40)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        build_tiny_pipeline("wan", num_frames=4)
