"""The engine's modules import downward only, without cycles, and never import a host.

Read from the source with ``ast`` (nothing is imported), counting every ``import``: at module level, inside
functions and under ``if TYPE_CHECKING`` alike, since each is a dependency of the module even when it is not
a load-time one. Not counted: the implicit import of a parent package's ``__init__`` (always the same package,
so the same layer) and ``importlib.import_module`` with a computed name (the discovery of methods and volume
models, which imports modules of the registry's own package).

Layers, by package (a new module of a package takes its package's layer; a new package or top-level module
must be placed in ``LAYERS`` first). A module may import its own layer or lower ones:

0  foundations: errors, atomic, runlock, record, device, distributed, io, geometry (and ``cryohet/__init__``)
1  the data path and what needs only geometry: data, simulate, reconstruct
2  models of V(τ, r)
3  inference of τ
4  analysis and validation of a fit (they read run records and volume models)
5  methods (one description per method) and the runner that runs them (``RunContext`` is the methods' contract)
6  hosts inside the engine: the CLI, its describe command, the RELION External job and the RELION 5 pipeliner jobs
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    "cryohet": 0,  # the package's __init__ (its version) only; every other module is placed below
    "cryohet.errors": 0, "cryohet.atomic": 0, "cryohet.runlock": 0, "cryohet.record": 0, "cryohet.device": 0,
    "cryohet.distributed": 0, "cryohet.io": 0, "cryohet.geometry": 0,
    "cryohet.data": 1, "cryohet.simulate": 1, "cryohet.reconstruct": 1,
    "cryohet.models": 2,
    "cryohet.inference": 3,
    "cryohet.analysis": 4, "cryohet.validation": 4,
    "cryohet.methods": 5, "cryohet.runner": 5,
    "cryohet.cli": 6, "cryohet.relion_external": 6, "cryohet.describe": 6, "cryohet.pipeliner_jobs": 6,
    "cryohet.pipeliner_engine": 6,
}

#: Top-level packages the engine never imports: Scipion (pyworkflow, pwem), its RELION plugin, our Scipion plugin.
HOSTS = ("pyworkflow", "pwem", "relion", "cryohet_plugin")

#: Known upward imports in files being rewritten elsewhere: (importer, imported) -> why it is still here.
#: Remove an entry with the import (the test fails on a stale entry, so that the list stays true).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def modules(package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every .py file of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def imports(path: Path, name: str, is_pkg: bool) -> Iterator[tuple[str, str, int]]:
    """(dotted name, its parent, line) for every name an import statement of the file brings in, relative
    imports resolved: ``import a.b`` -> (a.b, a); ``from a import b`` -> (a.b, a), b being a module or a name
    defined in a."""
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, alias.name.rpartition(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                yield f"{mod}.{alias.name}", mod, node.lineno


def graph(package: str) -> dict[str, dict[str, int]]:
    """Module -> {module of the same package it imports: first line}."""
    mods = modules(package)

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    edges: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        out = edges.setdefault(name, {})
        for dotted, parent, line in imports(path, name, is_pkg):
            if dotted.split(".")[0] != package:
                continue
            # the module imported, else (``from a import name``) the module that defines the name
            target = dotted if dotted in mods else owner(parent)
            if target and target != name:
                out.setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def describe_cycle(comp: list[str], edges: dict[str, dict[str, int]], package: str) -> str:
    files = modules(package)
    return "; ".join(f"{files[a][0].relative_to(ROOT)}:{line} imports {b}"
                     for a in comp for b, line in sorted(edges[a].items()) if b in comp)


def layer(module: str) -> int | None:
    best = None
    for prefix in LAYERS:
        if (module == prefix or (prefix != "cryohet" and module.startswith(prefix + "."))) and \
                (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else LAYERS[best]


@pytest.mark.parametrize("package", ["cryohet", "cryohet_plugin"])
def test_no_import_cycles(package: str) -> None:
    edges = graph(package)
    assert edges, f"no modules found under {ROOT / package}"
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe_cycle(c, edges, package) for c in found)


def test_every_engine_module_has_a_layer() -> None:
    unplaced = [m for m in modules("cryohet") if layer(m) is None]
    assert not unplaced, f"place these modules (or their package) in LAYERS of {__file__}: {unplaced}"


def test_engine_imports_downward_only() -> None:
    files = modules("cryohet")
    upward, known = [], set()
    for a, targets in graph("cryohet").items():
        for b, line in targets.items():
            la, lb = layer(a), layer(b)
            if la is None or lb is None or lb <= la:
                continue
            if (a, b) in KNOWN_UPWARD:
                known.add((a, b))
                continue
            upward.append(f"{files[a][0].relative_to(ROOT)}:{line}: {a} (layer {la}) imports {b} (layer {lb})")
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = set(KNOWN_UPWARD) - known
    assert not stale, f"these known upward imports are gone: remove them from KNOWN_UPWARD: {sorted(stale)}"


def test_engine_never_imports_a_host() -> None:
    bad = []
    for name, (path, is_pkg) in modules("cryohet").items():
        for dotted, _, line in imports(path, name, is_pkg):
            if dotted.split(".")[0] in HOSTS:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {dotted}")
    assert not bad, "the engine imports a host:\n" + "\n".join(sorted(set(bad)))


def test_the_checks_see_function_level_and_relative_imports(tmp_path: Path, monkeypatch) -> None:
    """The parser finds imports inside functions, relative imports and ``from pkg import module``, and the
    cycle search reports a two-module cycle."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\nfrom toy import a\n")
    (pkg / "c.py").write_text("from toy.sub.b import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = graph("toy")
    assert edges["toy.a"] == {"toy.sub.b": 2}
    assert edges["toy.sub.b"] == {"toy.a": 2}
    assert edges["toy.c"] == {"toy.sub.b": 1}
    assert edges["toy"] == edges["toy.sub"] == {}
    assert cycles(edges) == [["toy.a", "toy.sub.b"]]
