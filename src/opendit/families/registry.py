"""The family registry: one declaration per model family, keyed by module class.

A family says, as data, how parallelism is applied to its modules from outside:
- `cp_plan`: where tokens are split and gathered, in diffusers' `_cp_plan` vocabulary (ContextParallelInput /
  ContextParallelOutput by module path; families/splits.py applies it);
- `attention`: the attention modules whose processor calls F.scaled_dot_product_attention itself (the SDPA route
  of families/attention.py); empty: every attention module whose processor goes through diffusers'
  `dispatch_attention_fn` with a parallel config (the dispatch route);
- `tensor`: where --tp splits it (parallel/tensor.py), None where not declared;
- `cfg_batched`: whether its pipelines run [uncond; cond] in one call (so --cfg-parallel has a batch to split);
  False where they call the transformer once per guidance branch; None where nobody declared it (the split then
  refuses an odd batch at the call, with the reason).

A diffusers class that declares `_cp_plan` is a family with no code here: `family_for` reads the plan from the class,
and its tensor split from the class's `_tp_plan` where it has one (families/tp_plan.py). Classes without one are
declared in families/declared.py, and a user can declare more with `register_family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opendit.errors import OpenDiTError
from opendit.plugins import Registry


@dataclass(frozen=True)
class Family:
    name: str
    cp_plan: dict
    attention: tuple[str, ...] = ()
    cfg_batched: bool | None = None
    heads_attr: str = "num_attention_heads"
    tensor: object | None = None  # parallel.tensor's TensorSplit
    source: str = "declared"  # or "_cp_plan": read from the class
    # --shard-weights: blocks the model reads outside their own forward (diffusers' DiT embeds the final layer's
    # condition with block 0's embedder after every block ran): they stay in the root unit, gathered all forward
    shard_in_root: tuple[str, ...] = ()
    # OpenDiT's own models (DiT, video DiT): their ModelSpec (models/spec.py), applied by parallel/apply.py, whose
    # fused-qkv kernels, DSP, PipeFusion, token re-balancing and sharded loading need the model's own split points
    model_spec: object | None = None
    notes: dict = field(default_factory=dict)
    # hooks the plan vocabulary cannot say, installed after the plan: (module, SequenceState) -> list of handles
    # (Latte's temporal blocks take a timestep per (batch, token) row, narrowed with the tokens)
    install: object | None = None

    def num_heads(self, module) -> int | None:
        value = module.config.get(self.heads_attr) if hasattr(module, "config") else None
        return int(value) if value is not None else None

    @property
    def not_batched(self) -> tuple[str, ...]:
        """Root arguments split along dim 0: their dim 0 is the sequence, so they have no batch dim (Flux's ids)."""
        root = self.cp_plan.get("", {})
        return tuple(name for name, split in root.items() if not split.split_output and split.split_dim == 0)

    @property
    def splits_text(self) -> bool:
        """Whether the text stream is split with the image tokens (joint attention over both, e.g. SD3, Flux)."""
        for path, entry in self.cp_plan.items():
            if isinstance(entry, dict) and ("encoder_hidden_states" in entry or path == "context_embedder"):
                return True
        return False


_DECLARED = Registry(("opendit.families.declared",))  # class name -> Family (DiT, PixArt, SD3, LTX-2's addition)


def register_family(class_name: str, family: Family) -> Family:
    """Declare (or replace) the family of a module class, by class name."""
    return _DECLARED.add(class_name, family)


def declared_families() -> dict[str, Family]:
    return _DECLARED.items()


def family_for(module_or_class) -> Family | None:
    """The family of a module (or module class): declared for its class or a base class, else read from the class's
    `_cp_plan`; None when neither exists."""
    from opendit.models.spec import has_spec, spec_for

    if not isinstance(module_or_class, type) and has_spec(module_or_class):
        spec = spec_for(module_or_class)
        return Family(name=spec.name, cp_plan={}, cfg_batched=True, source="OpenDiT ModelSpec", model_spec=spec)
    declared = _DECLARED.items()
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for base in cls.__mro__:
        if base.__name__ in declared:
            return declared[base.__name__]
    plan = getattr(cls, "_cp_plan", None)
    if isinstance(plan, dict) and plan:
        return Family(name=f"diffusers {cls.__name__}", cp_plan=plan, source="_cp_plan", **_tensor_of(cls))
    return None


def _tensor_of(cls) -> dict:
    """The tensor split read from the class's `_tp_plan` (none without one); a plan OpenDiT cannot run exactly leaves
    tp undeclared, with the reason kept for the refusal, and every other capability working."""
    from opendit.families.tp_plan import tensor_split_from_tp_plan

    try:
        return {"tensor": tensor_split_from_tp_plan(cls)}
    except OpenDiTError as exc:
        return {"notes": {"tp": str(exc)}}


def require_family(module) -> Family:
    family = family_for(module)
    if family is None:
        raise OpenDiTError(
            f"{type(module).__name__} has no OpenDiT plan; supported: OpenDiT's own DiT models, every diffusers class "
            f"with a _cp_plan, and the declared classes {', '.join(declared_families())}; declare one with "
            "opendit.families.register_family"
        )
    return family
