"""A registry of named objects (sequence strategies, cache methods, model families) that modules add themselves to
when imported; the built-in modules are imported on first read, so reading never misses one."""

from __future__ import annotations

import importlib


class Registry:
    def __init__(self, builtin_modules: tuple[str, ...]):
        self.builtin_modules = builtin_modules
        self._items: dict[str, object] = {}
        self._loaded = False

    def add(self, name: str, item):
        """Add `item` under `name` (replacing one of the same name, e.g. a test re-registering); returns it."""
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def items(self) -> dict:
        """Every registered item by name (the built-in modules imported first)."""
        if not self._loaded:
            self._loaded = True
            for module in self.builtin_modules:
                importlib.import_module(module)
        return dict(self._items)
