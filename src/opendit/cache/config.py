"""What a cache across denoising steps is asked to do, validated once at the boundary.

Methods are registered (cache/registry.py); the two built in (cache/pab.py, cache/block_cache.py), one at a time:

- `pab` (Pyramid Attention Broadcast): inside the window [A, B) of the trajectory (fractions of the step count, so it
  holds for any number of steps) an attention module is computed every `range` steps and its output broadcast
  (reused) in between; spatial / self attention every N steps, temporal 2N, cross-attention 3N (the pyramid: the
  less an attention's output changes between steps, the longer it is reused). Optionally the MLPs, every `mlp_range`.
  Decisions depend on the step index only, so every rank and every image decides the same without communication.
- `fbcache` (adaptive first-block cache): the first block always runs; per sample, if its residual moved less than
  `threshold` (relative L1 since that sample's last full step) the remaining blocks are skipped and their cached
  residual added instead. At most `max_reuse` reuses in a row; the first and last `guard_steps` steps always compute.

Defaults per model (what `--cache pab|fbcache` means without further flags) are in `DEFAULTS`, measured with
benchmarks/cache.py on the bundled digits models (docs/caching.md, "Measured").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from opendit.errors import OpenDiTError

CACHE_KINDS = ("none", "pab", "fbcache")


@dataclass(frozen=True)
class CacheConfig:
    kind: str = "none"
    # pab
    pab_range: int = 2  # self / spatial attention: computed every N steps in the window; temporal 2N, cross 3N
    pab_window: tuple[float, float] = (0.2, 0.9)  # fractions of the steps [A, B) in which outputs may be reused
    pab_mlp_range: int = 0  # 0: MLPs always computed; N > 1: reused like attention, every N steps
    # fbcache
    threshold: float = 0.15  # relative L1 change of the first block's residual under which the rest is reused
    max_reuse: int = 4  # consecutive reuses per sample before a full step is forced
    guard_steps: int = 2  # the first and the last `guard_steps` steps always compute every block
    # a registered method's own options (sorted (name, value) pairs, validated by its Options model) and the module
    # that registers it (imported by the workers before installing)
    options: tuple = ()
    source: str = ""

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pab_window"] = list(self.pab_window)
        out["options"] = dict(self.options)
        return out

    def describe(self) -> str:
        if self.kind == "pab":
            a, b = self.pab_window
            mlp = f", mlp every {self.pab_mlp_range}" if self.pab_mlp_range > 1 else ""
            return (
                f"pab: attention reused inside steps [{a:g}, {b:g}) of the trajectory; self/spatial every "
                f"{self.pab_range}, temporal every {2 * self.pab_range}, cross every {3 * self.pab_range}{mlp}"
            )
        if self.kind == "fbcache":
            return (
                f"fbcache: per sample, skip the blocks after the first when its residual moved < "
                f"{self.threshold:g} (relative L1); at most {self.max_reuse} reuses in a row; "
                f"first/last {self.guard_steps} steps full"
            )
        if self.enabled:
            from opendit.cache.registry import cache_method

            method = cache_method(self.kind, self.source)
            return method.describe(method.options(dict(self.options)))
        return "no cache"


# Per model family: what `--cache pab` / `--cache fbcache` mean when no other cache flag is given.
DEFAULTS: dict[str, dict[str, dict]] = {
    "DiT": {"pab": {"pab_range": 2, "pab_window": (0.2, 0.9)}, "fbcache": {"threshold": 0.15, "max_reuse": 4}},
    "VideoDiT": {"pab": {"pab_range": 2, "pab_window": (0.2, 0.9)}, "fbcache": {"threshold": 0.15, "max_reuse": 4}},
}


def default_cache(kind: str, family: str | None = None) -> CacheConfig:
    """The documented default of `kind` for a model family (spec name); other families get the generic default."""
    check_kind(kind)
    return CacheConfig(kind=kind, **DEFAULTS.get(family or "", {}).get(kind, {}))


def check_kind(kind: str, source: str = "") -> None:
    if kind not in CACHE_KINDS:
        from opendit.cache.registry import cache_method

        cache_method(kind, source)  # OpenDiTError naming the registered methods


def method_cache_config(spec: dict, family: str | None = None) -> CacheConfig:
    """A cache given as {"method": name, **options} (Engine.generate(cache=...)): the built-in methods take their
    flags' names (pab_range, threshold, ...); a registered method its Options' fields, validated here."""
    from opendit.cache.registry import cache_method

    spec = dict(spec)
    name = spec.pop("method", None)
    if not isinstance(name, str):
        raise OpenDiTError('a cache given as a dict names its method: {"method": "fbcache", ...}')
    if name in CACHE_KINDS:
        return make_cache_config(name, family, **spec)
    method = cache_method(name)
    options = method.options(spec)
    return CacheConfig(kind=name, options=tuple(sorted(options.model_dump().items())),
                       source=type(method).__module__)  # fmt: skip


def make_cache_config(
    kind: str = "none",
    family: str | None = None,
    *,
    pab_range: int | None = None,
    pab_window: tuple[float, float] | list[float] | None = None,
    pab_mlp_range: int | None = None,
    threshold: float | None = None,
    max_reuse: int | None = None,
    guard_steps: int | None = None,
) -> CacheConfig:
    """A validated CacheConfig: the family's default for `kind`, overridden by whatever is given. Options of the
    other method are an error (they would silently do nothing)."""
    check_kind(kind)
    given = {
        "pab_range": pab_range, "pab_window": pab_window, "pab_mlp_range": pab_mlp_range,
        "threshold": threshold, "max_reuse": max_reuse, "guard_steps": guard_steps,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    own = {"pab": {"pab_range", "pab_window", "pab_mlp_range"}, "fbcache": {"threshold", "max_reuse", "guard_steps"}}
    for name in given:
        if kind not in own or name not in own[kind]:
            flag = "--" + name.replace("_", "-").replace("threshold", "cache-threshold").replace(
                "max-reuse", "cache-max-reuse"
            ).replace("guard-steps", "cache-guard-steps")
            method = "pab" if name.startswith("pab") else "fbcache"
            raise OpenDiTError(f"{flag} belongs to --cache {method}, but the cache is {kind!r}; add --cache {method}")
    if "pab_window" in given:
        given["pab_window"] = tuple(float(v) for v in given["pab_window"])
    config = replace(default_cache(kind, family), **given)
    validate_cache(config)
    return config


def validate_cache(config: CacheConfig) -> None:
    check_kind(config.kind, config.source)
    if config.kind not in CACHE_KINDS:  # a registered method: its own Options say what is valid
        from opendit.cache.registry import cache_method

        cache_method(config.kind, config.source).options(dict(config.options))
        return
    if not isinstance(config.pab_range, int) or config.pab_range < 1:
        raise OpenDiTError(f"--pab-range must be an integer >= 1 (1: never reuse), got {config.pab_range!r}")
    if not isinstance(config.pab_mlp_range, int) or config.pab_mlp_range < 0:
        raise OpenDiTError(
            f"--pab-mlp-range must be an integer >= 0 (0: MLPs always run), got {config.pab_mlp_range!r}"
        )
    window = config.pab_window
    if len(window) != 2 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in window) or window[0] >= window[1]:
        raise OpenDiTError(
            f"--pab-window A B takes two fractions of the steps with 0 <= A < B <= 1 (e.g. 0.2 0.9), got {window!r}"
        )
    if not math.isfinite(config.threshold) or config.threshold < 0:
        raise OpenDiTError(
            f"--cache-threshold must be a finite number >= 0 (0 never reuses; try 0.05 to 0.3), "
            f"got {config.threshold!r}"
        )
    if not isinstance(config.max_reuse, int) or config.max_reuse < 1:
        raise OpenDiTError(f"--cache-max-reuse must be an integer >= 1, got {config.max_reuse!r}")
    if not isinstance(config.guard_steps, int) or config.guard_steps < 0:
        raise OpenDiTError(f"--cache-guard-steps must be an integer >= 0, got {config.guard_steps!r}")


def cache_from_dict(data: dict | None) -> CacheConfig:
    """The inverse of to_dict (requests and record.json), validated."""
    if not data:
        return CacheConfig()
    known = set(CacheConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise OpenDiTError(f"unknown cache field(s) {unknown}; known: {sorted(known)}")
    values = dict(data)
    if "pab_window" in values:
        values["pab_window"] = tuple(values["pab_window"])
    if "options" in values:
        values["options"] = tuple(sorted(dict(values["options"]).items()))
    config = CacheConfig(**values)
    validate_cache(config)
    return config


def request_cache(request, family: str | None, plan=None) -> CacheConfig | None:
    """A call request's cache (its `cache` field and the chosen method's option fields), validated against the plan;
    None: no cache. An option of another method is an error (it would silently do nothing)."""
    from opendit.cache.registry import cache_method, cache_methods, option_fields

    given = {}  # request field -> (its method, the option, the value)
    for method in cache_methods().values():
        for option, field in option_fields(method):
            value = getattr(request, field, None)
            if value is not None:
                given[field] = (method.name, option, value)
    if isinstance(request.cache, dict):
        if given:
            raise OpenDiTError(f"give the cache's options inside its dict, not as {sorted(given)}")
        config = method_cache_config(request.cache, family)
    else:
        kind = request.cache or "none"
        check_kind(kind)
        for field, (owner, _option, _value) in given.items():
            if owner != kind:
                flag = "--" + field.replace("_", "-")
                raise OpenDiTError(f"{flag} belongs to --cache {owner}, but the cache is {kind!r}; add --cache {owner}")
        options = {option: value for owner, option, value in given.values()}
        if kind in CACHE_KINDS:
            config = make_cache_config(kind, family, **options)
        else:
            config = method_cache_config({"method": kind, **options}, family)
    if not config.enabled:
        return None
    check_cache_plan(plan)
    if plan is not None:
        cache_method(config.kind, config.source).check(plan)
    return config


def check_cache_plan(plan) -> None:
    """The parallel plans a cache cannot run under yet, refused with the fix (CLI / Engine and install_cache)."""
    if plan is None:
        return
    if plan.balance_tokens:
        raise OpenDiTError("--cache with --balance-tokens is not supported: a re-split would invalidate every cached "
                           "shard; drop one of them")  # fmt: skip
    if getattr(plan, "pipefusion", 1) > 1:
        # PipeFusion runs the blocks on different ranks (the head block's decision would not reach the later
        # stages) and already reuses last step's activations for the other patches
        raise OpenDiTError(
            "--cache with --pipefusion is not supported: PipeFusion already reuses the previous step's activations "
            "(its stale K/V) and splits the blocks over ranks; drop --cache or use --ulysses / --ring / "
            "--cfg-parallel / --tp"
        )


def spec_family(config) -> str | None:
    """The spec name of a model config (the cache defaults are per family)."""
    from opendit.models.spec import spec_name

    return spec_name(config)
