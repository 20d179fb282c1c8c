"""Model specs: what a model declares, as data, so that parallelism can be applied to it from outside.

A spec says (in the spirit of diffusers' `_cp_plan` and torchtitan's per-model specs):
- `token_split`: module path -> dim. The module's OUTPUT is this rank's contiguous block of tokens along dim
  (a forward hook narrows it; no communication). For DiT: the identity `token_shard`, which the model applies to the
  raw patches and to the positions, so no rank ever embeds the whole sequence.
- `token_gather`: module path -> dim. The module's output is all-gathered along dim over the sequence group.
- `attention`: path patterns (fnmatch, `*` = one path component) of the attention modules the sequence-parallel
  strategies install into, and `attention_kind`, the interface those modules offer ("fused_qkv": `qkv`, `proj`,
  `num_heads`, `head_dim` and an `attention(q, k, v)` entry point `core`, see models/attention.py).
- `shard_units`: the modules that become one all-gather each under sharded weights, in forward order. Patterns that
  share a wildcard prefix (`blocks.*.attn`, `blocks.*.mlp.fc1`) expand index by index, so block i's units all come
  before block i + 1's. Parameters in no unit belong to the root unit.
- `dims(config)`, `count_params(config, tokens)`, `block_flops(...)`, `model_flops(...)`, `edge_flops(...)` and
  `token_values(config)` (values per token where tokens are split and gathered): the sizes and exact counts the cost
  model and the planner read.
- `attention_filter`: optional path -> bool, narrowing `attention` (the video DiT: only the spatial blocks' attention
  spans the position split; its temporal blocks attend over frames every rank holds whole).
- `frame_split`: the split points of a model with spatial and temporal blocks (`FrameSplit`), which DSP reads.
- `tensor_split`: where tensor parallelism splits heads, MLP and modulation weights (`TensorSplit`).
- `derived`: parameter name -> function(model) -> the full tensor, for parameters the model computes rather than
  learns (DiT's sin-cos positions): sharded loading (parallel/sharded_loading.py) fills them from the function when a
  checkpoint has them for another size (or not at all).

Specs are registered by config type (`register_spec`), and `spec_for(model_or_config)` finds one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from opendit.errors import OpenDiTError


@dataclass(frozen=True)
class ModelDims:
    """The sizes every strategy and the cost model need, whatever the model family."""

    depth: int
    hidden_size: int
    num_heads: int
    num_tokens: int  # sequence length of one sample (the dimension position-split strategies split)
    mlp_ratio: float = 4.0
    # video DiT: attention over the split runs in `sequences` independent sequences per sample (one per frame) and in
    # a share `split_blocks` of the blocks (the spatial ones); the rest attend over frames, local on every rank
    sequences: int = 1
    split_blocks: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class FrameSplit:
    """Where a spatial-temporal model lets DSP (parallel/dsp.py) switch its split: `frame_split` / `frame_gather`
    (module -> frame dim of its output, as token_split / token_gather), `to_temporal` (modules whose output goes from
    frames split to positions split, before each temporal block) and `to_spatial` (the way back); `frames(config)` and
    `positions(config)` the sizes of the two dimensions."""

    frame_split: dict[str, int]
    frame_gather: dict[str, int]
    to_temporal: tuple[str, ...]
    to_spatial: tuple[str, ...]
    frames: Callable[..., int]
    positions: Callable[..., int]


@dataclass(frozen=True)
class TensorSplit:
    """Where tensor parallelism (parallel/tensor.py) splits a model, as path patterns (see `attention`):
    - `attention`: modules split by heads; `attention_kind` "fused_qkv" (qkv, proj, num_heads, head_dim: the fused
      qkv weight is split per q/k/v block and per head) or "separate_qkv" (diffusers' Attention: to_q, to_k, to_v,
      to_out.0, heads); their output projection is row-parallel (one all-reduce);
    - `column`: Linears whose output features are split (their input is whole on every rank);
    - `row`: Linears whose input features are split (the column layer's output): partial sums, one all-reduce;
    - `gathered`: Linears whose output is split per chunk (pattern -> chunks: adaLN's 6 modulation vectors) and
      all-gathered back to the full width, for what consumes it whole."""

    attention: tuple[str, ...]
    attention_kind: str = "fused_qkv"
    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    gathered: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_type: type
    token_split: dict[str, int]
    token_gather: dict[str, int]
    attention: tuple[str, ...]
    attention_kind: str
    shard_units: tuple[str, ...]
    dims: Callable[..., ModelDims]
    count_params: Callable[..., dict[str, int]]
    block_flops: Callable[..., dict[str, float]]
    model_flops: Callable[..., float]
    edge_flops: Callable[..., float]  # (config, tokens, batch): FLOPs outside the blocks (embeddings, final layer)
    token_values: Callable[..., tuple[int, int]]  # config -> values per token at the split and at the gather point
    notes: dict[str, str] = field(default_factory=dict)
    derived: dict[str, Callable[[nn.Module], object]] = field(default_factory=dict)
    attention_filter: Callable[[str], bool] | None = None
    frame_split: FrameSplit | None = None
    # True when the root's own parameters are read after the first shard unit has run (the video DiT adds
    # temp_embed after the first spatial block): sharded weights then keep the root gathered for the whole forward
    root_used_after_embedding: bool = False
    # the block chain a first-block cache skips through, and the MLPs PAB may reuse (cache/layout.py)
    cache_blocks: tuple[str, ...] = ("blocks.*",)
    cache_mlps: tuple[str, ...] = ("blocks.*.mlp",)
    # where tensor parallelism splits the model (parallel/tensor.py); None: the family does not declare it
    tensor_split: TensorSplit | None = None
    # PipeFusion's view of the forward (parallel/pipefusion.py: embed, condition, blocks, final); None: not declared
    stage_view: object | None = None
    # the family's measured bf16 drift vs fp32, documented (tests/test_precision.py); None: --dtype auto keeps fp32
    bf16_drift: str | None = None

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every attention module of `model` that spans the token split, in model order."""
        keep = self.attention_filter or (lambda _path: True)
        found = [m for path, m in model.named_modules() if any(_match(path, p) for p in self.attention) and keep(path)]
        if not found:
            raise OpenDiTError(f"{self.name} spec: no module of {type(model).__name__} matches {self.attention}")
        return found

    def shard_unit_modules(self, model: nn.Module) -> list[nn.Module]:
        """The shard units of `model` in forward order (see the module docstring)."""
        modules = dict(model.named_modules())
        units: list[nn.Module] = []
        for group in _prefix_groups(self.shard_units):
            prefix = group[0].split("*")[0]  # "blocks." for "blocks.*.attn"; the whole path without a wildcard
            if "*" not in group[0]:
                units.append(_lookup(modules, group[0], self.name))
                continue
            container = _lookup(modules, prefix.rstrip("."), self.name)
            for index, _ in container.named_children():
                for pattern in group:
                    units.append(_lookup(modules, pattern.replace("*", index, 1), self.name))
        return units


def match_path(path: str, pattern: str) -> bool:
    """Whether a module path matches a spec pattern (fnmatch, `*` = exactly one path component)."""
    return len(path.split(".")) == len(pattern.split(".")) and fnmatch.fnmatchcase(path, pattern)


_match = match_path


def _prefix_groups(patterns: tuple[str, ...]) -> list[list[str]]:
    """Consecutive patterns with the same wildcard prefix form one group (expanded index by index)."""
    groups: list[list[str]] = []
    for pattern in patterns:
        prefix = pattern.split("*")[0] if "*" in pattern else None
        if groups and prefix is not None and "*" in groups[-1][0] and groups[-1][0].split("*")[0] == prefix:
            groups[-1].append(pattern)
        else:
            groups.append([pattern])
    return groups


def _lookup(modules: dict[str, nn.Module], path: str, spec: str) -> nn.Module:
    if path not in modules:
        raise OpenDiTError(f"{spec} spec names module {path!r}, which the model does not have")
    return modules[path]


def cost_fields(dims, count_params, block_flops, edge_flops, token_values) -> dict[str, Callable]:
    """ModelSpec's cost fields (the module docstring) of a model whose forward is `config.depth` blocks plus what lies
    outside them (edge_flops): `model_flops`, one whole forward on one device, is that sum, derived here once."""

    def model_flops(config, tokens: int, batch: int) -> float:
        blk = block_flops(config, batch, tokens, tokens, tokens, config.num_heads)
        return config.depth * (blk["linear"] + blk["attention"]) + edge_flops(config, tokens, batch)

    costs = {"dims": dims, "count_params": count_params, "block_flops": block_flops, "edge_flops": edge_flops}
    return {**costs, "model_flops": model_flops, "token_values": token_values}


_SPECS: dict[type, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    _SPECS[spec.config_type] = spec
    return spec


def has_spec(model_or_config) -> bool:
    """Whether a spec is declared for this model's (or config's) config type."""
    return type(getattr(model_or_config, "config", model_or_config)) in _SPECS


def spec_name(model_or_config) -> str | None:
    """The name of a model's (or config's) declared spec; None for a model without one."""
    spec = _SPECS.get(type(getattr(model_or_config, "config", model_or_config)))
    return spec.name if spec is not None else None


def spec_for(model_or_config) -> ModelSpec:
    """The spec of a model (by its `config`) or of a config object."""
    config = getattr(model_or_config, "config", model_or_config)
    spec = _SPECS.get(type(config))
    if spec is None:
        known = ", ".join(s.name for s in _SPECS.values()) or "none"
        raise OpenDiTError(
            f"no parallel spec is declared for {type(config).__name__}; known: {known}; declare one with register_spec"
        )
    return spec
