"""The package's layering, checked on its source (imports inside functions included):

    io, model            import nothing of napari-xt above them (nor each other)
    engine, sample_data  use io and model
    train, inspect, distributed   use engine, io, model
    widgets, commands, cli, bench, _napari_io   on top; nothing below imports them

and no module imports itself back through others (no import cycles)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import napari_xt

ROOT = Path(napari_xt.__file__).resolve().parent
RANK = {"io": 0, "model": 0, "engine": 1, "sample_data": 1, "train": 2, "inspect": 2,
        "distributed": 2, "widgets": 3, "commands": 3, "cli": 3, "bench": 3, "_napari_io": 3,
        "__main__": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.with_suffix("").relative_to(ROOT.parent).parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules
                           else base_name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("napari_xt"):
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t != mod:
                        edges[mod].add(t)
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, targets in _imports().items():
        a = _part(mod)
        for t in targets:
            b = _part(t)
            if not b or a == b:
                continue  # the package root (version) or the same package
            if RANK[a] < 3 and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_the_core_never_imports_qt_or_napari():
    bad = []
    for mod, path in _modules().items():
        if RANK.get(_part(mod), 3) >= 3:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{mod}: {n}" for n in names
                    if n.split(".")[0] in ("napari", "qtpy", "PyQt5", "PyQt6", "PySide6",
                                           "magicgui", "superqt")]
    assert not bad, bad


def test_no_import_cycles():
    edges = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    assert not cycles, cycles
