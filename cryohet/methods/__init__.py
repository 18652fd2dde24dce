"""The registry of user-facing methods, discovered: every module of this package that defines ``METHOD``.

Adding a method is adding ``cryohet/methods/<name>.py`` with ``METHOD = Method(...)``; the CLI, the
Scipion plugin and the RELION External job find it here. ``Method.order`` sets its place in the lists.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from cryohet.methods.base import Method, pick_method


def method_modules() -> list[str]:
    """Names of the modules under cryohet.methods that may define ``METHOD`` (all but ``base`` and ``_*``),
    found on disk without importing them, sorted by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.ispkg and m.name != "base" and not m.name.startswith("_"))


def method_of(module_name: str) -> Method | None:
    """The ``METHOD`` of ``cryohet.methods.<module_name>`` (imported), None when it defines none."""
    m = getattr(importlib.import_module(f"{__name__}.{module_name}"), "METHOD", None)
    return m if isinstance(m, Method) else None


def sort_methods(methods: Iterable[Method]) -> dict[str, Method]:
    """Name -> method, by ``order`` then name; ValueError when two methods share a name."""
    out: dict[str, Method] = {}
    for m in sorted(methods, key=lambda m: (m.order, m.name)):
        if m.name in out:
            raise ValueError(f"two cryohet methods are named {m.name!r}")
        out[m.name] = m
    return out


def all_methods() -> dict[str, Method]:
    """Every method (name -> description), in the order of ``cryohet --help``."""
    return sort_methods(m for m in map(method_of, method_modules()) if m is not None)


def get_method(name: str) -> Method:
    return pick_method(all_methods(), name)
