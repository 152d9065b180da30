"""Layout of the results inside an OME-Zarr store: result names, group metadata files,
atomic creation of a result folder (and of its parent group / the store itself when they do
not exist yet), and the listing of results in the parent groups' attributes.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageIOError
from .ngff import ome_attrs, wrap_ome
from .store import atomic_directory

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RESERVED_NAMES = ("zarr.json",)  # (names starting with '.' are refused anyway)
MAX_NAME = 128  # leaves room for the temporary names beside a result in a 255-byte file name


def zarr_format(root: Path) -> int | None:
    """The zarr format of the group at `root`: 3 (`zarr.json`), 2 (`.zgroup` or
    `.zattrs`), or None when it holds neither."""
    if (root / "zarr.json").is_file():
        return 3
    if (root / ".zgroup").is_file() or (root / ".zattrs").is_file():
        return 2
    return None


def check_name(name: str) -> str:
    """`name` unchanged when it is a valid result name (letters, digits, `.`, `_`, `-`,
    starting with a letter or digit), else raises `ImageIOError`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ImageIOError(
            f"result name {name!r} must be letters, digits, '.', '_' or '-' (not starting "
            "with '.' or '-')"
        )
    return name


def check_new_name(name: str) -> str:
    """`check_name`, and for a result about to be written also: not a zarr metadata file's
    name, at most `MAX_NAME` characters (results of longer names still read)."""
    check_name(name)
    if name.lower() in RESERVED_NAMES:
        raise ImageIOError(f"result name {name!r} is the name of a zarr metadata file")
    if len(name) > MAX_NAME:
        raise ImageIOError(f"result name {name[:20]!r}... is longer than {MAX_NAME} characters")
    return name


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file of its own renamed into
    place);
    numpy values are converted by `json_default`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:  # a name of its own: two writers of one file never rename each other's
        tmp.write_text(json.dumps(data, indent=2, default=json_default))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_default(value: Any) -> Any:
    """The JSON-compatible form of a numpy scalar or array (the `default` hook of
    `json.dumps`); raises `TypeError` for anything else."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def group_attrs(path: Path, fmt: int) -> dict[str, Any]:
    """The attributes of the zarr group at `path` in format `fmt` (2 or 3); empty when
    its metadata file is missing."""
    if fmt == 3:
        meta = path / "zarr.json"
        return json.loads(meta.read_text()).get("attributes", {}) if meta.is_file() else {}
    meta = path / ".zattrs"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def write_group(path: Path, fmt: int, attrs: Mapping[str, Any]) -> None:
    """Write (or rewrite) a group's metadata file(s) atomically."""
    path.mkdir(parents=True, exist_ok=True)
    if fmt == 3:
        write_json(path / "zarr.json",
                    {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs)})
    else:
        write_json(path / ".zgroup", {"zarr_format": 2})
        write_json(path / ".zattrs", dict(attrs))


PRIVATE = ".napari-xt"  # a napari-xt result store's private folder (holds its lock)
_HELD: set[str] = set()  # stores whose lock this process holds (a run finishing them)


def hold(root: str | os.PathLike, held: bool) -> None:
    """Note that this process holds (or released) the lock of the store at `root`, so its
    own writes into it do not wait for themselves."""
    key = os.path.abspath(os.fspath(root))
    if held:
        _HELD.add(key)
    else:
        _HELD.discard(key)


@contextmanager
def store_lock(store: str | os.PathLike):
    """Hold a napari-xt result store's lock while writing into it (no-op for other stores
    and for a store this process already holds): a write never races a run."""
    from .lock import FolderLock, LockedError

    root = Path(store)
    if not (root / PRIVATE).is_dir() or os.path.abspath(root) in _HELD:
        yield
        return
    lock = FolderLock(root / PRIVATE, f"result store {root}")
    try:
        lock.acquire()
    except LockedError as err:
        raise ImageIOError(str(err)) from None
    hold(root, True)  # writes nested in this one do not lock again
    try:
        yield
    finally:
        hold(root, False)
        lock.release()


@contextmanager
def result_dir(store: str | os.PathLike, kind: str, name: str, overwrite: bool):
    """Yield (temporary result directory, zarr format, NGFF version); commit on success.

    A store that does not exist is created as a whole, atomically, with the result in it.
    A napari-xt result store is locked meanwhile (`store_lock`).
    """
    with store_lock(store):
        yield from _result_dir(store, kind, name, overwrite)


def _result_dir(store: str | os.PathLike, kind: str, name: str, overwrite: bool):
    root = Path(store)
    name = check_new_name(name)
    what = f"{kind.rstrip('s')} result {name!r}"
    fmt = zarr_format(root)
    if root.exists() and fmt is None:
        raise ImageIOError(f"{root}: exists but is not a zarr store")
    if fmt is None:
        with atomic_directory(root, overwrite=False, what="store") as tmp_root:
            write_group(tmp_root, 3, {})
            write_group(tmp_root / kind, 3, {})
            with atomic_directory(tmp_root / kind / name, overwrite=False, what=what) as tmp:
                yield tmp, 3, "0.5"
        return
    version = "0.5" if fmt == 3 else "0.4"
    parent = root / kind
    if not parent.exists():  # the parent group appears together with its first result
        with atomic_directory(parent, overwrite=False, what=f"{kind} group") as tmp_parent:
            write_group(tmp_parent, fmt, {})
            with atomic_directory(tmp_parent / name, overwrite=False, what=what) as tmp:
                yield tmp, fmt, version
        return
    with atomic_directory(parent / name, overwrite=overwrite, what=what) as tmp:
        yield tmp, fmt, version


def register(root: Path, kind: str, name: str, key: str) -> None:
    """List the result in its parent group's attributes (NGFF `labels` list for labels)."""
    parent = root / kind
    fmt = zarr_format(root) or 3
    attrs = group_attrs(parent, fmt)
    version = "0.5" if fmt == 3 else "0.4"
    if kind == "labels":
        block, _ = ome_attrs(attrs)
        names = [n for n in block.get("labels", []) if (parent / n).is_dir()]
        if name not in names:
            names.append(name)
        write_group(parent, fmt, wrap_ome({"labels": names}, version))
    else:
        names = sorted(set(attrs.get("napari-xt", {}).get(key, [])) | {name})
        write_group(parent, fmt, {"napari-xt": {key: names}})


def register_remaining(root: Path, kind: str) -> None:
    """After results were removed from `root/kind`: list only the results still there, and
    remove the group when nothing is left in it (only its own metadata)."""
    parent = Path(root) / kind
    if not parent.is_dir():
        return
    fmt = zarr_format(parent) or zarr_format(Path(root)) or 3
    names = sorted(p.name for p in parent.iterdir()
                   if p.is_dir() and NAME_PATTERN.match(p.name) and zarr_format(p))
    leftovers = [p for p in parent.iterdir()
                 if p.name not in ("zarr.json", ".zgroup", ".zattrs") and not p.is_dir()]
    if not names and not leftovers and not any(p.is_dir() for p in parent.iterdir()):
        for meta in ("zarr.json", ".zgroup", ".zattrs"):
            (parent / meta).unlink(missing_ok=True)
        parent.rmdir()
        return
    version = "0.5" if fmt == 3 else "0.4"
    if kind == "labels":
        write_group(parent, fmt, wrap_ome({"labels": names}, version))
    else:
        write_group(parent, fmt, {"napari-xt": {kind: names}})
