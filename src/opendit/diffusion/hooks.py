"""Step hooks: the sampler hands every denoising step's context to a list of hooks.

Per-step state (communication counters, fault injection, token balancing, tracing, later attention caches and stale
activations) lives in hook objects, never in the sampler or in module globals. A hook implements any of:

    on_loop_start(loop)        once, before the first step (loop: LoopInfo)
    on_step_start(ctx)         before the step's model call(s)
    on_step_end(ctx)           after the scheduler step; ctx.model_calls holds the timings of the step's model calls
    on_loop_end(loop)          once, after the last step

The base class's methods do nothing, so a hook overrides only what it needs. Every rank runs the same loop in lockstep,
so a hook may issue collectives (all ranks call it at the same point), but it must not change what the model computes
unless it is meant to (a cache) and then only identically on every rank of a sequence group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LoopInfo:
    """What a hook may want to know about the loop as a whole."""

    num_steps: int
    batch: int  # images denoised by this rank's loop (its dp group's share)
    guided: bool
    timesteps: list[float] = field(default_factory=list)


@dataclass
class ModelCall:
    """One call of the model function within a step (perf_counter seconds on this process's clock)."""

    start_s: float
    end_s: float

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass
class StepContext:
    """One denoising step as the hooks see it."""

    index: int  # 0-based step
    num_steps: int
    timestep: float
    start_s: float  # perf_counter at the step's start
    end_s: float | None = None  # set before on_step_end
    model_calls: list[ModelCall] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.end_s or self.start_s) - self.start_s

    @property
    def model_seconds(self) -> float:
        return sum(call.seconds for call in self.model_calls)


class StepHook:
    """Base class: every method is a no-op."""

    def on_loop_start(self, loop: LoopInfo) -> None:
        pass

    def on_step_start(self, ctx: StepContext) -> None:
        pass

    def on_step_end(self, ctx: StepContext) -> None:
        pass

    def on_loop_end(self, loop: LoopInfo) -> None:
        pass


class HookList(StepHook):
    """Calls each hook in order, as given. The runtime's communication accounting closes a step's counters, so it
    goes last: every hook before it still sees the step's calls, bytes and waits."""

    def __init__(self, hooks: Sequence[StepHook] = ()):
        self.hooks = list(hooks)

    def on_loop_start(self, loop: LoopInfo) -> None:
        self._each("on_loop_start", loop)

    def on_step_start(self, ctx: StepContext) -> None:
        self._each("on_step_start", ctx)

    def on_step_end(self, ctx: StepContext) -> None:
        self._each("on_step_end", ctx)

    def on_loop_end(self, loop: LoopInfo) -> None:
        self._each("on_loop_end", loop)

    def _each(self, event: str, arg) -> None:
        for hook in self.hooks:
            getattr(hook, event)(arg)
