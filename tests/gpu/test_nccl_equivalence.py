"""The GPU lane: every plan on 2-4 GPUs over NCCL gives the one-GPU output, within GPU tolerances (`make test-gpu`).

Skipped, with one line, unless OPENDIT_GPU=1 (the CPU suite hides CUDA) and at least 2 GPUs are visible. One world of
min(GPUs, 4) processes (opendit's launcher, cuda:LOCAL_RANK + NCCL as an engine worker joins) runs every plan of
tests/test_parallel_equivalence.py for world sizes 2..W on ranks 0..n-1, plus --balance-tokens over NCCL, against the
same model on the rank's own GPU in one process. Tolerances (docs/gpu.md):
- fp32 with TF32 off (cuBLAS and cuDNN): max relative error of the model output <= 1e-5 (cuBLAS picks kernels by
  shape, so a rank's token block rounds differently from the whole sequence; the tp all-reduce sums in another order),
  sampled images within 1/255;
- bf16 (weights and activations): max relative error <= 1e-2 against one bf16 GPU, images within 8/255 (the bound of
  the capability matrix for bf16).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

GPUS = torch.cuda.device_count() if os.environ.get("OPENDIT_GPU") == "1" and torch.cuda.is_available() else 0
if GPUS < 2:  # one line for the whole lane
    pytest.skip(f"GPU lane: needs >= 2 visible GPUs and OPENDIT_GPU=1 (make test-gpu); {GPUS} visible",
                allow_module_level=True)  # fmt: skip
pytestmark = pytest.mark.slow

FP32_REL, BF16_REL = 1e-5, 1e-2  # max relative error of the model output vs one GPU
FP32_LEVELS, BF16_LEVELS = 1, 8  # max 8-bit image difference vs one GPU
STEPS = 4  # the balancer re-splits after 1 warm-up + 2 measured steps


def nccl_world(dtype_name: str) -> list[dict]:
    """One rank of the GPU world: every plan at every world size 2..W on ranks 0..n-1; every rank's rows."""
    import torch.distributed as dist

    from helpers import EQUIVALENCE_MODELS, equivalence_reference, gather_rows, rel_err
    from opendit.api.generation import decode
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env, pick_device
    from opendit.distributed.mesh import build_runtime
    from opendit.engine.sampler_runner import sample_images
    from opendit.parallel.apply import parallelize
    from test_parallel_equivalence import PLANS

    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is tested in fp32 proper, not TF32
    torch.backends.cudnn.allow_tf32 = False
    device, backend = pick_device(None)
    assert backend == "nccl" and device.type == "cuda", (device, backend)
    init_from_env(device, backend)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    world = dist.get_world_size()
    plans = [(w, p) for w, ps in PLANS.items() if w <= world for p in ps]
    plans.append((2, ParallelConfig(ring=2, balance_tokens=True)))
    rows = []
    for name in EQUIVALENCE_MODELS:
        case = equivalence_reference(name, STEPS, device, dtype)
        for size, plan in plans:
            runtime = build_runtime(plan, device, ranks=list(range(size)))  # collective over the whole world
            if runtime is None:
                continue
            pmodel = parallelize(copy.deepcopy(case.reference), runtime)
            with torch.no_grad():
                out = pmodel(case.x, case.t, case.y)  # (2B, C_out, H, W)
            samples = sample_images(pmodel, case.labels, case.shape, **case.kwargs).samples
            img = decode(samples, case.config, None, device)
            rows.append({"model": name, "world": size, "plan": plan.describe(), "rank": runtime.index,
                         "backend": runtime.comms["all"].backend, "out_err": rel_err(out, case.ref_out),
                         "img_diff": int(np.abs(img.astype(int) - case.ref_img.astype(int)).max()),
                         "balance": pmodel.balancer.history if pmodel.balancer is not None else None})  # fmt: skip
    return gather_rows(rows)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def gpu_rows(request):
    from opendit.distributed.launch import launch

    return request.param, launch(nccl_world, min(GPUS, 4), (request.param,))


def test_every_plan_on_nccl_matches_one_gpu(gpu_rows):
    dtype, rows = gpu_rows
    rel, levels = (FP32_REL, FP32_LEVELS) if dtype == "fp32" else (BF16_REL, BF16_LEVELS)
    assert rows and {row["backend"] for row in rows} == {"nccl"}
    bad = [row for row in rows if row["out_err"] > rel or row["img_diff"] > levels]
    assert not bad, f"{dtype}: beyond {rel} relative / {levels} levels: {bad}"


def test_balance_tokens_runs_over_nccl(gpu_rows):
    """Item 1 of issue 36 on real NCCL: the balancer's busy-time exchange ran (it all-gathers on the GPU)."""
    _, rows = gpu_rows
    balanced = [row for row in rows if "balance" in row["plan"] or row["balance"]]
    assert balanced and all(row["balance"] for row in balanced), balanced
