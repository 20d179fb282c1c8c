"""OpenDiT: fast, memory-efficient, exact multi-device inference and training of Diffusion Transformers.

The public names load on first use, so that a worker process (training, calibration) that needs only one submodule
does not pay for importing the engine, the sampler and diffusers.
"""

import importlib

from opendit.errors import OpenDiTError

_EXPORTS = {
    "Engine": "opendit.engine",
    "generate": "opendit.engine",
    "GenerationRequest": "opendit.api.generation",
    "GenerationResult": "opendit.io.outputs",
    "save_outputs": "opendit.io.outputs",
    "parallelize": "opendit.parallel.entry",
    "ParallelConfig": "opendit.distributed.config",
}
__all__ = ["Engine", "OpenDiTError", "GenerationRequest", "GenerationResult", "ParallelConfig", "generate",
           "parallelize", "save_outputs"]  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'opendit' has no attribute {name!r}")
