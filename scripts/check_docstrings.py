"""Every public name of the documented packages has a docstring (the API reference is made
from them, so a missing one is a hole in the docs).

Public: modules whose dotted path has no part starting with "_" (package `__init__` files
count as their package), and in them every class, function and method whose name does not
start with "_", at module level or in a public class (not nested in functions). Dunder
methods are left out, and so are the members of classes that only restate a base class's
contract (`@overload`, `NamedTuple` fields are attributes, not definitions).

Run: python scripts/check_docstrings.py [--list]   (exit 1 and one line per missing name)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("io", "model", "engine", "train", "inspect", "distributed")


def _public_module(path: Path) -> bool:
    parts = path.relative_to(ROOT / "napari_xt").with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return not any(p.startswith("_") for p in parts)


def _definitions(node: ast.AST):
    """The definitions directly in `node`, also those inside its if / try / with blocks
    (definitions made conditionally are public all the same)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield child
        elif isinstance(child, (ast.If, ast.Try, ast.With, ast.ExceptHandler)):
            yield from _definitions(child)
        elif hasattr(ast, "TryStar") and isinstance(child, ast.TryStar):
            yield from _definitions(child)


def _documented(node: ast.AST) -> bool:
    text = ast.get_docstring(node)
    return bool(text and text.strip())  # (an empty docstring documents nothing)


def _missing_in(node: ast.AST, prefix: str) -> list[str]:
    out = []
    for child in _definitions(node):
        name = child.name
        if name.startswith("_"):
            continue
        decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in child.decorator_list}
        if "overload" in decorators:
            continue
        qual = f"{prefix}.{name}"
        if not _documented(child):
            out.append(qual)
        if isinstance(child, ast.ClassDef):
            out.extend(_missing_in(child, qual))
    return out


def missing() -> list[str]:
    """Dotted names (module.Class.method) of public definitions without a docstring."""
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / "napari_xt" / package).rglob("*.py")):
            if not _public_module(path):
                continue
            mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mod = mod.removesuffix(".__init__")
            tree = ast.parse(path.read_text())
            if not _documented(tree):
                out.append(f"{mod} (module)")
            out.extend(_missing_in(tree, mod))
    return out


def main(argv: list[str] | None = None) -> int:
    names = missing()
    for name in names:
        print(f"missing docstring: {name}")
    print(f"{len(names)} public definitions without a docstring in napari_xt."
          f"{{{','.join(PACKAGES)}}}", file=sys.stderr)
    return 1 if names else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
