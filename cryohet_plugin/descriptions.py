"""The engine's method descriptions, as the plugin needs them, without importing the engine's heavy modules.

Scipion imports every plugin's protocols in each of its processes (the GUI, every protocol run of
any plugin). Importing the method modules pulls in torch and friends (seconds), so the descriptions
(names, parameters, outputs, citations; not the ``run`` functions) are cached as JSON, keyed by the
cryohet version and the size and modification time of every source file of the ``cryohet``
package. Any edit or upgrade makes a new key; a cache that cannot be written is simply skipped.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryohet import __version__
from cryohet.methods import method_modules, method_of, sort_methods
from cryohet.methods.base import Method, Param, pick_method

logger = logging.getLogger(__name__)

#: Parameter types a description may use, by name.
TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path, "PosixPath": Path}

_memo: dict[str, Method] | None = None


def cache_dir() -> Path:
    base = os.environ.get("CRYOHET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cryohet")
    return Path(base)


def _source_key() -> str:
    """Hash of the version and of (path, size, mtime) of every .py file of the cryohet package."""
    root = Path(importlib.util.find_spec("cryohet").origin).parent
    h = hashlib.sha256(__version__.encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(",".join(method_modules()).encode())
    return h.hexdigest()[:20]


def _to_json(m: Method) -> dict[str, Any]:
    params = []
    for p in m.params:
        d = asdict(p)
        d["type"] = p.type.__name__
        if d["type"] not in TYPES:
            raise TypeError(f"{m.name}.{p.name}: type {d['type']} cannot be cached")
        if isinstance(d["default"], Path):
            d["default"] = str(d["default"])
        d["choices"] = list(p.choices) if p.choices is not None else None
        params.append(d)
    return {"name": m.name, "title": m.title, "help": m.help, "params": params, "outputs": list(m.outputs),
            "citations": list(m.citations), "order": m.order, "needs_poses": m.needs_poses}


def _from_json(d: dict[str, Any]) -> Method:
    params = []
    for p in d["params"]:
        p = dict(p)
        p["type"] = TYPES[p["type"]]
        p["choices"] = tuple(p["choices"]) if p["choices"] is not None else None
        params.append(Param(**p))
    return Method(name=d["name"], title=d["title"], help=d["help"], params=tuple(params),
                  outputs=tuple(d["outputs"]), run=_not_here, citations=tuple(d["citations"]),
                  order=d.get("order", Method.order), needs_poses=d.get("needs_poses", True))


def _not_here(*_args: Any) -> None:
    raise RuntimeError("the Scipion plugin runs methods through the engine's command line, not in-process")


def _import_all() -> dict[str, Method]:
    methods = []
    for mod in method_modules():
        try:
            m = method_of(mod)
        except Exception as exc:  # one broken method must not hide the others from Scipion
            logger.warning("cryohet: method module %s does not load (%s); no protocol for it", mod, exc)
            continue
        if m is not None:
            methods.append(m)
    return sort_methods(methods)


def load_descriptions(use_cache: bool = True) -> dict[str, Method]:
    """Method name -> description (``run`` is a stub), from the cache when it is current."""
    global _memo
    if _memo is not None and use_cache:
        return _memo
    path = cache_dir() / f"descriptions-{_source_key()}.json" if use_cache else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            _memo = {d["name"]: _from_json(d) for d in data}
            return _memo
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("cryohet: ignoring unreadable description cache %s (%s)", path, exc)
    methods = _import_all()
    if path is not None:
        try:
            text = json.dumps([_to_json(m) for m in methods.values()], indent=1)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".descriptions-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, TypeError) as exc:
            logger.info("cryohet: description cache not written (%s)", exc)
    _memo = methods
    return methods


def get_description(name: str) -> Method:
    return pick_method(load_descriptions(), name)
