"""The request schema's bounds and per-field help (request.py): each bound with why it is what it is, and how each field
is spelled on the command line, what a valid value is and an example of one (what every error message says)."""

from __future__ import annotations

from dataclasses import dataclass

from opendit.cache.config import CACHE_FIELD_HELP
from opendit.diffusion.sampler import SCHEDULERS
from opendit.precision import DTYPES

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


@dataclass(frozen=True)
class FieldHelp:
    flag: str  # how the CLI spells the field
    what: str  # what a valid value is, with its bounds
    fix: str  # an example of a valid value


_DEGREE = f"an integer from 1 to {MAX_WORLD}"
_SWITCH = "True or False"
FIELD_HELP = {
    "model": FieldHelp("--model", "a preset name (`opendit models` lists them)", "e.g. --model DiT-XL/2"),
    "ckpt": FieldHelp("--ckpt", "a path to a .pt or .safetensors file", "e.g. --ckpt DiT-XL-2-256x256.pt"),
    "vae": FieldHelp("--vae", "a path to a local diffusers AutoencoderKL folder", "e.g. --vae ./sd-vae-ft-ema"),
    "dtype": FieldHelp("--dtype", f"one of {', '.join(DTYPES)}, auto", "e.g. --dtype bf16"),
    "device": FieldHelp("--device", "cpu, cuda or cuda:N", "e.g. --device cpu"),
    "nproc": FieldHelp("--nproc", f"an integer from 1 to {MAX_NPROC} (local processes)", "e.g. --nproc 2"),
    "parallel": FieldHelp("--dp/--ulysses/--ring/--tp", "an opendit ParallelConfig", "e.g. ParallelConfig(ulysses=2)"),
    "dp": FieldHelp("--dp", _DEGREE, "e.g. --dp 2"),
    "cfg": FieldHelp("--cfg-parallel", "1 or 2", "pass --cfg-parallel for 2"),
    "ulysses": FieldHelp("--ulysses", _DEGREE, "e.g. --ulysses 2"),
    "tp": FieldHelp("--tp", _DEGREE, "e.g. --tp 2"),
    "pipefusion": FieldHelp("--pipefusion", _DEGREE, "e.g. --pipefusion 2"),
    "patches": FieldHelp("--patches", "an integer from 0 to 65536 (0: one per stage)", "e.g. --patches 4"),
    "warmup_steps": FieldHelp("--warmup-steps", "an integer from 0 to 10000", "e.g. --warmup-steps 2"),
    "ring": FieldHelp("--ring", _DEGREE, "e.g. --ring 2"),
    "sp_impl": FieldHelp("--sp-impl", "auto or a registered strategy", "see `opendit plan --list-strategies`"),
    "shard_weights": FieldHelp("--shard-weights", _SWITCH, "pass --shard-weights or leave it out"),
    "comm_dtype": FieldHelp("--comm-dtype", "bf16, fp16 or None", "e.g. --comm-dtype bf16"),
    "token_shares": FieldHelp("", "None or a tuple of relative speeds", "e.g. token_shares=(1.0, 2.0)"),
    "token_shares[]": FieldHelp("", "a finite speed > 0", "e.g. token_shares=(1.0, 2.0)"),
    "balance_tokens": FieldHelp("--balance-tokens", _SWITCH, "pass --balance-tokens or leave it out"),
    "parallel_auto": FieldHelp("--parallel", _SWITCH, "pass --parallel auto or leave it out"),
    "memory_gib": FieldHelp(
        "--memory-gib", f"a number of GiB from 0 to {MAX_MEMORY_GIB} (memory per rank)", "e.g. --memory-gib 2"
    ),  # fmt: skip
    "image_size": FieldHelp("--image-size", f"an integer from 1 to {MAX_IMAGE_SIZE} (pixels)", "e.g. --image-size 256"),
    "progress": FieldHelp("--no-progress", _SWITCH, "pass --no-progress or leave it out"),
    "classes": FieldHelp("--classes", f"a list of 1 to {MAX_CLASSES} integer class ids", "e.g. --classes 0 1 2"),
    "classes[]": FieldHelp("--classes", "an integer class id (0 or more)", "e.g. --classes 0 1 2"),
    "seed": FieldHelp("--seed", "an integer from 0 to 2**64 - 1 (image i uses seed + i)", "e.g. --seed 0"),
    "steps": FieldHelp("--steps", f"an integer from 1 to {MAX_STEPS}", "try --steps 30"),
    "scheduler": FieldHelp("--scheduler", f"one of {', '.join(SCHEDULERS)}", "e.g. --scheduler ddim"),
    "cfg_scale": FieldHelp(
        "--cfg-scale", f"a finite number from 1 to {MAX_CFG_SCALE:g} (1 disables guidance)", "e.g. --cfg-scale 4"
    ),
    "out": FieldHelp("--out", "a folder path", "e.g. --out outputs"),
    "diffusers": FieldHelp("--diffusers", "a local diffusers pipeline folder", "e.g. --diffusers ./PixArt-XL-2-512"),
    "prompt": FieldHelp("--prompt", f"a list of 1 to {MAX_CLASSES} prompts (text)", 'e.g. --prompt "a photo of a cat"'),
    "prompt[]": FieldHelp("--prompt", f"a text of at most {MAX_PROMPT_CHARS} characters", 'e.g. --prompt "a cat"'),
    "negative_prompt": FieldHelp(
        "--negative-prompt", f"a text of at most {MAX_PROMPT_CHARS} characters", 'e.g. --negative-prompt "blurry"'
    ),
    "trace": FieldHelp("--trace", "a file path", "e.g. --trace trace.json"),
    "video": FieldHelp("--video", _SWITCH, "pass --video or leave it out"),
    "motion": FieldHelp("--motion", "a list of directions (right, left, down, up)", "e.g. --motion right up"),
    "motion[]": FieldHelp("--motion", "a direction: right, left, down or up", "e.g. --motion right"),
    "frames": FieldHelp("--frames", "an integer from 1 to 1024 (the video model's own frame count)", "e.g. --frames 8"),
}
FIELD_HELP.update({name: FieldHelp(*entry) for name, entry in CACHE_FIELD_HELP.items()})
