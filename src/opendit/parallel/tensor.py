"""Tensor parallelism (--tp N): the block weights and their compute split over the innermost mesh ranks, exact.

Megatron's layout, declared per model family by its spec (`TensorSplit`, models/spec.py) and installed from outside:
- attention by heads: tp rank r keeps heads [h_r, h_r + H_r) (head_sizes: ceil first, so any head count >= N runs;
  uneven splits are exact). A fused qkv weight (3C, C) is laid out (3, H, Dh) along its output dim, so rank r's rows
  are three ranges (its heads of q, of k and of v), not one column range. The module then has H_r heads, and the
  sequence-parallel kernels installed after this (Ulysses, ring, ...) see a narrower attention and split those heads
  or the tokens further. The output projection (C, C) is row-parallel: rank r keeps the input columns of its heads,
  computes a partial sum and all-reduces it; the bias is added once, after the sum.
- MLP: fc1 column-parallel (rank r keeps M_r of the M hidden units, split_sizes), GELU local, fc2 row-parallel.
- adaLN modulation (k x C outputs, a third of a DiT block's weights): rank r keeps C_r of each of the k chunks and
  all-gathers (B, k, C_r) -> (B, k, C), because the modulations act elementwise on the whole residual stream, which
  every tp rank holds.
Per block and rank that is 2 all-reduces of the (B, S, C) activation (S: this rank's tokens) and one all-gather of
(B, k, C_r) per adaLN; `block_comm_bytes` states both in the CommStats convention, for the cost model and the tests.

Weights: the local tensors are plain parameters of their local shape (a rank's block bytes are ~1/N). Every split
module keeps `tp_layouts` (parameter name -> SliceLayout: the global shape and the ranges of the global tensor the
local one is made of), which sharded loading reads, so a rank reads only its slices from the file
(parallel/sharded_loading.py). Installed on a model built on `meta`, nothing real is sliced.

Families read from a diffusers class's `_tp_plan` (families/tp_plan.py) run through the same functions, with one more
attention kind and packed Linears (`PlannedTensorSplit`):
- "diffusers_heads": an attention module with whichever of diffusers' projections it has (to_q / to_k / to_v and the
  joint stream's add_q_proj / add_k_proj / add_v_proj, column-parallel on this rank's heads; to_out.0 and to_add_out,
  row-parallel on the same head columns; none of them when it is pre-only, Flux's single-stream attention). Its `heads`
  becomes the local count and `inner_dim` (where it equals heads x head_dim) the local width, so processors that
  unflatten by `heads` or by `inner_dim // heads` see this rank's heads.
- packed Linears (`PackedLinear`): a Linear whose output (dim 0) or input (dim 1) features are a concatenation of
  blocks, each split on its own. Blocks of attention heads are split like the attention (head_sizes x head_dim): the
  q, k and v blocks that lead a packed output projection inside an attention module (Flux2's to_qkv_mlp_proj), the
  attention-output block that leads a packed input projection inside an attention module or beside one (Flux2's
  to_out, Flux's single-stream proj_out). The other blocks (MLP) are split like the layer that produces or consumes
  them: in proportion to the heads inside an attention module (its processor separates the fused output by the global
  q, k, v : MLP ratio), by split_sizes elsewhere (as a plain column-parallel Linear, Flux's proj_mlp, is split).

Inference only: the collectives are not differentiable (training uses DDP / FSDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendit.distributed.comm import Comm, all_reduce_bytes
from opendit.errors import OpenDiTError
from opendit.models.spec import TensorSplit, match_path
from opendit.parallel.sequence import head_sizes, split_sizes


@dataclass(frozen=True)
class SliceLayout:
    """A local tensor = the global tensor's `ranges` (start, length) along `dim`, concatenated in order."""

    global_shape: tuple[int, ...]
    dim: int
    ranges: tuple[tuple[int, int], ...]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        if tuple(full.shape) != self.global_shape:
            raise OpenDiTError(f"tensor of shape {tuple(full.shape)} where the layout expects {self.global_shape}")
        parts = [full.narrow(self.dim, start, n) for start, n in self.ranges]
        return torch.cat(parts, self.dim) if len(parts) > 1 else parts[0].clone()


def _local_parameter(param: nn.Parameter, layout: SliceLayout | None) -> nn.Parameter:
    """The local part of a parameter as its own Parameter (a copy, so the whole tensor can be freed)."""
    value = param.detach().clone() if layout is None else layout.take(param.detach())
    return nn.Parameter(value, requires_grad=param.requires_grad)


class TensorParallelLinear(nn.Module):
    """A Linear's local part: `weight` and `bias` keep nn.Linear's state-dict names; `tp_layouts` say which part."""

    def __init__(self, linear: nn.Linear, weight: SliceLayout, bias: SliceLayout | None, comm: Comm):
        super().__init__()
        self.weight = _local_parameter(linear.weight, weight)
        self.bias = None if linear.bias is None else _local_parameter(linear.bias, bias)
        self.tp_layouts = {"weight": weight, **({"bias": bias} if bias is not None and linear.bias is not None else {})}
        self.comm = comm
        self.out_features, self.in_features = self.weight.shape

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp={self.comm.size}"


class ColumnParallelLinear(TensorParallelLinear):
    """Output features split: (..., C_in) whole -> (..., out_r) this rank's outputs. No communication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(TensorParallelLinear):
    """Input features split: (..., in_r) -> partial sums, all-reduced -> (..., C_out) whole, bias added once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (..., C_out): this rank's share of the sum over input features
        out = self.comm.all_reduce(partial, kind="tp_all_reduce", inplace=True)  # (..., C_out) on every tp rank
        return out if self.bias is None else out + self.bias


class GatheredLinear(TensorParallelLinear):
    """Outputs in `chunks` blocks of C, each split by `sizes`: (..., C_in) -> (..., chunks * C) on every rank."""

    def __init__(self, linear: nn.Linear, weight, bias, comm: Comm, chunks: int, sizes: list[int]):
        super().__init__(linear, weight, bias, comm)
        self.chunks, self.sizes = chunks, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight, self.bias).unflatten(-1, (self.chunks, -1))  # (..., k, C_r)
        full = self.comm.all_gather(local, -1, self.sizes, kind="tp_all_gather")  # (..., k, C) in rank order
        return full.flatten(-2)  # (..., k * C): chunk j's C values as one Linear would give them


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.shape)


def _rows(linear: nn.Linear, ranges) -> tuple[SliceLayout, SliceLayout | None]:
    """Layouts of a Linear split along its output features (weight rows, bias entries) into `ranges`."""
    bias = None if linear.bias is None else SliceLayout(_shape(linear.bias), 0, tuple(ranges))
    return SliceLayout(_shape(linear.weight), 0, tuple(ranges)), bias


def _columns(linear: nn.Linear, ranges) -> SliceLayout:
    """The weight layout of a Linear split along its input features (its bias stays whole)."""
    return SliceLayout(_shape(linear.weight), 1, tuple(ranges))


def _share(length: int, parts: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(length, parts)
    return sum(sizes[:rank]), sizes[rank]


def _split_fused_attention(attn: nn.Module, comm: Comm) -> list[int]:
    """SelfAttention (qkv (3C, C) laid out (3, H, Dh), proj, num_heads, head_dim) -> this rank's heads."""
    heads, dh = attn.num_heads, attn.head_dim
    sizes = head_sizes(heads, comm.size)
    start, count = sum(sizes[: comm.rank]), sizes[comm.rank]
    width = heads * dh
    rows = [(part * width + start * dh, count * dh) for part in range(3)]  # q, k, v blocks of this rank's heads
    attn.qkv = ColumnParallelLinear(attn.qkv, *_rows(attn.qkv, rows), comm)
    attn.proj = RowParallelLinear(attn.proj, _columns(attn.proj, [(start * dh, count * dh)]), None, comm)
    attn.num_heads = count
    return sizes


def _split_separate_attention(attn: nn.Module, comm: Comm) -> list[int]:
    """diffusers' Attention (to_q, to_k, to_v: (H*Dh, C_in) each; to_out.0; heads) -> this rank's heads."""
    heads = attn.heads
    dh = attn.to_q.out_features // heads
    sizes = head_sizes(heads, comm.size)
    start, count = sum(sizes[: comm.rank]), sizes[comm.rank]
    rows = [(start * dh, count * dh)]
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), *_rows(getattr(attn, name), rows), comm))
    out = attn.to_out[0]
    attn.to_out[0] = RowParallelLinear(out, _columns(out, rows), None, comm)
    attn.heads = count
    return sizes


# diffusers' attention projections split by heads: the column-parallel ones (rows of this rank's heads) and the
# row-parallel ones (input columns of this rank's heads); a module has whichever of them it was built with
HEAD_COLUMNS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
HEAD_ROWS = ("to_out.0", "to_add_out")


def _head_dim(attn: nn.Module, heads: int, width: int | None = None) -> int:
    """An attention module's head width: its `head_dim`, else (its q projection's or `inner_dim`) / heads."""
    dh = getattr(attn, "head_dim", None)
    if not isinstance(dh, int):
        q = getattr(attn, "to_q", None)
        width = q.out_features if isinstance(q, nn.Linear) else width or getattr(attn, "inner_dim", None)
        if not isinstance(width, int) or width % heads:
            raise OpenDiTError(f"{type(attn).__name__}: cannot tell its head width ({heads} heads, width {width})")
        dh = width // heads
    return dh


def _localize_heads(attn: nn.Module, heads: int, dh: int, count: int) -> None:
    """`heads` becomes this rank's count; `inner_dim` / `inner_kv_dim`, where they are heads x head_dim, its width."""
    for name in ("inner_dim", "inner_kv_dim"):
        if getattr(attn, name, None) == heads * dh:
            setattr(attn, name, count * dh)
    attn.heads = count


def _split_diffusers_heads(attn: nn.Module, comm: Comm) -> list[int]:
    """diffusers' attention with any of to_q/to_k/to_v, add_q_proj/add_k_proj/add_v_proj (each (H*Dh, C_in)),
    to_out.0 and to_add_out (each (C_out, H*Dh)), `heads` -> this rank's heads (uneven: head_sizes)."""
    heads = attn.heads
    dh = _head_dim(attn, heads)
    sizes = head_sizes(heads, comm.size)
    start, count = sum(sizes[: comm.rank]), sizes[comm.rank]
    rows = [(start * dh, count * dh)]
    children = dict(attn.named_modules())
    for name in (*HEAD_COLUMNS, *HEAD_ROWS):
        linear = children.get(name)
        if linear is None:
            continue
        width = linear.out_features if name in HEAD_COLUMNS else linear.in_features
        if not isinstance(linear, nn.Linear) or width != heads * dh:
            raise OpenDiTError(
                f"{type(attn).__name__}.{name} is not a Linear with {heads} x {dh} = {heads * dh} "
                f"{'outputs' if name in HEAD_COLUMNS else 'inputs'}, so it cannot be split by heads exactly"
            )
        if name in HEAD_COLUMNS:
            local = ColumnParallelLinear(linear, *_rows(linear, rows), comm)
        else:
            local = RowParallelLinear(linear, _columns(linear, rows), None, comm)
        _replace(attn, name, local)
    _localize_heads(attn, heads, dh, count)
    return sizes


ATTENTION_SPLITS = {
    "fused_qkv": _split_fused_attention,
    "separate_qkv": _split_separate_attention,
    "diffusers_heads": _split_diffusers_heads,
}


@dataclass(frozen=True)
class PackedLinear:
    """A Linear (path pattern) whose output features (dim 0, column-parallel) or input features (dim 1, row-parallel)
    are a concatenation of blocks, each split over the ranks on its own (diffusers' PackedColwiseParallel /
    PackedRowwiseParallel). `blocks`: proportional widths; None: the Linear's `_tp_packed_col_blocks` /
    `_tp_packed_row_blocks` (set by the model's __init__)."""

    pattern: str
    dim: int
    blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PlannedTensorSplit(TensorSplit):
    """A TensorSplit with packed Linears (`PackedLinear`), split after the attention, column and row Linears."""

    packed: tuple[PackedLinear, ...] = ()


def _block_sizes(linear: nn.Linear, packed: PackedLinear, path: str) -> list[int]:
    """The absolute widths of a packed Linear's blocks along its packed dim."""
    attr = "_tp_packed_col_blocks" if packed.dim == 0 else "_tp_packed_row_blocks"
    blocks = packed.blocks if packed.blocks is not None else getattr(linear, attr, None)
    width = linear.out_features if packed.dim == 0 else linear.in_features
    if not blocks or any(not isinstance(b, int) or b < 1 for b in blocks) or width % sum(blocks):
        raise OpenDiTError(
            f"{path}: packed {'column' if packed.dim == 0 else 'row'}-parallel Linear without usable blocks "
            f"({blocks!r} for width {width}; set {attr} on it or give the blocks)"
        )
    unit = width // sum(blocks)
    return [b * unit for b in blocks]


def _packed_owner(modules: dict, path: str, packed: PackedLinear, heads_of: dict) -> str | None:
    """The attention module whose heads a packed Linear carries: its parent when the parent is an attention module
    (the Linear is one of its fused projections), else, for a packed input, the attention module beside it whose
    output it consumes (the only child of its parent split by heads); None: a packed Linear outside attention."""
    parent = path.rpartition(".")[0]
    module = modules.get(parent)
    if parent in heads_of or isinstance(getattr(module, "heads", None), int):
        return parent
    if packed.dim == 1:
        prefix = f"{parent}." if parent else ""
        beside = [p for p in heads_of if p.startswith(prefix) and "." not in p[len(prefix) :]]
        if len(beside) > 1:
            raise OpenDiTError(f"{path}: its input could come from any of the attention modules {beside}")
        if beside:
            return beside[0]
    return None


def _packed_ranges(linear, packed: PackedLinear, path: str, owner, info, n: int, r: int) -> list[tuple[int, int]]:
    """This rank's ranges of a packed Linear's packed dim (see the module docstring for which block splits how).
    info: None without an owning attention, else (its global heads, head width, whether the Linear is inside it)."""
    blocks = _block_sizes(linear, packed, path)
    heads, dh, inside = info if owner is not None else (0, 0, False)
    lead = 0 if owner is None else 3 if packed.dim == 0 else 1  # q, k, v lead a packed output; attention output input
    if any(b != heads * dh for b in blocks[:lead]) or len(blocks) < lead:
        raise OpenDiTError(
            f"{path}: packed blocks {blocks} do not start with {lead} block(s) of the attention's {heads} heads x "
            f"{dh}, so which of its features are heads is unknown and it cannot be split exactly"
        )
    hs = head_sizes(heads, n) if owner is not None else None
    ranges, offset = [], 0
    for index, block in enumerate(blocks):
        if index < lead:  # this rank's heads
            start, count = sum(hs[:r]) * dh, hs[r] * dh
        elif inside:  # an MLP block fused into the attention module: in proportion to its heads
            if block * sum(hs[:r]) % heads or block * hs[r] % heads:
                raise OpenDiTError(
                    f"{path}: its block of {block} features cannot be split in proportion to {hs} of {heads} heads, "
                    "as its processor (which separates the fused features by the global ratio) needs; use a tp "
                    f"degree that divides both {heads} and {block}"
                )
            start, count = block * sum(hs[:r]) // heads, block * hs[r] // heads
        else:  # as a plain column-parallel Linear producing it is split
            start, count = _share(block, n, r)
        ranges.append((offset + start, count))
        offset += block
    return ranges


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_tensor_parallel(model: nn.Module, split: TensorSplit, comm: Comm) -> dict:
    """Split `model` (in place) over the tp group `comm` as `split` declares. Returns what record.json says."""
    if split.attention_kind not in ATTENTION_SPLITS:
        raise OpenDiTError(f"unknown tensor-parallel attention kind {split.attention_kind!r}")
    modules = dict(model.named_modules())  # a snapshot: replacing children below does not change other paths

    def matching(patterns) -> list[str]:
        return [path for path in modules if any(match_path(path, p) for p in patterns)]

    attention = matching(split.attention)
    if not attention:
        raise OpenDiTError(f"tensor parallelism: no module of {type(model).__name__} matches {split.attention}")
    heads_of = {}  # attention path -> (global heads, head width), for the packed Linears that carry its heads
    if split.attention_kind == "diffusers_heads":
        heads_of = {path: (modules[path].heads, _head_dim(modules[path], modules[path].heads)) for path in attention}
    head_split = [ATTENTION_SPLITS[split.attention_kind](modules[path], comm) for path in attention]
    n, r = comm.size, comm.rank
    for path in matching(split.column):
        linear = modules[path]
        _replace(model, path, ColumnParallelLinear(linear, *_rows(linear, [_share(linear.out_features, n, r)]), comm))
    for path in matching(split.row):
        linear = modules[path]
        columns = _columns(linear, [_share(linear.in_features, n, r)])
        _replace(model, path, RowParallelLinear(linear, columns, None, comm))
    packed = _apply_packed(model, modules, getattr(split, "packed", ()), heads_of, comm)
    gathered = 0
    for pattern, chunks in split.gathered:
        for path in matching([pattern]):
            linear = modules[path]
            width = linear.out_features // chunks
            sizes = split_sizes(width, n)
            start = sum(sizes[:r])
            rows = [(j * width + start, sizes[r]) for j in range(chunks)]
            _replace(model, path, GatheredLinear(linear, *_rows(linear, rows), comm, chunks, sizes))
            gathered += 1
    record = {
        "tp": n,
        "attention_modules": len(attention),
        "head_split": head_split[0],
        "gathered_modules": gathered,
    }
    if packed:
        record["packed_modules"] = packed
    return record


def _apply_packed(model: nn.Module, modules: dict, specs, heads_of: dict, comm: Comm) -> int:
    """Split the packed Linears of `specs`, after the attention modules of `heads_of` (path -> (global heads, head
    width)) were split; returns how many. An attention module whose only head projections are packed (Flux2's
    single-stream one) gets its local `heads` here; its `inner_dim` stays global (its processor separates the fused
    features by the global ratio, which the proportional split keeps)."""
    fused: dict[str, tuple[int, int]] = {}
    done = 0
    for packed in specs:
        if packed.dim not in (0, 1):
            raise OpenDiTError(f"{packed.pattern}: packed dim must be 0 (outputs) or 1 (inputs), not {packed.dim}")
        for path in [p for p in modules if match_path(p, packed.pattern)]:
            linear = modules[path]
            if not isinstance(linear, nn.Linear):
                raise OpenDiTError(f"{path} is a {type(linear).__name__}, not a Linear; it cannot be split packed")
            owner = _packed_owner(modules, path, packed, heads_of)
            if owner is not None and owner not in heads_of and owner not in fused:
                attn = modules[owner]
                fused[owner] = (attn.heads, _head_dim(attn, attn.heads, getattr(attn, "inner_dim", None)))
            info = None
            if owner is not None:  # (heads, head width, whether the Linear is inside the attention module)
                info = (*(heads_of.get(owner) or fused[owner]), owner == path.rpartition(".")[0])
            ranges = _packed_ranges(linear, packed, path, owner, info, comm.size, comm.rank)
            if packed.dim == 0:
                local = ColumnParallelLinear(linear, *_rows(linear, ranges), comm)
            else:
                local = RowParallelLinear(linear, _columns(linear, ranges), None, comm)
            _replace(model, path, local)
            done += 1
    for owner, (heads, _dh) in fused.items():
        modules[owner].heads = head_sizes(heads, comm.size)[comm.rank]
    return done


def tensor_layouts(model: nn.Module) -> dict[str, SliceLayout]:
    """Parameter name -> its SliceLayout, for every parameter tensor parallelism split."""
    return {
        f"{path}.{name}" if path else name: layout
        for path, module in model.named_modules()
        for name, layout in getattr(module, "tp_layouts", {}).items()
    }


def block_comm_bytes(
    batch: float, tokens: float, hidden: int, tp: int, rank: int, itemsize: int, chunks: int = 6, rows: float = None
) -> dict[str, tuple[float, int]]:
    """What one DiT-style block sends under tensor parallelism on tp rank `rank`: {kind: (bytes, calls)}.
    batch x tokens: the rows of the block's activation on this rank (its token shard); `rows`: the rows the adaLN
    runs on (default `batch`; the video DiT's blocks modulate every frame or position sequence)."""
    if tp == 1:
        return {}
    activation = int(batch * tokens * hidden * itemsize)
    share = split_sizes(hidden, tp)[rank]
    modulation = int((batch if rows is None else rows) * chunks * share * itemsize) * (tp - 1)
    return {"tp_all_reduce": (2 * all_reduce_bytes(activation, tp), 2), "tp_all_gather": (modulation, 1)}
