"""The control group of a job's ranks: how rank 0 hands each call to the others, with a long timeout.

Between calls the serving ranks wait for as long as the caller takes, which must not trip the process-group timeout
(that timeout, OPENDIT_PG_TIMEOUT_S, is what ends a call whose peer died); a dead peer while idle is still noticed by
the WorkerPool (or torchrun's agent), which sees the process exit. The engine's replica (engine/replica.py) is one.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=30)  # idle time between calls is the caller's business


class ControlMember:
    """One rank's membership: `join` creates the control group (gloo, every rank); `owns_group` says whether this
    replica created the process group (then `close` destroys it)."""

    control = None
    owns_group = False

    def join_control(self) -> None:
        self.control = dist.new_group(list(range(dist.get_world_size())), timeout=CONTROL_TIMEOUT, backend="gloo")

    def broadcast(self, message=None):
        """Rank 0's `message` on every rank (over the control group); returns it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def close(self) -> None:
        """Leave the process group if this replica created it (a clean end: every rank closes at the same message)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
