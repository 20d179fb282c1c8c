"""The first-block cache's mixed calls (some samples reuse, others compute): on a chain of like blocks the computing
samples' rows are carried compactly from block 1 to block K and scattered back once; that must give bit-for-bit
what the per-block merge path gives (every block on the computing rows, merged back into the full batch), on our
DiT under guidance and on every diffusers transformer we declare (one stream, and joint image + text streams).
Decisions are forced (`replay`) so that every pattern occurs: one sample reusing, all but one, all, none."""

from __future__ import annotations

import pytest
import torch
from tests.diffusers_models import KINDS, build, inputs
from tests.test_cache import STEPS, _pseudo_trajectory, run_sampler, small_model

from opendit.cache import CacheConfig, install_cache
from opendit.cache.block_cache import BlockCache

ANY_DECISION = CacheConfig(kind="fbcache", threshold=1e9, max_reuse=1000, guard_steps=0)
# per step, which samples reuse (step 0 has nothing cached yet)
PATTERN_3 = [[0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]]


@pytest.fixture
def path_counts(monkeypatch):
    """How often each mixed-call path ran."""
    counts = {"compact": 0, "merged": 0}
    for name, key in (("_compact_forward", "compact"), ("_merged_forward", "merged")):
        original = getattr(BlockCache, name)

        def counted(self, *args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(BlockCache, name, counted)
    return counts


def _replayed(model, run, pattern, compact: bool):
    cache = install_cache(model, ANY_DECISION)
    cache.blocks.compact = compact
    cache.replay = [[[bool(f) for f in flags]] for flags in pattern]
    out = run(cache)
    reused = [call["reused_samples"] for step in cache.records for call in step["calls"]]
    cache.remove()
    return out, reused


def test_compact_rows_equal_the_merged_path_on_our_dit(path_counts):
    model, labels = small_model(), [1, 4, 7]
    # rows [cond 1, 4, 7; uncond 1, 4, 7]: an image's two rows decide together under our sampler
    pattern = [p + p for p in (PATTERN_3 + PATTERN_3)[:STEPS]]
    with torch.no_grad():
        merged, reused_m = _replayed(model, lambda c: run_sampler(model, c, labels), pattern, compact=False)
        assert path_counts == {"compact": 0, "merged": 6 * 3}, path_counts  # 6 mixed steps x 3 span blocks
        compact, reused_c = _replayed(model, lambda c: run_sampler(model, c, labels), pattern, compact=True)
        uncached = run_sampler(model, None, labels)
    assert path_counts["compact"] == path_counts["merged"], path_counts
    assert reused_c == reused_m and any(0 < len(r) < 6 for r in reused_c)
    assert torch.equal(compact, merged)
    assert float((compact - uncached).abs().max()) > 1e-4  # the reuse changed the images: the test can fail


def _trajectory(module, kind, cache):
    return _pseudo_trajectory(module, kind, cache, steps=len(PATTERN_3), batch=3)


@pytest.mark.parametrize("kind", KINDS)
def test_compact_rows_equal_the_merged_path_on_diffusers_transformers(kind, path_counts):
    model = build(kind)
    with torch.no_grad():
        merged, reused_m = _replayed(model, lambda c: _trajectory(model, kind, c), PATTERN_3, compact=False)
        compact, reused_c = _replayed(model, lambda c: _trajectory(model, kind, c), PATTERN_3, compact=True)
        uncached = _trajectory(model, kind, None)
    assert path_counts["compact"] == path_counts["merged"] > 0, path_counts
    assert reused_c == reused_m == [[i for i, f in enumerate(p) if f] for p in PATTERN_3]
    assert torch.equal(compact, merged), float((compact - merged).abs().max())
    assert float((compact - uncached).abs().max()) > 1e-5


def test_controlnet_residuals_between_blocks_keep_images_independent_of_their_batch(path_counts):
    """A ControlNet adds full-batch residuals between blocks, so a mixed call must merge at each block: each of 3
    images in one batch (decisions forced per image) equals that image sampled alone with its own decisions."""
    model = build("flux")
    kwargs = inputs("flux", batch=3)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(5)
    control = [torch.randn(3, kwargs["hidden_states"].shape[1], inner, generator=g)]

    def run(cache, rows):
        kw = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == 3 else v) for k, v in kwargs.items()}
        hidden = kw.pop("hidden_states")
        cache.reset(len(PATTERN_3))
        for step in range(len(PATTERN_3)):
            cache.start_step(step)
            out = model(hidden_states=hidden, **kw, controlnet_block_samples=[c[rows] for c in control],
                        return_dict=False)[0]  # fmt: skip
            hidden = hidden + 0.1 * out
        return hidden

    with torch.no_grad():
        cache = install_cache(model, ANY_DECISION)
        cache.replay = [[[bool(f) for f in flags]] for flags in PATTERN_3]
        together = run(cache, slice(0, 3))
        assert cache.compact_call is False and path_counts["merged"] > 0 and path_counts["compact"] == 0
        for i in range(3):
            cache.replay = [[[bool(flags[i])]] for flags in PATTERN_3]
            alone = run(cache, slice(i, i + 1))
            assert float((together[i : i + 1] - alone).abs().max()) <= 1e-5 * float(alone.abs().max()), i
        cache.remove()
