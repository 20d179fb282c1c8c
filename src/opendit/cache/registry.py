"""The cache-method registry: one object per method of caching across denoising steps.

A method declares
- `name` and `summary`;
- `Options`: a pydantic model of its options (types, bounds, defaults), validated once where the call is made;
- `check(plan)`: raise OpenDiTError for a parallel plan it cannot run under (naming the fix);
- `install(cache)`: wrap the modules it caches (`cache.wrap(module, forward)`; `cache.layout` names the blocks,
  attention and MLP modules of the model's family; `cache.step`, `cache.slot`, `cache.num_steps` say where the
  sampler is; `cache.call_record` counts what a call reused);
- `reset(cache)`: a new trajectory (drop whatever it cached);
- `describe(options)` for the record, and `calls_saved(cache, totals)`: the model calls it saved.

`pab` and `fbcache` are the built-in methods (cache/pab.py, cache/block_cache.py). Adding a method is one file that
subclasses CacheMethod and calls `register_cache_method`; engine workers import that file's module by name before
they install it (`CacheConfig.source`), so a method registered in user code reaches every rank.
"""

from __future__ import annotations

import importlib

from pydantic import BaseModel, ConfigDict, ValidationError

from opendit.errors import OpenDiTError
from opendit.plugins import Registry

BUILTIN_MODULES = ("opendit.cache.pab", "opendit.cache.block_cache")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheMethod:
    name: str = ""
    summary: str = ""
    Options: type[BaseModel] = NoOptions

    def check(self, plan) -> None:
        return None

    def install(self, cache) -> None:
        raise NotImplementedError

    def reset(self, cache) -> None:
        return None

    def describe(self, options) -> str:
        values = ", ".join(f"{k}={v}" for k, v in options.model_dump().items())
        return f"{self.name}: {self.summary}" + (f" ({values})" if values else "")

    def calls_saved(self, cache, totals: dict) -> float:
        return 0.0

    def options(self, values: dict):
        """`values` validated into this method's Options; OpenDiTError naming the field and what it takes."""
        try:
            return self.Options(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "options"
            known = ", ".join(self.Options.model_fields) or "none"
            raise OpenDiTError(f"cache {self.name}: {field}: {error['msg']} (its options: {known})") from None


_METHODS = Registry(BUILTIN_MODULES)


def option_fields(method: CacheMethod) -> list[tuple[str, str]]:
    """(option, request field) of each of a method's options: the request field (and so the CLI flag, the Engine
    keyword and the server's field) is the option's `request_field` where its Options declare one (fbcache's
    `threshold` is `cache_threshold`), else the option's own name when it starts with the method's, else
    "<method>_<option>"."""
    pairs = []
    for option, info in method.Options.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        prefix = method.name.replace("-", "_")
        default = option if option.startswith(prefix + "_") else f"{prefix}_{option}"
        pairs.append((option, extra.get("request_field", default)))
    return pairs


def register_cache_method(method: CacheMethod) -> CacheMethod:
    """Add a method (or replace one of the same name)."""
    if not method.name or method.name == "none":
        raise OpenDiTError("a cache method needs a name other than 'none'")
    return _METHODS.add(method.name, method)


def unregister_cache_method(name: str) -> None:
    _METHODS.remove(name)


def cache_methods() -> dict[str, CacheMethod]:
    return _METHODS.items()


def cache_method(name: str, source: str = "") -> CacheMethod:
    """The registered method `name`; `source` (the module that registers it) is imported first when needed."""
    methods = _METHODS.items()
    if name not in methods and source:
        importlib.import_module(source)
        methods = _METHODS.items()
    if name not in methods:
        raise OpenDiTError(f"unknown cache {name!r}; choose one of: none, {', '.join(methods)}")
    return methods[name]
