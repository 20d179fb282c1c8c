"""Model families: one declaration per module class (registry.py), the one applier of split/gather plans in
diffusers' `_cp_plan` vocabulary (splits.py), the attention call routed to a strategy's kernel (attention.py), and
applying a plan to a module (apply.py)."""

from opendit.families.registry import Family, declared_families, family_for, register_family, require_family

__all__ = ["Family", "declared_families", "family_for", "register_family", "require_family"]
