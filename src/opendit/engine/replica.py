"""What every rank's replica shares, whatever runs the generation (OpenDiT's sampler over a DiT: worker.Replica; a
diffusers pipeline's own loop: pipeline_replica.PipelineReplica): joining the job (the process group from the
environment, the control group, rank 0's spec on every rank) or picking the one process's device; the per-phase
memory peaks; the trace hook of a call; every rank's record gathered on every rank; the Chrome trace written by the
output rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from opendit.distributed.comm import CommStats
from opendit.distributed.control import ControlMember
from opendit.distributed.env import global_rank, init_from_env, pick_device
from opendit.memory import PhasePeaks
from opendit.parallel.trace import TraceHook, utilisation_summary, write_chrome_trace


class ReplicaBase(ControlMember):
    runtime = None

    def join(self, spec):
        """Join the job (spec.world > 1: process group, control group, rank 0's spec) or pick the device; sets
        spec, device and the memory phases. Returns the spec every rank agreed on."""
        self.runtime, self.control, self.owns_group = None, None, False
        if spec.world > 1:
            device, backend = pick_device(spec.settings.device)
            self.owns_group = init_from_env(device, backend)
            self.join_control()
            spec = self.broadcast(spec)
        else:
            device = torch.device(spec.settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.spec, self.device = spec, device
        # phase peaks reset the high-water mark: only in worker processes, never in a caller's own (in-process engine)
        self.memory = PhasePeaks(device, reset=spec.world > 1)
        return spec

    def trace_hook(self, stats: CommStats | None) -> TraceHook:
        """This call's timeline and utilisation (clocks aligned at a barrier over every rank)."""
        align = None if self.spec.world == 1 else (lambda: dist.barrier(group=self.control))
        rank = global_rank() if self.spec.world > 1 else 0
        return TraceHook(stats if stats is not None else CommStats(), rank, align=align, device=self.device)

    def gather_ranks(self, mine: dict, call, trace: TraceHook) -> list[dict]:
        """Every rank's record of this call (with its utilisation, and its trace events when tracing) on every
        rank, in rank order."""
        mine["utilisation"] = trace.summary()
        if call.trace is not None:
            mine["trace_events"] = trace.events()
        if self.spec.world == 1:
            return [mine]
        everyone: list = [None] * self.spec.world
        dist.all_gather_object(everyone, mine, group=self.control)
        return everyone

    def finish_ranks(self, call, ranks: list[dict], metadata: dict) -> dict:
        """On the output rank: write the call's Chrome trace (if asked) and return the utilisation summary."""
        if call.trace is not None:
            write_chrome_trace(call.trace, [rank.pop("trace_events") for rank in ranks], metadata)
        return utilisation_summary([rank.pop("utilisation") for rank in ranks])
