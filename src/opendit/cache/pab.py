"""Pyramid Attention Broadcast's schedule: at which steps an attention (or MLP) module is computed.

Inside the window [A, B) of the trajectory (fractions of the step count) a module is computed at the window's first
step and then every `every` steps; at the steps in between its last output is broadcast (reused). Outside the window
it is always computed: the first steps shape the image's layout and the last ones its detail, and both change fast.
The rule depends on the step index only, so every rank, every image and every split decides the same.
"""

from __future__ import annotations

import math


def pab_schedule(num_steps: int, every: int, window: tuple[float, float]) -> list[bool]:
    """compute[i] for steps i = 0..num_steps-1 (True: run the module, False: reuse its last output)."""
    first = math.ceil(window[0] * num_steps)
    end = math.ceil(window[1] * num_steps)  # exclusive
    return [not (first <= i < end) or (i - first) % every == 0 for i in range(num_steps)]
