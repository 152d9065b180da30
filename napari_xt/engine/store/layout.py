"""Where everything lives in a result store, and how it is cut into chunks and shards.

    result.zarr/                      an OME-Zarr 0.5 image (zarr v3)
      zarr.json                       ome.multiscales: a preview pyramid of the input image;
                                      attributes["napari-xt"]: format, run signature,
                                      provenance ("created": when), "complete", "entries":
                                      what napari-xt runs created here
      0/ 1/ ...                       the preview levels (as many as the label pyramid has)
      labels/zarr.json                ome.labels: the label images
      labels/<name>/                  NGFF image-label (y, x), mode pyramid, sharded
      probabilities/<name>/           NGFF image (c, y, x) float16, mean pyramid, sharded
      tables/<name>/                  detections: zarr columns + table.parquet
      classifications/<name>/         a classification record (attributes)
      .napari-xt/                     private state, invisible to OME-Zarr readers:
        lock                          one writer at a time (pid, host, start time)
        journal                       the commit log: what is durably written, with CRC-32s
        points-*.bin                  detections and halo strips of committed shards
        heat                          centre maps of shards flushed before they were complete
        embeddings/                   default place of the region embedding cache

Level-0 arrays are written in whole shards (`Tiling`): a shard is `SHARD` pixels a side,
a multiple of the chunk (`CHUNK` px, a multiple of the region size) and aligned with the
engine's strips, so the shards of a strip are complete when the strip has passed and each
is written once. A 100k x 100k label image is ~2,500 shard files, not millions of chunks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_xt.io.result_store import PRIVATE

FORMAT = 2
KIND = "prediction-store"
CHUNK = 512  # pixels a side of a chunk (rounded up to whole regions)
SHARD = 2048  # pixels a side of a shard (at most; a whole number of chunks)
MIN_PYRAMID = 1024  # pyramids go down until the larger side is at most this

Index = tuple[int, int]


def labels_path(name: str) -> str:
    """Store-relative path of the label image of result `name`."""
    return f"labels/{name}"


def probabilities_path(name: str) -> str:
    """Store-relative path of the probability image of result `name`."""
    return f"probabilities/{name}"


def table_path(name: str) -> str:
    """Store-relative path of the detection table of result `name`."""
    return f"tables/{name}"


def classification_path(name: str) -> str:
    """Store-relative path of the classification record of result `name`."""
    return f"classifications/{name}"


HEAT_PATH = f"{PRIVATE}/heat"


def default_cache(path: str | os.PathLike) -> Path:
    """Where a store keeps its region embedding cache unless told otherwise."""
    return Path(path) / PRIVATE / "embeddings"


def root_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The "napari-xt" attributes of a store's root zarr.json (None: not readable)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    value = attrs.get("napari-xt") if isinstance(attrs, dict) else None
    return value if isinstance(value, dict) else None


def store_kind(path: str | os.PathLike) -> str:
    """What `path` is, for a run about to write there:

    "missing" (nothing there), "file", "empty" (an empty folder, or one holding only the
    private folder of a store being created), "store" (a result store
    of this format), "legacy" (a result store of napari-xt 0.1), "foreign" (anything else).
    """
    p = Path(path)
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "file"
    if not any(c.name != PRIVATE for c in p.iterdir()):
        return "empty"  # (or a store another run is just creating: its lock will say so)
    attrs = root_attrs(p)
    if attrs is None:
        return "foreign"
    if attrs.get("format") == FORMAT and attrs.get("kind") == KIND:
        return "store"
    if "run_signature" in attrs and "format" not in attrs:
        return "legacy"
    return "foreign"


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of every level of a store's pyramids (labels, probabilities, the
    preview has as many levels): halved until the larger side is at most MIN_PYRAMID."""
    from napari_xt.io.pyramid import pyramid_shapes

    return pyramid_shapes(height, width, min_size=MIN_PYRAMID)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class Tiling:
    """Chunks and shards of an `height x width` level-0 array over `S`-pixel regions."""

    height: int
    width: int
    region_size: int
    chunk: tuple[int, int]
    shard: tuple[int, int]

    @classmethod
    def for_grid(cls, height: int, width: int, region_size: int,
                 strip_px: int | None = None) -> Tiling:
        """The tiling of a `height x width` array over `region_size`-pixel regions: chunks of
        `CHUNK` pixels rounded up to whole regions; shards of the largest whole number of chunks
        (at most `SHARD` pixels) that divides `strip_px`, the engine's strip width (one chunk
        when none does). Along a side shorter than a chunk the chunk and the shard are that side;
        a shard never has more chunks than the side needs."""
        s = int(region_size)
        c = _round_up(CHUNK, s)
        z = c
        # largest whole number of chunks <= SHARD that divides the strip width (so a shard
        # never waits for the next strip); one chunk when nothing larger fits
        for m in range(max(1, SHARD // c), 0, -1):
            if strip_px is None or strip_px % (m * c) == 0:
                z = m * c
                break
        def axis(n: int) -> tuple[int, int]:
            ch = min(c, n)
            return ch, min(z, _round_up(n, ch))
        (cy, zy), (cx, zx) = axis(height), axis(width)
        return cls(int(height), int(width), s, (cy, cx), (zy, zx))

    @property
    def shard_grid(self) -> tuple[int, int]:
        """(rows, cols) of the shard grid."""
        return -(-self.height // self.shard[0]), -(-self.width // self.shard[1])

    def shard_of(self, row: int, col: int) -> Index:
        """The shard (i, j) that holds region (row, col)."""
        s = self.region_size
        return (row * s) // self.shard[0], (col * s) // self.shard[1]

    def shard_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) level pixels of shard (i, j), clipped to the image."""
        zy, zx = self.shard
        return i * zy, j * zx, min((i + 1) * zy, self.height), min((j + 1) * zx, self.width)

    def regions_of(self, i: int, j: int) -> list[Index]:
        """The regions whose pixels lie in shard (i, j) (raster order)."""
        y0, x0, y1, x1 = self.shard_box(i, j)
        s = self.region_size
        return [(r, c) for r in range(y0 // s, -(-y1 // s)) for c in range(x0 // s, -(-x1 // s))]

    def neighbours(self, i: int, j: int) -> list[Index]:
        """The shards around shard (i, j), up to eight, those inside the shard grid."""
        rows, cols = self.shard_grid
        return [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                if (a, b) != (i, j) and 0 <= a < rows and 0 <= b < cols]
