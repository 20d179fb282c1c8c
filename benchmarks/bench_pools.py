"""What the side-by-side benchmarks (vs_diffusers.py, video_scaling.py) share: a model copy that shares its weights,
and one question to a 1-process pool or to both ranks of a 2-rank pool."""

from __future__ import annotations

import copy


def shared_copy(model):
    """A copy with its own modules (hooks and processors are per module) sharing the parameter and buffer tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def ask_pools(pool1, pool2, command: tuple, single: bool) -> tuple[dict, list[dict]]:
    """Send `command` to the 1-process pool (single) or to both ranks of the 2-rank pool, and return (answer,
    every rank's answer). A worker answers {"seconds": [one per forward], ...}; for 2 ranks the answer is rank 0's
    with "seconds" the slower rank's time forward by forward (a forward ends when both are done) and
    "rank_seconds" both ranks' lists."""
    if single:
        pool1.send(command)
        answer = pool1.recv(0)
        return answer, [answer]
    for r in range(2):
        pool2.send(command, r)
    answers = [pool2.recv(r) for r in range(2)]
    answer = dict(answers[0])
    answer["rank_seconds"] = [a["seconds"] for a in answers]
    answer["seconds"] = [max(pair) for pair in zip(*answer["rank_seconds"])]
    return answer, answers
