"""The result store: everything a run persists, and the only code that knows where.

`create_store(path, spec, ...)` opens the store of a run: a `DiskStore` (an OME-Zarr 0.5
store at `path`, see `layout.py` for what lives where and `disk.py` for the commit
protocol) or, for `path=None`, a `MemoryStore` (numpy arrays, nothing persisted).
`open_result(path)` reads a store written earlier (`reader.py`), for widgets and tools.

Guarantees (each tested): a region is done only when its data is durably written and its
checksum recorded; a rerun verifies before it trusts and recomputes what does not verify;
one writer at a time (a lock naming the other run); nothing is deleted that napari-xt did not
create, and the output is never the input; finishing is crash-safe at every step; the
store validates as OME-Zarr and reopens in napari.
"""

from __future__ import annotations

import os
from typing import Any

from napari_xt.io.results import PALETTE

from ..spelling import Spelling
from .layout import Index, Tiling, store_kind
from .memory import MemoryStore
from .reader import ResultReader, open_result
from .spec import (
    DONE,
    FAILED,
    PENDING,
    ClassInfo,
    RegionTiles,
    StoreError,
    StoreSpec,
)

__all__ = [
    "DONE",
    "FAILED",
    "PALETTE",
    "PENDING",
    "ClassInfo",
    "Index",
    "MemoryStore",
    "ResultReader",
    "RegionTiles",
    "StoreError",
    "StoreSpec",
    "Tiling",
    "create_store",
    "open_result",
    "store_kind",
]


def create_store(path: str | os.PathLike | None, spec: StoreSpec, *, overwrite: bool = False,
                 restart: bool = False, inputs: tuple[str, ...] = (),
                 spelling: Spelling | None = None, threaded: bool = True,
                 cache_signature: dict | None = None) -> Any:
    """The store of a run: refuses (StoreError) before writing anything when `path` is the
    input, inside it or contains it, is a file or a folder that is not a napari-xt store,
    holds another run's results (without `overwrite`), or is locked by a running run."""
    if path is None:
        return MemoryStore(spec)
    from .disk import DiskStore

    try:
        return DiskStore(path, spec, overwrite=overwrite, restart=restart, inputs=inputs,
                         spelling=spelling, threaded=threaded, cache_signature=cache_signature)
    except StoreError:
        raise
    except OSError as err:
        raise StoreError(f"cannot write the output store {path}: {err}") from err
