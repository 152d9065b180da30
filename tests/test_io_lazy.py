"""Laziness: opening reads metadata only; slicing reads only the chunks the region covers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore, WrapperStore

from napari_xt import sample_data
from napari_xt.io import ImageIOError, chunks, open_image


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


def test_missing_tiles_are_read_a_band_at_a_time_and_equal_the_pixels(tmp_path, rng):
    # A missing tile is read with the missing tiles right of it (up to the strip's width)
    # in one store read; every region read still gives exactly the stored pixels, also
    # with two threads reading at once (the engine's reader and its compute thread).
    from napari_xt.io.source import ImageSource

    data = rng.random((2, 256, 320)).astype(np.float32)
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(2, 32, 32))
    src = ImageSource(open_image(tmp_path / "a.zarr").levels[0], axes="CYX")
    src.fit_tile_cache(128, 64)  # a strip 128 px wide: bands of up to 5 tiles
    reads = []
    original = src._read_raw
    src._read_raw = lambda *a, **k: reads.append(a[:4]) or original(*a, **k)
    boxes = [(y, x, min(y + 16, 256), min(x + 16, 320)) for y in range(0, 256, 16)
             for x in range(0, 128, 16)]
    for box in boxes:
        np.testing.assert_array_equal(src.read_box(*box), data[:, box[0]:box[2], box[1]:box[3]])
    assert all(x1 - x0 == 5 * 32 for y0, x0, y1, x1 in reads), reads
    assert len(reads) == 256 // 32  # one read per tile row, not one per tile (40)

    fresh = ImageSource(open_image(tmp_path / "a.zarr").levels[0], axes="CYX")
    fresh.fit_tile_cache(320, 64)
    bad = []

    def reader(order):
        try:
            for box in order:
                if not np.array_equal(fresh.read_box(*box),
                                      data[:, box[0]:box[2], box[1]:box[3]]):
                    bad.append(box)
        except Exception as err:
            bad.append(err)

    wide = [(y, x, y + 16, x + 16) for y in range(0, 256, 16) for x in range(0, 320, 16)]
    threads = [threading.Thread(target=reader, args=(o,)) for o in (wide, wide[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and not bad

    # a garbled tile fails only the regions on it, and is the tile named
    chunk = tmp_path / "a.zarr" / "c" / "0" / "2" / "3"
    chunk.write_bytes(b"garbage" * 10)
    broken = ImageSource(open_image(tmp_path / "a.zarr").levels[0], axes="CYX")
    broken.fit_tile_cache(320, 64)
    np.testing.assert_array_equal(broken.read_box(64, 0, 80, 16), data[:, 64:80, :16])
    with pytest.raises(ImageIOError, match=r"chunk \(0, 2, 3\)"):
        broken.read_box(64, 96, 80, 112)
    np.testing.assert_array_equal(broken.read_box(64, 128, 80, 144), data[:, 64:80, 128:144])


def test_a_batch_is_normalised_as_each_region_alone(tmp_path, rng):
    # Regions are normalised in whole-batch operations: the same values as one region at a
    # time, the padding of edge regions still 0 and non-finite pixels 0 with their mask.
    from napari_xt.io.source import ImageSource

    data = rng.random((2, 100, 90)).astype(np.float32) * 50
    data[1, 40:44, 10:13] = np.nan
    data[0, 99, 89] = np.inf
    src = ImageSource(data, axes="CYX", normalize=([3.0, 5.0], [2.0, 4.0]))
    boxes = [(0, 0, 32, 32), (32, 0, 64, 32), (96, 64, 100, 90), (64, 80, 96, 90)]
    one = []
    for box in boxes:
        out = np.full((2, 32, 32), 7.0, np.float32)
        one.append((out, src.read_into(box, out)))
    batch = np.full((len(boxes), 2, 32, 32), 7.0, np.float32)
    sizes = [src.fill(box, batch[n]) for n, box in enumerate(boxes)]
    masks = src.finish(batch, sizes)
    for n, (out, mask) in enumerate(one):
        np.testing.assert_array_equal(batch[n], out)
        assert (mask is None) == (masks[n] is None)
        if mask is not None:
            np.testing.assert_array_equal(mask, masks[n])
    assert masks[1] is not None and masks[1][8:12, 10:13].all() and masks[1].sum() == 12
    assert masks[2] is not None and masks[2][3, 25] and masks[2].sum() == 1
    assert (batch[2][:, 4:, :] == 0).all() and (batch[2][:, :, 26:] == 0).all()
    assert (batch[3][:, :, 10:] == 0).all()
    np.testing.assert_allclose(batch[0][0], (data[0, :32, :32] - 3) / 2, rtol=1e-6)


def test_the_tile_cache_counts_whole_bands_and_stays_in_its_budget(tmp_path, rng):
    # Cached tiles are views of the band read with them: the cache charges a band's bytes
    # until its last tile leaves, so keeping one tile per band in use cannot hold many
    # bands beyond the budget.
    from napari_xt.io.source import ImageSource

    data = rng.random((2, 512, 512)).astype(np.float32)
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(2, 32, 32))
    src = ImageSource(open_image(tmp_path / "a.zarr").levels[0], axes="CYX")
    src.fit_tile_cache(512, 32, floor=0)  # bands of up to 16 tiles (128 KiB)
    src.tile_cache_bytes = 4 * 16 * 2 * 32 * 32 * 4  # four bands' worth
    for by in range(16):
        src.read_box(by * 32, 0, by * 32 + 8, 8)  # reads the whole band of row by
        for keep in range(by + 1):  # ... and keeps the first tile of every band hot
            src.read_box(keep * 32, 0, keep * 32 + 8, 8)
        held = {id(t.base if t.base is not None else t): (t.base if t.base is not None
                                                          else t).nbytes
                for t in src._tiles.values()}
        assert src._tile_bytes == sum(held.values())
        assert src._tile_bytes <= src.tile_cache_bytes + 16 * 2 * 32 * 32 * 4
