"""The strategy registry: one object per sequence-parallel strategy, read by config validation, installation, the
cost model, the planner and the CLI, so that a kernel and its cost can never drift apart.

A strategy declares
- `name`, `summary`, `uses` (the mesh dimensions it needs > 1: ("ulysses",), ("ring",) or ("ulysses", "ring")) and
  `auto` (whether `--sp-impl auto` picks it when exactly those dimensions are > 1);
- `check(plan, dims)`: raise OpenDiTError for a plan it cannot run (naming a fix), return notes on exact fallbacks;
- `install(modules, runtime, sizes)`: put its kernel into the model's attention modules (from the model's spec);
- `core(runtime, sizes)`: its kernel as an attention core on projected (B, S_r, H, D) q, k, v, for models whose
  attention modules project q, k, v themselves (every diffusers family: families/attention.py routes their attention
  call to it); None where the method cannot run on an attention call (DSP: it needs frames);
- `block_work(dims, plan, batch, sizes, rank)`: the attention work one sequence rank does per block (AttentionWork);
- `block_comm(dims, plan, batch, sizes, rank, itemsize, attn_s)`: its collectives per block (CommItem list), bytes
  and calls taken from the kernel's own formulas (the same functions the kernel tests check against CommStats);
- `buffers(dims, plan, batch, sizes, itemsize)`: peak bytes of its send/receive buffers per block;
- `layout`: "tokens" (the spec's token_split / token_gather split the sequence and the kernel goes into the attention
  modules) or "frames" (DSP: `install_model(model, spec, runtime)` installs its own split points; its block_work and
  block_comm describe the model as it runs, not one attention over the split); `splits_heads`: whether the degree is
  bounded by the head count.

Adding a strategy is one new file that defines a SequenceStrategy subclass and calls `register(...)`; the built-in
ones live in parallel/attention/ and are imported on first use of the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from opendit.errors import OpenDiTError
from opendit.models.spec import ModelDims
from opendit.plugins import Registry

BUILTIN_MODULES = (
    "opendit.parallel.attention.ulysses",
    "opendit.parallel.attention.ulysses_overlap",
    "opendit.parallel.attention.ring",
    "opendit.parallel.attention.usp",
    "opendit.parallel.attention.fastseq",
    "opendit.parallel.dsp",
)


@dataclass
class CommItem:
    """One kind of collective a strategy issues per block on one rank: `calls` calls sending `bytes` in total
    (CommStats convention) over a group of `size` ranks at mesh `stride`. `hide_s`: compute it can overlap with;
    `overlap`: the Speeds.overlap key saying how much of it the link really hides (None: on the critical path)."""

    kind: str
    bytes: float
    calls: int
    size: int
    stride: int = 1
    hide_s: float = 0.0
    overlap: str | None = None


@dataclass
class AttentionWork:
    """The attention work of one sequence rank per block: queries x keys over `heads` heads; the fused QKV matmul runs
    on `qkv_rows` tokens; `key_blocks` attention calls of tokens / key_blocks keys each (ring steps); extras."""

    q_tokens: float
    heads: float
    qkv_rows: float
    key_blocks: int = 1
    extra_linear_flops: float = 0.0
    elementwise_rows: float | None = None  # tokens the block's elementwise ops run over (None: the rank's own)
    extra_elementwise: float = 0.0  # elements touched beyond the block's own (ring merges)
    dispatch_ops: float = 0.0  # extra ops relative to one plain block (a plain block = 1.0)


class SequenceStrategy:
    name: str = ""
    summary: str = ""
    uses: tuple[str, ...] = ()
    auto: bool = False
    layout: str = "tokens"
    splits_heads: bool = True

    def install_model(self, model, spec, runtime) -> list:
        raise NotImplementedError(f"{self.name} installs into attention modules (layout 'tokens')")

    def check(self, plan, dims: ModelDims) -> list[str]:
        return []

    def install(self, modules: list, runtime, sizes: list[int]) -> None:
        core = self.core(runtime, sizes)  # stateless: one kernel serves every block
        for module in modules:
            module.core = core

    def core(self, runtime, sizes: list[int]):
        raise NotImplementedError(f"{self.name} has no attention-core kernel")

    def block_work(self, dims: ModelDims, plan, batch: float, sizes: list[int], rank: int) -> AttentionWork:
        raise NotImplementedError

    def block_comm(
        self, dims: ModelDims, plan, batch: float, sizes: list[int], rank: int, itemsize: int, attn_s: float
    ) -> list[CommItem]:
        raise NotImplementedError

    def buffers(self, dims: ModelDims, plan, batch: float, sizes: list[int], itemsize: int) -> float:
        return 0.0

    def accepts(self, ulysses: int, ring: int) -> bool:
        """Whether this strategy runs on these degrees: exactly the dimensions it uses are > 1."""
        return {"ulysses": ulysses > 1, "ring": ring > 1} == {d: d in self.uses for d in ("ulysses", "ring")}


_REGISTRY = Registry(BUILTIN_MODULES)


def register(strategy: SequenceStrategy) -> SequenceStrategy:
    """Add a strategy (or replace one of the same name, e.g. a test re-registering)."""
    if not strategy.name or not strategy.uses:
        raise OpenDiTError("a sequence-parallel strategy needs a name and the mesh dimensions it uses")
    return _REGISTRY.add(strategy.name, strategy)


def unregister(name: str) -> None:
    _REGISTRY.remove(name)


def strategies() -> dict[str, SequenceStrategy]:
    """Every registered strategy by name: the built-ins in BUILTIN_MODULES order (whatever imported them first),
    then the others in registration order."""
    rank = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    order = sorted(_REGISTRY.items().values(), key=lambda s: rank.get(type(s).__module__, len(rank)))
    return {s.name: s for s in order}


def get_strategy(name: str) -> SequenceStrategy:
    registered = strategies()
    if name not in registered:
        raise OpenDiTError(f"unknown sp-impl {name!r}; choose one of {', '.join(registered)}")
    return registered[name]


def strategies_for(ulysses: int, ring: int) -> list[SequenceStrategy]:
    """The strategies that run on these degrees (the planner tries each)."""
    return [s for s in strategies().values() if s.accepts(ulysses, ring)]


def auto_strategy(ulysses: int, ring: int) -> str:
    """What `--sp-impl auto` runs on these degrees ("none" without sequence parallelism)."""
    if ulysses * ring == 1:
        return "none"
    for strategy in strategies_for(ulysses, ring):
        if strategy.auto:
            return strategy.name
    fits = strategies_for(ulysses, ring)
    if fits:
        return fits[0].name
    raise OpenDiTError(f"no registered sequence-parallel strategy runs on ulysses={ulysses} x ring={ring}")
