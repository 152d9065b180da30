"""The zarr arrays of a result store: what each is (`ArrayDef`) and how it is created
(sharded, zstd, `dimension_names` as NGFF 0.5 asks, empty chunks written too so every
shard is a file of its own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import HEAT_PATH, Tiling, labels_path, probabilities_path
from .spec import StoreSpec


@dataclass(frozen=True)
class ArrayDef:
    """One zarr array of a result store: its store-relative `path`, `shape`, `chunks` and
    `shards` (a leading channel axis is whole in both), numpy `dtype` name, `dims` (its dimension
    names) and `private` (under the private folder, not a published output: the centre maps)."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    private: bool = False


def array_defs(spec: StoreSpec, tiling: Tiling) -> dict[str, ArrayDef]:
    """The level-0 arrays a run writes, by output: "labels" (H, W) of `spec.label_dtype`,
    "probabilities" (K, H, W) float16 and "heat" (K_h [+ 1 size], H, W) float32 (private), each
    only when `spec` writes it, chunked and sharded as `tiling` says."""
    h, w = spec.height, spec.width
    (cy, cx), (zy, zx) = tiling.chunk, tiling.shard
    out: dict[str, ArrayDef] = {}
    if spec.writes_labels:
        out["labels"] = ArrayDef(f"{labels_path(spec.name)}/0", (h, w), (cy, cx), (zy, zx),
                                 spec.label_dtype, ("y", "x"))
    if spec.writes_probabilities:
        k = spec.prob_channels
        out["probabilities"] = ArrayDef(f"{probabilities_path(spec.name)}/0", (k, h, w),
                                        (k, cy, cx), (k, zy, zx), "float16", ("c", "y", "x"))
    if spec.writes_detections:
        k = spec.heat_channels + int(spec.has_size)
        out["heat"] = ArrayDef(HEAT_PATH, (k, h, w), (k, cy, cx), (k, zy, zx), "float32",
                               ("c", "y", "x"), private=True)
    return out


def create_array(zstore: Any, d: ArrayDef, level: int = 1):
    """Creates the array `d` in the zarr store `zstore` (fill value 0, zstd at `level`, empty
    chunks written too), replacing any array at its path, and returns it."""
    import zarr
    from zarr.codecs import ZstdCodec

    return zarr.create_array(store=zstore, name=d.path, shape=d.shape, chunks=d.chunks,
                             shards=d.shards, dtype=d.dtype, fill_value=0,
                             compressors=ZstdCodec(level=level), dimension_names=d.dims,
                             overwrite=True, config={"write_empty_chunks": True})
