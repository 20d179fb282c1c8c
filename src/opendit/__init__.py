"""OpenDiT: fast, memory-efficient, exact multi-device inference and training of Diffusion Transformers."""

from opendit.errors import OpenDiTError
from opendit.generation import GenerationRequest, GenerationResult, generate, save_outputs

__all__ = ["OpenDiTError", "GenerationRequest", "GenerationResult", "generate", "save_outputs"]
__version__ = "0.1.0"
