"""Laziness: opening reads metadata only; slicing reads only the chunks the region covers."""

from __future__ import annotations

import threading

import numpy as np
import tifffile
import zarr
from zarr.storage import LocalStore, WrapperStore

from napari_xt import sample_data
from napari_xt.io import chunks, open_image


class CountingStore(WrapperStore):
    """Records every key read through the store."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []
        self._lock = threading.Lock()

    async def get(self, key, prototype, byte_range=None):
        with self._lock:
            self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def chunk_keys(self) -> set[str]:
        meta = (".json", ".zattrs", ".zgroup", ".zarray", ".zmetadata")
        return {k for k in self.keys if not k.endswith(meta)}


def test_huge_zarr_reads_only_the_sliced_chunks(tmp_path):
    root = zarr.open_group(str(tmp_path / "big.zarr"), mode="w", zarr_format=3)
    arr = root.create_array("0", shape=(100_000, 100_000), chunks=(1024, 1024), dtype="u1",
                            fill_value=0, dimension_names=["y", "x"])
    arr[50_000:51_000, 50_000:51_000] = 7  # touches 2 x 2 stored chunks
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    store = CountingStore(LocalStore(str(tmp_path / "big.zarr"), read_only=True))
    image = open_image(store)
    assert image.shape == (100_000, 100_000)
    assert store.chunk_keys() == set()  # opening read metadata only
    region = image.levels[0][50_100:50_300, 49_900:50_200].compute()
    assert (region[:, 100:] == 7).all() and (region[:, :100] == 0).all()
    # rows 50100-50300 and columns 49900-50200 straddle chunk borders 50176 and 50176
    assert store.chunk_keys() == {"0/c/48/48", "0/c/48/49", "0/c/49/48", "0/c/49/49"}
    store.keys.clear()
    image.levels[0][60_000:60_010, 70_000:70_010].compute()
    assert store.chunk_keys() == {"0/c/58/68"}


def test_sample_scene_100k_computes_only_covered_chunks(monkeypatch):
    calls = []
    original = sample_data.render_slide_chunk

    def counting(seed, level, y0, x0, h, w):
        calls.append((level, y0, x0, h, w))
        return original(seed, level, y0, x0, h, w)

    monkeypatch.setattr(sample_data, "render_slide_chunk", counting)
    scene = sample_data.slide_scene(100_000, 100_000, seed=3)
    assert scene.shape == (100_000, 100_000, 3) and scene.num_levels == 8
    assert calls == []
    block = scene.levels[0][70_000:70_100, 30_700:30_800].compute()
    assert block.shape == (100, 100, 3)
    assert sorted(calls) == [(0, 69_632, 29_696, 1024, 1024), (0, 69_632, 30_720, 1024, 1024)]
    calls.clear()
    scene.levels[-1].compute()
    assert len(calls) == 1 and calls[0][0] == 7


def test_sample_scene_task_graph_stays_small_after_slicing():
    scene = sample_data.sar_scene(100_000, 100_000)
    region = scene.levels[0][:, 10:20, 10:20]
    graph = region.__dask_optimize__(region.__dask_graph__(), region.__dask_keys__())
    assert len(graph) <= 4


def test_tiled_tiff_region_touches_only_its_tiles(tmp_path, rng, monkeypatch):
    data = rng.integers(0, 255, (2048, 2048), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, tile=(256, 256), compression="zlib",
                     metadata=None)
    reads = []
    original = chunks.ChunkReader.__getitem__

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(chunks.ChunkReader, "__getitem__", counting)
    image = open_image(tmp_path / "t.tif")
    assert image.levels[0].numblocks == (8, 8) and reads == []
    np.testing.assert_array_equal(image.levels[0][300:400, 600:700].compute(),
                                  data[300:400, 600:700])
    assert reads == [(slice(256, 512), slice(512, 768))]
    reads.clear()
    image.levels[0][200:300, 500:520].compute()
    assert len(reads) == 4


def test_a_store_array_is_read_directly_only_when_nothing_is_on_top(tmp_path, rng):
    from napari_xt.io.source import ImageSource

    data = rng.random((2, 300, 260)).astype(np.float32)
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(2, 128, 128))
    level = open_image(tmp_path / "a.zarr").levels[0]
    assert chunks.direct_reader(level) is not None
    for derived in (level[:, :100], level + 1, level.rechunk((2, 64, 64))):
        assert chunks.direct_reader(derived) is None  # any operation: through dask
    src = ImageSource(level, axes="CYX")
    np.testing.assert_array_equal(src.read_box(37, 5, 237, 260), data[:, 37:237, 5:260])
    shifted = ImageSource(level + 1, axes="CYX")
    np.testing.assert_array_equal(shifted.read_box(0, 0, 50, 50), data[:, :50, :50] + 1)
