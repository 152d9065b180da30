"""Sieving labels (`napari_xt.io.sieve`, `napari-xt sieve`): the rule on hand-made cases and
against a slow pixel-by-pixel reference, block-wise = whole-image, and the command on a real
result store (what it writes, what readers see, what it refuses)."""

from __future__ import annotations

import json
from collections import Counter, deque

import dask.array as da
import numpy as np
import pytest

from napari_xt.io.sieve import (
    check_min_size,
    halo,
    sieve,
    sieve_blocks,
    sieve_box,
    sieve_lazy,
)


def _pieces(labels):
    """Pieces (4-connected, one label) by flood fill: list of pixel lists."""
    h, w = labels.shape
    seen = np.zeros(labels.shape, bool)
    out = []
    for y in range(h):
        for x in range(w):
            if seen[y, x]:
                continue
            todo, piece = deque([(y, x)]), []
            seen[y, x] = True
            while todo:
                cy, cx = todo.popleft()
                piece.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if (0 <= ny < h and 0 <= nx < w and not seen[ny, nx]
                            and labels[ny, nx] == labels[y, x]):
                        seen[ny, nx] = True
                        todo.append((ny, nx))
            out.append(piece)
    return out


def reference_sieve(labels, min_size):
    """The documented rule, written out directly (slow; small images only)."""
    return reference_pass(reference_pass(labels, min_size), min_size)


def reference_pass(labels, min_size):
    h, w = labels.shape
    pieces = _pieces(labels)
    piece_of = np.zeros(labels.shape, int)
    for i, p in enumerate(pieces):
        for y, x in p:
            piece_of[y, x] = i
    large = [len(p) >= min_size for p in pieces]
    out = labels.copy()
    for i, p in enumerate(pieces):
        if large[i]:
            continue
        votes_large, votes_any = Counter(), Counter()
        for y, x in p:
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and piece_of[ny, nx] != i:
                    votes_any[int(labels[ny, nx])] += 1
                    if large[piece_of[ny, nx]]:
                        votes_large[int(labels[ny, nx])] += 1
        votes = votes_large or votes_any
        if votes:
            best = max(votes.values())
            winner = min(v for v, n in votes.items() if n == best)
            for y, x in p:
                out[y, x] = winner
    return out


def blobs(shape, classes, seed, smooth=3):
    """Random labels with pieces of many sizes (smoothed noise, then speckled)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    field = ndi.uniform_filter(rng.random((classes, *shape)), (0, smooth, smooth))
    labels = field.argmax(0).astype(np.uint8)
    specks = rng.random(shape) < 0.02
    labels[specks] = rng.integers(0, classes, int(specks.sum()))
    return labels


def test_a_speck_takes_the_label_around_it_and_large_pieces_stay():
    labels = np.zeros((40, 40), np.uint8)
    labels[:, 20:] = 1  # two large pieces
    labels[5:7, 5:7] = 2  # a 4-px speck in land
    labels[30, 30] = 0  # a 1-px speck in the sea
    out = sieve(labels, 5)
    expected = np.zeros((40, 40), np.uint8)
    expected[:, 20:] = 1
    np.testing.assert_array_equal(out, expected)
    assert labels[5, 5] == 2  # the input is not changed
    np.testing.assert_array_equal(sieve(labels, 4)[5:7, 5:7], 2)  # 4 px is not under 4
    np.testing.assert_array_equal(sieve(labels, 1), labels)


def test_majority_ties_border_and_specks_in_specks():
    # a speck on the image border is sieved like any other
    labels = np.ones((10, 10), np.int32)
    labels[0, 0] = 7
    assert sieve(labels, 3)[0, 0] == 1
    # majority of the outside neighbours: 3 sides 1, 1 side 2 -> 1
    labels = np.full((9, 9), 1, np.int32)
    labels[:, 5:] = 2
    labels[4, 4] = 3
    assert sieve(labels, 2)[4, 4] == 1
    # a tie goes to the lower label
    labels = np.full((8, 8), 5, np.int32)
    labels[:, 4:] = 2
    labels[3:5, 3:5] = 9  # 2 neighbours of each side each way
    assert sieve(labels, 5)[3, 3] == 2
    # a speck inside a speck joins what surrounds both
    labels = np.zeros((12, 12), np.int32)
    labels[3:8, 3:8] = 1  # 24 px around the speck, small for min_size 30
    labels[5, 5] = 2
    assert (sieve(labels, 30) == 0).all()
    # a speck touching a large piece counts only large neighbours
    labels[5, 5:9] = 2  # now reaches the land at x = 8
    assert (sieve(labels, 30) == 0).all()
    # nothing large around: the small pieces vote among themselves, all from the input
    labels = np.array([[1, 1, 2], [1, 3, 2]], np.int32)
    np.testing.assert_array_equal(sieve(labels, 10), reference_sieve(labels, 10))


@pytest.mark.parametrize("seed", range(6))
def test_sieve_is_the_documented_rule(seed):
    labels = blobs((37, 41), 3 + seed % 3, seed)
    for min_size in (2, 5, 17):
        got = sieve(labels, min_size)
        np.testing.assert_array_equal(got, reference_sieve(labels, min_size))
        # pieces of min_size or more never change
        for piece in _pieces(labels):
            if len(piece) >= min_size:
                ys, xs = zip(*piece)
                assert (got[list(ys), list(xs)] == labels[ys[0], xs[0]]).all()


@pytest.mark.parametrize("dtype,values", [
    (np.int8, (-128, -2, -1, 0, 5)), (np.int64, (2**62, 1, -(2**62))),
    (np.uint64, (0, 2**63 + 5, 2**64 - 1)), (np.uint16, (60000, 0, 7))])
def test_any_integer_values(dtype, values):
    labels = np.asarray(values, dtype)[blobs((29, 31), len(values), 7)]
    for min_size in (2, 9):
        got = sieve(labels, min_size)
        assert got.dtype == labels.dtype and set(np.unique(got)) <= set(values)
        np.testing.assert_array_equal(got, reference_sieve(labels, min_size))
        tiled = sieve_lazy(labels, min_size, chunk=10).compute()
        np.testing.assert_array_equal(tiled, got)


def test_many_values_take_the_graph_path_and_agree():
    from napari_xt.io.sieve import MANY_VALUES, piece_ids

    labels = blobs((33, 35), MANY_VALUES + 8, 3, smooth=2).astype(np.int32) * 1000
    assert len(np.unique(labels)) >= MANY_VALUES
    np.testing.assert_array_equal(sieve(labels, 6), reference_sieve(labels, 6))
    # both ways of numbering pieces give the same partition
    rank = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    few, n_few = piece_ids(rank, 1)  # (forced: the per-value loop)
    many, n_many = piece_ids(rank, MANY_VALUES)
    assert n_few == n_many == len(_pieces(labels))
    pairs = set(zip(few.ravel().tolist(), many.ravel().tolist()))
    assert len(pairs) == n_few


def test_lazy_names_differ_with_every_argument():
    labels = da.from_array(blobs((64, 64), 3, 1), chunks=32)
    names = {sieve_lazy(labels, m, chunk=c).name for m in (4, 8) for c in (16, 32)}
    assert len(names) == 4
    with pytest.raises(ValueError, match="chunk"):
        sieve_lazy(labels, 4, chunk=0)


@pytest.mark.parametrize("min_size,block", [(4, 50), (16, 64), (64, 100), (64, 333)])
def test_blockwise_equals_the_whole_image(min_size, block):
    labels = blobs((420, 390), 4, min_size + block, smooth=7)
    labels[100:103, :] = 3  # a long thin piece crossing many blocks
    whole = sieve(labels, min_size)
    assert (whole != labels).any()
    tiled = np.full_like(labels, 255)
    reads = []

    def read(box):
        reads.append(box)
        y0, x0, y1, x1 = box
        return labels[y0:y1, x0:x1]

    for (y0, x0, y1, x1), part in sieve_blocks(read, labels.shape, min_size, block=block):
        tiled[y0:y1, x0:x1] = part
    np.testing.assert_array_equal(tiled, whole)
    m = halo(min_size)
    assert all(y1 - y0 <= block + 2 * m and x1 - x0 <= block + 2 * m
               for y0, x0, y1, x1 in reads)  # memory bounded by the block and its margin
    lazy = sieve_lazy(da.from_array(labels, chunks=77), min_size, chunk=block)
    assert lazy.chunks[0][0] == min(block, labels.shape[0])
    np.testing.assert_array_equal(lazy.compute(), whole)


def test_bad_arguments_are_refused():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="min_size"):
            check_min_size(bad)
    with pytest.raises(ValueError, match="2-D"):
        sieve(np.zeros((2, 3, 4), np.uint8), 4)
    with pytest.raises(ValueError, match="integers"):
        sieve(np.zeros((3, 4), np.float32), 4)
    with pytest.raises(ValueError, match="not inside"):
        sieve_box(lambda b: np.zeros((1, 1), np.uint8), (10, 10), 4, (0, 5, 11, 8))
    with pytest.raises(ValueError, match="gave shape"):  # a reader that returns too little
        sieve_box(lambda b: np.zeros((1, 1), np.uint8), (10, 10), 4, (0, 0, 5, 5))


# ------------------------------------------------------------------ the command on a store
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A result store of `napari-xt predict` with the demo model on a 300 x 260 scene."""
    from napari_xt.cli import main
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    folder = tmp_path_factory.mktemp("sieve")
    img, _ = SyntheticScene(3, SceneConfig(height=300, width=260)).read()
    np.save(folder / "scene.npy", np.moveaxis(img, 0, -1))
    out = folder / "scene.xt.zarr"
    assert main(["predict", str(folder / "scene.npy"), "--model", "demo", "--out",
                 str(out), "--quiet"]) == 0
    return out


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".napari-xt" not in p.parts}


def test_sieve_command_writes_a_second_label_result(store, tmp_path, capsys):
    import shutil

    from napari_xt.cli import main
    from napari_xt.io import list_results, read_labels

    work = tmp_path / "s.xt.zarr"
    shutil.copytree(store, work)
    before = _tree(work)
    assert main(["sieve", str(work), "--min-size", "16", "--quiet"]) == 0
    assert "labels/prediction_sieve16" in capsys.readouterr().out
    after = _tree(work)
    changed = {str(k) for k in before if before[k] != after.get(k)}
    assert changed == {"labels/zarr.json"}  # only the listing gained a name
    assert list_results(work)["labels"] == ["prediction", "prediction_sieve16"]
    model, sieved = read_labels(work, "prediction"), read_labels(work, "prediction_sieve16")
    raw = np.asarray(model.levels[0])
    np.testing.assert_array_equal(np.asarray(sieved.levels[0]), sieve(raw, 16))
    assert sieved.properties == model.properties and sieved.colors == model.colors
    assert sieved.pixel_size == model.pixel_size
    meta = json.loads((work / "labels/prediction_sieve16/zarr.json").read_text())
    assert meta["attributes"]["napari-xt"]["sieve"]["min_size"] == 16

    # independent readers: ome-zarr-models validates both label images; napari's reader
    # (the plugin's) gives both as Labels layers with class names
    import zarr
    from ome_zarr_models import open_ome_zarr

    root = open_ome_zarr(zarr.open_group(str(work), mode="r"))
    assert set(root.labels.label_paths) == {"prediction", "prediction_sieve16"}
    root.labels.get_image_labels_group("prediction_sieve16")
    from napari_xt._napari_io import get_reader

    layers = get_reader(str(work))(str(work))
    labels = {kw["name"]: data for data, kw, kind in layers if kind == "labels"}
    assert set(labels) == {"prediction", "prediction_sieve16"}
    first = labels["prediction_sieve16"]
    first = first[0] if isinstance(first, list) else first
    np.testing.assert_array_equal(np.asarray(first), sieve(raw, 16))

    # a rerun of the same predict verifies the store and keeps the sieved result
    assert main(["predict", str(store.parent / "scene.npy"), "--model", "demo", "--out",
                 str(work), "--quiet"]) == 0
    assert "complete (verified)" in capsys.readouterr().err
    assert list_results(work)["labels"] == ["prediction", "prediction_sieve16"]


def test_sieve_command_refuses_what_it_must_not_touch(store, tmp_path, capsys):
    import shutil

    from napari_xt.cli import main
    from napari_xt.io import read_labels

    work = tmp_path / "s.xt.zarr"
    shutil.copytree(store, work)
    assert main(["sieve", str(work), "--min-size", "8", "--quiet"]) == 0
    capsys.readouterr()
    mine = (work / "labels/prediction_sieve8/0/zarr.json").read_bytes()

    def refused(argv, needle):
        assert main(["sieve", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    assert main(["sieve", str(work), "--min-size", "8"]) == 0  # again: kept as it is
    assert "kept" in capsys.readouterr().out
    assert (work / "labels/prediction_sieve8/0/zarr.json").read_bytes() == mine
    # a sieved copy of something else under that name is replaced only with --overwrite
    assert main(["sieve", str(work), "--min-size", "4", "--out-name", "other",
                 "--quiet"]) == 0
    refused([str(work), "--min-size", "8", "--out-name", "other"], "--overwrite")
    assert main(["sieve", str(work), "--min-size", "8", "--out-name", "other", "--overwrite",
                 "--quiet"]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.asarray(read_labels(work, "other").levels[0]),
                                  np.asarray(read_labels(work, "prediction_sieve8").levels[0]))
    refused([str(work), "--min-size", "8", "--out-name", "prediction"], "--out-name")
    refused([str(work), "--min-size", "0"], "min_size")
    refused([str(work), "--min-size", "1"], "--min-size")
    refused([str(work), "--min-size", "8", "--name", "nope"], "no label result 'nope'")
    refused([str(work), "--min-size", "8", "--out-name", "../evil"], "evil")
    refused([str(work), "--min-size", "8", "--out-name", "zarr.json"], "metadata file")
    refused([str(work), "--min-size", "8", "--out-name", "x" * 200], "longer than")
    refused([str(work), "--min-size", "300"], "--min-size")
    # --overwrite replaces an earlier sieved copy only, never another result
    refused([str(work), "--min-size", "8", "--name", "prediction_sieve8", "--out-name",
             "prediction", "--overwrite"], "never replaced")
    from napari_xt.io import write_labels

    write_labels(work, "mine", np.zeros((300, 260), np.uint8))
    refused([str(work), "--min-size", "8", "--out-name", "mine", "--overwrite"],
            "never replaced")
    assert (np.asarray(read_labels(work, "mine").levels[0]) == 0).all()
    assert (np.asarray(read_labels(work, "prediction").levels[0]) != 0).any()
    garbled = tmp_path / "garbled.xt.zarr"
    shutil.copytree(work, garbled)
    (garbled / "labels/prediction/zarr.json").write_text("{not json")
    refused([str(garbled), "--min-size", "8", "--out-name", "g"], "cannot read")
    (garbled / "labels/prediction/zarr.json").write_text("[]")
    refused([str(garbled), "--min-size", "8", "--out-name", "g"], "prediction")
    assert not (garbled / "labels/g").exists()
    plain = tmp_path / "folder"
    plain.mkdir()
    refused([str(plain), "--min-size", "8"], "not a zarr store")
    assert not any(plain.iterdir())
    assert main(["sieve", str(work), "--min-size", "8", "--overwrite", "--quiet"]) == 0

    # a store whose run is not finished, or that a run holds, is left alone
    root = json.loads((work / "zarr.json").read_text())
    root["attributes"]["napari-xt"]["complete"] = False
    (work / "zarr.json").write_text(json.dumps(root))
    refused([str(work), "--min-size", "32"], "not finished")
    assert not (work / "labels/prediction_sieve32").exists()
    root["attributes"]["napari-xt"]["complete"] = True
    (work / "zarr.json").write_text(json.dumps(root))
    from napari_xt.io.lock import FolderLock

    lock = FolderLock(work / ".napari-xt", f"result store {work}")
    lock.acquire()
    try:
        assert main(["sieve", str(work), "--min-size", "32", "--quiet"]) == 2
        assert "is in use by another" in capsys.readouterr().err
    finally:
        lock.release()
    assert not (work / "labels/prediction_sieve32").exists()


def test_predict_sieve_writes_the_copy_when_the_run_is_finished(store, tmp_path, capsys):
    from napari_xt.cli import main
    from napari_xt.io import list_results, read_labels

    image = str(store.parent / "scene.npy")
    assert main(["predict", image, "--model", "demo", "--out", str(tmp_path / "x.zarr"),
                 "--sieve", "1"]) == 2
    assert "--sieve" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
    out = tmp_path / "one.xt.zarr"
    assert main(["predict", image, "--model", "demo", "--out", str(out), "--sieve", "16",
                 "--quiet"]) == 0
    assert "wrote labels/prediction_sieve16" in capsys.readouterr().err
    raw = np.asarray(read_labels(out, "prediction").levels[0])
    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction_sieve16").levels[0]),
                                  sieve(raw, 16))
    stamp = (out / "labels/prediction_sieve16/zarr.json").stat().st_mtime_ns
    assert main(["predict", image, "--model", "demo", "--out", str(out), "--sieve", "16",
                 "--quiet"]) == 0  # the same command again: verified, the copy kept
    assert "kept labels/prediction_sieve16" in capsys.readouterr().err
    assert (out / "labels/prediction_sieve16/zarr.json").stat().st_mtime_ns == stamp

    # a fresh run into the store (other labels): the old copy is named as stale, kept
    assert main(["predict", image, "--model", "demo", "--out", str(out), "--overwrite",
                 "--crop-stride", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "labels/prediction_sieve16 was sieved from earlier labels" in err
    assert "--min-size 16 --out-name prediction_sieve16 --overwrite" in err
    assert main(["sieve", str(out), "--min-size", "16", "--overwrite", "--quiet"]) == 0
    raw = np.asarray(read_labels(out, "prediction").levels[0])
    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction_sieve16").levels[0]),
                                  sieve(raw, 16))

    # a sieved copy whose metadata is garbled is not trusted, and not replaced either
    (out / "labels/prediction_sieve16/zarr.json").write_text("{garbled")
    assert main(["predict", image, "--model", "demo", "--out", str(out), "--sieve", "16",
                 "--crop-stride", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "never replaced" in err[-1] and "Traceback" not in "".join(err), err
    assert (out / "labels/prediction_sieve16/zarr.json").read_text() == "{garbled"

    # many images (--out-dir): every finished store gets its copy
    folder = tmp_path / "many"
    assert main(["predict", image, "--model", "demo", "--out-dir", str(folder), "--sieve",
                 "16", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "wrote labels/prediction_sieve16" in text
    (many,) = folder.glob("*.zarr")
    assert list_results(many)["labels"] == ["prediction", "prediction_sieve16"]
