"""PipeFusion's cost (--pipefusion N --patches M --warmup-steps K): step time, bytes and per-rank memory.

The runtime (parallel/pipefusion.py) gives stage s the blocks split_sizes(depth, N)[s] and pushes M token patches
(split_sizes(T, M)) through the stages; each block's attention runs the patch's queries over the whole sequence's
K/V (its cache). So, per pipelined step:
- a stage's work on one patch = its blocks on T_m rows, attention T_m x T; stage 0 also embeds, the last stage runs
  the final layer;
- the pipeline's time = the first patch through every stage (fill, with one P2P hop of (B, T_m, C) between stages)
  + (M - 1) x the slowest stage's time per patch (steady state: each stage starts patch m + 1 while the next one
  works on m) + the broadcast of the prediction (B, C_out, H, W) from the last stage;
- a warm-up step is the same with M = 1: the whole sequence through the stages one after the other, i.e. one
  device's compute plus N - 1 hops, so warm-up steps are a little slower than one device.
Over a request of S steps: K warm-up steps + (S - K) pipelined ones (`request_s`). Bytes follow the CommStats
convention: a stage sends (B, T, C) per step in M messages ("p2p"), the last stage the prediction to N - 1 ranks
("broadcast"; every other stage records the call with 0 bytes).

Memory per rank: its blocks' weights (~1/N; loading reads only those from the file) + the embedders and the final
layer (on every stage) + the K/V cache of its blocks (2 x (B, T, C) per block: what PipeFusion pays for the stale
attention) + the activations of a warm-up step (the whole sequence in one patch) + attention workspace.
"""

from __future__ import annotations

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.spec import spec_for
from opendit.parallel.sequence import split_sizes
from opendit.planning.cost import (
    EW_ELEMS_PER_TOKEN,
    MemoryCost,
    StepCost,
    _saturating,
    comm_time,
    local_batch,
    predict_memory,
    predict_step_time,
)
from opendit.planning.speeds import Speeds


def _check(model, plan: ParallelConfig, guided: bool, batch: int) -> float:
    """The batch every stage runs (PipeFusion splits no batch: cost.local_batch of its dp = cfg = 1 plan)."""
    spec = spec_for(model)
    if spec.stage_view is None:
        raise OpenDiTError(
            f"PipeFusion pipelines row patches of one token sequence through stages of blocks, reusing the other "
            f"patches' stale K/V; {spec.name} declares no such stage view (ModelSpec.stage_view: its blocks change the "
            "token layout between them): drop --pipefusion, or use --ulysses / --ring (exact)"
        )
    return local_batch(batch, plan, guided)


def _block_s(model, b: float, rows: int, tokens: int, speeds: Speeds) -> float:
    """One block on `rows` tokens of each of b samples whose attention reads all `tokens` keys (cost.py's rates)."""
    spec = spec_for(model)
    dims = spec.dims(model, tokens)
    fl = spec.block_flops(model, b, rows, rows, tokens, dims.num_heads)
    linear_s = fl["linear"] / _saturating(speeds.matmul_flops, b * rows, speeds.matmul_half_rows)
    attn_s = fl["attention"] / _saturating(speeds.attn_flops, min(rows, tokens), speeds.attn_half_tokens)
    # + the patch's K/V written into the block's cache (2 x (b, rows, C))
    ew_s = (EW_ELEMS_PER_TOKEN + 2) * b * rows * dims.hidden_size * speeds.dtype_bytes / speeds.mem_bw
    return linear_s + attn_s + ew_s


def _pipeline_s(model, tokens: int, b: float, plan: ParallelConfig, speeds: Speeds, patches: int) -> dict:
    """Compute, exposed communication and dispatch of one step with `patches` patches (1: a warm-up step)."""
    spec, s, n = spec_for(model), speeds.dtype_bytes, plan.pipefusion
    dims = spec.dims(model, tokens)
    blocks = split_sizes(dims.depth, n)
    t_m = max(split_sizes(tokens, patches))
    hop_bytes = b * t_m * dims.hidden_size * s  # one patch's residual stream, (B, T_m, C)
    hop_s = comm_time("p2p", hop_bytes, 1, 1, 2, speeds)
    per_patch = [k * _block_s(model, b, t_m, tokens, speeds) for k in blocks]  # each stage, one patch
    dispatch = [k * speeds.block_overhead_s for k in blocks]  # one launch unit per block, as cost.py counts one device
    if speeds.async_dispatch:  # GPUs queue kernels ahead: a stage's patch costs the larger of the two
        stage = [max(c, d) for c, d in zip(per_patch, dispatch)]
    else:  # CPU: the core that computes dispatches
        stage = [c + d for c, d in zip(per_patch, dispatch)]
    slowest = max(range(n), key=lambda i: stage[i])
    edge_s = spec.edge_flops(model, tokens, b) / _saturating(speeds.matmul_flops, b * tokens, speeds.matmul_half_rows)
    out_bytes = b * tokens * spec.token_values(model)[1] * s  # the prediction, (B, C_out, H, W)
    bcast_s = comm_time("all_gather", out_bytes * (n - 1), 1, 1, n, speeds)
    compute_s = sum(per_patch) + (patches - 1) * per_patch[slowest] + edge_s
    overhead_s = sum(dispatch) + (patches - 1) * dispatch[slowest] + 2 * speeds.block_overhead_s
    comm_s = (n - 1) * hop_s + bcast_s  # the fill's hops; steady-state hops overlap the next patch's compute
    total = sum(stage) + (patches - 1) * stage[slowest] + edge_s + comm_s + 2 * speeds.block_overhead_s
    return {
        "total_s": total,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "overhead_s": overhead_s,
        "hidden_s": (patches - 1) * hop_s * (n > 1),
        "bytes": b * tokens * dims.hidden_size * s,  # a non-last stage: all M patches, (B, T, C) per step
        "calls": patches,
        "out_bytes": out_bytes * (n - 1),
        "stage_s": stage,
    }


def predict_pipefusion_step(
    model, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided: bool = True
) -> StepCost:
    """Predicted time of one pipelined step (StepCost.total_s) and, in `detail`, of a warm-up step and the per-step
    mean over a request (`mean_step_s(steps)` is computed by `request_s`). `batch`: the request's forward samples
    (PipeFusion does not split the batch: every stage runs all of it)."""
    b = _check(model, plan, guided, batch)
    pipe = _pipeline_s(model, tokens, b, plan, speeds, plan.patch_count)
    warm = _pipeline_s(model, tokens, b, plan, speeds, 1)
    return StepCost(
        total_s=pipe["total_s"],
        compute_s=pipe["compute_s"],
        comm_s=pipe["comm_s"],
        hidden_s=pipe["hidden_s"],
        overhead_s=pipe["overhead_s"],
        bytes_per_rank=max(pipe["bytes"], pipe["out_bytes"]),  # a sending stage, or the last one's broadcast
        calls_per_rank=pipe["calls"] + 1,
        per_rank_s=[pipe["total_s"]] * plan.pipefusion,  # every stage waits for the broadcast
        detail={
            "local_batch": b,
            "warmup_step_s": warm["total_s"],
            "warmup_steps": plan.warmup_steps,
            "stage_patch_s": pipe["stage_s"],
            "patches": plan.patch_count,
            "blocks_per_stage": split_sizes(spec_for(model).dims(model, tokens).depth, plan.pipefusion),
            "stale": True,
        },
    )


def request_s(step: StepCost, steps: int) -> float:
    """A request's sampling time: K warm-up steps at their own time, the rest pipelined (any plan: without PipeFusion
    every step costs total_s)."""
    warm = min(step.detail.get("warmup_steps", 0), steps)
    return warm * step.detail.get("warmup_step_s", step.total_s) + (steps - warm) * step.total_s


def predict_pipefusion_memory(
    model, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided: bool = True, decode_bytes=0.0
) -> MemoryCost:
    """Whole-run peak bytes of the busiest stage (stage 0: the most blocks, and the embedding). Loading reads only the
    stage's own blocks from the file (worker.load_replica_model) and one tensor in flight."""
    b = _check(model, plan, guided, batch)
    spec, s = spec_for(model), speeds.dtype_bytes
    dims = spec.dims(model, tokens)
    params = spec.count_params(model, tokens)
    mine = split_sizes(dims.depth, plan.pipefusion)[0]
    resident = (params["total"] - (dims.depth - mine) * params["block"]) * s
    c, unit = dims.hidden_size, b * tokens * dims.hidden_size * s
    kv_cache = mine * 2 * unit  # every block's K and V of the whole sequence, (B, T, C) each
    # a warm-up step: one device's block activations on the whole sequence (cost.py's phases), and its embedding
    attn_phase, mlp_phase = 10 * unit, (3 + 2 * dims.mlp_ratio) * unit
    activations = max(attn_phase, mlp_phase, b * tokens * spec.token_values(model)[0] * s)
    buffers = 2 * b * (tokens / plan.patch_count + 1) * c * s  # a patch received and one in flight
    workspace = b * dims.num_heads * tokens * 4 * 2
    if not speeds.fused_attention:
        workspace += b * dims.num_heads * tokens * tokens * 4
    reserved = speeds.reserved_bytes
    sampling = resident + kv_cache + activations + buffers + workspace + reserved
    loading = resident + params.get("largest_tensor", params["block"] / 4) * 4 + reserved
    decode = resident + decode_bytes + reserved if decode_bytes else 0.0
    total = speeds.process_bytes + max(sampling, loading, decode)
    return MemoryCost(
        total, resident + kv_cache, activations, buffers, workspace, reserved, speeds.process_bytes,
        loading, sampling, decode,
    )  # fmt: skip


def step_time(model, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided=None) -> StepCost:
    """Any plan's step: PipeFusion's model for --pipefusion plans, cost.predict_step_time for the rest."""
    if plan.pipefusion > 1:
        return predict_pipefusion_step(model, tokens, batch, plan, speeds, plan.cfg == 2 if guided is None else guided)
    return predict_step_time(model, tokens, batch, plan, speeds, guided=guided)


def memory(model, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided=None, decode_bytes=0.0):
    """Any plan's per-rank memory (see step_time)."""
    if plan.pipefusion > 1:
        guided = True if guided is None else guided
        return predict_pipefusion_memory(model, tokens, batch, plan, speeds, guided, decode_bytes)
    return predict_memory(model, tokens, batch, plan, speeds, guided=guided, decode_bytes=decode_bytes)


def pipefusion_step_comm(model, tokens: int, batch: int, plan: ParallelConfig, stage: int, pipelined: bool, itemsize=4):
    """What stage `stage` records in one step, {kind: {"bytes", "calls"}} (CommStats convention; tests compare it with
    a run): M patch sends (1 in a warm-up step) from every stage but the last, and the prediction's broadcast."""
    spec = spec_for(model)
    dims = spec.dims(model, tokens)
    n, patches = plan.pipefusion, plan.patch_count if pipelined else 1
    out = {}
    if stage < n - 1:
        out["p2p"] = {"bytes": batch * tokens * dims.hidden_size * itemsize, "calls": patches}
    wire = 2 if plan.comm_dtype else itemsize
    out_bytes = batch * tokens * spec.token_values(model)[1] * wire * (n - 1) if stage == n - 1 else 0
    out["broadcast"] = {"bytes": out_bytes, "calls": 1}
    return out
