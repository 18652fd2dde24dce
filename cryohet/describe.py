"""``cryohet describe``: the engine's method descriptions as JSON, for hosts that run the engine elsewhere.

A host (the Scipion plugin) builds its forms from what the engine it runs says about itself, not from a
copy of the engine that happens to sit beside it: ``cryohet describe --json`` prints every method's name,
title, help, parameters (type, default, units in help, choices, range, expert, input role), outputs and
citations. ``cryohet describe --key`` prints, without importing any method module (no torch), a key that
changes with the engine's version and with any edit of its sources, so that a host can cache the JSON.

``to_json`` / ``from_json`` are the two directions of one schema (``SCHEMA``); a description read back has
a ``run`` that refuses to run (a host runs methods through the command line).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from cryohet import __version__
from cryohet.methods import all_methods, method_modules
from cryohet.methods.base import Method, Param

#: Version of the JSON layout; a host refuses a layout it does not know.
SCHEMA = 1

#: Parameter types a description may use, by name.
TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}

_PARAM_FIELDS = {f.name for f in fields(Param)}


def source_key() -> str:
    """Hash of the version and of (path, size, mtime) of every .py file of the installed cryohet package."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{__version__}:{root}".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(",".join(method_modules()).encode())
    return h.hexdigest()[:20]


def _param_json(p: Param) -> dict[str, Any]:
    d = asdict(p)
    d["type"] = "Path" if issubclass(p.type, Path) else p.type.__name__
    if d["type"] not in TYPES:
        raise TypeError(f"parameter {p.name}: type {d['type']} has no JSON form")
    if isinstance(d["default"], Path):
        d["default"] = str(d["default"])
    d["choices"] = list(p.choices) if p.choices is not None else None
    return d


def _param_from_json(d: dict[str, Any]) -> Param:
    d = {k: v for k, v in d.items() if k in _PARAM_FIELDS}  # fields of a newer engine that this one lacks
    d["type"] = TYPES[d["type"]]
    d["choices"] = tuple(d["choices"]) if d.get("choices") is not None else None
    return Param(**d)


def to_json(methods: dict[str, Method]) -> dict[str, Any]:
    """The descriptions of ``methods`` (name -> Method) as a JSON-ready dict."""
    return {"schema": SCHEMA, "version": __version__, "key": source_key(), "python": sys.executable,
            "methods": [{"name": m.name, "title": m.title, "help": m.help,
                         "params": [_param_json(p) for p in m.params],
                         "common_params": [_param_json(p) for p in m.common_params],
                         "outputs": list(m.outputs), "citations": list(m.citations), "order": m.order,
                         "needs_poses": m.needs_poses} for m in methods.values()]}


def _not_here(*_args: Any) -> None:
    raise RuntimeError("a description read from JSON does not run: run the method through `cryohet <method>`")


def from_json(data: dict[str, Any]) -> dict[str, Method]:
    """Name -> Method from ``to_json``'s dict; ValueError for another schema."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"method descriptions of schema {data.get('schema')!r}; this cryohet reads schema {SCHEMA}")
    out = {}
    for d in data["methods"]:
        out[d["name"]] = Method(
            name=d["name"], title=d["title"], help=d["help"],
            params=tuple(map(_param_from_json, d["params"])),
            common_params=tuple(map(_param_from_json, d["common_params"])),
            outputs=tuple(d["outputs"]), run=_not_here, citations=tuple(d["citations"]),
            order=d["order"], needs_poses=d["needs_poses"])
    return out


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    sp = sub.add_parser("describe", help="Print the methods' descriptions (for hosts and scripts).",
                        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="Every method's description as JSON on stdout.")
    what.add_argument("--key", action="store_true",
                      help="Only the cache key of this engine's descriptions (fast: imports no method).")
    return sp


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cryohet")
    args = add_parser(parser.add_subparsers()).parse_args(list(argv))
    if args.key:
        print(source_key())
    elif args.json:
        json.dump(to_json(all_methods()), sys.stdout, indent=1)
        print()
    else:
        for m in all_methods().values():
            print(f"{m.name:20s} {m.title}")
    return 0
