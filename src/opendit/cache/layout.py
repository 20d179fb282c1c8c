"""Where a cache plugs into a model: its chain of blocks and its attention / MLP modules, found from the model's
declared spec (our DiT and video DiT: models/spec.py) or, for diffusers transformers, from their family
(families/) and diffusers' own registry of its block classes (which output is the image stream,
which the text stream). Nothing here names one model's modules.

Block I/O: a block takes the image tokens (`hidden_states`, or its first argument) and possibly the text tokens
(`encoder_hidden_states`), and returns either one tensor (the image tokens) or a tuple in which the image and text
tokens sit at known positions. `BlockIO` reads and writes those "streams" so the block cache can skip any such block.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from opendit.errors import OpenDiTError

# the ModuleList children of a diffusers transformer that hold its blocks, in forward order (as diffusers' own
# first-block cache finds them; Z-Image's main chain is `layers`, its refiners before it are not cached)
_DIFFUSERS_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
_DIFFUSERS_MLPS = ("ff", "ffn", "ff_context", "feed_forward")


@dataclass
class BlockIO:
    """How to find the streams in one block class's arguments and output."""

    out_hidden: int | None = None  # index of the image tokens in a tuple output; None: the output is the tensor
    out_encoder: int | None = None  # index of the text tokens in a tuple output; None: the block has no text stream
    hidden_name: str = "hidden_states"
    encoder_name: str = "encoder_hidden_states"
    params: tuple[str, ...] = ()  # the forward's parameter names (for positional arguments)

    def _arg(self, name: str, index: int, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self.params.index(name) if name in self.params else index
        if position >= len(args):
            raise OpenDiTError(f"block called without its {name!r} argument")
        return args[position]

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        """(image tokens, text tokens or None) that went into the block."""
        hidden = self._arg(self.hidden_name, 0, args, kwargs)
        encoder = self._arg(self.encoder_name, 1, args, kwargs) if self.out_encoder is not None else None
        return hidden, encoder

    def outputs(self, out) -> tuple:
        """(image tokens, text tokens or None) that came out (diffusers registers blocks that return a plain tensor
        with index 0, so a tensor is read as the image tokens whatever the index says)."""
        if self.out_hidden is None or not isinstance(out, tuple):
            return out, None
        return out[self.out_hidden], (out[self.out_encoder] if self.out_encoder is not None else None)

    def pack(self, hidden, encoder, like):
        """An output of the block's own form holding these streams."""
        if self.out_hidden is None or (self.out_encoder is None and not isinstance(like, tuple)):
            return hidden
        out = list(like) if like is not None else [None] * (max(self.out_hidden, self.out_encoder or 0) + 1)
        out[self.out_hidden] = hidden
        if self.out_encoder is not None:
            out[self.out_encoder] = encoder
        return tuple(out)


@dataclass
class CacheLayout:
    family: str  # the spec's name ("DiT", "VideoDiT", "diffusers Flux", ...)
    blocks: list[tuple[str, nn.Module, BlockIO]]  # forward order
    attention: list[tuple[str, nn.Module, str]]  # (path, module, "spatial" | "temporal" | "cross")
    mlps: list[tuple[str, nn.Module]]
    batch_arg: str = "x"  # the root argument whose dim 0 is the batch (for per-sample decisions)

    def batch_size(self, args: tuple, kwargs: dict) -> int:
        x = kwargs.get(self.batch_arg, args[0] if args else None)
        if x is None:
            raise OpenDiTError(f"the model was called without {self.batch_arg!r}: cannot tell its batch size")
        return len(x) if isinstance(x, list) else int(x.shape[0])  # a list: one tensor per sample (Z-Image)


def cache_layout(model: nn.Module) -> CacheLayout:
    """The layout of `model`: one of ours (declared ModelSpec) or a diffusers transformer with a declared spec."""
    from opendit.families import family_for

    family = family_for(model)
    if family is None:
        raise OpenDiTError(
            f"no cache layout for {type(model).__name__}: caches work on models with a family (OpenDiT's DiT and "
            "video DiT, and the module classes of families/)"
        )
    if family.model_spec is not None:  # our blocks: block(x, c) -> x, attention and MLPs by the spec's paths
        return _own_layout(model, family.model_spec)
    return _diffusers_layout(model, family)


def _own_layout(model: nn.Module, spec) -> CacheLayout:
    from opendit.models.spec import _match

    modules = dict(model.named_modules())
    io = BlockIO()  # our blocks: block(x, c) -> x
    blocks = [(path, m, io) for path, m in modules.items() if any(_match(path, p) for p in spec.cache_blocks)]
    keep = spec.attention_filter or (lambda _path: True)
    attention = [
        (path, m, "spatial" if keep(path) else "temporal")
        for path, m in modules.items()
        if any(_match(path, p) for p in spec.attention)
    ]
    mlps = [(path, m) for path, m in modules.items() if any(_match(path, p) for p in spec.cache_mlps)]
    return _checked(CacheLayout(spec.name, blocks, attention, mlps, "x"))


def _diffusers_layout(model: nn.Module, family) -> CacheLayout:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from opendit.families.splits import matching_modules

    blocks = []
    for name, child in model.named_children():
        if name not in _DIFFUSERS_BLOCK_LISTS or not isinstance(child, nn.ModuleList):
            continue
        for index, block in enumerate(child):
            meta = _registered_block(TransformerBlockRegistry, type(block))
            if meta is None:
                io = BlockIO()  # not registered: tensor in, tensor out
            else:
                io = BlockIO(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index,
                             meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name)  # fmt: skip
            io.params = tuple(inspect.signature(type(block).forward).parameters)[1:]
            blocks.append((f"{name}.{index}", block, io))
    if family.attention:  # declared: the modules whose attention spans the token split
        sequence = {path for pattern in family.attention for path, _m in matching_modules(model, pattern)}
    else:  # read from a _cp_plan: every attention module but cross-attention to the text
        sequence = {path for path, m in model.named_modules() if not getattr(m, "is_cross_attention", False)}
    attention = []
    for path, module in model.named_modules():
        owner = path.rsplit(".", 1)[0] if "." in path else ""
        if not any(owner == p for p, _b, _io in blocks) or not _is_attention(module):
            continue
        # attention over the token sequence (split by sequence parallelism) is "spatial"; others attend to the text
        attention.append((path, module, "spatial" if path in sequence else "cross"))
    mlps = [
        (f"{p}.{n}", getattr(b, n))
        for p, b, _io in blocks
        for n in _DIFFUSERS_MLPS
        if isinstance(getattr(b, n, None), nn.Module)
    ]
    return _checked(CacheLayout(family.name, blocks, attention, mlps, "hidden_states"))


def _registered_block(registry, cls):
    """diffusers' block metadata for `cls` or its nearest registered base (under --shard-weights FSDP2 turns each
    block into a subclass of its own class, which the registry does not know by name)."""
    for base in cls.__mro__:
        try:
            return registry.get(base)
        except ValueError:
            continue
    return None


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = Attention
    return isinstance(module, (Attention, AttentionModuleMixin))


def _checked(layout: CacheLayout) -> CacheLayout:
    if len(layout.blocks) < 2:
        raise OpenDiTError(f"{layout.family}: a block cache needs at least 2 blocks, found {len(layout.blocks)}")
    if not layout.attention:
        raise OpenDiTError(f"{layout.family}: no attention module found for PAB")
    return layout
