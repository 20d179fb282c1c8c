"""Cost model: predicted step time and per-rank memory of a DiT forward under a parallel plan.

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
All formulas follow the kernels in ulysses.py, ring.py, hybrid.py and FastSeq as described in ANCHORS.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from opendit.distributed.config import ParallelConfig, head_split
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig
from opendit.parallel.sequence import split_sizes
from opendit.planning.speeds import DEFAULTS, Speeds

KINDS = ("all_to_all", "all_gather", "p2p")
# Elementwise traffic per token per block, in elements of hidden size C: two LayerNorm+modulate (12), SDPA layout
# copies (4), gates and residuals (10), GELU over the 4C hidden (8), Ulysses/ring packing copies (~6). Counted from
# models/dit.py; only the order of magnitude matters (it is < 10% of a step except for tiny hidden sizes).
EW_ELEMS_PER_TOKEN = 40


def _saturating(peak: float, size: float, half: float) -> float:
    return peak * size / (size + half) if size > 0 else peak


# ------------------------------------------------------------------------------------------------ exact counts
def count_params(model: DiTConfig, tokens: int | None = None) -> dict[str, int]:
    """Parameters of a DiT (equal to build_dit(...).parameters(), pos_embed included): {"block", "total"}."""
    c, p = model.hidden_size, model.patch_size
    m = int(c * model.mlp_ratio)
    tokens = model.num_tokens if tokens is None else tokens
    block = (3 * c * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c) + (6 * c * c + 6 * c)
    embed = model.in_channels * p * p * c + c + (256 * c + c) + (c * c + c)
    embed += (model.num_classes + int(model.class_dropout_prob > 0)) * c + tokens * c
    final = (2 * c * c + 2 * c) + (c * p * p * model.out_channels + p * p * model.out_channels)
    return {"block": block, "total": embed + model.depth * block + final}


def block_flops(model: DiTConfig, batch: float, rows: float, q_tokens: float, k_tokens: float, heads: float) -> dict:
    """FLOPs of one block on one rank: linear layers on `rows` tokens per sample, attention of q_tokens x k_tokens
    over `heads` heads (2 FLOPs per multiply-add; QK^T and PV are 2 * Sq * Sk * D each)."""
    c = model.hidden_size
    m = model.mlp_ratio * c
    d = c // model.num_heads
    linear = 2 * batch * rows * c * (3 * c + c + 2 * m) + 2 * batch * c * 6 * c  # qkv, proj, fc1, fc2; adaLN
    attention = 4 * batch * heads * q_tokens * k_tokens * d
    return {"linear": linear, "attention": attention}


def model_flops(model: DiTConfig, tokens: int, batch: int) -> float:
    """FLOPs of one whole forward on one device (blocks + patch embedding + final layer + timestep MLP)."""
    c, p = model.hidden_size, model.patch_size
    blk = block_flops(model, batch, tokens, tokens, tokens, model.num_heads)
    edges = 2 * batch * tokens * c * p * p * (model.in_channels + model.out_channels)
    edges += 2 * batch * (256 * c + c * c + 2 * c * c)
    return model.depth * (blk["linear"] + blk["attention"]) + edges


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
    intra = speeds.links[kind]
    if not crosses:
        return intra.time(nbytes, calls)
    inter = speeds.inter_links[kind]
    if kind == "all_to_all":
        return calls * max(intra.latency_s, inter.latency_s) + max(
            nbytes * (1 - off) / intra.bandwidth, nbytes * off / inter.bandwidth
        )
    return inter.time(nbytes, calls)


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


def _rank_block(model, plan, b, tokens, sizes, heads_u, r, speeds, s) -> dict:
    """Compute and communication of one block on sequence rank r = ring_idx * U + ulysses_idx."""
    c, h = model.hidden_size, model.num_heads
    d = c // h
    u_deg, r_deg = plan.ulysses, plan.ring
    g, u = divmod(r, u_deg)
    impl = plan.impl
    t_r = sizes[r]
    group = sizes[g * u_deg : (g + 1) * u_deg]
    t_g = sum(group)
    h_u = heads_u[u]
    if impl == "none":
        q_tok, heads, qkv_rows = tokens, h, tokens
    elif impl in ("ulysses", "fastseq"):
        q_tok, heads, qkv_rows = tokens, h_u, t_r
    elif impl == "ring":
        q_tok, heads, qkv_rows = t_r, h, t_r
    else:  # usp: the group's tokens for this rank's heads, against all keys through the ring
        q_tok, heads, qkv_rows = t_g, h_u, t_r
    fl = block_flops(model, b, t_r, q_tok, tokens, heads)
    if impl == "fastseq":  # QKV for every token but only this rank's heads: 3 * h_u * d outputs instead of 3c
        fl["linear"] += 2 * b * c * 3 * (tokens * h_u * d - t_r * c)
        qkv_rows = tokens
    rows = b * t_r
    lin_rate = _saturating(speeds.matmul_flops, rows, speeds.matmul_half_rows)
    qkv_rate = _saturating(speeds.matmul_flops, b * qkv_rows, speeds.matmul_half_rows)
    qkv_share = 3 * c / (3 * c + c + 2 * model.mlp_ratio * c)
    linear_s = fl["linear"] * (1 - qkv_share) / lin_rate + fl["linear"] * qkv_share / qkv_rate
    # Attention runs in one call (Ulysses, FastSeq) or in one call per ring block on (q_tok x block) tiles: a short
    # block runs below the kernel's sustained rate, which is what makes ring lose at small sequences on GPUs.
    ring_deg = {"ring": plan.sp_degree, "usp": r_deg}.get(impl, 1)
    k_block = tokens / ring_deg
    attn_rate = _saturating(speeds.attn_flops, min(q_tok, k_block), speeds.attn_half_tokens)
    attn_s = fl["attention"] / attn_rate
    ew_elems = EW_ELEMS_PER_TOKEN * b * max(t_r, qkv_rows if impl == "fastseq" else t_r) * c
    if ring_deg > 1:  # the fp32 log-sum-exp merge after each ring step: ~6 passes over (b, q_tok, heads, d) fp32
        ew_elems += 6 * b * q_tok * heads * d * (ring_deg - 1) * 4 / s
    ew_s = ew_elems * s / speeds.mem_bw
    # Dispatch overhead grows with the kernel's extra ops: packing around each all-to-all, and per ring step an
    # exchange, an attention call and a merge (~a third of a block's ops each).
    ops = 1.0 + 0.3 * (impl in ("ulysses", "fastseq", "usp")) + 0.3 * (ring_deg - 1)
    comm = []  # (kind, bytes, calls, stride, size, overlappable_with_seconds, overlap_key)
    if impl in ("ulysses", "usp"):
        hs = heads_u
        a2a = s * b * d * (3 * t_r * (h - hs[u]) + hs[u] * (t_g - t_r))
        comm.append(("all_to_all", a2a, 2, 1, u_deg, 0.0, None))
    if impl in ("ring", "usp"):
        blocks = sizes if impl == "ring" else [sum(sizes[j * u_deg : (j + 1) * u_deg]) for j in range(r_deg)]
        me, hh = (r, h) if impl == "ring" else (g, h_u)
        stride = 1 if impl == "ring" else u_deg
        p = len(blocks)
        for step in range(p - 1):  # block (me - step) travels on while attention runs on it
            src = blocks[(me - step) % p]
            nbytes = 2 * b * src * hh * d * s
            hide = attn_s * src / tokens
            comm.append(("p2p", nbytes, 1, stride, p, hide, "ring"))
    if impl == "fastseq":
        comm.append(("all_gather", b * t_r * c * s * (u_deg - 1), 1, 1, u_deg, 0.0, None))
        comm.append(("all_to_all", b * (tokens - t_r) * h_u * d * s, 1, 1, u_deg, 0.0, None))
    if plan.shard_weights and plan.sp_degree > 1:
        blk = count_params(model)["block"] * s
        comm.append(("all_gather", blk / plan.sp_degree * (plan.sp_degree - 1), 1, 1, plan.sp_degree, None, "weights"))
    return {"linear_s": linear_s, "attn_s": attn_s, "ew_s": ew_s, "comm": comm, "ops": ops}


def predict_step_time(
    model: DiTConfig,
    tokens: int,
    batch: int,
    plan: ParallelConfig,
    speeds: Speeds,
    guided: bool | None = None,
) -> StepCost:
    """Predicted time of one denoising step.

    tokens: sequence length per sample (model.num_tokens for images); batch: forward samples of the whole request
    (images x 2 with CFG); guided: whether the batch holds CFG pairs (default: batch even and plan.cfg == 2, or
    False). Time is that of the busiest rank of the busiest group; every rank waits for it at the next collective.
    """
    guided = plan.cfg == 2 if guided is None else guided
    s = speeds.dtype_bytes
    b = local_batch(batch, plan, guided)
    sp = plan.sp_degree
    if tokens < sp:
        raise OpenDiTError(f"{tokens} tokens cannot be split over {sp} sequence ranks; use at most {tokens}")
    sizes = split_sizes(tokens, sp, plan.token_shares)
    heads_u = head_split(model.num_heads, plan.ulysses)
    rel = speeds.rank_speeds or (1.0,) * sp
    if len(rel) != sp:
        raise OpenDiTError(f"speeds.rank_speeds lists {len(rel)} ranks but the plan has {sp} sequence ranks")
    per_rank, parts = [], []
    for r in range(sp):
        blk = _rank_block(model, plan, b, tokens, sizes, heads_u, r, speeds, s)
        compute = (blk["linear_s"] + blk["attn_s"] + blk["ew_s"]) / rel[r]
        exposed = hidden = 0.0
        nbytes = calls = 0
        for kind, nb, n, stride, size, hide_s, key in blk["comm"]:
            t = comm_time(kind, nb, n, stride, size, speeds)
            if key == "weights":  # prefetched during the previous block
                hide_s = compute
            frac = speeds.overlap.get(key, 0.0) if key else 0.0
            h = frac * min(t, (hide_s or 0.0) / rel[r])
            exposed, hidden = exposed + t - h, hidden + h
            nbytes, calls = nbytes + nb, calls + n
        per_rank.append(model.depth * (compute + exposed))
        parts.append((compute, exposed, hidden, nbytes, calls, blk))
    worst = max(range(sp), key=lambda r: per_rank[r])
    compute, exposed, hidden, nbytes, calls, blk = parts[worst]
    depth = model.depth
    # Outside the blocks: patch embedding and final layer on the full sequence before the shard / after the gather
    # (small), the token gather over the sequence group and the CFG gather of the prediction over the cfg group.
    edges = 2 * b * tokens * model.hidden_size * model.patch_size**2 * (model.in_channels + model.out_channels)
    edge_s = edges / _saturating(speeds.matmul_flops, b * tokens, speeds.matmul_half_rows)
    out_elems = b * model.patch_size**2 * model.out_channels
    gather_bytes = out_elems * sizes[worst] * s * (sp - 1)
    gather_s = comm_time("all_gather", gather_bytes, 1, 1, sp, speeds) if sp > 1 else 0.0
    cfg_bytes = out_elems * tokens * s if plan.cfg == 2 else 0
    cfg_s = comm_time("all_gather", cfg_bytes, 1, sp, 2, speeds) if plan.cfg == 2 else 0.0
    overhead = (depth * blk["ops"] + 2) * speeds.block_overhead_s  # + embedder and final layer
    comm_s = depth * exposed + gather_s + cfg_s
    compute_s = depth * compute + edge_s
    if speeds.async_dispatch:  # GPUs: the host queues kernels ahead; dispatch costs only when it is the bottleneck
        total = max(compute_s + comm_s, overhead)
    else:  # CPU: the same core dispatches and computes
        total = compute_s + comm_s + overhead
    return StepCost(
        total_s=total,
        compute_s=compute_s,
        comm_s=comm_s,
        hidden_s=depth * hidden,
        overhead_s=overhead,
        bytes_per_rank=depth * nbytes + gather_bytes + cfg_bytes,
        calls_per_rank=depth * calls + (sp > 1) + (plan.cfg == 2),
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
    """Predicted peak bytes on the busiest rank and its parts."""

    total: float
    weights: float
    activations: float
    buffers: float
    workspace: float
    reserved: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict_memory(
    model: DiTConfig, tokens: int, batch: int, plan: ParallelConfig, speeds: Speeds, guided: bool | None = None
) -> MemoryCost:
    """Peak bytes per rank. Inference keeps one block's activations alive at a time (no autograd graph), so the
    peak is the larger of the attention phase and the MLP phase of one block, on this rank's tokens."""
    guided = plan.cfg == 2 if guided is None else guided
    s = speeds.dtype_bytes
    b = local_batch(batch, plan, guided)
    c, h = model.hidden_size, model.num_heads
    sp, impl = plan.sp_degree, plan.impl
    t_r = max(split_sizes(tokens, sp, plan.token_shares))
    h_u = max(head_split(h, plan.ulysses))
    params = count_params(model, tokens)
    weights = params["total"] * s
    if plan.shard_weights and sp > 1:  # own shard + at most one block's worth gathered (tests/test_shard.py: 0.9-1.0)
        weights = params["total"] * s / sp + params["block"] * s
    unit = b * t_r * c * s  # one (b, T_r, C) tensor
    full_heads = b * tokens * c * h_u / h * s  # one (b, T, H_u, D) tensor
    group_heads = full_heads / plan.ring  # one (b, T_group, H_u, D) tensor (USP)
    # attention phase: residual x, normed x, fused qkv (3), attention output, projection (1 + 1 + 3 + 1 + 1)
    attn_phase = 7 * unit
    buffers = {
        "none": 0.0,
        "ulysses": 3 * unit + 3 * full_heads + 2 * full_heads,  # packed send, receive, output send/receive
        "fastseq": b * tokens * c * s + 3 * full_heads + 2 * full_heads,  # gathered x, qkv of my heads, a2a back
        "ring": 4 * unit + unit * 4 / s,  # K/V stack, in-flight block, fp32 running output
        "usp": 3 * unit + (3 + 4 + 4 / s + 2) * group_heads,  # a2a send/recv, K/V stack + in flight, fp32 out
    }[impl]
    mlp_phase = (3 + 2 * model.mlp_ratio) * unit  # x, normed, fc1 out, gelu out, fc2 out
    # Before the blocks: raw patches (b, T, C_in p^2) are sharded before the embedding, so no (b, T, C) tensor exists;
    # with sharded weights the root all-gathers pos_embed (1, T, C) for the embedding and frees it before block 0.
    patch_values = model.in_channels * model.patch_size**2
    embedding = b * tokens * patch_values * s + (tokens * c * s if plan.shard_weights and sp > 1 else 0)
    activations = max(attn_phase, mlp_phase, embedding)
    q_tok = t_r if impl == "ring" else tokens
    k_tok = t_r if impl in ("ring", "usp") else tokens
    workspace = b * h_u * q_tok * 4 * 2  # fp32 log-sum-exp and row statistics
    if not speeds.fused_attention:  # the math path materialises the scores
        workspace += b * h_u * q_tok * k_tok * 4
    reserved = speeds.reserved_bytes
    total = weights + activations + buffers + workspace + reserved
    return MemoryCost(total, weights, activations, buffers, workspace, reserved)


def block_comm(model: DiTConfig, tokens: int, batch: float, plan: ParallelConfig, rank: int, itemsize: int = 4) -> dict:
    """Bytes (CommStats convention) and calls one sequence rank sends per block, per collective kind:
    {kind: {"bytes", "calls"}}. `batch` is the local batch of the rank's group. Matches ulysses_bytes, ring_bytes,
    hybrid_bytes and FastSeq's all-gather + all-to-all."""
    speeds = replace(DEFAULTS["cpu-gloo"], dtype_bytes=itemsize)
    sizes = split_sizes(tokens, plan.sp_degree, plan.token_shares)
    heads_u = head_split(model.num_heads, plan.ulysses)
    out: dict[str, dict] = {}
    for kind, nbytes, calls, *_ in _rank_block(model, plan, batch, tokens, sizes, heads_u, rank, speeds, itemsize)[
        "comm"
    ]:
        entry = out.setdefault(kind, {"bytes": 0, "calls": 0})
        entry["bytes"] += nbytes
        entry["calls"] += calls
    return out
