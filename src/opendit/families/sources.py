"""Where an engine's model comes from, and so which runner generates with it: each source names the request field
that selects it and the function that resolves an engine request to its spec (checked, no weights read). The first
source whose field the request sets is taken; the last, with no field, is the default (OpenDiT's own checkpoints and
presets). A new kind of source (e.g. a single-file diffusers checkpoint) is one more entry here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    field: str | None  # the engine request field that selects this source (None: the default)
    resolver: str  # "module:function", (EngineRequest, images, cfg_scale) -> spec


SOURCES = (
    Source("diffusers pipeline folder", "diffusers", "opendit.api.pipelines:resolve_pipeline_engine"),
    Source("OpenDiT checkpoint or preset", None, "opendit.api.generation:resolve_checkpoint_engine"),
)


def resolve_source(settings, images: int | None, cfg_scale: float | None):
    """The spec of the engine request, from the source it names (see the module docstring)."""
    source = next(s for s in SOURCES if s.field is None or getattr(settings, s.field, None) is not None)
    module, name = source.resolver.split(":")
    return getattr(importlib.import_module(module), name)(settings, images, cfg_scale)
