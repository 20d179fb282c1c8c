"""Multi-GPU smoke check of OpenDiT (issue 36): one command, under 10 minutes, a JSON summary on stdout.

    python scripts/gpu_smoke_multi.py           # or: make gpu-smoke; needs >= 2 GPUs (4 adds the 4-rank plans)

Every run is `opendit sample` as a user types it (the shipped digits models, 8 images, 10 steps, NCCL on
cuda:LOCAL_RANK), compared with the same request on one GPU (docs/gpu.md has the tolerances):
- plans: every plan on 2 GPUs (ulysses, ulysses non-overlapped, fastseq, ring, cfg, dp, tp, sharded weights,
  --balance-tokens over ring and ulysses, PipeFusion) and on 4 GPUs when there are 4 (usp 2x2, ulysses 4, cfg x
  ulysses, dp x cfg): exact plans within 1/255; bf16 on the wire within 8/255; PipeFusion's stale activations within
  8/255 mean; ring and usp in bf16 (the attention fallback chain on this GPU) within 8/255 of one bf16 GPU, with the
  kernel chosen read from record.json;
- balance_tokens: the balancer's busy-time exchange ran over NCCL (record.json's token_balance);
- torchrun: `torchrun --nproc-per-node 2 ... sample --ulysses 2` equals the one-GPU images;
- dsp_video: `sample --video --sp-impl dsp` on 2 GPUs equals one GPU, every frame;
- fault_injection: rank 1 raising at step 2 ends the whole NCCL job with its message, well before any hang;
- calibrate: `opendit calibrate --backend nccl --nproc 2 --quick` (per-rank GPUs, device timings) and the planner's
  loader finds that file (a throwaway OPENDIT_CACHE);
- device_cuda_n: `--device cuda:1` in one process runs on GPU 1 (record.json's device);
- gpu_shortfall: `--nproc <GPUs + 1>` is refused with one line naming --device cpu.
Exit status 0 when every check passed (or, with fewer than 2 GPUs, after one line saying so), else 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke_common import CLI, Smoke, image_diff, need_gpus, opendit, sample_cli  # noqa: E402

BASE = ["--device", "cuda", "--classes", "0", "1", "2", "3", "4", "5", "6", "7", "--seed", "0", "--steps", "10"]
BOUNDS = {"exact": (1, None), "bf16": (8, None), "stale": (255, 8.0)}  # (max, mean) in 1/255
PLANS_2 = {
    "ulysses2": (["--ulysses", "2"], "exact"),
    "ulysses2-plain": (["--ulysses", "2", "--sp-impl", "ulysses"], "exact"),
    "fastseq2": (["--ulysses", "2", "--sp-impl", "fastseq"], "exact"),
    "ring2": (["--ring", "2"], "exact"),
    "cfg2": (["--cfg-parallel"], "exact"),
    "dp2": (["--dp", "2"], "exact"),
    "tp2": (["--tp", "2"], "exact"),
    "ulysses2-sharded": (["--ulysses", "2", "--shard-weights"], "exact"),
    "ring2-balanced": (["--ring", "2", "--balance-tokens"], "exact"),
    "ulysses2-balanced": (["--ulysses", "2", "--balance-tokens"], "exact"),
    "ulysses2-bf16-wire": (["--ulysses", "2", "--comm-dtype", "bf16"], "bf16"),
    "pipefusion2": (["--pipefusion", "2"], "stale"),
}
PLANS_4 = {
    "usp2x2": (["--ulysses", "2", "--ring", "2"], "exact"),
    "ulysses4": (["--ulysses", "4"], "exact"),
    "cfg2-ulysses2": (["--cfg-parallel", "--ulysses", "2"], "exact"),
    "dp2-cfg2": (["--dp", "2", "--cfg-parallel"], "exact"),
}
BF16_PLANS = {"ring2": (2, ["--ring", "2"]), "usp2x2": (4, ["--ulysses", "2", "--ring", "2"])}  # (GPUs, flags)


def judge(diff: dict, kind: str) -> bool:
    bound_max, bound_mean = BOUNDS[kind]
    return diff["max_levels"] <= bound_max and (bound_mean is None or diff["mean_levels"] <= bound_mean)


def plans(tmp: Path, gpus: int) -> dict:
    one = tmp / "one-gpu"
    sample_cli(one, ["--nproc", "1", *BASE])
    table = {**PLANS_2, **(PLANS_4 if gpus >= 4 else {})}
    rows, ok = {}, True
    for name, (flags, kind) in table.items():
        nproc = 4 if name in PLANS_4 else 2
        out = tmp / name
        try:
            record = sample_cli(out, ["--nproc", str(nproc), *flags, *BASE])
        except Exception as exc:
            rows[name], ok = {"ok": False, "error": str(exc)[-400:]}, False
            continue
        diff = image_diff(one, out)
        good = judge(diff, kind) and record["parallel"]["backend"] == "nccl"
        rows[name] = {"ok": good, "judge": kind, **diff, "backend": record["parallel"]["backend"],
                      "per_step_ms": 1e3 * record["timing"]["sampling_s"] / len(record["timing"]["per_step_s"]),
                      "token_balance": record["parallel"].get("token_balance")}  # fmt: skip
        ok &= good
    return {"ok": ok, "plans": rows}


def bf16_plans(tmp: Path, gpus: int) -> dict:
    one = tmp / "one-gpu-bf16"
    sample_cli(one, ["--nproc", "1", "--dtype", "bf16", *BASE])
    rows, ok = {}, True
    for name, (nproc, flags) in BF16_PLANS.items():
        if nproc > gpus:
            continue
        out = tmp / f"{name}-bf16"
        record = sample_cli(out, ["--nproc", str(nproc), "--dtype", "bf16", *flags, *BASE])
        diff = image_diff(one, out)
        rows[name] = {"ok": judge(diff, "bf16"), **diff, "kernels": record["parallel"].get("attention_kernels")}
        ok &= rows[name]["ok"] and bool(rows[name]["kernels"])
    return {"ok": ok, "plans": rows}


def balance_tokens(tmp: Path) -> dict:
    record = json.loads((tmp / "ring2-balanced" / "record.json").read_text())
    history = record["parallel"].get("token_balance")
    return {"ok": bool(history), "history": history, "token_split": record["parallel"].get("token_split")}


def torchrun(tmp: Path) -> dict:
    script = tmp / "opendit_cli.py"
    script.write_text(CLI + "\n")
    out = tmp / "torchrun"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), "sample", "--no-progress", "--ulysses", "2", *BASE, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0:
        return {"ok": False, "exit": done.returncode, "stderr": done.stderr.strip()[-600:]}
    diff = image_diff(tmp / "one-gpu", out)
    return {"ok": judge(diff, "exact"), **diff}


def dsp_video(tmp: Path) -> dict:
    video = ["--video", "--device", "cuda", "--classes", "3", "7", "--motion", "right", "up", "--seed", "0",
             "--steps", "10"]  # fmt: skip
    sample_cli(tmp / "video-one", ["--nproc", "1", *video])
    record = sample_cli(tmp / "video-dsp", ["--nproc", "2", "--sp-impl", "dsp", *video])
    diff = image_diff(tmp / "video-one", tmp / "video-dsp")
    return {"ok": judge(diff, "exact"), **diff, "backend": record["parallel"]["backend"]}


def fault_injection(tmp: Path) -> dict:
    env = {"OPENDIT_FAULT_INJECT": "rank=1,step=2", "OPENDIT_PG_TIMEOUT_S": "60"}
    began = time.perf_counter()
    done = opendit(["sample", "--no-progress", "--nproc", "2", "--ulysses", "2", *BASE, "--out", str(tmp / "fault")],
                   timeout=240, env=env)  # fmt: skip
    seconds = time.perf_counter() - began
    said = "injected fault on rank 1 at step 2" in done.stderr
    return {"ok": done.returncode != 0 and said and seconds < 120, "exit": done.returncode, "seconds": seconds,
            "message": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}  # fmt: skip


def calibrate(tmp: Path) -> dict:
    env = {"OPENDIT_CACHE": str(tmp / "cache")}
    done = opendit(["calibrate", "--backend", "nccl", "--nproc", "2", "--quick", "--force"], timeout=300, env=env)
    if done.returncode != 0:
        return {"ok": False, "exit": done.returncode, "stderr": done.stderr.strip()[-600:]}
    probe = "from opendit.planning.speeds import resolve_speeds; print(resolve_speeds().source)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})  # fmt: skip
    source = found.stdout.strip()
    return {"ok": source.startswith("opendit calibrate"), "loader_source": source, "output": done.stdout.strip()}


def device_cuda_n(tmp: Path) -> dict:
    record = sample_cli(tmp / "cuda1", ["--device", "cuda:1", "--classes", "0", "1", "--steps", "4"])
    return {"ok": record["device"] == "cuda:1", "device": record["device"]}


def gpu_shortfall(tmp: Path, gpus: int) -> dict:
    done = opendit(["sample", "--nproc", str(gpus + 1), "--classes", "0", "--steps", "2", "--out", str(tmp / "x")], 120)
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {"ok": done.returncode == 2 and "--device cpu" in line, "exit": done.returncode, "message": line}


def main() -> int:
    gpus = need_gpus(2, "gpu_smoke_multi")
    smoke = Smoke("gpu_smoke_multi")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        smoke.run("plans", plans, tmp, gpus)
        smoke.run("balance_tokens", balance_tokens, tmp)
        smoke.run("bf16_ring_usp", bf16_plans, tmp, gpus)
        smoke.run("torchrun", torchrun, tmp)
        smoke.run("dsp_video", dsp_video, tmp)
        smoke.run("fault_injection", fault_injection, tmp)
        smoke.run("calibrate", calibrate, tmp)
        smoke.run("device_cuda_n", device_cuda_n, tmp)
        smoke.run("gpu_shortfall", gpu_shortfall, tmp, gpus)
    return smoke.finish()


if __name__ == "__main__":
    sys.exit(main())
