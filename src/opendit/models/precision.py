"""The precision knob: `--dtype fp32|bf16|fp16` for weights and activations, and where fp32 is kept regardless.

Weights are stored in the compute dtype (checkpoint.load_model casts each tensor once, while loading). Activations
follow the weights, except in these **fp32 islands**, kept because their numerics need it:

- the sinusoidal timestep embedding (models/layers.py: `timestep_embedding`), fed to its MLP in the compute dtype;
- LayerNorm and the adaLN modulation `norm(x) * (1 + scale) + shift` (models/dit.py: `norm_modulate`); the adaLN
  linear itself runs in the compute dtype (fp32 accumulation inside the matmul), its outputs are upcast at once;
- the adaLN-Zero gates: `gate * branch(x)` is formed in fp32 before it is added to the residual stream;
- the residual stream itself under fp16 (see "fp16 overflow guard" below);
- softmax statistics: SDPA (flash/memory-efficient kernels, CPU and CUDA) keeps the running max and sum in fp32;
  ring attention (parallel/attention/ring.py) merges partial outputs with their log-sum-exp in fp32 - the ring
  kernel's owner keeps that invariant, this module only records it;
- the sampler: the latents, the scheduler state and the CFG combine are fp32 (diffusion/sampler.py casts the model
  output with `.float()` before touching them), so a 50-step loop does not accumulate half-precision rounding.

**fp16 overflow guard.** fp16's largest finite value is 65504. The DiT residual stream is a sum over blocks of
`gate * branch` and grows with depth (trained transformers develop a few "massive" channels); any branch input is a
LayerNorm output (|x| <= sqrt(C)) modulated by `1 + scale`, so it stays small. The strategy is therefore **fp32
residual accumulation**: under fp16 the residual stream `tokens` (B, S, C) is kept in fp32 (`residual_dtype`),
every branch (qkv, attention, proj, MLP) still computes in fp16 on its normalised input, and its gated output is
added in fp32. Cost: one (B, S, C) fp32 tensor per rank instead of fp16, i.e. +S*C*2 bytes - small next to the
(B, S, 4C) MLP hidden state. Nothing is clamped (clamping changes results silently). If a branch still overflows
(a checkpoint whose weights push a normalised input past 65504), `check_finite` on the model output raises an
OpenDiTError that names bf16 (fp32's exponent range) as the fix instead of returning NaN images. bf16 has the
exponent range of fp32, so its residual stream stays in bf16 (halving activation memory); measured drift on the
digits model is reported in tests/test_precision.py and docs/precision.md.

**Communication dtype.** Collectives carry tensors in the dtype they have, i.e. the compute dtype: sequence-parallel
kernels exchange q/k/v/attention outputs that come out of compute-dtype linears, and `token_gather` moves the final
layer's output (compute dtype). The residual stream never crosses ranks. The one override is
`ParallelConfig.comm_dtype` (`--comm-dtype`), which the runtime (parallel/apply.py) passes to every
`parallel.comm.Comm` it builds; `Comm` then casts wider floating tensors to that dtype on the wire and back on arrival
(never narrower ones: bf16 data is not re-rounded through fp16). Sharded weights (parallel/sharding.py) are gathered in
their storage dtype, never through comm_dtype, so that sharding stays exact.
"""

import torch

from opendit.errors import OpenDiTError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP16_MAX = torch.finfo(torch.float16).max  # 65504


AUTO = "auto"  # --dtype auto: bf16 where this device computes it fast and the model documents its drift
AUTO_MIN_SPEEDUP = 1.25  # bf16 must beat fp32 by this much (a DiT block, calibrated) to be chosen


def choose_dtype(half_speedup: float, bf16_drift: str | None, speeds_source: str) -> tuple[str, str]:
    """--dtype auto -> ("bf16" | "fp32", why). bf16 when the calibrated block speed-up reaches AUTO_MIN_SPEEDUP and
    the model documents its bf16 drift (ModelSpec.bf16_drift); fp32 otherwise, saying which condition failed."""
    if bf16_drift is None:
        return "fp32", "the model documents no bf16 drift, so fp32"
    if half_speedup < AUTO_MIN_SPEEDUP:
        return "fp32", (
            f"bf16 is {half_speedup:.2f}x fp32 here (< {AUTO_MIN_SPEEDUP}x; {speeds_source}), so fp32"
            + ("; run `opendit calibrate` to measure it" if half_speedup == 1.0 else "")
        )
    return "bf16", f"bf16 is {half_speedup:.2f}x fp32 here ({speeds_source}); documented drift: {bf16_drift}"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise OpenDiTError(f"unsupported dtype {name}; choose one of {', '.join(DTYPES)}")
    if name not in DTYPES:
        raise OpenDiTError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


def residual_dtype(compute: torch.dtype) -> torch.dtype:
    """Dtype of the residual stream for a compute dtype: fp32 under fp16 (the overflow guard), else the same."""
    return torch.float32 if compute == torch.float16 else compute


def check_finite(x: torch.Tensor, what: str = "model output") -> torch.Tensor:
    """Raise an actionable OpenDiTError if half-precision `x` holds inf/NaN (an fp16 overflow); return x."""
    if x.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(x).all()):
        raise OpenDiTError(
            f"{what} has inf/NaN values in {dtype_name(x.dtype)}: a layer overflowed the half-precision range "
            f"(fp16 max {FP16_MAX:.0f}); run with --dtype bf16 (fp32's exponent range) or --dtype fp32"
        )
    return x
