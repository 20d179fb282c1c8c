"""One-GPU smoke check of OpenDiT (issue 36): one command, under 10 minutes, a JSON summary on stdout.

    python scripts/gpu_smoke_1gpu.py            # or: make gpu-smoke

Checks (docs/gpu.md has the tolerances and why):
- cpu_vs_cuda_fp32: the shipped digits model, 10 classes, on CPU and on cuda:0 in fp32 (TF32 off): images within 1/255;
- cuda_bf16_vs_fp32: the same in bf16 on the GPU, against fp32 (reported: bf16 drift, not an exactness claim);
- device_timing: record.json's per-step times on CUDA are device time (each step synchronised): positive, summing to
  the sampling time, which is less than the call's total;
- attention_chain: ring/USP's attention with log-sum-exp on this GPU in fp32/bf16/fp16 (flash -> efficient -> math):
  the kernel chosen and why, output within 1e-2 (half) / 1e-4 (fp32) of the math path;
- compute_calibration: `opendit calibrate`'s compute part on the GPU (synchronised timings): matmul / attention rates;
- gpu_shortfall: `opendit sample --nproc <GPUs + 1>` is refused with one line naming --device cpu (no silent CPU run);
- xl_vs_diffusers: DiT-XL/2 width (28 blocks, 1152 wide, 256 tokens) forward time against diffusers'
  DiTTransformer2DModel with the same weights (testing/dit_to_diffusers.py), batch 2 and 16, fp32 and bf16.
Exit status 0 when every check passed (or, on a machine without a GPU, after one line saying so), else 1.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke_common import Smoke, array_diff, need_gpus, opendit  # noqa: E402


def no_tf32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: exactness is compared without TF32
    torch.backends.cudnn.allow_tf32 = False


def cpu_vs_cuda() -> dict:
    import opendit

    classes = list(range(10))
    cpu = opendit.generate(classes=classes, seed=0, device="cpu", progress=False)
    cuda = opendit.generate(classes=classes, seed=0, device="cuda:0", progress=False)
    diff = array_diff(cpu.images, cuda.images)
    return {"ok": diff["max_levels"] <= 1, "bound_levels": 1, **diff, "cuda_record_device": cuda.record["device"]}


def bf16_vs_fp32() -> dict:
    import opendit

    classes = list(range(10))
    fp32 = opendit.generate(classes=classes, seed=0, device="cuda:0", progress=False)
    bf16 = opendit.generate(classes=classes, seed=0, device="cuda:0", dtype="bf16", progress=False)
    return {"ok": None, **array_diff(fp32.images, bf16.images)}


def device_timing() -> dict:
    import opendit

    result = opendit.generate(classes=list(range(10)), seed=0, device="cuda:0", progress=False)
    timing = result.record["timing"]
    steps = timing["per_step_s"]
    consistent = math.isclose(sum(steps), timing["sampling_s"], rel_tol=1e-6)
    return {
        "ok": consistent and timing["sampling_s"] < timing["total_s"] and min(steps) > 0,
        "steps": len(steps),
        "per_step_ms_median": 1e3 * sorted(steps)[len(steps) // 2],
        "sampling_s": timing["sampling_s"],
        "total_s": timing["total_s"],
    }


def attention_chain() -> dict:
    import torch

    from opendit.parallel.attention.ring import attention_kernels, attention_math_lse, attention_with_lse

    out = {}
    ok = True
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape = (2, 16, 256, 72)  # (B, H, S, D): DiT-XL/2's heads and head dim at 256 tokens
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
        got, lse = attention_with_lse(q, k, v)
        want, want_lse = attention_math_lse(q, k, v)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        lse_err = float((lse - want_lse).abs().max())
        ok &= err <= bound and lse_err <= 1e-2
        out[str(dtype).removeprefix("torch.")] = {"rel_err": err, "lse_abs_err": lse_err, "bound": bound}
    return {"ok": ok, **out, "kernels": attention_kernels()}


def compute_calibration() -> dict:
    import torch

    from opendit.planning.calibrate import measure_compute

    rates = measure_compute(quick=True, device=torch.device("cuda", 0))
    rates.pop("raw")
    positive = all(math.isfinite(v) and v >= 0 for v in rates.values())
    return {"ok": positive and rates["matmul_flops"] > 1e12, "matmul_tflops": rates["matmul_flops"] / 1e12,
            "attn_tflops": rates["attn_flops"] / 1e12, "mem_bw_gbs": rates["mem_bw"] / 1e9,
            "block_overhead_us": rates["block_overhead_s"] * 1e6, "half_speedup": rates["half_speedup"]}  # fmt: skip


def gpu_shortfall(gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = opendit(["sample", "--nproc", str(gpus + 1), "--classes", "0", "--steps", "2", "--out", tmp], 120)
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {"ok": done.returncode == 2 and "--device cpu" in line, "exit": done.returncode, "message": line}


def xl_vs_diffusers() -> dict:
    import torch

    from opendit.models.dit import build_dit, perturb_weights, preset
    from opendit.testing.dit_to_diffusers import to_diffusers_dit

    config = preset("DiT-XL/2")
    ours = perturb_weights(build_dit(config).eval(), std=0.02, seed=1)  # on CPU, fp32
    theirs = to_diffusers_dit(ours)
    rows, ok = [], True
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        a = ours.to("cuda", dtype)
        b = theirs.to("cuda", dtype)
        for batch in (2, 16):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, config.in_channels, *config.input_size, generator=gen).to("cuda", dtype)
            t = torch.randint(0, 1000, (batch,), generator=gen).float().to("cuda")
            y = torch.randint(0, config.num_classes, (batch,), generator=gen).to("cuda")
            with torch.inference_mode():
                ms_ours = time_forward(lambda a=a, x=x, t=t, y=y: a(x, t, y))
                ms_theirs = time_forward(lambda b=b, x=x, t=t, y=y: b(hidden_states=x, timestep=t, class_labels=y))
                want = b(hidden_states=x, timestep=t, class_labels=y).sample.float()
                err = float((a(x, t, y).float() - want).abs().max() / want.abs().max())
            ok &= err <= bound
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "tokens": config.num_tokens,
                         "opendit_ms": ms_ours, "diffusers_ms": ms_theirs, "speedup": ms_theirs / ms_ours,
                         "rel_err": err, "bound": bound})  # fmt: skip
    return {"ok": ok, "model": "DiT-XL/2 width, random weights", "rows": rows}


def time_forward(fn, reps: int = 20, warmup: int = 5) -> float:
    """Milliseconds per call, device time (CUDA events around `reps` calls after `warmup`)."""
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    gpus = need_gpus(1, "gpu_smoke_1gpu")
    no_tf32()
    smoke = Smoke("gpu_smoke_1gpu")
    began = time.perf_counter()
    smoke.run("cpu_vs_cuda_fp32", cpu_vs_cuda)
    smoke.run("cuda_bf16_vs_fp32", bf16_vs_fp32)
    smoke.run("device_timing", device_timing)
    smoke.run("attention_chain", attention_chain)
    smoke.run("compute_calibration", compute_calibration)
    smoke.run("gpu_shortfall", gpu_shortfall, gpus)
    smoke.run("xl_vs_diffusers", xl_vs_diffusers)
    smoke.header["wall_s"] = round(time.perf_counter() - began, 1)
    return smoke.finish()


if __name__ == "__main__":
    sys.exit(main())
