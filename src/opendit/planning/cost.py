"""Cost model: predicted step time and per-rank memory of a model's forward under a parallel plan.

What is counted comes from two declarations, never from a switch on names: the model's spec (models/spec.py: exact
parameter and FLOP counts, values per token at the split and gather points) and the plan's sequence-parallel strategy
(parallel/registry.py: the attention work per rank, its collectives per block from the kernel's own formulas, its
buffers).

step time = max over the ranks of one group of (compute + exposed communication + fixed overhead), where
- compute = exact matmul FLOPs / matmul rate + attention FLOPs / attention rate + elementwise bytes / memory bandwidth;
  rates saturate with size (rate = peak * n / (n + n_half)) because small matmuls and short sequences run far below
  peak on every device;
- communication = sum over collectives of (latency + bytes / bandwidth), bytes in the CommStats convention (what this
  rank sends to other ranks), so a calibration of the link and the counters of a run measure the same quantity;
- overlap is explicit: only what a kernel really overlaps can hide, and only the fraction `Speeds.overlap[kind]` of
  it (ring P2P under the block attention, the weight all-gather under the previous block). Ulysses' and FastSeq's
  all-to-alls sit on the critical path (overlap 0 unless the runtime pipelines them and the speed file says so).

Memory per rank = weights (/ sp degree + one block in flight when sharded) + the block's live activations (tokens / sp)
+ the kernel's send/receive buffers + attention workspace + a reserved amount (CUDA context, allocator slack).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.spec import ModelDims, spec_for
from opendit.parallel.registry import AttentionWork, CommItem, get_strategy
from opendit.parallel.sequence import head_sizes, split_sizes
from opendit.planning.speeds import DEFAULTS, Speeds

KINDS = ("all_to_all", "all_gather", "p2p")
# the link each recorded collective kind runs on (Speeds.links has one per KINDS entry): tensor parallelism's
# all-reduce is a reduce-scatter + all-gather, its bytes in that convention (comm.all_reduce_bytes)
LINK_OF = {"tp_all_reduce": "all_gather", "tp_all_gather": "all_gather"}
# Elementwise traffic per token per block, in elements of hidden size C: two LayerNorm+modulate (12), SDPA layout
# copies (4), gates and residuals (10), GELU over the 4C hidden (8), Ulysses/ring packing copies (~6). Counted from
# models/dit.py; only the order of magnitude matters (it is < 10% of a step except for tiny hidden sizes).
EW_ELEMS_PER_TOKEN = 40


def _saturating(peak: float, size: float, half: float) -> float:
    return peak * size / (size + half) if size > 0 else peak


# ------------------------------------------------------------------------------------------------ layout helpers
def local_batch(batch: int, plan: ParallelConfig, guided: bool) -> float:
    """Samples in one forward of the busiest group: images split over dp (ceil), the CFG pair split over cfg."""
    per_image = 2 if guided else 1
    if batch % per_image:
        raise OpenDiTError(f"a guided batch counts 2 samples per image (cond + uncond); got an odd batch {batch}")
    images = batch // per_image
    return math.ceil(images / plan.dp) * per_image / plan.cfg


def _span(stride: int, size: int, speeds: Speeds) -> tuple[bool, float]:
    """Does a group of `size` ranks at `stride` cross nodes, and which fraction of its peers is off-node."""
    if speeds.inter_links is None or stride * size <= speeds.ranks_per_node:
        return False, 0.0
    on_node = max(1, speeds.ranks_per_node // stride)
    return True, (size - min(on_node, size)) / max(1, size - 1)


def comm_time(kind: str, nbytes: float, calls: int, stride: int, size: int, speeds: Speeds) -> float:
    """Time of `calls` collectives of one kind sending `nbytes` per rank in total, over a group at `stride`.

    Inside a node: the node link. Across nodes: an all-to-all sends the off-node fraction of its bytes over the
    network while the rest goes over the node link in parallel; rings (all-gather, P2P) run at the slowest hop.
    """
    if calls == 0 or size == 1:
        return 0.0
    crosses, off = _span(stride, size, speeds)
    kind = LINK_OF.get(kind, kind)
    intra = speeds.links[kind]
    if not crosses:
        return intra.time(nbytes, calls)
    inter = speeds.inter_links[kind]
    if kind == "all_to_all":
        return calls * max(intra.latency_s, inter.latency_s) + max(
            nbytes * (1 - off) / intra.bandwidth, nbytes * off / inter.bandwidth
        )
    return inter.time(nbytes, calls)


def _no_pipefusion(plan: ParallelConfig) -> None:
    if plan.pipefusion > 1:  # its stages and patches are another model: never price it as one device
        raise OpenDiTError("PipeFusion plans are priced by planning.pipefusion_cost (step_time / memory)")


# ------------------------------------------------------------------------------------------------ step time
@dataclass
class StepCost:
    """Predicted time of one denoising step (one forward of the busiest group) and its parts, seconds / bytes."""

    total_s: float
    compute_s: float
    comm_s: float  # exposed (not hidden) communication
    hidden_s: float  # communication hidden behind compute by the kernel's overlap
    overhead_s: float
    bytes_per_rank: float  # sent per step by the busiest rank (CommStats convention)
    calls_per_rank: int
    per_rank_s: list[float]
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_work(dims, plan: ParallelConfig, b: float, sizes: list[int], r: int):
    """The strategy's attention work on sequence rank r (one device: every token and head)."""
    if plan.sp_degree == 1:
        return None, AttentionWork(q_tokens=dims.num_tokens, heads=dims.num_heads, qkv_rows=dims.num_tokens)
    strategy = get_strategy(plan.impl)
    return strategy, strategy.block_work(dims, plan, b, sizes, r)


def tensor_share(dims, plan: ParallelConfig) -> tuple[float, ModelDims]:
    """(the busiest tp rank's share of a block's matmuls and weights, the attention it holds): under --tp N rank 0
    keeps ceil(H/N) of the H heads (and about that share of the MLP and adaLN), which the strategies then split."""
    if plan.tp == 1:
        return 1.0, dims
    heads = head_sizes(dims.num_heads, plan.tp)[0]
    return heads / dims.num_heads, replace(dims, num_heads=heads, hidden_size=heads * dims.head_dim)


def _tensor_comm(dims, plan: ParallelConfig, b: float, t_r: int, s: int) -> list[CommItem]:
    """Tensor parallelism's collectives per block on tp rank 0 (parallel/tensor.py's formulas)."""
    from opendit.parallel.tensor import block_comm_bytes

    rows = b * dims.sequences  # a video DiT's blocks modulate every frame (or position) sequence
    counts = block_comm_bytes(rows, t_r, dims.hidden_size, plan.tp, 0, s, rows=rows)
    return [CommItem(kind, nbytes, calls, plan.tp, 1) for kind, (nbytes, calls) in counts.items()]


def _rank_block(model, plan, b, tokens, sizes, r, speeds, s) -> dict:
    """Compute and communication of one block on sequence rank r = ring_idx * U + ulysses_idx: the FLOPs from the
    model's spec, the attention shape and the collectives from the plan's strategy (parallel/registry.py), the
    matmuls and heads divided by tensor parallelism, whose all-reduces and gathers join the collectives."""
    spec = spec_for(model)
    dims = spec.dims(model, tokens)
    c = dims.hidden_size
    share, attn_dims = tensor_share(dims, plan)
    strategy, work = _attention_work(attn_dims, plan, b * dims.sequences, sizes, r)  # video: B * F sequences
    t_r = sizes[r]
    fl = spec.block_flops(model, b, t_r, work.q_tokens, tokens, work.heads)
    fl["linear"] = fl["linear"] * share + work.extra_linear_flops
    seq = dims.sequences  # a video DiT's matmuls run on every frame of the rank's positions: B * F * T_r rows
    # a tp rank's matmuls are `share` as wide: as little work per call as share x the rows, and as far below peak
    lin_rate = _saturating(speeds.matmul_flops, b * seq * t_r * share, speeds.matmul_half_rows)
    qkv_rate = _saturating(speeds.matmul_flops, b * seq * work.qkv_rows * share, speeds.matmul_half_rows)
    qkv_share = 3 * c / (3 * c + c + 2 * dims.mlp_ratio * c)
    linear_s = fl["linear"] * (1 - qkv_share) / lin_rate + fl["linear"] * qkv_share / qkv_rate
    # Attention runs in one call (Ulysses, FastSeq) or in one call per ring block on (q_tok x block) tiles: a short
    # block runs below the kernel's sustained rate, which is what makes ring lose at small sequences on GPUs.
    k_block = tokens / work.key_blocks
    attn_rate = _saturating(speeds.attn_flops, min(work.q_tokens, k_block), speeds.attn_half_tokens)
    attn_s = fl["attention"] / attn_rate
    rows = work.elementwise_rows if work.elementwise_rows is not None else t_r
    ew_elems = EW_ELEMS_PER_TOKEN * b * seq * rows * c + work.extra_elementwise * 4 / s
    ew_s = ew_elems * s / speeds.mem_bw
    comm = [] if strategy is None else strategy.block_comm(attn_dims, plan, b * dims.sequences, sizes, r, s, attn_s)
    if strategy is not None and strategy.layout == "tokens" and dims.split_blocks != 1:
        # video DiT: a position-split kernel runs in the spatial blocks only (on B * F sequences, passed above);
        # spread over every block, as the step time multiplies a block by depth
        comm = [replace(c, bytes=c.bytes * dims.split_blocks, calls=c.calls * dims.split_blocks) for c in comm]
    if plan.tp > 1:  # the sequence groups' ranks are tp apart on the mesh; tp's own collectives are innermost
        comm = [replace(item, stride=item.stride * plan.tp) for item in comm] + _tensor_comm(dims, plan, b, t_r, s)
    if plan.shard_weights and plan.sp_degree > 1:  # one block's weights gathered, under the previous block
        blk = spec.count_params(model)["block"] * s
        comm.append(CommItem("all_gather", blk / plan.sp_degree * (plan.sp_degree - 1), 1, plan.sp_degree, 1, 0.0))
        comm[-1].overlap = "weights"
    ops = 1.0 + work.dispatch_ops
    return {"linear_s": linear_s, "attn_s": attn_s, "ew_s": ew_s, "comm": comm, "ops": ops}


def _block_costs(model, tokens: int, b: float, plan: ParallelConfig, speeds: Speeds) -> list[dict]:
    """Per sequence rank: one block's compute, exposed and hidden communication, bytes and calls."""
    s, sp = speeds.dtype_bytes, plan.sp_degree
    sizes = split_sizes(tokens, sp, plan.token_shares)
    rel = speeds.rank_speeds or (1.0,) * sp
    if len(rel) != sp:
        raise OpenDiTError(f"speeds.rank_speeds lists {len(rel)} ranks but the plan has {sp} sequence ranks")
    out = []
    for r in range(sp):
        blk = _rank_block(model, plan, b, tokens, sizes, r, speeds, s)
        compute = (blk["linear_s"] + blk["attn_s"] + blk["ew_s"]) / rel[r]
        exposed = hidden = 0.0
        for item in blk["comm"]:
            t = comm_time(item.kind, item.bytes, item.calls, item.stride, item.size, speeds)
            hide_s = compute if item.overlap == "weights" else item.hide_s  # weights: prefetched a block ahead
            h = speeds.overlap.get(item.overlap, 0.0) * min(t, hide_s / rel[r]) if item.overlap else 0.0
            exposed, hidden = exposed + t - h, hidden + h
        nbytes, calls = sum(i.bytes for i in blk["comm"]), sum(i.calls for i in blk["comm"])
        out.append({"compute": compute, "exposed": exposed, "hidden": hidden, "bytes": nbytes, "calls": calls, **blk})
    return out


def predict_step_time(
    model, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided: bool | None = None
) -> StepCost:
    """Predicted time of one denoising step.

    tokens: sequence length per sample (model.num_tokens for images); batch: forward samples of the whole request
    (images x 2 with CFG); guided: whether the batch holds CFG pairs (default: batch even and plan.cfg == 2, or
    False). Time is that of the busiest rank of the busiest group; every rank waits for it at the next collective.
    """
    _no_pipefusion(plan)
    guided = plan.cfg == 2 if guided is None else guided
    spec, s, b, sp = spec_for(model), speeds.dtype_bytes, local_batch(batch, plan, guided), plan.sp_degree
    if tokens < sp:
        raise OpenDiTError(f"{tokens} tokens cannot be split over {sp} sequence ranks; use at most {tokens}")
    depth = spec.dims(model, tokens).depth
    ranks = _block_costs(model, tokens, b, plan, speeds)
    per_rank = [depth * (r["compute"] + r["exposed"]) for r in ranks]
    worst = max(range(sp), key=lambda r: per_rank[r])
    blk, sizes = ranks[worst], split_sizes(tokens, sp, plan.token_shares)
    # Outside the blocks: embeddings and final layer (small), the token gather over the sequence group and the CFG
    # gather of the prediction over the cfg group.
    edge_s = spec.edge_flops(model, tokens, b) / _saturating(speeds.matmul_flops, b * tokens, speeds.matmul_half_rows)
    gather_bytes, cfg_bytes = output_gather_bytes(model, tokens, b, plan, worst, s)
    gather_s = comm_time("all_gather", gather_bytes, 1, plan.tp, sp, speeds) if sp > 1 else 0.0
    cfg_s = comm_time("all_gather", cfg_bytes, 1, sp * plan.tp, 2, speeds) if plan.cfg == 2 else 0.0
    overhead = (depth * blk["ops"] + 2) * speeds.block_overhead_s  # + embedder and final layer
    comm_s = depth * blk["exposed"] + gather_s + cfg_s
    compute_s = depth * blk["compute"] + edge_s
    if speeds.async_dispatch:  # GPUs: the host queues kernels ahead; dispatch costs only when it is the bottleneck
        total = max(compute_s + comm_s, overhead)
    else:  # CPU: the same core dispatches and computes
        total = compute_s + comm_s + overhead
    return StepCost(
        total_s=total,
        compute_s=compute_s,
        comm_s=comm_s,
        hidden_s=depth * blk["hidden"],
        overhead_s=overhead,
        bytes_per_rank=depth * blk["bytes"] + gather_bytes + cfg_bytes,
        calls_per_rank=depth * blk["calls"] + (sp > 1) + (plan.cfg == 2),
        per_rank_s=[t + edge_s + overhead for t in per_rank],
        detail={
            "local_batch": b,
            "token_sizes": sizes,
            "linear_s": depth * blk["linear_s"],
            "attention_s": depth * blk["attn_s"],
            "elementwise_s": depth * blk["ew_s"],
            "gather_s": gather_s,
            "cfg_gather_s": cfg_s,
        },
    )


# ------------------------------------------------------------------------------------------------ memory
@dataclass
class MemoryCost:
    """Predicted whole-run peak bytes of the busiest rank (`total`) and its parts.

    A run has phases, and the peak is the largest of them, on top of what every process pays (`process`: the
    interpreter, torch, diffusers, the process groups; 0 for device memory, where `reserved` is the CUDA context):
    - `loading`: the weights as loaded (whole model, or 1/P of it with sharded loading) + one source tensor in
      flight, read in the file's dtype (fp32 assumed);
    - `sampling`: the forward (weights, one block's activations, the strategy's buffers, attention workspace,
      `reserved`);
    - `decode`: on the output rank of a latent model, its resident weights + the VAE + the VAE's activations.
    `weights`, `activations`, `buffers`, `workspace` are the sampling phase's parts."""

    total: float
    weights: float
    activations: float
    buffers: float
    workspace: float
    reserved: float
    process: float = 0.0
    loading: float = 0.0
    sampling: float = 0.0
    decode: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def predict_memory(
    model,
    tokens: int,
    batch: int,
    plan: ParallelConfig,
    speeds: Speeds,
    guided: bool | None = None,
    decode_bytes: float = 0.0,
) -> MemoryCost:
    """Whole-run peak bytes per rank (MemoryCost's phases). Inference keeps one block's activations alive at a time
    (no autograd graph), so sampling's peak is the larger of the attention and the MLP phase of one block, on this
    rank's tokens. `decode_bytes`: the VAE's weights + activations for the request's images (outputs.vae_memory_bytes),
    paid by the output rank."""
    _no_pipefusion(plan)
    guided = plan.cfg == 2 if guided is None else guided
    spec, s, b, sp = spec_for(model), speeds.dtype_bytes, local_batch(batch, plan, guided), plan.sp_degree
    dims = spec.dims(model, tokens)
    sizes = split_sizes(tokens, sp, plan.token_shares)
    t_r, c = max(sizes), dims.hidden_size
    params = spec.count_params(model, tokens)
    sharded = plan.shard_weights and sp > 1
    share, attn_dims = tensor_share(dims, plan)  # --tp: this rank's part of every block's weights and heads
    total = params["total"] - dims.depth * params["block"] * (1 - share)
    resident = total * s / sp if sharded else total * s
    weights = resident + params["block"] * s if sharded else resident  # + at most one gathered block (test_shard)
    unit = b * t_r * c * s  # one (b, T_r, C) tensor
    # attention phase: residual x, normed x, fused qkv (3), attention output, projection (1 + 1 + 3 + 1 + 1); under
    # tp the qkv and attention output are this rank's heads only, the projection's partial sum is whole
    attn_phase = (6 + 4 * share) * unit
    mlp_phase = (3 + 2 * dims.mlp_ratio * share) * unit  # x, normed, fc1 out, gelu out (this rank's M_r), fc2 out
    # Before the blocks: the inputs are sharded at the split point (raw patches for DiT), so no (b, T, C) tensor
    # exists; with sharded weights the root all-gathers the positions (1, T, C) and frees them before block 0.
    embedding = b * tokens * spec.token_values(model)[0] * s + (tokens * c * s if sharded else 0)
    activations = max(attn_phase, mlp_phase, embedding)
    strategy = get_strategy(plan.impl) if sp > 1 else None
    buffers = strategy.buffers(attn_dims, plan, b, sizes, s) if strategy else 0.0
    work = max(
        (_attention_work(attn_dims, plan, b, sizes, r)[1] for r in range(sp)), key=lambda w: w.heads * w.q_tokens
    )
    workspace = b * work.heads * work.q_tokens * 4 * 2  # fp32 log-sum-exp and row statistics
    if not speeds.fused_attention:  # the math path materialises the scores
        workspace += b * work.heads * work.q_tokens * tokens / work.key_blocks * 4
    reserved = speeds.reserved_bytes
    sampling = weights + activations + buffers + workspace + reserved
    # the largest source tensor (fp32 in the file), whole or this rank's rows of it
    in_flight = params.get("largest_tensor", params["block"] / 4) * 4 / (sp if sharded else 1)
    loading = resident + in_flight + reserved
    decode = resident + decode_bytes + reserved if decode_bytes else 0.0
    process = speeds.process_bytes
    total = process + max(sampling, loading, decode)
    return MemoryCost(total, weights, activations, buffers, workspace, reserved, process, loading, sampling, decode)


def block_comm(model, tokens: int, batch: float, plan: ParallelConfig, rank: int, itemsize: int = 4) -> dict:
    """Bytes (CommStats convention) and calls one sequence rank sends per block, per collective kind:
    {kind: {"bytes", "calls"}}, from the plan's strategy (the kernel's own formulas). `batch` is the local batch of
    the rank's group."""
    speeds = replace(DEFAULTS["cpu-gloo"], dtype_bytes=itemsize)
    sizes = split_sizes(tokens, plan.sp_degree, plan.token_shares)
    out: dict[str, dict] = {}
    for item in _rank_block(model, plan, batch, tokens, sizes, rank, speeds, itemsize)["comm"]:
        entry = out.setdefault(item.kind, {"bytes": 0, "calls": 0})
        entry["bytes"] += item.bytes
        entry["calls"] += item.calls
    return out


def predict_step_comm(model, tokens: int, batch: float, plan: ParallelConfig, sp_rank: int, itemsize: int = 4) -> dict:
    """Every collective one rank issues per denoising step, {kind: {"bytes", "calls"}} in the CommStats convention:
    the strategy's per-block collectives x depth (in the wire dtype: 2 bytes under comm_dtype), the token gather of
    the output over the sequence group and the cfg gather of the prediction (always exact, `itemsize`). `batch` is
    the samples of this rank's model call (its dp group's guided batch, halved by cfg); tensor parallelism's
    "tp_all_reduce" / "tp_all_gather" are tp rank 0's. Weight gathers of sharded
    weights are counted separately (kind "weight_gather"). Tests assert this equals what a run records."""
    depth = spec_for(model).dims(model, tokens).depth
    wire = 2 if plan.comm_dtype else itemsize
    out: dict[str, dict] = {}

    def add(kind: str, nbytes: float, calls: int) -> None:
        entry = out.setdefault(kind, {"bytes": 0, "calls": 0})
        entry["bytes"] += nbytes
        entry["calls"] += calls

    gather_bytes, cfg_bytes = output_gather_bytes(model, tokens, batch, plan, sp_rank, itemsize)
    if plan.sp_degree > 1 or plan.tp > 1:  # sequence kernels in the wire dtype, tensor parallelism's always exact
        for size, exact in ((wire, False), (itemsize, True)):
            for kind, counts in block_comm(model, tokens, batch, plan, sp_rank, size).items():
                if kind.startswith("tp_") == exact:
                    add(kind, depth * counts["bytes"], depth * counts["calls"])
    if plan.sp_degree > 1:
        add("all_gather", gather_bytes, 1)
    if plan.cfg == 2:
        add("all_gather", cfg_bytes, 1)
    return out


def output_gather_bytes(model, tokens: int, batch: float, plan: ParallelConfig, sp_rank: int, itemsize: int):
    """(token gather, cfg gather) bytes one rank sends per step: its (B, T_r, values) output to the other sequence
    ranks, and its half of the prediction (B, T, values) to the other cfg rank (0 where the plan has none)."""
    spec = spec_for(model)
    out_elems = batch * spec.token_values(model)[1]
    sizes = split_sizes(tokens, plan.sp_degree, plan.token_shares)
    gather = out_elems * sizes[sp_rank] * itemsize * (plan.sp_degree - 1)
    if plan.sp_degree > 1 and plan.impl == "dsp":  # DSP gathers frames: F_r of the F frames' values per position
        frames = spec.dims(model, tokens).sequences
        gather = out_elems * tokens * split_sizes(frames, plan.sp_degree)[sp_rank] / frames
        gather *= itemsize * (plan.sp_degree - 1)
    return gather, out_elems * tokens * itemsize if plan.cfg == 2 else 0
