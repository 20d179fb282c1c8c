"""A cache method registered from this test file — not in OpenDiT — runs through `Engine` on 1 and 2 processes.

The toy method, `final-repeat`, reuses the model's whole output every other step inside the trajectory (a crude
cache, but one with a visible effect): it wraps the root module through the layout's blocks' owner, keeps one output
per call slot, and counts what it reused. Registered here; the engine's workers import this module by name
(`CacheConfig.source`) before installing it, so both ranks of a 2-process engine run it."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from opendit.cache.registry import CacheMethod, register_cache_method
from opendit.errors import OpenDiTError


class FinalRepeatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    every: int = Field(2, ge=2)  # the output is computed on every `every`-th step, reused in between
    skip_first: int = Field(2, ge=0)  # steps at the start that always compute


class FinalRepeat(CacheMethod):
    name = "final-repeat"
    summary = "the model's output reused between every `every`-th step"
    Options = FinalRepeatOptions

    def check(self, plan) -> None:
        if plan.cfg > 1:
            raise OpenDiTError("final-repeat keeps one output per call: drop --cfg-parallel")

    def install(self, cache) -> None:
        options = self.options(dict(cache.config.options))
        cache.state["outputs"] = {}
        for _path, block, _io in cache.layout.blocks:  # every block: reuse its output on the off steps
            cache.wrap(block, self._forward(cache, block, block.forward, options))

    def reset(self, cache) -> None:
        cache.state["outputs"].clear()

    @staticmethod
    def _forward(cache, block, forward, options):
        def cached(*args, **kwargs):
            key = (cache.slot, id(block))
            off = cache.step >= options.skip_first and (cache.step - options.skip_first) % options.every
            if off and key in cache.state["outputs"]:
                cache.call_record["attention_reused"] += 1
                return cache.state["outputs"][key]
            out = forward(*args, **kwargs)
            cache.state["outputs"][key] = out
            return out

        return cached


register_cache_method(FinalRepeat())

CALL = {"classes": [3, 7], "seed": 4, "steps": 6}
TOY = {"method": "final-repeat", "every": 2, "skip_first": 2}


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_toy_cache_method_validates_its_options_and_plan():
    from opendit.cache.config import method_cache_config
    from opendit.distributed.config import ParallelConfig

    config = method_cache_config(TOY)
    assert config.kind == "final-repeat" and dict(config.options) == {"every": 2, "skip_first": 2}
    assert config.source == __name__
    with pytest.raises(OpenDiTError, match="final-repeat: every: Input should be greater than or equal to 2"):
        method_cache_config({"method": "final-repeat", "every": 1})
    with pytest.raises(OpenDiTError, match="unknown cache 'nope'; choose one of: none, .*final-repeat"):
        method_cache_config({"method": "nope"})
    with pytest.raises(OpenDiTError, match="drop --cfg-parallel"):
        FinalRepeat().check(ParallelConfig(cfg=2))


@pytest.mark.slow
def test_toy_cache_method_runs_through_the_engine_on_one_and_two_processes():
    from opendit import Engine
    from opendit.distributed.config import ParallelConfig

    with Engine() as engine:
        plain = engine.generate(**CALL)
        cached = engine.generate(**CALL, cache=TOY)
    with Engine(nproc=2, parallel=ParallelConfig(ulysses=2)) as engine:
        cached2 = engine.generate(**CALL, cache=TOY)
    summary = cached.record["cache"]
    assert summary["config"]["kind"] == "final-repeat" and summary["saved"]["attention_reused"] > 0
    # steps 3 and 5 of 6 reuse every block's output: an image differs from the uncached one, and 2 ranks = 1
    assert _max_diff(cached.images, plain.images) > 0
    assert _max_diff(cached2.images, cached.images) <= 1
    assert cached2.record["cache"]["saved"]["attention_reused"] == summary["saved"]["attention_reused"]
