"""Caching across denoising steps (opendit/cache): PAB and the adaptive first-block cache.

- settings are validated (unknown cache, threshold < 0, a PAB window outside [0, 1], a flag of the other method);
- the PAB schedule holds for any step count; threshold 0 / range 1 reuse nothing and change nothing;
- per sample: an image's decisions and result do not depend on the batch it is in;
- 2 gloo ranks (Ulysses, ring, cfg-parallel; DSP on the video DiT) with each cache equal one process with the same
  cache, under the one process's recorded decisions (and, with a threshold no metric sits near, without replay);
  recorded bytes per step fall on reused steps;
- the diffusers transformers (DiT, PixArt, SD3, Flux, Wan) take both caches, in one process and on 2 ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from opendit.cache import CacheConfig, install_cache, make_cache_config
from opendit.cache.pab import pab_schedule
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, build_dit, perturb_weights, preset

SMALL = DiTConfig(**{**preset("DiT-T/2").to_dict(), "num_classes": 10, "latent": False, "input_size": (10, 10),
                     "in_channels": 3, "num_heads": 3, "hidden_size": 48, "depth": 4})  # fmt: skip
STEPS = 10


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return perturb_weights(build_dit(SMALL).eval(), std=0.05, seed=seed + 1)


def run_sampler(model_fn, cache, labels, hooks=(), first_index=0, cfg_scale=3.0):
    from opendit.diffusion.sampler import sample

    result = sample(
        model_fn, torch.tensor(labels), (SMALL.in_channels, *SMALL.input_size), num_classes=10,
        scheduler_name="flow-euler", prediction="flow", learn_sigma=False, steps=STEPS, cfg_scale=cfg_scale, seed=4,
        first_index=first_index, hooks=[*([cache] if cache is not None else []), *hooks],
    )  # fmt: skip
    return result.samples


def decisions(cache) -> list[list[list[bool]]]:
    """[step][call] -> per-sample reuse flags, from the cache's record (what `replay` takes)."""
    out = []
    for step in cache.records:
        out.append([[i in call["reused_samples"] for i in range(call["samples"])] for call in step["calls"]])
    return out


def metrics(cache) -> list[list[list[float]]]:
    """[step][call] -> the per-sample first-block metric the cache recorded (empty where none was computed)."""
    return [[call.get("metric", []) for call in step["calls"]] for step in cache.records]


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"kind": "lru"}, "unknown cache 'lru'"),
        ({"kind": "fbcache", "threshold": -0.1}, "--cache-threshold must be"),
        ({"kind": "fbcache", "threshold": float("nan")}, "--cache-threshold must be"),
        ({"kind": "pab", "pab_window": (0.2, 1.5)}, "--pab-window A B takes two fractions"),
        ({"kind": "pab", "pab_window": (0.8, 0.2)}, "0 <= A < B <= 1"),
        ({"kind": "pab", "pab_range": 0}, "--pab-range must be"),
        ({"kind": "fbcache", "max_reuse": 0}, "--cache-max-reuse must be"),
        ({"kind": "pab", "threshold": 0.1}, "--cache-threshold belongs to --cache fbcache"),
        ({"kind": "none", "pab_range": 2}, "--pab-range belongs to --cache pab"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, fragment):
    with pytest.raises(OpenDiTError, match=None) as info:
        make_cache_config(**kwargs)
    assert fragment in str(info.value)


def test_bad_settings_through_the_cli(tmp_path, capsys):
    from opendit.cli import main

    base = ["sample", "--classes", "1", "--steps", "2", "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, fragment in [
        (["--cache", "lru"], "unknown cache"),
        (["--cache", "fbcache", "--cache-threshold", "-1"], "(--cache-threshold) must be"),
        (["--cache", "pab", "--pab-window", "0.5", "1.2"], "--pab-window"),
    ]:
        assert main(base + extra) != 0
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("steps", [1, 2, 7, 30, 50, 250])
@pytest.mark.parametrize("every", [1, 2, 3, 6])
def test_pab_schedule_holds_for_any_step_count(steps, every):
    window = (0.2, 0.9)
    compute = pab_schedule(steps, every, window)
    assert len(compute) == steps
    for i, c in enumerate(compute):
        inside = window[0] * steps <= i < window[1] * steps
        if not inside:
            assert c, (i, steps)
    reused = [i for i, c in enumerate(compute) if not c]
    for i in reused:  # a reused step has a computed step within `every - 1` steps before it, inside the window
        assert any(compute[j] for j in range(max(0, i - every + 1), i)), (i, compute)
    if every == 1:
        assert not reused


def test_threshold_zero_and_range_one_change_nothing():
    model = small_model()
    labels = [1, 2, 3]
    ref = run_sampler(model, None, labels)
    for config in (make_cache_config("fbcache", threshold=0.0), make_cache_config("pab", pab_range=1)):
        cache = install_cache(model, config)
        out = run_sampler(model, cache, labels)
        saved = cache.summary()["saved"]
        cache.remove()
        assert torch.equal(out, ref), config
        assert saved["blocks_skipped"] == 0 and saved["attention_reused"] == 0
    assert torch.equal(run_sampler(model, None, labels), ref)  # removed: the model is as it was


def test_caches_reuse_and_stay_close_on_the_trained_digits_model():
    from opendit.digits.judges import load_for_eval

    model, _meta = load_for_eval()
    labels = list(range(10))
    shape = (model.config.in_channels, *model.config.input_size)
    from opendit.diffusion.sampler import sample

    def go(cache):
        kw = dict(num_classes=10, scheduler_name="flow-euler", prediction="flow", learn_sigma=False, steps=20,
                  cfg_scale=3.0, seed=0, hooks=[cache] if cache else [])  # fmt: skip
        return sample(model, torch.tensor(labels), shape, **kw).samples

    ref = go(None)
    for kind in ("pab", "fbcache"):
        cache = install_cache(model, make_cache_config(kind, "DiT"))
        out = go(cache)
        summary = cache.summary()
        cache.remove()
        saved = summary["saved"]
        assert (saved["blocks_skipped"] if kind == "fbcache" else saved["attention_reused"]) > 0, summary
        assert 0 < float((out - ref).abs().max()) < 1.0  # changed, but by less than the pixel range [-1, 1]
        if kind == "fbcache":  # per-sample decisions: some calls mix reusing and computing samples
            mixed = [c for s in summary["steps"] for c in s["calls"] if 0 < len(c["reused_samples"]) < c["samples"]]
            assert mixed, "no call mixed reusing and computing samples"


def test_an_image_does_not_depend_on_its_batch():
    """Decisions are per image: 4 images in one batch equal the same images sampled 2 + 2 (first_index)."""
    from opendit.digits.judges import load_for_eval

    model, _meta = load_for_eval()
    config = make_cache_config("fbcache", "DiT", threshold=0.08)
    from opendit.diffusion.sampler import sample

    def go(labels, first):
        cache = install_cache(model, config)
        kw = dict(num_classes=10, scheduler_name="flow-euler", prediction="flow", learn_sigma=False, steps=16,
                  cfg_scale=3.0, seed=7, first_index=first, hooks=[cache])  # fmt: skip
        out = sample(model, torch.tensor(labels), (1, 16, 16), **kw).samples
        flags = decisions(cache)
        cache.remove()
        return out, flags

    whole, flags_whole = go([3, 8, 0, 5], 0)
    part_a, flags_a = go([3, 8], 0)
    part_b, flags_b = go([0, 5], 2)
    assert float((torch.cat([part_a, part_b]) - whole).abs().max()) < 1e-4
    # rows: [cond 0..3; uncond 0..3] vs [cond 0,1; uncond 0,1] and [cond 2,3; uncond 2,3]
    for step, a, b, w in zip(range(16), flags_a, flags_b, flags_whole):
        cond_u = a[0][:2] + b[0][:2] + a[0][2:] + b[0][2:]
        assert cond_u == w[0], step
        assert w[0][:4] == w[0][4:], step  # an image's two branches decide together (their metrics are summed)
    assert any(any(w[0]) and not all(w[0]) for w in flags_whole), "no step mixed reusing and computing images"


def test_fbcache_refuses_a_guided_batch_split_inside_the_model_call():
    """Pairing an image's two branches needs both in the call (or over the cfg group): a dp split of the call's
    batch would make N ranks differ from one process, so it is refused with the fix named."""
    from opendit.diffusion.hooks import LoopInfo

    cache = install_cache(small_model(), CacheConfig(kind="fbcache"))
    cache.on_loop_start(LoopInfo(num_steps=STEPS, batch=3, guided=True))
    sums = torch.ones(6, 2, dtype=torch.float64)
    assert torch.equal(cache.reduce_sum(sums.clone()), torch.full((6, 2), 2.0, dtype=torch.float64))
    with pytest.raises(OpenDiTError, match="split the images before sampling"):
        cache.reduce_sum(torch.ones(4, 2, dtype=torch.float64))  # 4 rows of a 3-image guided loop
    cache.remove()


def test_cache_refuses_shard_weights_and_unknown_models():
    from opendit.cache.layout import cache_layout

    with pytest.raises(OpenDiTError, match="no cache layout"):
        cache_layout(torch.nn.Linear(2, 2))

    class Plan:
        shard_weights, balance_tokens = False, True

    class Runtime:
        plan = Plan()

    with pytest.raises(OpenDiTError, match="--cache with --balance-tokens"):
        install_cache(small_model(), CacheConfig(kind="fbcache"), Runtime())
    Plan.balance_tokens, Plan.pipefusion = False, 2
    with pytest.raises(OpenDiTError, match="--cache with --pipefusion is not supported.*drop --cache"):
        install_cache(small_model(), CacheConfig(kind="pab"), Runtime())


def every_ranks_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows (on every rank), then the process group ends."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return [row for rank_rows in everyone for row in rank_rows]


# ------------------------------------------------------------------------------------------------ 2 ranks
PLANS = [{"ulysses": 2}, {"ring": 2}, {"cfg": 2}, {"tp": 2}]
CACHES = {
    "pab": CacheConfig(kind="pab", pab_range=2, pab_window=(0.1, 0.95), pab_mlp_range=3),
    # a threshold above every metric: the decisions follow the cap alone, so no metric sits near the threshold
    "fbcache-cap": CacheConfig(kind="fbcache", threshold=1e9, max_reuse=2, guard_steps=1),
    # a threshold among the metrics (their median, measured first): compared under the one process's decisions
    "fbcache-replay": None,
}


def median_metric_threshold(model, labels) -> CacheConfig:
    """A threshold that splits this model's first-block metrics in two, so that both decisions occur."""
    cache = install_cache(model, CACHES["fbcache-cap"])
    run_sampler(model, cache, labels)
    metrics = sorted(v for step in cache.records for call in step["calls"] for v in call.get("metric", []))
    cache.remove()
    return CacheConfig(kind="fbcache", threshold=metrics[len(metrics) // 2], max_reuse=3, guard_steps=1)


def _two_rank_world() -> list[dict]:
    import torch.distributed as dist

    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.parallel.apply import parallelize

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    reference = small_model()
    labels = [1, 4, 7]
    rows = []
    for name, config in CACHES.items():
        config = config or median_metric_threshold(reference, labels)
        cache = install_cache(reference, config)
        ref = run_sampler(reference, cache, labels)
        flags, ref_metrics = decisions(cache), metrics(cache)
        cache.remove()
        for plan in PLANS:
            runtime = build_runtime(ParallelConfig(**plan), "cpu")
            pmodel = parallelize(copy.deepcopy(reference), runtime)
            mine, mine_metrics = flags, ref_metrics  # this rank's samples: under cfg-parallel, its half of the batch
            if plan.get("cfg", 1) > 1:
                half, c_rank = len(labels), runtime.coords["cfg"]
                mine = [[call[c_rank * half : (c_rank + 1) * half] for call in step] for step in flags]
                mine_metrics = [[c[c_rank * half : (c_rank + 1) * half] for c in step] for step in ref_metrics]
            out = {}
            for mode in ("uncached", "cached", "replayed"):
                c = None if mode == "uncached" else install_cache(pmodel.model, config, runtime)
                if mode == "replayed":
                    c.replay = mine
                runtime.stats.history.clear()
                got = run_sampler(pmodel, c, labels, hooks=pmodel.step_hooks())
                bytes_per_step = [sum(v["bytes"] for v in step.values()) for step in runtime.stats.history]
                out[mode] = {
                    "err": float((got - ref).abs().max()),
                    "flags": decisions(c) if c is not None else None,
                    "metrics": metrics(c) if c is not None else None,
                    "bytes": bytes_per_step,
                    "saved": c.summary()["saved"] if c is not None else None,
                }
                if c is not None:
                    c.remove()
            rows.append({"cache": name, "plan": str(plan), "rank": dist.get_rank(), "ref_flags": mine,
                         "ref_metrics": mine_metrics, **out})  # fmt: skip
    return every_ranks_rows(rows)


@pytest.fixture(scope="module")
def two_rank_rows() -> list[dict]:
    from opendit.distributed.launch import launch

    return launch(_two_rank_world, 2, threads_per_proc=1)


@pytest.mark.slow
def test_two_ranks_with_a_cache_equal_one_process_with_it(two_rank_rows):
    assert {(r["cache"], r["plan"]) for r in two_rank_rows} == {(c, str(p)) for c in CACHES for p in PLANS}
    for row in two_rank_rows:
        assert row["replayed"]["err"] <= 1 / 255, row["replayed"]
        assert row["replayed"]["flags"] == row["ref_flags"]
        if row["cache"] != "fbcache-replay":  # no decision near the threshold: equal without replay too
            assert row["cached"]["err"] <= 1 / 255, (row["cache"], row["plan"], row["cached"])
            assert row["cached"]["flags"] == row["ref_flags"]
        saved = row["cached"]["saved"]
        assert saved["blocks_skipped"] + saved["attention_reused"] > 0, row
        # the metric each rank decides on is the one process's: summed over the sequence group and, under guidance,
        # over the image's two branches (across the cfg group under cfg-parallel)
        got, want = row["replayed"]["metrics"], row["ref_metrics"]
        pairs = [(g, w) for gs, ws in zip(got, want) for gc, wc in zip(gs, ws) for g, w in zip(gc, wc)]
        assert len(got) == len(want) and (pairs or row["cache"] == "pab"), row["cache"]
        close = all(abs(g - w) <= 1e-4 * abs(w) + 2e-6 for g, w in pairs)  # metrics are recorded to 6 decimals
        assert close, (row["cache"], row["plan"], pairs)


@pytest.mark.slow
def test_recorded_bytes_fall_on_reused_steps(two_rank_rows):
    for row in two_rank_rows:
        if "cfg" in row["plan"]:
            continue  # cfg-parallel's one all-gather per step carries the output: it never shrinks
        full, cached = row["uncached"]["bytes"], row["cached"]["bytes"]
        assert len(full) == len(cached) == STEPS
        reused_steps = [i for i, step in enumerate(row["ref_flags"]) if any(step[0])]
        if row["cache"] == "pab":
            reused_steps = [i for i in range(STEPS) if cached[i] < full[i]]
            assert reused_steps, row
        for i in range(STEPS):
            if i in reused_steps:
                assert cached[i] < full[i], (row["cache"], row["plan"], i, cached[i], full[i])
            else:
                assert cached[i] >= full[i], (row["cache"], row["plan"], i)


# ------------------------------------------------------------------------------------------------ other models
DIFFUSERS_CACHES = {
    "pab": CacheConfig(kind="pab", pab_range=2, pab_window=(0.0, 1.0), pab_mlp_range=2),
    "fbcache": CacheConfig(kind="fbcache", threshold=1e9, max_reuse=2, guard_steps=1),
}


def _pseudo_trajectory(module, kind, cache, steps=6, batch=2):
    """A denoising-like loop on a diffusers transformer: the image tokens move by the output each step."""
    from tests.diffusers_models import inputs

    kwargs = inputs(kind, batch=batch)
    hidden = kwargs.pop("hidden_states")
    if cache is not None:
        cache.reset(steps)
    with torch.no_grad():
        for step in range(steps):
            if cache is not None:
                cache.start_step(step)
            out = module(hidden_states=hidden, **kwargs, return_dict=False)[0]
            hidden = hidden + 0.1 * out[:, : hidden.shape[1]]
    return hidden


def _diffusers_world() -> list[dict]:
    import torch.distributed as dist
    from tests.diffusers_models import KINDS, build

    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    rows = []
    for kind in KINDS:
        for name, config in DIFFUSERS_CACHES.items():
            reference = build(kind)
            cache = install_cache(reference, config)
            ref = _pseudo_trajectory(reference, kind, cache)
            ref_saved = cache.summary()["saved"]
            cache.remove()
            uncached = _pseudo_trajectory(reference, kind, None)
            model = opendit.parallelize(build(kind), ParallelConfig(ulysses=2))
            runtime = model._opendit_runtime
            cache = install_cache(model, config, runtime)
            got = _pseudo_trajectory(model, kind, cache)
            saved = cache.summary()["saved"]
            cache.remove()
            rows.append({
                "kind": kind, "cache": name, "rank": dist.get_rank(), "saved": saved, "ref_saved": ref_saved,
                "err": float((got - ref).abs().max() / ref.abs().max()),
                "moved": float((ref - uncached).abs().max()),
            })  # fmt: skip
    return every_ranks_rows(rows)


@pytest.mark.slow
def test_diffusers_transformers_take_both_caches_on_two_ranks():
    from opendit.distributed.launch import launch

    rows = launch(_diffusers_world, 2, threads_per_proc=1)
    from tests.diffusers_models import KINDS

    assert {(r["kind"], r["cache"]) for r in rows} == {(k, c) for k in KINDS for c in DIFFUSERS_CACHES}
    for row in rows:
        assert row["err"] <= 1e-5, row  # 2-rank Ulysses + cache == 1 process + the same cache
        assert row["saved"] == row["ref_saved"], row
        work = row["saved"]["blocks_skipped"] if row["cache"] == "fbcache" else row["saved"]["attention_reused"]
        assert work > 0 and row["moved"] > 0, row  # it reused something, and that changed the result


def _video_world() -> list[dict]:
    from tests.test_video_parallel import CONFIG, reference_model

    from opendit.diffusion.sampler import sample
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import sample_images
    from opendit.parallel.apply import parallelize

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    reference = reference_model()
    labels = torch.tensor([2, 5])
    kw = dict(num_classes=CONFIG.num_classes, scheduler_name="flow-euler", prediction="flow", learn_sigma=False,
              steps=STEPS, cfg_scale=2.0, seed=1)  # fmt: skip
    rows = []
    for name, config in (("pab", CACHES["pab"]), ("fbcache", CACHES["fbcache-cap"])):
        cache = install_cache(reference, config)
        ref = sample(reference, labels, CONFIG.sample_shape, hooks=[cache], **kw).samples
        ref_saved = cache.summary()["saved"]
        cache.remove()
        for impl in ("dsp", "ulysses"):
            runtime = build_runtime(ParallelConfig(ulysses=2, sp_impl=impl), "cpu")
            pmodel = parallelize(copy.deepcopy(reference), runtime)
            cache = install_cache(pmodel.model, config, runtime)
            got = sample_images(pmodel, labels, CONFIG.sample_shape, hooks=[cache], **kw).samples
            rows.append({"cache": name, "impl": impl, "err": float((got - ref).abs().max()),
                         "saved": cache.summary()["saved"], "ref_saved": ref_saved})  # fmt: skip
            cache.remove()
    return every_ranks_rows(rows)


@pytest.mark.slow
def test_video_dit_with_a_cache_under_dsp_and_ulysses_equals_one_process():
    from opendit.distributed.launch import launch

    rows = launch(_video_world, 2, threads_per_proc=1)
    assert {(r["cache"], r["impl"]) for r in rows} == {(c, i) for c in ("pab", "fbcache") for i in ("dsp", "ulysses")}
    for row in rows:
        assert row["err"] <= 1 / 255, row
        assert row["saved"] == row["ref_saved"], row
        assert row["saved"]["blocks_skipped"] + row["saved"]["attention_reused"] > 0, row
