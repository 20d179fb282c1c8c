"""Pyramid Attention Broadcast's schedule: at which steps an attention (or MLP) module is computed.

Inside the window [A, B) of the trajectory (fractions of the step count) a module is computed at the window's first
step and then every `every` steps; at the steps in between its last output is broadcast (reused). Outside the window
it is always computed: the first steps shape the image's layout and the last ones its detail, and both change fast.
The rule depends on the step index only, so every rank, every image and every split decides the same.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from opendit.cache.registry import CacheMethod, register_cache_method


def pab_schedule(num_steps: int, every: int, window: tuple[float, float]) -> list[bool]:
    """compute[i] for steps i = 0..num_steps-1 (True: run the module, False: reuse its last output)."""
    first = math.ceil(window[0] * num_steps)
    end = math.ceil(window[1] * num_steps)  # exclusive
    return [not (first <= i < end) or (i - first) % every == 0 for i in range(num_steps)]


class PABOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pab_range: int = Field(2, ge=1, description="self/spatial attention every N steps; temporal 2N, cross 3N")
    pab_window: tuple[float, float] = Field(
        (0.2, 0.9), description="reuse inside steps [A, B) (fractions of the steps)",
        json_schema_extra={"what": "two fractions A < B in [0, 1]", "cli": {"metavar": ["A", "B"]}},
    )  # fmt: skip
    pab_mlp_range: int = Field(0, ge=0, description="reuse the MLPs too, every N steps (0: never)")


class PyramidAttentionBroadcast(CacheMethod):
    """`pab`: attention (and optionally MLP) outputs reused on a fixed schedule of the step index; per-cache state:
    `cache.state["schedule"]` (kind -> compute flags per step) and `cache.state["outputs"]` ((slot, path) -> the
    module's last computed output)."""

    name = "pab"
    summary = "attention outputs broadcast across steps on a pyramid schedule"
    Options = PABOptions

    def install(self, cache) -> None:
        cache.state["outputs"] = {}
        targets = [(path, module, kind) for path, module, kind in cache.layout.attention]
        if cache.config.pab_mlp_range > 1:
            targets += [(path, module, "mlp") for path, module in cache.layout.mlps]
        for path, module, kind in targets:
            cache.wrap(module, self._forward(cache, module.forward, path, kind))

    def reset(self, cache) -> None:
        config, steps = cache.config, cache.num_steps
        schedule = {kind: pab_schedule(steps, config.pab_range * factor, config.pab_window)
                    for kind, factor in (("spatial", 1), ("temporal", 2), ("cross", 3))}  # fmt: skip
        if config.pab_mlp_range > 1:
            schedule["mlp"] = pab_schedule(steps, config.pab_mlp_range, config.pab_window)
        cache.state["schedule"] = schedule
        cache.state["outputs"].clear()

    @staticmethod
    def _forward(cache, forward, path: str, kind: str):
        counter = "mlp_reused" if kind == "mlp" else "attention_reused"
        outputs = cache.state["outputs"]

        def cached_forward(*args, **kwargs):
            key = (cache.slot, path)
            schedule = cache.state["schedule"][kind]
            if not schedule[cache.step] and key in outputs:
                cache.call_record[counter] += 1
                return outputs[key]
            out = forward(*args, **kwargs)
            # keep it only if a later step of the window may reuse it
            if any(not s for s in schedule[cache.step + 1 :]):
                outputs[key] = out
            else:
                outputs.pop(key, None)
            return out

        return cached_forward


register_cache_method(PyramidAttentionBroadcast())
