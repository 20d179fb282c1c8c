"""OpenDiT's sequence parallelism vs diffusers' own context parallelism, side by side, on the same diffusers
transformer, the same inputs, in the same run -> JSON + Markdown table + PNG (benchmarks/results/vs_diffusers.*).

    .venv/bin/python benchmarks/vs_diffusers.py                  # all four models (~15-20 min on 2 quiet cores)
    .venv/bin/python benchmarks/vs_diffusers.py --models qwenimage flux2 --passes 5   # ~7-10 min; merged into the file
    .venv/bin/python benchmarks/vs_diffusers.py --quick --out /tmp/vsd   # few tokens / blocks, 2 passes: smoke test
    .venv/bin/python benchmarks/vs_diffusers.py --models flux --dtypes fp32 --passes 7
    .venv/bin/python benchmarks/vs_diffusers.py --from-json benchmarks/results/vs_diffusers.json   # re-render

One result file, many runs: a run measures the (model, dtype)s it is given and MERGES them into OUT.json (default
benchmarks/results/vs_diffusers.json): its rows replace the rows of those (model, dtype)s, every other row stays, so
`--models qwenimage flux2` keeps the Flux and Wan rows. Every row carries "run" (the run's UTC start, its id) and
"loadavg_at_start"; "runs" keeps one record per run that still has rows (job, machine, loads after each pass, wall
time, stock failures, checksums). A file written before runs were tagged counts as one run dated by the git commit
that wrote it. A --quick run and a full one are never merged: the script refuses before measuring (give another
--out, as a smoke test should, or --fresh); `--fresh` writes only this run's rows. Speedups are same-run, same-pass
ratios, so rows of different runs stand on their own; the table says which run each row comes from and how loaded
the machine was.

Models (random weights, seed 0, identical in every process; checked by a parameter checksum per process), all at
DiT-XL width: 16 heads x 72 head_dim = 1152 hidden; text 1024 wide unless said otherwise:
  flux       FluxTransformer2DModel, axes_dims_rope (8, 32, 32), 2 double-stream + 2 single-stream blocks,
             in_channels 64, pooled 768, no guidance embedding; 1024 image tokens (32 x 32 grid ids) + 256 text
             tokens, batch 1.
  wan        WanTransformer3DModel (RoPE splits 72 into t/h/w = 24/24/24), ffn 4608, text_dim 4096, 2 blocks; latent
             (1, 16, 9, 32, 32) with patch (1, 2, 2) -> 2304 video tokens, 256 text tokens, batch 1.
  qwenimage  QwenImageTransformer2DModel, axes_dims_rope (8, 32, 32) over (frame, row, column), 2 (double-stream,
             joint-attention) blocks, in_channels 64 (16 latent channels packed 2 x 2), out 16; 1024 image tokens
             (`img_shapes=[[(1, 32, 32)]]`) + 256 text tokens, batch 1, no encoder_hidden_states_mask (every text
             token valid, what a mask of ones means).
  flux2      Flux2Transformer2DModel, axes_dims_rope (18, 18, 18, 18) over (t, h, w, l) (four equal parts as
             released), 2 double-stream + 2 single-stream (fused qkv+MLP) blocks, in_channels 128 (32 latent
             channels packed 2 x 2), mlp_ratio 3, guidance embedding (guidance 4.0); 1024 image tokens + 256 text
             tokens, ids (1, tokens, 4) as the pipeline passes them (img (0, h, w, 0), text (0, 0, 0, l)), batch 1.
Each in fp32 and bf16 (`model.to(dtype)`, inputs cast; the same cast model in every configuration). `--quick`: 1 + 1
blocks (Wan, Qwen-Image: 1), 16 x 16 grids, 64 text tokens. The shapes are small next to the released models
(1536 .. 6144 wide, 30 .. 60 blocks) but wide enough that attention and the MLPs, not Python, take the time on a
CPU, as in the runs of docs/benchmarks.md.

Configurations (every one under torch.no_grad(), `return_dict=False`, one forward per timed pass):
  single              1 process x 1 thread, the plain diffusers model (the reference for speedup and error)
  diffusers-ulysses   2 gloo ranks x 1 thread: diffusers' own
                      `enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`
  diffusers-ring      2 gloo ranks x 1 thread: diffusers' own ring (`ContextParallelConfig(ring_degree=2)`)
  ours-ulysses        2 gloo ranks x 1 thread: `opendit.parallelize(model, ParallelConfig(ulysses=2))`
  ours-ring           2 gloo ranks x 1 thread: `opendit.parallelize(model, ParallelConfig(ring=2))`
  (FastSeq has no diffusers counterpart, so it is not in this head-to-head; docs/families.md)

Stock diffusers 0.42.1 cannot run context parallelism on CPU-only torch. Both stock calls are run once per model
and their raw failures are recorded in the JSON ("stock_failures"). The workarounds below live ONLY in this file and
touch nothing global (no registry entry, no module attribute of diffusers is changed):
  (a) CPU device / mesh [both diffusers modes]: `ModelMixin._resolve_parallel_config` (modeling_utils.py:1697-1740)
      does `torch.device(type, rank % torch.accelerator.device_count())` (line 1719), a ZeroDivisionError when the
      accelerator count is 0. We override `_resolve_parallel_config` on the model INSTANCE with the same code using
      device "cpu" and `init_device_mesh("cpu", (ring, ulysses), ("ring", "ulysses"))`, then call diffusers' own
      `model.enable_parallelism(config=...)`: its backend check, per-processor `_parallel_config` and
      `apply_context_parallel(model, cp_config, model._cp_plan)` all run unchanged.
  (b) "diffusers ring + benchmark-local CPU LSE workaround" [diffusers-ring only]: diffusers' TemplatedRingAttention
      calls its forward op with return_lse=True (attention_dispatch.py:2427-2440); the native op refuses it
      (attention_dispatch.py:875-876) and `_native_flash` calls aten._scaled_dot_product_flash_attention, which has
      no CPU kernel. Backends are a closed Enum in a global registry, so instead the attention call itself is
      replaced, the same way for every model class: each attention module whose processor's own `__call__` calls
      `dispatch_attention_fn` (FluxAttnProcessor, WanAttnProcessor, QwenDoubleStreamAttnProcessor2_0,
      Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor; the JSON lists them per model) gets a copy of its processor
      whose class is a subclass of the processor's class with diffusers' OWN `__call__` code object, bound to a copy
      of its module's globals in which the one name `dispatch_attention_fn` means `_ring_cpu_dispatch` (diffusers'
      module is not touched; projections, norms, RoPE and output projections run exactly as diffusers wrote them).
      `_ring_cpu_dispatch` does what `_native_attention` does with a parallel config, diffusers' own
      `_templated_context_parallel_attention` (hence its TemplatedRingAttention, all-gather of K/V, fp32 LSE merge),
      with a local forward op built on `torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` (out + logsumexp
      on CPU; the same CPU flash kernel F.scaled_dot_product_attention uses); a call without a parallel config (Wan's
      cross-attention to the unsplit text) goes to diffusers' dispatch_attention_fn unchanged. diffusers-ulysses needs
      no (b): the stock processors and the native backend run it.
  The stock trials record, per model: both plain `enable_parallelism` calls, and diffusers' ring past (a) on the
  default backend and with `_native_flash` set on every processor's backend slot (the per-module part of
  ModelMixin.set_attention_backend, without its global `set_active_backend`). No new kind of failure showed up for
  Qwen-Image or FLUX.2: the same ZeroDivisionError, return_lse refusal and missing CPU flash kernel as Flux and Wan.
  OpenDiT itself, in the same process, reaches these classes through their `_cp_plan` and unchanged processors: its
  `parallelize` wraps the name `dispatch_attention_fn` of the processor's module once, passing every call that does
  not carry an OpenDiT site through to diffusers' function (so diffusers-ulysses' calls take one extra Python call).

Timing (the method of issues 14 and 19): every configuration gets one warm-up forward first (for diffusers
configurations it is also the byte-counting forward, see below); then `--passes` interleaved passes: pass i runs every
(model, dtype, configuration) in the list order rotated by i * n / passes, each `--repeats` timed forwards in a row
(2 ranks: both leave a barrier before each forward, each times it, the slower rank's time counts). Per pass, each
configuration's minimum over its forwards; SPEEDUP = median over passes of (1-process minimum / 2-rank minimum of
the same pass), so a busy moment of the shared machine spoils one pass, not the figure. Also recorded: overall
min / overall min, and every forward's time. `--warmup-each-pass` adds a warm-up forward before every timed group.
Error = max |out - ref| / max |ref| (float64) of rank 0's output vs the single-process output of the same model and
dtype.

Bytes per forward (rank 0; bytes this rank sends to OTHER ranks, the convention of opendit.distributed.comm):
ours from `model._opendit_runtime.stats.snapshot()` of the timed forward; diffusers MEASURED on the warm-up forward by
a TorchDispatchMode (a context manager on this thread only, nothing patched) that sees every
torch.ops._c10d_functional collective diffusers issues (funcol all_to_all_single / all_gather_into_tensor), counted
with the same convention. Collectives diffusers issues outside funcol (dist.all_gather, only for masks or the
*_anything modes, unused here) would not be seen; the JSON lists the op names seen.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from common import (
    ROOT,
    ask_pools,
    finish,
    interleaved_passes,
    machine,
    rel_err,
    render_only,
    report_args,
    shared_copy,
    side_by_side_pools,
    speedup_bars,
)

SEED = 0
CONFIGS = ("single", "diffusers-ulysses", "diffusers-ring", "ours-ulysses", "ours-ring")
PARALLEL = CONFIGS[1:]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = ("flux", "wan", "qwenimage", "flux2")  # also the order of the table and the plot
HEADS, HEAD_DIM = 16, 72  # every model: DiT-XL width, 16 x 72 = 1152

# model dims: full and --quick
DIMS = {
    "flux": {
        "full": {"double": 2, "single": 2, "grid": 32, "text": 256},
        "quick": {"double": 1, "single": 1, "grid": 16, "text": 64},
    },
    "wan": {
        "full": {"layers": 2, "latent": (9, 32, 32), "text": 256},
        "quick": {"layers": 1, "latent": (3, 16, 16), "text": 64},
    },
    "qwenimage": {
        "full": {"layers": 2, "grid": 32, "text": 256},
        "quick": {"layers": 1, "grid": 16, "text": 64},
    },
    "flux2": {
        "full": {"double": 2, "single": 2, "grid": 32, "text": 256},
        "quick": {"double": 1, "single": 1, "grid": 16, "text": 64},
    },
}


# ------------------------------------------------------------------------------------------------ models, inputs
# kind -> (diffusers class, its config from the kind's dims); every model 16 heads x 72 (HEADS x HEAD_DIM)
# - flux: RoPE (8, 32, 32), text 1024 wide, pooled 768, no guidance embedding
# - wan: RoPE splits 72 into t/h/w = 24/24/24, ffn 4608, text 4096
# - qwenimage: Qwen-Image's layout at DiT-XL width: 16 latent channels packed 2 x 2 -> 64 in, 16 out; RoPE over
#   (frame, height, width) = 8 + 32 + 32 = 72 channels (the released 16/56/56 of 128, rounded to even sizes)
# - flux2: FLUX.2's layout at DiT-XL width: 32 latent channels packed 2 x 2 -> 128 in; RoPE over (t, h, w, l) in four
#   equal parts as released (4 x 32 of 128 there, 4 x 18 = 72 here); guidance embedding as FLUX.2 [dev]
MODELS = {
    "flux": ("FluxTransformer2DModel", lambda d: {
        "patch_size": 1, "in_channels": 64, "num_layers": d["double"], "num_single_layers": d["single"],
        "joint_attention_dim": 1024, "pooled_projection_dim": 768, "guidance_embeds": False,
        "axes_dims_rope": (8, 32, 32)}),
    "wan": ("WanTransformer3DModel", lambda d: {
        "patch_size": (1, 2, 2), "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
        "ffn_dim": 4608, "num_layers": d["layers"]}),
    "qwenimage": ("QwenImageTransformer2DModel", lambda d: {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": d["layers"], "joint_attention_dim": 1024,
        "axes_dims_rope": (8, 32, 32)}),
    "flux2": ("Flux2Transformer2DModel", lambda d: {
        "patch_size": 1, "in_channels": 128, "num_layers": d["double"], "num_single_layers": d["single"],
        "joint_attention_dim": 1024, "axes_dims_rope": (18, 18, 18, 18), "guidance_embeds": True}),
}  # fmt: skip


def build_model(kind: str, dims: dict):
    import diffusers

    if kind not in MODELS:
        raise ValueError(kind)
    class_name, config = MODELS[kind]
    torch.manual_seed(SEED)
    model = getattr(diffusers, class_name)(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, **config(dims))
    return model.eval()


def _grid_ids(side: int, axes: int, h_axis: int) -> torch.Tensor:
    """(side * side, axes) position ids of a row-major side x side token grid: row in column h_axis, column in
    h_axis + 1, every other axis 0 (Flux: (0, h, w); FLUX.2: (t=0, h, w, l=0))."""
    ids = torch.zeros(side * side, axes)
    ids[:, h_axis] = torch.arange(side).repeat_interleave(side)
    ids[:, h_axis + 1] = torch.arange(side).repeat(side)
    return ids


def make_inputs(kind: str, dims: dict, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(SEED + 1)
    if kind == "wan":
        f, h, w = dims["latent"]
        return {
            "hidden_states": torch.randn(1, 16, f, h, w, generator=gen).to(dtype),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, dims["text"], 4096, generator=gen).to(dtype),
            "return_dict": False,
        }
    side, text = dims["grid"], dims["text"]
    if kind == "flux":
        return {
            "hidden_states": torch.randn(1, side * side, 64, generator=gen).to(dtype),
            "encoder_hidden_states": torch.randn(1, text, 1024, generator=gen).to(dtype),
            "pooled_projections": torch.randn(1, 768, generator=gen).to(dtype),
            "timestep": torch.tensor([0.5]),
            "img_ids": _grid_ids(side, 3, 1),
            "txt_ids": torch.zeros(text, 3),
            "return_dict": False,
        }
    if kind == "qwenimage":
        # no encoder_hidden_states_mask: every text token is valid, which is what a mask of ones means (a mask would
        # make diffusers' ring attend with a mask of the whole key length to each visiting K/V block)
        return {
            "hidden_states": torch.randn(1, side * side, 64, generator=gen).to(dtype),
            "encoder_hidden_states": torch.randn(1, text, 1024, generator=gen).to(dtype),
            "timestep": torch.tensor([0.5]),
            "img_shapes": [[(1, side, side)]],  # per sample: (frames, rows, columns) of packed tokens
            "return_dict": False,
        }
    if kind == "flux2":
        # ids (1, tokens, 4) as the pipeline passes them (its _cp_plan splits them along dim 1, expected_dims=3);
        # text ids count along the last axis (l)
        txt_ids = torch.zeros(text, 4)
        txt_ids[:, 3] = torch.arange(text)
        return {
            "hidden_states": torch.randn(1, side * side, 128, generator=gen).to(dtype),
            "encoder_hidden_states": torch.randn(1, text, 1024, generator=gen).to(dtype),
            "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([4.0]),
            "img_ids": _grid_ids(side, 4, 1)[None],
            "txt_ids": txt_ids[None],
            "return_dict": False,
        }
    raise ValueError(kind)


def token_counts(kind: str, dims: dict) -> dict:
    if kind == "wan":
        f, h, w = dims["latent"]
        return {"video_tokens": f * (h // 2) * (w // 2), "text_tokens": dims["text"]}
    return {"image_tokens": dims["grid"] ** 2, "text_tokens": dims["text"]}


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def build_group(kind: str, dims: dict, dtypes: list[str]) -> dict:
    """{dtype name: model} with the same weights (bf16 = the fp32 model cast)."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # the keep-in-fp32 note on .to(bf16); the model is cast the same everywhere
    base = build_model(kind, dims)
    return {name: (base if name == "fp32" else copy.deepcopy(base).to(DTYPES[name])) for name in dtypes}


# ------------------------------------------------------------------------------------------------ workers
def _entries(job: dict) -> list[tuple[str, str]]:
    return [(m, d) for m in job["models"] for d in job["dtypes"]]


def parallel_worker(channel, job: dict) -> None:
    """One of 2 ranks: builds every (model, dtype) x 2-rank configuration once, then runs what the parent asks."""
    import opendit
    from opendit.distributed.config import ParallelConfig
    from opendit.distributed.env import init_from_env

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"), "gloo")
    rank = dist.get_rank()
    models, inputs = {}, {}
    report = {"rank": rank, "checksums": {}, "stock_failures": {}, "ring_workaround_processors": {}}
    for kind in job["models"]:
        dims = DIMS[kind][job["size"]]
        group = build_group(kind, dims, job["dtypes"])
        for dname, base in group.items():
            report["checksums"][f"{kind}/{dname}"] = checksum(base)
            inputs[(kind, dname)] = make_inputs(kind, dims, DTYPES[dname])
            for config in PARALLEL:
                model = shared_copy(base)
                impl, mode = config.split("-")
                if impl == "diffusers":
                    replaced = apply_diffusers_cp(model, mode)
                    if replaced:
                        report["ring_workaround_processors"][kind] = replaced
                else:
                    opendit.parallelize(model, ParallelConfig(**{mode: 2}))
                models[(kind, dname, config)] = model
        first = group[job["dtypes"][0]]
        report["stock_failures"][kind] = stock_failures(kind, first, inputs[(kind, job["dtypes"][0])])
    channel.send(report)
    while True:
        command = channel.recv()
        if command == "stop":
            break
        kind, dname, config, what, repeats = command
        model, x = models[(kind, dname, config)], inputs[(kind, dname)]
        runtime = getattr(model, "_opendit_runtime", None)
        counter = CollectiveBytes() if (what == "warmup" and config.startswith("diffusers")) else None
        seconds = []
        for _ in range(repeats):
            if runtime is not None:
                runtime.stats.reset()  # the snapshot below is of the last forward alone
            dist.barrier()  # both ranks start each forward together; the parent takes the slower rank's time
            elapsed, out = timed_forward(model, x, counter)
            seconds.append(elapsed)
        answer = {"seconds": seconds}
        if runtime is not None:
            answer["comm"] = runtime.stats.snapshot()
        if counter is not None:
            answer["comm"] = {k: {"calls": counter.calls[k], "bytes": counter.bytes[k]} for k in counter.bytes}
            answer["other_functional_ops"] = counter.other_ops
            answer["collective_seconds"] = counter.seconds
        if what == "output" and rank == 0:
            answer["output"] = out.float().numpy()
        channel.send(answer)
    dist.barrier()
    dist.destroy_process_group()


def timed_forward(model, inputs: dict, counter=None) -> tuple[float, torch.Tensor]:
    """Wall time of one no-grad forward (inside `counter`'s dispatch mode when given) and its output."""
    with torch.no_grad():
        start = time.perf_counter()
        if counter is not None:
            with counter:
                out = model(**inputs)[0]
        else:
            out = model(**inputs)[0]
        return time.perf_counter() - start, out


def single_worker(channel, job: dict) -> None:
    """1 process x 1 thread: the plain diffusers models."""
    torch.set_num_threads(1)
    models, inputs, report = {}, {}, {"checksums": {}}
    for kind in job["models"]:
        dims = DIMS[kind][job["size"]]
        for dname, model in build_group(kind, dims, job["dtypes"]).items():
            report["checksums"][f"{kind}/{dname}"] = checksum(model)
            models[(kind, dname)] = model
            inputs[(kind, dname)] = make_inputs(kind, dims, DTYPES[dname])
    channel.send(report)
    while True:
        command = channel.recv()
        if command == "stop":
            break
        kind, dname, _config, what, repeats = command
        seconds = []
        for _ in range(repeats):
            elapsed, out = timed_forward(models[(kind, dname)], inputs[(kind, dname)])
            seconds.append(elapsed)
        answer = {"seconds": seconds}
        if what == "output":
            answer["output"] = out.float().numpy()
        channel.send(answer)


# ------------------------------------------------------------------------------------------------ parent
def total_bytes(comm: dict | None) -> int | None:
    return None if comm is None else int(sum(v["bytes"] for v in comm.values()))


def run(job: dict, log) -> dict:
    os.environ.setdefault("OPENDIT_PG_TIMEOUT_S", "1800")  # a bf16 forward on a busy 2-core box can take minutes
    started = time.perf_counter()
    with side_by_side_pools(parallel_worker, single_worker, job) as (pool1, pool2, reports, single_report):
        log(f"setup done in {time.perf_counter() - started:.0f} s")

        def ask(kind, dname, config, what, repeats=1):
            """-> answer with "seconds": one time per forward (2 ranks: the slower rank's, forward by forward)."""
            answer, answers = ask_pools(pool1, pool2, (kind, dname, config, what, repeats), config == "single")
            answer["comm_rank1"] = answers[-1].get("comm")
            return answer

        keys = [(m, d, c) for (m, d) in _entries(job) for c in CONFIGS]
        warm = {}
        for key in keys:
            warm[key] = ask(*key, "warmup")
            log(f"warm-up {'/'.join(key)}: {warm[key]['seconds'][0]:.2f} s")
        times = {key: [] for key in keys}  # per pass: the minimum over its `repeats` forwards
        all_times = {key: [] for key in keys}  # per pass: every forward
        outputs, comms = {}, {}

        def timed_pass(i, key):
            if job["warmup_each_pass"]:
                ask(*key, "warmup")
            answer = ask(*key, "output" if i == 0 else "time", job["repeats"])
            times[key].append(min(answer["seconds"]))
            all_times[key].append(answer["seconds"])
            if "output" in answer:
                outputs[key] = answer["output"]
            if key[2].startswith("ours"):
                comms[key] = answer.get("comm")
            elif key[2].startswith("diffusers"):
                comms[key] = warm[key].get("comm")

        order_log, loads = interleaved_passes(keys, job["passes"], timed_pass, log, started)
    wall = time.perf_counter() - started

    rows = []
    for kind, dname in _entries(job):
        ref_key = (kind, dname, "single")
        ref_t = times[ref_key]
        for config in PARALLEL:
            key = (kind, dname, config)
            t = times[key]
            per_pass = [s / p for s, p in zip(ref_t, t)]  # same pass: 1-process minimum / 2-rank minimum
            rows.append(
                {
                    "model": kind,
                    "dtype": dname,
                    "config": config,
                    "impl": config.split("-")[0],
                    "mode": config.split("-")[1],
                    "single_pass_min_s": ref_t,
                    "parallel_pass_min_s": t,
                    "single_all_s": all_times[ref_key],
                    "parallel_all_s": all_times[key],
                    "speedup_per_pass": per_pass,
                    # THE figure (issue 14 / 19 method): median over passes of (1-process min / 2-rank min)
                    "speedup": statistics.median(per_pass),
                    "single_min_s": min(ref_t),
                    "parallel_min_s": min(t),
                    "single_median_s": statistics.median(ref_t),
                    "parallel_median_s": statistics.median(t),
                    "speedup_min": min(ref_t) / min(t),  # overall min / overall min, for reference
                    "max_rel_err": rel_err(outputs[key], outputs[ref_key]),
                    "bytes_per_forward_rank0": total_bytes(comms.get(key)),
                    "comm_rank0": comms.get(key),
                    "bytes_source": "CommStats.snapshot()" if config.startswith("ours") else "TorchDispatchMode count",
                    "warmup_s": warm[key]["seconds"][0],
                    "parallel_rank_seconds_warmup": warm[key].get("rank_seconds"),
                    "other_functional_ops_seen": warm[key].get("other_functional_ops"),
                    # diffusers, warm-up (counting) forward: seconds rank 0 spent inside functional collectives and
                    # wait_tensor; ours: CommStats wait_s of the timed forwards (comm_rank0)
                    "collective_seconds_warmup": warm[key].get("collective_seconds"),
                }
            )
    return {
        "rows": rows,
        "single_warmup_s": {f"{m}/{d}": warm[(m, d, "single")]["seconds"][0] for m, d in _entries(job)},
        "order_per_pass": order_log,
        "loadavg_after_each_pass": loads,
        "wall_s": wall,
        "stock_failures": reports[0]["stock_failures"],
        "ring_workaround_processors": reports[0]["ring_workaround_processors"],
        "checksums": single_report["checksums"],
    }


# ------------------------------------------------------------------------------- diffusers' context parallelism on CPU
# (workarounds (a) and (b) of the module docstring, bound to model instances and per-module processors; nothing
# global of diffusers is changed; the raw stock failures, recorded; the bytes diffusers' functional collectives send)
def _cpu_resolve_parallel_config(self, config):
    """WORKAROUND (a): ModelMixin._resolve_parallel_config (modeling_utils.py:1697-1740) with device "cpu" and a CPU
    DeviceMesh instead of `torch.device(accel, rank % torch.accelerator.device_count())` (line 1719: division by zero
    on CPU-only torch). Bound to one model instance; nothing global changes."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    mesh = cp.mesh or init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    self._parallel_config = config
    return config


def _cpu_lse_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """WORKAROUND (b): a forward op with diffusers' forward-op signature (cf. _native_flash_attention_forward_op,
    attention_dispatch.py:1074-1120) on the CPU flash kernel, which returns the logsumexp. (B, S, H, D) in and out;
    lse (B, S, H) float32. Inference only (no ctx saved)."""
    if enable_gqa:
        raise ValueError("enable_gqa is not supported by the benchmark-local CPU LSE op")
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))  # (B, H, S, D), as _native_flash does
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    out = out.transpose(1, 2).contiguous()
    lse = lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def _ring_cpu_dispatch(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    attention_kwargs=None, *, backend=None, parallel_config=None,
):  # fmt: skip
    """WORKAROUND (b): what the processors' `dispatch_attention_fn(...)` call does on the native backend
    (attention_dispatch.py: dispatch_attention_fn -> _native_attention), with one change: the call with a parallel
    config runs diffusers' own `_templated_context_parallel_attention` (TemplatedRingAttention for ring_degree > 1)
    with the CPU LSE forward op instead of `_native_attention_forward_op`. A call without one (Wan's cross-attention
    to the unsplit text) goes to diffusers' dispatch_attention_fn unchanged. (B, S, H, D) in and out."""
    from diffusers.models import attention_dispatch as ad

    if parallel_config is None:
        return ad.dispatch_attention_fn(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
            backend=backend, parallel_config=None,
        )  # fmt: skip
    if backend is not None or attn_mask is not None or attention_kwargs:
        # the benchmark runs every model on the default backend, without masks: anything else is not what we time
        raise NotImplementedError("benchmark-local ring dispatch: default backend, no mask, no attention_kwargs")
    return ad._templated_context_parallel_attention(
        query, key, value, None, dropout_p, is_causal, scale, enable_gqa, False,
        forward_op=_cpu_lse_forward_op, backward_op=ad._native_attention_backward_op,
        _parallel_config=parallel_config,
    )  # fmt: skip


_RING_CPU_CLASSES: dict[type, type] = {}


def _dispatches(processor) -> bool:
    """Whether this processor's own __call__ hands its attention to `dispatch_attention_fn` with a parallel config
    (the processors of every class with a _cp_plan; diffusers' enable_parallelism sets `_parallel_config` on them)."""
    code = getattr(type(processor).__call__, "__code__", None)  # None for a class without a Python __call__
    return hasattr(processor, "_parallel_config") and code is not None and "dispatch_attention_fn" in code.co_names


def ring_cpu_processor(processor):
    """WORKAROUND (b) processor, for any processor class that `_dispatches`: a copy of the instance whose class is a
    subclass of its own, with diffusers' own `__call__` (the same code object: projections, norms, RoPE, output
    projections exactly as diffusers wrote them) bound to a COPY of its module's globals in which the name
    `dispatch_attention_fn` is `_ring_cpu_dispatch`. diffusers' module and its globals are not touched."""
    cls = type(processor)
    if cls not in _RING_CPU_CLASSES:
        original = cls.__call__
        scope = dict(vars(sys.modules[cls.__module__]))  # the processor module's globals, copied
        scope["dispatch_attention_fn"] = _ring_cpu_dispatch
        call = types.FunctionType(original.__code__, scope, original.__name__, original.__defaults__,
                                  original.__closure__)  # fmt: skip
        call.__kwdefaults__ = original.__kwdefaults__
        call.__doc__ = original.__doc__
        _RING_CPU_CLASSES[cls] = type(f"{cls.__name__}RingCpuLse", (cls,), {"__call__": call, "__module__": __name__})
    ring = copy.copy(processor)  # the instance's own state (backend, parallel config slots) kept
    ring.__class__ = _RING_CPU_CLASSES[cls]
    return ring


def _context_parallel_config(mode: str):
    from diffusers.models._modeling_parallel import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=2) if mode == "ulysses" else ContextParallelConfig(ring_degree=2)


def apply_diffusers_cp(model, mode: str) -> dict[str, int]:
    """diffusers' own enable_parallelism with workaround (a); for ring also workaround (b) on every attention module
    whose processor dispatches (any model class). Returns {processor class: modules} that (b) replaced."""
    replaced: dict[str, int] = {}
    if mode == "ring":
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(module, "set_processor") and _dispatches(processor):
                module.set_processor(ring_cpu_processor(processor))
                name = type(processor).__name__
                replaced[name] = replaced.get(name, 0) + 1
        if not replaced:
            raise RuntimeError(f"{type(model).__name__}: no processor calls dispatch_attention_fn; (b) cannot apply")
    model._resolve_parallel_config = types.MethodType(_cpu_resolve_parallel_config, model)  # (a), this instance
    model.enable_parallelism(config=_context_parallel_config(mode))
    return replaced


def _failure(exc: BaseException) -> dict:
    frames = traceback.extract_tb(exc.__traceback__)
    where = [f"{_short(f.filename)}:{f.lineno} in {f.name}: {f.line}" for f in frames[-4:]]
    ours = [f for f in frames if "/diffusers/" in f.filename or "/opendit/" in f.filename]
    at = f"{_short(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}: {ours[-1].line}" if ours else ""
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "raised_at": where[-1] if where else "",
        "library_frame": at,  # the innermost diffusers / opendit frame
        "last_frames": where,
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def stock_failures(kind: str, model, inputs: dict) -> dict:
    """The stock diffusers calls on CPU-only torch, each on a throwaway copy; the raw failures."""
    out = {}
    for mode in ("ulysses", "ring"):
        trial = shared_copy(model)
        key = f"enable_parallelism(config=ContextParallelConfig({mode}_degree=2))"
        try:
            trial.enable_parallelism(config=_context_parallel_config(mode))
            with torch.no_grad():
                trial(**inputs)
            out[key] = {"error": None, "note": "ran without error"}
        except Exception as exc:  # noqa: BLE001 - the failure is what we record
            out[key] = _failure(exc)
    # past (a): diffusers' ring with its stock processors on the default (native) backend, and with `_native_flash`
    # set on every processor that has a backend slot: the per-module loop of ModelMixin.set_attention_backend without
    # its last line (`_AttentionBackendRegistry.set_active_backend`, a global). A per-module
    # `AttentionModuleMixin.set_attention_backend` would miss Qwen-Image, whose attention is the older `Attention`.
    for backend in (None, "_native_flash"):
        trial = shared_copy(model)
        key = f"ring with workaround (a) only, backend {backend or 'native (default)'}: first forward"
        given = 0
        try:
            if backend is not None:
                from diffusers.models.attention_dispatch import AttentionBackendName

                for module in trial.modules():
                    processor = getattr(module, "processor", None)
                    if processor is not None and hasattr(processor, "_attention_backend"):
                        processor._attention_backend = AttentionBackendName(backend)
                        given += 1
            trial._resolve_parallel_config = types.MethodType(_cpu_resolve_parallel_config, trial)
            trial.enable_parallelism(config=_context_parallel_config("ring"))
            with torch.no_grad():
                trial(**inputs)
            out[key] = {"error": None, "note": "ran without error"}
        except Exception as exc:  # noqa: BLE001
            out[key] = _failure(exc)
        if backend is not None:
            out[key]["processors_given_backend"] = given
    return out


class CollectiveBytes:
    """Counts the functional collectives issued on this thread while active (a TorchDispatchMode: a context
    manager, not a patch): bytes this rank sends to other ranks, per op name."""

    COLLECTIVES = (
        "all_to_all_single",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_gather_into_tensor_coalesced",
        "reduce_scatter_tensor",
        "all_reduce",
        "broadcast",
    )

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "namespace", "") != "_c10d_functional":
                    return func(*args, **kwargs)
                counter.record(func, args, kwargs)
                start = time.perf_counter()
                out = func(*args, **kwargs)
                counter.seconds += time.perf_counter() - start  # issue + wait_tensor: this rank's blocked time
                return out

        self.mode = _Mode()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.other_ops: dict[str, int] = {}
        self.seconds = 0.0

    def record(self, func, args, kwargs) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        name = func.overloadpacket.__name__
        if name not in self.COLLECTIVES:  # wait_tensor, _wrap_tensor_autograd: bookkeeping, no data moves
            self.other_ops[name] = self.other_ops.get(name, 0) + 1
            return
        x = args[0]
        group_name = kwargs.get("group_name", args[-1])
        group = _resolve_process_group(group_name) if isinstance(group_name, str) else None
        size = group.size() if group is not None else dist.get_world_size()
        me = dist.get_rank(group) if group is not None else dist.get_rank()
        nbytes = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
        if name == "all_to_all_single":
            splits = args[2] if len(args) > 2 else kwargs.get("input_split_sizes")
            if splits:
                sent = nbytes - nbytes * splits[me] // x.shape[0]
            else:
                sent = nbytes * (size - 1) // size
        elif name in ("all_gather_into_tensor", "all_gather_single"):
            sent = nbytes * (size - 1)
        elif name == "broadcast":
            sent = nbytes * (size - 1) if me == args[1] else 0
        else:  # reductions (not used by diffusers' CP here): count the input once so it shows up
            sent = nbytes
        self.bytes[name] = self.bytes.get(name, 0) + int(sent)
        self.calls[name] = self.calls.get(name, 0) + 1

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ one file, many runs
# The result file holds the newest rows of every (model, dtype) measured so far, each row tagged with the run it came
# from; a run measures some (model, dtype)s and replaces only those rows (see merge_runs).
RUN_FIELDS = ("job", "machine", "single_warmup_s", "order_per_pass", "loadavg_after_each_pass", "loadavg_at_end",
              "wall_s", "stock_failures", "ring_workaround_processors", "checksums")  # fmt: skip
LAYOUT = ("runs: one record per run whose rows are here (id = its UTC start; job, machine, loads, stock failures), "
          "oldest first; rows: the newest row of each (model, dtype, config), tagged with its run and that run's "
          "load average at start")  # fmt: skip


def run_result(measured: dict, job: dict, mach: dict, started_utc: str) -> dict:
    """One run in the file's form: {"size", "runs": [its record], "rows": [its rows, tagged]}."""
    record = {
        "run": started_utc,  # the run's id: its UTC start time
        "date": started_utc,
        "models": job["models"],
        "dtypes": job["dtypes"],
        "loadavg_at_start": mach.get("loadavg_at_start"),
        **{k: v for k, v in {**measured, "job": job, "machine": mach}.items() if k in RUN_FIELDS},
    }
    tags = {"run": record["run"], "loadavg_at_start": record["loadavg_at_start"]}
    rows = [{**row, **tags} for row in measured["rows"]]
    return {"layout": LAYOUT, "size": job["size"], "runs": [record], "rows": rows}


def as_runs(result: dict, source: Path | None = None) -> dict:
    """`result` in the file's form. A file written before runs were tagged (one run, its fields at the top level)
    becomes one run whose date is that of the git commit that last wrote the file (the run recorded none)."""
    if "runs" in result:
        return result
    date = _git_date(source) if source is not None else None
    run_id = date or "untagged run"
    record = {
        "run": run_id,
        "date": date,
        "date_source": "git commit that wrote the result file (the run itself recorded no date)",
        "models": result["job"]["models"],
        "dtypes": result["job"]["dtypes"],
        "loadavg_at_start": result["machine"].get("loadavg_at_start"),
        **{k: v for k, v in result.items() if k in RUN_FIELDS},
    }
    tags = {"run": run_id, "loadavg_at_start": record["loadavg_at_start"]}
    rows = [{**row, **tags} for row in result["rows"]]
    return {"layout": LAYOUT, "size": result["job"]["size"], "runs": [record], "rows": rows}


def _git_date(path: Path) -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(Path(path).resolve().parent), "log", "-1", "--format=%cI", "--",
                               Path(path).name], capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _row_order(row: dict) -> tuple:
    model = MODELS.index(row["model"]) if row["model"] in MODELS else len(MODELS)
    return model, row["model"], list(DTYPES).index(row["dtype"]), PARALLEL.index(row["config"])


def merge_runs(previous: dict | None, new: dict, log=print, source: Path | None = None) -> dict:
    """`new` (one run) over `previous` (the file as it was, any form): the (model, dtype)s the new run measured get
    its rows, every other (model, dtype) keeps its rows and their run's record; a run no row comes from any more is
    dropped. A file of the other size (--quick vs full) is not merged: its rows would not be comparable. `source`:
    where `previous` was read (dates an untagged file, see as_runs)."""
    if previous is None:
        return new
    previous = as_runs(previous, source)
    if previous["size"] != new["size"]:
        log(f"not merged: the file holds {previous['size']} runs, this one is {new['size']}; its rows are replaced")
        return new
    measured = {(r["model"], r["dtype"]) for r in new["rows"]}
    kept = [r for r in previous["rows"] if (r["model"], r["dtype"]) not in measured]
    rows = sorted(kept + new["rows"], key=_row_order)
    used = {r["run"] for r in rows}
    runs = [run for run in previous["runs"] if run["run"] in used] + new["runs"]
    for run in previous["runs"]:
        if run["run"] not in used:
            log(f"run {run['run']}: every row replaced, its record dropped")
    if kept:
        log(f"kept {len(kept)} rows of earlier runs: {sorted({(r['model'], r['dtype']) for r in kept})}")
    return {**new, "runs": runs, "rows": rows}


# ------------------------------------------------------------------------------------------------ report
def fmt_bytes(n) -> str:
    if n is None:
        return "not counted"
    return f"{n / 2**20:.1f} MiB"


def _load(values) -> str:
    return "?" if not values else f"{values[0]:.1f}"


def markdown(result: dict, source: Path | None = None) -> str:
    result = as_runs(result, source)
    runs = {run["run"]: run for run in result["runs"]}
    number = {run_id: i + 1 for i, run_id in enumerate(runs)}  # "run 1", "run 2", ... in the tables
    rows = {(r["model"], r["dtype"], r["config"]): r for r in result["rows"]}
    entries = list(dict.fromkeys((r["model"], r["dtype"]) for r in result["rows"]))  # (model, dtype), file order
    quick = " (--quick smoke run: not a measurement)" if result["size"] == "quick" else ""
    lines = [
        "# OpenDiT vs diffusers' own context parallelism (2 gloo ranks x 1 thread vs 1 process x 1 thread)",
        "",
        f"Rows come from {len(runs)} run(s){quick}; a run measures the (model, dtype)s it was given and replaces only "
        "those rows (`--models` / `--dtypes`), so each row's figures are relative to the single process of the SAME "
        "run and pass. Load average (1 min) at a run's start and after each of its passes: other jobs share the "
        "2 cores, hence per-pass minima and the median over passes.",
        "",
        "| run | started (UTC) | models x dtypes | machine | load at start | load after each pass | passes x forwards "
        "| wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run_id, run in runs.items():
        mach, job = run["machine"], run["job"]
        date = (run.get("date") or "unknown") + (" (commit date)" if run.get("date_source") else "")
        lines.append(
            f"| {number[run_id]} | {date} | {' '.join(run['models'])} x {' '.join(run['dtypes'])} | "
            f"{mach['cpu']} ({mach['cpu_count']} cores, {mach['cpu_flags']}), torch "
            f"{mach['torch']}, diffusers {mach.get('diffusers')} | {_load(run.get('loadavg_at_start'))} | "
            f"{', '.join(_load(x) for x in run.get('loadavg_after_each_pass', []))} | {job['passes']} x "
            f"{job.get('repeats', 1)} | {run['wall_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        "Speedup = median over passes of (1-process minimum / 2-rank minimum of the pass) (overall min / overall min "
        "in brackets). Error = max|out - ref| / max|ref| of rank 0's output vs the single-process output of the same "
        "model and dtype. Bytes = what rank 0 sends per forward (ours: CommStats; diffusers: counted by a "
        "TorchDispatchMode on its functional collectives).",
        "diffusers ring = diffusers ring + benchmark-local CPU LSE workaround (b); both diffusers modes need "
        "workaround (a) (CPU device / mesh). See the script's docstring.",
        "",
        "| model | dtype | mode | diffusers speedup | ours speedup | diffusers max rel err | ours max rel err "
        "| diffusers bytes | ours bytes | ours >= diffusers | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, dname in entries:
        for mode in ("ulysses", "ring"):
            d, o = rows[(kind, dname, f"diffusers-{mode}")], rows[(kind, dname, f"ours-{mode}")]
            lines.append(
                f"| {kind} | {dname} | {mode} | {d['speedup']:.2f}x ({d['speedup_min']:.2f}x) | "
                f"{o['speedup']:.2f}x ({o['speedup_min']:.2f}x) | {d['max_rel_err']:.2e} | "
                f"{o['max_rel_err']:.2e} | {fmt_bytes(d['bytes_per_forward_rank0'])} | "
                f"{fmt_bytes(o['bytes_per_forward_rank0'])} | {'yes' if o['speedup'] >= d['speedup'] else 'NO'} | "
                f"{number[o['run']]} |"
            )
    lines += [
        "",
        "Times (seconds; min / median over passes of the per-pass minima):",
        "",
        "| model | dtype | config | min | median |",
        "|---|---|---|---|---|",
    ]
    for kind, dname in entries:
        first = rows[(kind, dname, "diffusers-ulysses")]
        lines.append(f"| {kind} | {dname} | single | {first['single_min_s']:.2f} | {first['single_median_s']:.2f} |")
        for config in PARALLEL:
            r = rows[(kind, dname, config)]
            lines.append(f"| {kind} | {dname} | {config} | {r['parallel_min_s']:.2f} | {r['parallel_median_s']:.2f} |")
    # per model, the newest run that measured it (its stock failures and processors)
    latest = {}
    for run in result["runs"]:
        for kind in run["models"]:
            if any(r["model"] == kind and r["run"] == run["run"] for r in result["rows"]):
                latest[kind] = run
    lines += ["", "Processors given workaround (b) for diffusers' ring (class: attention modules):", ""]
    for kind, run in latest.items():
        procs = run.get("ring_workaround_processors", {}).get(kind)
        shown = ", ".join(f"{name}: {n}" for name, n in procs.items()) if procs else "not recorded in this run"
        lines.append(f"- {kind} (run {number[run['run']]}): {shown}")
    lines += ["", "Stock diffusers failures on CPU-only torch (raw):", ""]
    for kind, run in latest.items():
        for call, info in run.get("stock_failures", {}).get(kind, {}).items():
            error = (info.get("error") or info.get("note") or "").splitlines()[0]  # the JSON has the full text
            error = error if len(error) <= 200 else error[:200] + " ..."
            where = info.get("library_frame") or info.get("raised_at", "")
            lines.append(f"- {kind}, `{call}`: `{error}` (innermost diffusers frame: `{where}`)")
    return "\n".join(lines)


def write_plot(result: dict, path: Path, source: Path | None = None) -> None:
    result = as_runs(result, source)
    rows = {(r["model"], r["dtype"], r["config"]): r for r in result["rows"]}
    entries = list(dict.fromkeys((r["model"], r["dtype"]) for r in result["rows"]))
    groups = [(m, d, mode) for m, d in entries for mode in ("ulysses", "ring")]
    series = {
        "diffusers (own CP; ring with CPU-LSE workaround)": (
            [rows[(m, d, f"diffusers-{mode}")]["speedup"] for m, d, mode in groups], "tab:orange"),
        "OpenDiT parallelize": ([rows[(m, d, f"ours-{mode}")]["speedup"] for m, d, mode in groups], "tab:blue"),
    }  # fmt: skip
    quick = " [--quick]" if result["size"] == "quick" else ""
    labels = [f"{m}\n{d}\n{mode}" for m, d, mode in groups]
    speedup_bars(path, labels, series, "2 gloo ranks x 1 thread vs 1 process x 1 thread" + quick)


def render(result: dict, out: Path) -> dict[str, Path]:
    """OUT.{json,md,png}: the JSON as given (a re-render leaves it as it was), the table and the plot. OUT.json is
    also where a result without run tags came from (the git date of that file dates its run)."""
    source = _out_json(out)
    return finish(out, result, markdown(result, source), plot=lambda path: write_plot(result, path, source))


def _out_json(out: str | Path) -> Path:
    """OUT.json for --out OUT (OUT may carry a .json / .md / .png suffix, as write_report allows)."""
    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    return out.parent / f"{out.name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=None, help="interleaved timed passes (default 5; --quick 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per configuration and pass (default 3; --quick 1)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="fewer tokens and blocks: a smoke test, not a measurement")
    parser.add_argument("--warmup-each-pass", action="store_true", help="a warm-up forward before every timed one")
    parser.add_argument(
        "--fresh", action="store_true", help="do not merge: OUT gets only this run's rows (default: merged into OUT)"
    )
    report_args(parser, "vs_diffusers")
    args = parser.parse_args()
    if render_only(args, render):
        return 0
    passes = args.passes or (2 if args.quick else 5)
    job = {
        "models": args.models,
        "dtypes": args.dtypes,
        "passes": passes,
        "repeats": args.repeats or (1 if args.quick else 3),
        "size": "quick" if args.quick else "full",
        "warmup_each_pass": args.warmup_each_pass,
    }
    dims = {kind: {**DIMS[kind][job["size"]], **token_counts(kind, DIMS[kind][job["size"]])} for kind in args.models}

    def log(msg: str) -> None:
        print(f"[vs_diffusers] {msg}", flush=True)

    path = _out_json(args.out)
    previous = json.loads(path.read_text()) if (path.is_file() and not args.fresh) else None
    if previous is not None and as_runs(previous)["size"] != job["size"]:
        # checked before measuring: a --quick smoke run must not replace a measured file by accident (nor the reverse)
        parser.error(f"{path} holds {as_runs(previous)['size']} runs and this one is {job['size']}: they are not "
                     "merged; give another --out, or --fresh to replace the file")  # fmt: skip
    log(f"job {job}")
    started_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    mach = machine(threads_per_process=1, backend="gloo over loopback")
    measured = run(job, log)
    measured["loadavg_at_end"] = os.getloadavg()
    job = {**job, "dims": dims, "heads": HEADS, "head_dim": HEAD_DIM, "seed": SEED}
    result = run_result(measured, job, mach, started_utc)
    if previous is not None:
        result = merge_runs(previous, result, log, source=path)
    render(result, Path(args.out))
    log(f"wall {measured['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
