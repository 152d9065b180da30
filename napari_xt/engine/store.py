"""`PredictionStore`: where a run's outputs and progress live.

Persistent stores are OME-Zarr 0.5 (zarr v3) directories; `path=None` keeps everything in
numpy arrays (no zarr or dask needed; nothing to resume). Layout:

    <out>.zarr/
      zarr.json                  root attributes "napari-xt": provenance and run signature
      labels/<name>/             NGFF image-label pyramid (written at finish, io.results)
      probabilities/<name>       (K, H, W) float16 per-class probabilities, chunk = one region
      tables/detections/         y, x, class, score, size columns (io.results format)
      classifications/<name>/    classification record: mean logits / probabilities over crops
      _progress/region_state     (rows, cols) uint8: STATE_* below
      _progress/crop_logits      (crops, K) float32 and crop_done (crops,) bool (classifiers)
      _progress/points/r_c.npy   detections of each finished region
      _work/labels               (H, W) label tiles of finished regions, chunk = one region
      _work/heat                 (K_h, H, W) float16 finished centre heatmaps (detections)
      _embeddings/               default place of the region embedding cache (kept on
                                 overwrite: it has its own signature)

A store is resumed only by a run with the same signature; a different run needs
`overwrite=True`. Every write error becomes a `StoreError` naming the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

STATE_PENDING, STATE_QUEUED, STATE_ENCODED, STATE_CONTEXT, STATE_DONE, STATE_FAILED = range(6)
STATE_NAMES = ("pending", "queued", "encoded", "contextualized", "decoded", "failed")
KEEP_ON_OVERWRITE = ("_embeddings",)


class StoreError(OSError):
    """The output store cannot be created, written, or holds another run's results."""


class _MemoryArrays:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def create(self, name, shape, chunks, dtype, fill=0):
        self.arrays[name] = np.full(shape, fill, dtype=dtype)
        return self.arrays[name]

    def get(self, name):
        return self.arrays.get(name)


class _ZarrArrays:
    def __init__(self, root: Path) -> None:
        import zarr

        self.zarr = zarr
        self.root = root
        self.group = zarr.open_group(str(root), mode="a", zarr_format=3)

    def create(self, name, shape, chunks, dtype, fill=0):
        chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                       fill_value=fill, overwrite=True)

    def get(self, name):
        try:
            node = self.group[name]
        except KeyError:
            return None
        return node


class PredictionStore:
    """Outputs of one run over a `rows x cols` region grid of an `H x W` level."""

    def __init__(self, path: str | os.PathLike | None, signature: dict[str, Any],
                 overwrite: bool = False, restart: bool = False) -> None:
        """`overwrite`: replace whatever the store holds; `restart`: start the same run
        again from scratch instead of resuming it (another run's results still need
        `overwrite`)."""
        self.path = None if path is None else Path(path)
        self.signature = json.loads(json.dumps(signature))
        self.resumed = False
        if self.path is None:
            self.arrays: Any = _MemoryArrays()
            self.points: dict[tuple[int, int], np.ndarray] = {}
            return
        try:
            self._open(overwrite, restart)
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(f"cannot write the output store {self.path}: {err}") from err

    # ------------------------------------------------------------------ opening
    def _open(self, overwrite: bool, restart: bool) -> None:
        p = self.path
        meta = p / "zarr.json"
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} exists and is not a directory")
        if p.exists() and any(p.iterdir()):
            old = _read_signature(meta)
            if old is None and not overwrite:
                raise StoreError(f"{p} exists and is not a napari-xt prediction store; "
                                 "choose another output or pass overwrite=True")
            if old is not None and old != self.signature and not overwrite:
                diff = sorted(k for k in set(old) | set(self.signature)
                              if old.get(k) != self.signature.get(k))
                raise StoreError(f"{p} holds results of a different run (differs in: "
                                 f"{', '.join(diff)}); pass overwrite=True to replace them")
            if old == self.signature and not overwrite and not restart:
                self.resumed = True
            else:
                _refuse_to_drop_corrections(p)
                for child in p.iterdir():
                    if child.name not in KEEP_ON_OVERWRITE:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        self.arrays = _ZarrArrays(p)
        if not self.resumed:
            self.set_attrs({"run_signature": self.signature, "complete": False})

    def set_attrs(self, values: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            g = self.arrays.group
            cur = dict(g.attrs.get("napari-xt", {}))
            cur.update(json.loads(json.dumps(values, default=_json_default)))
            g.attrs["napari-xt"] = cur
        except OSError as err:
            raise StoreError(f"cannot write the output store {self.path}: {err}") from err

    def attrs(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        return dict(self.arrays.group.attrs.get("napari-xt", {}))

    # ------------------------------------------------------------------ arrays
    def array(self, name: str, shape, chunks, dtype, fill=0):
        """The array `name`, created if missing (or if its shape/dtype differ)."""
        a = self.arrays.get(name)
        if a is None or tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
            a = self.arrays.create(name, tuple(shape), tuple(chunks), dtype, fill)
        return a

    def write_points(self, index: tuple[int, int], points: np.ndarray) -> None:
        if self.path is None:
            self.points[index] = points
            return
        folder = self.path / "_progress" / "points"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{index[0]}_{index[1]}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, points)
        os.replace(tmp, folder / f"{index[0]}_{index[1]}.npy")

    def all_points(self, dtype: np.dtype) -> np.ndarray:
        if self.path is None:
            parts = list(self.points.values())
        else:
            folder = self.path / "_progress" / "points"
            files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
            parts = [np.load(f) for f in files]
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    def points_done(self, grid: tuple[int, int]) -> np.ndarray:
        """(rows, cols) bool: regions whose detections are already saved."""
        done = np.zeros(grid, bool)
        folder = None if self.path is None else self.path / "_progress" / "points"
        names = ([f.stem for f in folder.glob("*.npy")] if folder and folder.is_dir()
                 else [f"{r}_{c}" for r, c in getattr(self, "points", {})])
        for stem in names:
            r, c = (int(v) for v in stem.split("_"))
            if r < grid[0] and c < grid[1]:
                done[r, c] = True
        return done

    def remove_work(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path / "_work", ignore_errors=True)
            try:
                del self.arrays.group["_work"]
            except (KeyError, OSError):
                pass


def _refuse_to_drop_corrections(path: Path) -> None:
    from napari_xt.io.corrections import corrections_in

    found = corrections_in(path)
    if found:
        raise StoreError(f"{path} holds an annotator's corrections ({', '.join(found)}); a "
                         "fresh run would delete them. Write the new run to another output, "
                         "or move the store away first")


def _read_signature(meta: Path) -> dict[str, Any] | None:
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    return attrs.get("napari-xt", {}).get("run_signature")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
