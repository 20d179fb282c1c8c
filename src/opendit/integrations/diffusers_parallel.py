"""Sequence, cfg and data parallelism for diffusers transformer classes, applied from outside, as they are.

Nothing in diffusers is edited or patched globally. What is installed on one module instance:
- forward pre-hooks / hooks at the spec's split points (`DiffusersSpec`, integrations/diffusers_specs.py): a tensor
  argument or output is narrowed to this rank's contiguous block of tokens along its sequence dim (uneven sizes:
  ceil/floor of L/P, so any token count works), rotary embeddings with their tokens;
- our own attention processors (integrations/diffusers_processors.py) on the self- and joint-attention modules: the
  same projections, norms and RoPE as diffusers' processors, with the attention itself a registered strategy's kernel
  (Ulysses, ring, USP) over the sequence group; cross-attention to text keeps diffusers' processor (text K/V stay whole:
  local queries against every text token is exact);
- a forward hook all-gathering the spec's gather point (before unpatchify) over the sequence group;
- on the root module, cfg and dp batch splits: the [uncond; cond] (or any) batch of one call is split over the cfg
  group (halves), then over dp, and the output all-gathered back in order.

Token streams: joint attention (SD3, Flux) attends over text and image tokens together. Both streams are split (as
diffusers' own plans do for Flux): rank r holds text block r and image block r, its attention sequence is their
concatenation, and the kernels see per-rank sizes text_r + image_r. Attention without a mask does not depend on the
order of the keys, and every query's output returns to the rank that holds it, so this is exact, and no rank repeats
the text stream's MLP. The split hooks record each stream's global length at every call (`SequenceState`); the
processors build (and cache) their kernel for the sizes of the streams they attend over.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from opendit.errors import OpenDiTError
from opendit.parallel.registry import get_strategy
from opendit.parallel.sequence import split_sizes

# strategies whose kernel is an attention core on (B, S, H, D) q, k, v (what our diffusers processors call); the
# others (fastseq, ulysses-overlap) replace a fused-qkv module's whole forward and only fit our own DiT
CORE_STRATEGIES = ("ulysses", "ring", "usp")


@dataclass(frozen=True)
class Split:
    """Narrow a tensor to this rank's tokens along `dim` (only when it has `ndim` dims, None: any); its tokens
    belong to `stream` ("image" or "text")."""

    dim: int
    stream: str = "image"
    ndim: int | None = None


@dataclass
class SequenceState:
    """Per-call facts the split hooks record and the attention processors read: each stream's global length."""

    size: int  # ranks of the sequence group
    rank: int
    lengths: dict[str, int] = field(default_factory=dict)

    def sizes(self, stream: str) -> list[int]:
        if stream not in self.lengths:
            raise OpenDiTError(f"no {stream} tokens were split in this call (is the spec's split point right?)")
        return split_sizes(self.lengths[stream], self.size)

    def joint_sizes(self, streams: tuple[str, ...]) -> list[int]:
        """Tokens per rank of a sequence made of these streams (each split evenly, concatenated per rank)."""
        per_stream = [self.sizes(s) for s in streams]
        return [sum(column) for column in zip(*per_stream)]


def narrow(tensor: torch.Tensor, split: Split, state: SequenceState) -> torch.Tensor:
    """(..., L, ...) along split.dim -> this rank's (..., L_r, ...) block; records L for the stream."""
    if not isinstance(tensor, torch.Tensor) or (split.ndim is not None and tensor.dim() != split.ndim):
        return tensor
    length = tensor.shape[split.dim]
    known = state.lengths.get(split.stream)
    if known is not None and known != length:
        raise OpenDiTError(f"{split.stream} tokens: {length} at one split point, {known} at another")
    state.lengths[split.stream] = length
    sizes = split_sizes(length, state.size)
    start = sum(sizes[: state.rank])
    return tensor.narrow(split.dim, start, sizes[state.rank])


def _matches(path: str, pattern: str) -> bool:
    return len(path.split(".")) == len(pattern.split(".")) and fnmatch.fnmatchcase(path, pattern)


def install_splits(model: nn.Module, spec, state: SequenceState) -> list:
    """The spec's input splits (pre-hooks, by argument name or position), output splits and the gather point."""
    modules = dict(model.named_modules())
    handles = []
    for path, args in spec.inputs.items():
        module = _module(modules, path, spec)
        if path == "":  # a new call of the model: the streams' lengths are recorded afresh
            handles.append(module.register_forward_pre_hook(lambda _m, _a: state.lengths.clear()))
        handles.append(module.register_forward_pre_hook(_input_splitter(args, state), with_kwargs=True))
    for path, outs in spec.outputs.items():
        handles.append(_module(modules, path, spec).register_forward_hook(_output_splitter(outs, state)))
    return handles


def _module(modules: dict, path: str, spec) -> nn.Module:
    if path not in modules:
        raise OpenDiTError(f"{spec.name} spec names module {path!r}, which this {spec.class_name} does not have")
    return modules[path]


def _input_splitter(args: dict, state: SequenceState):
    def hook(module, positional, kwargs):
        positional = list(positional)
        for key, split in args.items():
            if isinstance(key, int) and key < len(positional):
                positional[key] = narrow(positional[key], split, state)
            elif key in kwargs:
                kwargs[key] = narrow(kwargs[key], split, state)
        return tuple(positional), kwargs

    return hook


def _output_splitter(outs: dict, state: SequenceState):
    def hook(module, _args, output):
        if None in outs:  # the output itself
            return narrow(output, outs[None], state)
        items = list(output)
        for index, split in outs.items():
            items[index] = narrow(items[index], split, state)
        return type(output)(items) if isinstance(output, tuple) else items

    return hook


def install_gather(model: nn.Module, spec, runtime, state: SequenceState) -> list:
    """All-gather the gather point's output (B, L_r, D) -> (B, L, D) over the sequence group, in token order."""
    from opendit.parallel.sequence import TokenGather

    exact = runtime.exact("sp")  # the model's output: full precision whatever comm_dtype says
    handles = []
    for path, (dim, stream) in spec.gather.items():

        def hook(_module, _args, output, dim=dim, stream=stream):
            return TokenGather(exact, state.sizes(stream), dim)(output)

        handles.append(_module(dict(model.named_modules()), path, spec).register_forward_hook(hook))
    return handles


class KernelCache:
    """The strategy's attention kernel for given per-rank sizes, built once per sizes (kernels are stateless)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.strategy = get_strategy(runtime.plan.impl)
        self._kernels: dict[tuple[int, ...], object] = {}

    def __call__(self, sizes: list[int]):
        key = tuple(sizes)
        if key not in self._kernels:
            holder = _CoreHolder()
            self.strategy.install([holder], self.runtime, list(sizes))  # sets holder.core
            self._kernels[key] = holder.core
        return self._kernels[key]


class _CoreHolder:
    core = None


def attention_modules(model: nn.Module, spec) -> list[tuple[str, nn.Module, tuple]]:
    """(path, module, (processor kind, streams)) for every attention module the spec parallelises."""
    found = []
    for path, module in model.named_modules():
        for pattern, entry in spec.attention.items():
            if _matches(path, pattern):
                found.append((path, module, entry))
                break
    if not found:
        raise OpenDiTError(f"{spec.name} spec: no attention module matches {list(spec.attention)}")
    return found
