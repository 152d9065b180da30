"""Shared by the result-store test modules: small shards, the demo model on synthetic SAR
scenes of its task, an uninterrupted reference run and bit-for-bit comparisons; the
fixtures `_small_shards` (autouse), `demo` and `scene` for a module that imports them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_xt.engine import Finished, run
from napari_xt.engine.store import layout
from napari_xt.io import read_detections, read_labels, read_probabilities

OUTPUTS = ("labels", "probabilities", "detections")
SMALL = {"CHUNK": 64, "SHARD": 128, "MIN_PYRAMID": 128}  # 2 x 2 regions a shard, 3 levels


@contextmanager
def small_shards(mp: pytest.MonkeyPatch | None = None):
    """Small shards and one torch thread (the arithmetic of killed child processes)."""
    own = mp is None
    mp = mp or pytest.MonkeyPatch()
    for name, value in SMALL.items():
        mp.setattr(layout, name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if own:
            mp.undo()


def demo_model():
    from napari_xt.model.choice import load_model

    model, _, norm = load_model("demo")
    return model, norm


def write_scene(folder: Path, seed: int, height: int, width: int) -> Path:
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    img, _ = SyntheticScene(seed, SceneConfig(height=height, width=width)).read()
    path = folder / f"scene{seed}_{height}x{width}.npy"
    np.save(path, img)
    return path


def run_demo(image, demo, out, **kw):
    """Every event of a run of the demo model (`demo` = (model, normalization))."""
    model, norm = demo
    kw.setdefault("outputs", OUTPUTS)
    return list(run(str(image) if isinstance(image, Path) else image, model, out,
                    normalize=norm, **kw))


def reference_run(scene, demo, out, **kw):
    """An uninterrupted run with the small-shard settings (made outside any test)."""
    with small_shards():
        fin = run_demo(scene, demo, out, **kw)[-1]
    assert isinstance(fin, Finished) and fin.summary["complete"], fin
    return out


def complete(out) -> bool:
    return bool((layout.root_attrs(out) or {}).get("complete"))


def same_table(a, b):
    ta, tb = read_detections(a, "prediction"), read_detections(b, "prediction")
    assert list(ta) == list(tb)
    assert len(ta["y"]) == len(tb["y"]), (np.c_[ta["y"], ta["x"]].tolist(),
                                          np.c_[tb["y"], tb["x"]].tolist())
    for col in ta:
        np.testing.assert_array_equal(ta[col], tb[col])


def assert_same_results(a, b):
    """Labels (every level), probabilities and detection tables equal bit for bit, and
    both stores complete."""
    la, lb = read_labels(a, "prediction"), read_labels(b, "prediction")
    assert len(la.levels) == len(lb.levels) > 1
    for x, y in zip(la.levels, lb.levels):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(read_probabilities(a, "prediction").levels[0]),
                                  np.asarray(read_probabilities(b, "prediction").levels[0]))
    same_table(a, b)
    assert len(read_detections(a, "prediction")["y"]) > 0
    assert complete(a) and complete(b)


@pytest.fixture(autouse=True)
def _small_shards(monkeypatch):
    with small_shards(monkeypatch):
        yield


@pytest.fixture(scope="module")
def demo():
    return demo_model()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"), 5, 384, 448)
