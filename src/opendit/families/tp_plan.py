"""A diffusers class's `_tp_plan` as the TensorSplit that parallel/tensor.py runs (`--tp N`, exact, uneven allowed).

diffusers declares tensor parallelism per class as module path pattern -> style: "colwise" (output features split),
"rowwise" (input features split, partial sums all-reduced), PackedColwiseParallel / PackedRowwiseParallel (the
packed dim is a concatenation of blocks, each split on its own; see diffusers/hooks/tensor_parallel.py). diffusers
splits every block evenly and refuses a head count the degree does not divide; OpenDiT splits by heads instead:
- an attention module (the parent of colwise to_q, to_k and to_v) is split by heads (`head_sizes`: 3 heads over 2
  ranks are 2 + 1) with everything it has: the joint stream's add_q_proj / add_k_proj / add_v_proj on the same heads,
  to_out.0 and to_add_out row-parallel on the same head columns, nothing more when it is pre-only (Flux's single
  stream). Its `heads` becomes the local count (attention kind "diffusers_heads");
- other colwise / rowwise Linears (the MLPs) are column / row parallel with `split_sizes`, so a colwise layer and the
  rowwise one that consumes it agree on every rank's share;
- packed Linears keep their blocks: blocks of heads split like the attention, the others like their producer or
  consumer (`PackedLinear`, parallel/tensor.py's docstring says which); Flux's single-stream proj_out takes the
  columns of this rank's heads of the attention output plus its share of proj_mlp's features;
- what the plan does not name stays whole on every rank (modulation, norms, embedders, the final layer).

A plan whose entries cannot be split exactly raises OpenDiTError with the reason (here for what the plan says, at
apply time for what needs the module's sizes).
"""

from __future__ import annotations

from opendit.errors import OpenDiTError
from opendit.parallel.tensor import HEAD_COLUMNS, HEAD_ROWS, PackedLinear, PlannedTensorSplit

QKV = ("to_q", "to_k", "to_v")
PACKED = {"PackedColwiseParallel": 0, "PackedRowwiseParallel": 1}


def _style(pattern: str, style) -> str | tuple[int, tuple[int, ...] | None]:
    """ "colwise" / "rowwise", or (packed dim, blocks) for diffusers' packed markers (recognised by class name, so
    that no diffusers import is needed)."""
    if style in ("colwise", "rowwise"):
        return style
    dim = PACKED.get(type(style).__name__)
    if dim is None:
        raise OpenDiTError(
            f"_tp_plan entry {pattern!r}: style {style!r} is none of colwise, rowwise, PackedColwiseParallel, "
            "PackedRowwiseParallel, so OpenDiT cannot split it"
        )
    blocks = getattr(style, "blocks", None)
    return dim, None if blocks is None else tuple(int(b) for b in blocks)


def tensor_split_from_tp_plan(cls_or_module) -> PlannedTensorSplit | None:
    """The TensorSplit of a class's (or module's class's) `_tp_plan`; None when it declares none."""
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    plan = getattr(cls, "_tp_plan", None)
    if not isinstance(plan, dict) or not plan:
        return None
    owner = cls.__name__
    styles = {pattern: _style(pattern, style) for pattern, style in plan.items()}

    def parent(pattern: str) -> str:
        return pattern.rpartition(".")[0]

    attention = [parent(p) for p, s in styles.items() if p.rpartition(".")[2] == "to_q" and s == "colwise"]
    attention = list(dict.fromkeys(attention))
    for attn in attention:
        missing = [name for name in QKV if styles.get(f"{attn}.{name}") != "colwise"]
        if missing:
            raise OpenDiTError(
                f"{owner}._tp_plan: {attn}.to_q is colwise but {', '.join(missing)} not, so the attention cannot be "
                "split by heads exactly"
            )
    column, row, packed = [], [], []
    for pattern, style in styles.items():
        attn = next((a for a in attention if pattern.startswith(f"{a}.")), None)
        name = pattern[len(attn) + 1 :] if attn is not None else None
        if attn is not None and not isinstance(style, tuple):  # a plain Linear of an attention split by heads
            expected = "colwise" if name in HEAD_COLUMNS else "rowwise" if name in HEAD_ROWS else None
            if style != expected:
                raise OpenDiTError(
                    f"{owner}._tp_plan: {pattern!r} is {style} inside the attention {attn}, which is split by heads; "
                    f"only {', '.join(HEAD_COLUMNS)} (colwise) and {', '.join(HEAD_ROWS)} (rowwise) are split with "
                    "it, so this entry cannot be split exactly"
                )
            continue
        if isinstance(style, tuple):
            packed.append(PackedLinear(pattern, *style))
        elif style == "colwise":
            column.append(pattern)
        else:
            row.append(pattern)
    if not attention:
        raise OpenDiTError(
            f"{owner}._tp_plan splits no attention by heads (no colwise to_q / to_k / to_v), which OpenDiT's tensor "
            "parallelism needs"
        )
    return PlannedTensorSplit(
        attention=tuple(attention),
        attention_kind="diffusers_heads",
        column=tuple(column),
        row=tuple(row),
        packed=tuple(packed),
    )
