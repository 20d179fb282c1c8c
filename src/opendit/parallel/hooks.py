"""The runtime's step hooks: communication accounting, fault injection and token balancing (diffusion/hooks.py).

`ParallelModel.step_hooks()` returns them in the order they must run: the balancer reads the step's blocked time
before the accounting hook closes the step's counters.
"""

from __future__ import annotations

import os

from opendit.diffusion.hooks import StepContext, StepHook
from opendit.distributed.comm import CommStats
from opendit.distributed.env import ENV_FAULT, InjectedFault


class CommAccounting(StepHook):
    """Closes each step's communication counters: `stats.history[i]` = {kind: {calls, bytes, wait_s}} of step i."""

    def __init__(self, stats: CommStats):
        self.stats = stats

    def on_step_end(self, ctx: StepContext) -> None:
        self.stats.end_step()


class FaultInjection(StepHook):
    """TEST HOOK (OPENDIT_FAULT_INJECT="rank=R,step=S"): global rank R raises at the end of step S."""

    def __init__(self, rank: int, fault: tuple[int, int | str] | None):
        self.rank, self.fault = rank, fault

    def on_step_end(self, ctx: StepContext) -> None:
        if self.fault is not None and self.fault == (self.rank, ctx.index):
            raise InjectedFault(
                f"injected fault on rank {self.rank} at step {ctx.index} ({ENV_FAULT}={os.environ.get(ENV_FAULT)})"
            )


class TokenBalancing(StepHook):
    """--balance-tokens: feeds each step's busy time (model calls minus time blocked in collectives) to the
    TokenBalancer and, when it proposes a split, re-installs the kernels with it (exact) before the next step."""

    def __init__(self, pmodel, stats: CommStats):
        self.pmodel, self.stats = pmodel, stats
        self._waited = 0.0

    def on_step_start(self, ctx: StepContext) -> None:
        self._waited = self.stats.waited_s()

    def on_step_end(self, ctx: StepContext) -> None:
        balancer = self.pmodel.balancer
        if balancer is None or balancer.done:
            return
        # the sampler synchronised the step on CUDA and the waits are device-timed there: busy is device time
        busy = ctx.model_seconds - (self.stats.waited_s() - self._waited)
        new_sizes = balancer.observe(busy)
        if new_sizes is not None:
            old = self.pmodel.token_sizes
            self.pmodel.set_token_sizes(new_sizes)
            gain = balancer.history[-1]["predicted_gain"]
            self.pmodel.notes.append(
                f"tokens re-split by measured speed: {old} -> {new_sizes} (predicted {gain:.0%} faster)"
            )


def runtime_step_hooks(runtime, first: tuple = ()) -> list[StepHook]:
    """A runtime's step hooks in the order they must run (none in one process): `first` (e.g. the token balancer,
    which reads the step's blocked time before the accounting closes it), fault injection, then the accounting."""
    if runtime is None:
        return []
    from opendit.distributed.env import global_rank

    return [*first, FaultInjection(global_rank(), runtime.fault), CommAccounting(runtime.stats)]
