"""The registry of user-facing methods; each module defines ``METHOD``."""
from __future__ import annotations

import importlib

from cryohet.methods.base import Method, pick_method

#: Module names under cryohet.methods, in the order they appear in ``cryohet --help``.
METHOD_MODULES = (
    "simulate", "reconstruct", "principal_volumes", "train_vae", "analyze", "eval_volume", "select",
    "benchmark_make", "benchmark_score", "validate_halfsets", "consensus",
)


def all_methods() -> dict[str, Method]:
    methods = {}
    for mod in METHOD_MODULES:
        m = importlib.import_module(f"cryohet.methods.{mod}").METHOD
        methods[m.name] = m
    return methods


def get_method(name: str) -> Method:
    return pick_method(all_methods(), name)
