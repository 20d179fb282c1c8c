"""Several validated calls denoised as one batch: `merge_calls` joins calls whose settings agree into one Call (each
image keeps the seed its own request gives it, so every image equals the one its request alone would make), and
`split_result` gives each request back its images and a record of its own.

Calls merge when everything but the images agrees: steps, scheduler, guidance, the model at the call's size (image
size, frames), and no cache or trace (a cache's decisions depend on the whole batch, a trace file is per call).
Diffusers pipeline calls never merge: one generator seeds the whole pipeline call (pipelines.py), so another batch
would draw other noise.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from opendit.api.generation import Call, GenerationResult


def merge_key(call) -> tuple | None:
    """Calls with equal keys may share one denoising loop; None: this call runs alone."""
    if not isinstance(call, Call) or call.cache is not None or call.trace is not None:
        return None
    return (call.steps, call.scheduler, call.cfg_scale, repr(call.config.to_dict()))


def image_seeds(call: Call) -> list[int]:
    """The seed of each of the call's images: its own list, or seed + i."""
    if call.image_seeds is not None:
        return list(call.image_seeds)
    return [call.seed + i for i in range(len(call.classes))]


def merge_calls(calls: list[Call]) -> Call:
    """One Call denoising every image of `calls` (equal merge keys) in order, each image with its own seed."""
    if len(calls) == 1:
        return calls[0]
    keys = {merge_key(call) for call in calls}
    if None in keys or len(keys) != 1:
        raise ValueError("merge_calls needs calls with equal merge_key (same steps, scheduler, guidance and size)")
    classes = [label for call in calls for label in call.classes]
    seeds = [seed for call in calls for seed in image_seeds(call)]
    notes = list(dict.fromkeys(note for call in calls for note in call.notes))
    return replace(calls[0], classes=classes, image_seeds=seeds, notes=notes)


def split_result(result: GenerationResult, calls: list[Call]) -> list[GenerationResult]:
    """Each call's share of a merged result (in the order of `calls`): its images (and video frames), its labels
    and a copy of the record with its own request and the batch it ran in."""
    if len(calls) == 1:
        return [result]
    parts, start = [], 0
    total = sum(len(call.classes) for call in calls)
    for index, call in enumerate(calls):
        stop = start + len(call.classes)
        record = copy.deepcopy(result.record)
        record["request"] = call.request
        record["batch"] = {"requests": len(calls), "images": total, "index": index, "first_image": start}
        frames = None if result.frames is None else result.frames[start:stop]
        parts.append(
            GenerationResult(
                images=result.images[start:stop], labels=result.labels[start:stop], record=record, frames=frames
            )
        )
        start = stop
    return parts
