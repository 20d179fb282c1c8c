"""The precision knob: --dtype fp32|bf16|fp16 for weights and activations.

fp32 islands (kept in fp32 whatever the knob says, because their numerics need it): the sinusoidal timestep
embedding, adaLN modulation and LayerNorm (models/dit.py: norm_modulate), the scheduler state and the CFG combine
(diffusion/sampler.py works on fp32 tensors), softmax statistics (SDPA accumulates in fp32) and the ring merge.
"""

import torch

from opendit.errors import OpenDiTError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise OpenDiTError(f"unsupported dtype {name}; choose one of {', '.join(DTYPES)}")
    if name not in DTYPES:
        raise OpenDiTError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
