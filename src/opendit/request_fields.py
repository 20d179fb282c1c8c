"""The request schema's bounds (request.py): each with why it is what it is."""

from __future__ import annotations

# Bounds (inclusive). Each is a limit of the code or of the hardware, not a taste:
MAX_STEPS = 1000  # every scheduler here runs on DiT's 1000-step training schedule; diffusers' DDPM/DDIM refuse more
MAX_CLASSES = 1024  # images per call: one batch (x2 with guidance) is held at once on every rank; >= ImageNet's 1000
MAX_CLASS_ID = 2**31 - 1  # labels are int64 tensors; no model has more classes (the model's own range is checked too)
MAX_IMAGE_SIZE = 8192  # pixels per side: DiT-XL/2 at 8192 px is 262,144 tokens, past what one generation can hold
MAX_CFG_SCALE = 100.0  # guidance saturates images long before (DiT uses 1.5-4); keeps s * (cond - uncond) far from inf
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes -2**63 .. 2**64 - 1 and wraps negatives (-1 == 2**64 - 1),
# so seeds are 0 .. 2**64 - 1 and image i's seed + i must stay in range (image i draws its noise from seed + i)
MAX_WORLD = 1024  # each mesh degree and their product: one process per device; past any job this code targets
MAX_NPROC = 256  # --nproc starts local processes, each holding a model replica: 16x the largest node (16 GPUs)
MAX_PATH_BYTES = 4096  # Linux PATH_MAX: longer paths fail in every os call (ENAMETOOLONG)
MAX_MEMORY_GIB = 1 << 20  # per rank: a PiB, far beyond any device, still a finite number
MAX_NAME_BYTES = 255  # Linux NAME_MAX, per path component
MAX_PROMPT_CHARS = 1 << 16  # per prompt: text encoders read at most a few hundred tokens (CLIP 77, T5 512) of it


_DEGREE = f"an integer from 1 to {MAX_WORLD}"
_SWITCH = "True or False"
