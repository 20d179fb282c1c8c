"""Caching across denoising steps: PAB and the adaptive first-block cache (cache/config.py says what each does)."""

from opendit.cache.config import CACHE_KINDS, CacheConfig, cache_from_dict, default_cache, make_cache_config
from opendit.cache.runtime import StepCache, install_cache

__all__ = [
    "CACHE_KINDS", "CacheConfig", "StepCache", "cache_from_dict", "default_cache", "install_cache",
    "make_cache_config",
]  # fmt: skip
