"""Rules that keep a run from destroying what it did not create.

- The output is never the input image, a folder that contains it, or a folder inside it
  (`check_not_input`), with or without overwrite.
- A run writes only into a missing or empty folder or a napari-xt result store; anything
  else (a user's folder, an OME-Zarr image, a file) is refused whatever the options.
- Replacing a store (`clear_store`) removes only what napari-xt runs recorded as created
  (and the private `.napari-xt` folder, keeping a matching embedding cache); label images
  or tables that someone else added to the store stay, and a store holding an annotator's
  corrections is never replaced.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..spelling import Spelling, hint
from .layout import PRIVATE, root_attrs, store_kind
from .spec import StoreError

LEGACY_ENTRIES = ("_work", "_progress", "_embeddings", "probabilities", "zarr.json")


def _resolved(p: str | os.PathLike) -> Path:
    # resolve() follows symlinks before it folds "..": "link/../x" is x beside link's target
    return Path(os.fspath(p)).resolve()


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike], spelling: Spelling,
                    what: str = "output store") -> None:
    """Raises StoreError when `out` is one of the `inputs`, contains one or lies inside one
    (paths resolved, links followed); `what` names the output in the message."""
    o = _resolved(out)
    for raw in inputs:
        i = _resolved(raw)
        if o == i:
            why = "is the input image"
        elif o in i.parents:
            why = f"contains the input image {i}"
        elif i in o.parents:
            why = f"is inside the input image {i}"
        else:
            continue
        raise StoreError(f"the {what} {out} {why}; napari-xt never writes into its input: "
                         f"{hint(spelling, 'out')}")


def check_writable_kind(path: Path, spelling: Spelling) -> str:
    """The store kind of `path` (see `layout.store_kind`), refusing files and foreign
    folders."""
    kind = store_kind(path)
    if kind == "file":
        raise StoreError(f"{path} is a file, not a result store folder; {hint(spelling, 'out')}")
    if kind == "foreign":
        raise StoreError(f"{path} exists and is not a napari-xt result store; napari-xt never "
                         f"replaces other folders: {hint(spelling, 'out')}")
    return kind


def refuse_to_drop_corrections(path: Path, spelling: Spelling | None = None) -> None:
    """Raises StoreError when the store at `path` holds an annotator's corrections, which
    replacing the store would delete (no flag allows it: the remedy named, in `spelling`'s
    words, is another output, or moving the store away)."""
    from napari_xt.io.corrections import corrections_in

    found = corrections_in(path)
    if found:
        raise StoreError(f"{path} holds an annotator's corrections ({', '.join(found)}); a "
                         f"fresh run would delete them and no option allows that: "
                         f"{hint(spelling or Spelling(), 'out')}, or move the store away "
                         "first")


def created_entries(path: Path, kind: str) -> list[str]:
    """Store-relative paths that napari-xt runs created in the store at `path`."""
    attrs = root_attrs(path) or {}
    if kind == "store":
        entries = attrs.get("entries")
        return [str(p) for p in entries] if isinstance(entries, list) else []
    name = (attrs.get("run_signature") or {}).get("name", "prediction")
    return [*LEGACY_ENTRIES, f"labels/{name}", f"tables/{name}", f"classifications/{name}"]


def clear_store(path: Path, kind: str, cache_signature: dict | None = None) -> None:
    """Remove what napari-xt created in a store (see the module docstring); the store's own
    embedding cache is kept when it was made for `cache_signature` (the new run's)."""
    from napari_xt.io.result_store import register_remaining

    from .layout import default_cache

    cache = default_cache(path)
    keep_embeddings = cache_signature is not None and _cache_signature(cache) == cache_signature
    for rel in created_entries(path, kind):
        target = path / rel
        if rel in ("zarr.json", PRIVATE) or not _inside(target, path):
            continue
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    private = path / PRIVATE
    if private.is_dir():
        for child in private.iterdir():
            if child.name in ("lock",) or (keep_embeddings and child.name == "embeddings"):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for group in ("labels", "tables", "classifications"):
        register_remaining(path, group)


def _cache_signature(folder: Path) -> dict | None:
    import json

    try:
        meta = json.loads((folder / "cache.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("signature") if isinstance(meta, dict) else None


def refuse_foreign_results(path: Path, entries: list[str], spelling: Spelling) -> None:
    """A fresh run's results must not land on results someone else put in the store."""
    found = [e for e in entries if (path / e).exists()]
    if found:
        raise StoreError(f"{path} holds results napari-xt did not write under this run's "
                         f"name ({', '.join(found)}); they are never replaced: "
                         f"{hint(spelling, 'name')}")


def _inside(target: Path, root: Path) -> bool:
    try:
        return root.resolve() in target.resolve().parents
    except OSError:
        return False
