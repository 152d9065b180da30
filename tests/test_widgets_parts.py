"""Widget building blocks: settings file, region-grid painting, camera priority, PNG output."""

import json

import numpy as np
import pytest

from napari_xt.widgets.settings import ENV_DIR, WidgetSettings, config_dir
from napari_xt.widgets.snapshot import compose_overlay, read_png, write_png


def test_settings_roundtrip_keeps_other_sections(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert config_dir() == tmp_path
    run, other = WidgetSettings("run"), WidgetSettings("inspect")
    assert run.load() == {}
    run.save({"device": "cpu", "batch_size": 3})
    other.save({"mode": "alone"})
    assert WidgetSettings("run").load() == {"device": "cpu", "batch_size": 3}
    data = json.loads((tmp_path / "widgets.json").read_text())
    assert data == {"run": {"device": "cpu", "batch_size": 3}, "inspect": {"mode": "alone"}}
    (tmp_path / "widgets.json").write_text("{broken")
    assert WidgetSettings("run").load() == {}  # unreadable file: defaults


def test_png_writer_roundtrip_and_overlay_colours(tmp_path):
    image = np.linspace(-30, 0, 64 * 48, dtype=np.float32).reshape(48, 64)
    labels = np.zeros((48, 64), np.uint8)
    labels[10:20, 10:30] = 1
    points = {"y": np.array([40.0]), "x": np.array([50.0]), "class": np.array([2])}
    rgb = compose_overlay(image, labels, points)
    assert rgb.shape == (48, 64, 3)
    plain = compose_overlay(image)
    inside = (rgb[12:18, 12:28].astype(int) - plain[12:18, 12:28]).mean(axis=(0, 1))
    assert inside[2] > 40 and inside[0] < 0  # class 1 tints blue-ish (0.2, 0.65, 1.0)
    assert np.array_equal(rgb[0:5, 40:60], plain[0:5, 40:60])  # untouched outside overlays
    assert tuple(rgb[40, 50]) == (255, 217, 38)  # class 2 marker colour (1.0, 0.85, 0.15)
    path = write_png(tmp_path / "x.png", rgb)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(read_png(path)[..., :3], rgb)


@pytest.mark.gui
def test_region_grid_painter_overlays_and_batches(make_napari_viewer, qtbot):
    from napari_xt.widgets.region_grid import (
        CONTEXTUALIZED,
        DECODED,
        ENCODED,
        FAILED,
        QUEUED,
        RegionGridPainter,
        grid_transform,
    )

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((300, 500), np.float32), scale=(2.0, 2.0), translate=(10, 20))
    painter = RegionGridPainter(viewer, 3, 4, 128, (2.0, 2.0), (10.0, 20.0), max_rate=10)
    layer = painter.layer
    assert tuple(layer.scale) == (256.0, 256.0)
    assert tuple(layer.translate) == (10 + 63.5 * 2, 20 + 63.5 * 2)
    # region (2, 3) covers pixels [256, 384) x [384, 512): its centre maps to grid pixel (2, 3)
    centre_world = (10 + 2 * (256 + 63.5), 20 + 2 * (384 + 63.5))
    assert np.allclose(layer.world_to_data(centre_world), (2, 3))
    assert grid_transform(128, (2.0, 2.0), (10.0, 20.0)) == (tuple(layer.scale),
                                                              tuple(layer.translate))
    painter.mark_all(QUEUED)
    for _ in range(500):  # a burst of events: recorded now, drawn by the timer
        painter.mark([(0, 0), (0, 1)], ENCODED)
    painter.mark([(0, 0)], CONTEXTUALIZED)
    painter.mark([(0, 0)], DECODED)
    painter.mark([(0, 0)], ENCODED)  # late event: never goes back
    painter.mark([(1, 1)], FAILED)
    qtbot.waitUntil(lambda: painter.refreshes >= 1, timeout=2000)
    qtbot.wait(250)
    assert painter.refreshes <= 4  # batched, not one redraw per event
    expected = np.full((3, 4), QUEUED)
    expected[0, 0], expected[0, 1], expected[1, 1] = DECODED, ENCODED, FAILED
    assert np.array_equal(layer.data, expected)
    assert painter.counts() == {"queued": 9, "encoded": 1, "decoded": 1, "failed": 1}
    painter.stop()


@pytest.mark.gui
def test_viewport_priority_follows_camera(make_napari_viewer):
    from napari_xt.widgets.viewport import ViewportPriority, camera_of

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((1000, 800), np.float32), scale=(0.5, 0.5), translate=(100, 0))
    priority = ViewportPriority(viewer, (0.5, 0.5), (100.0, 0.0), (1000, 800))
    camera_of(viewer).center = (100 + 0.5 * 600, 0.5 * 200)
    assert priority() == pytest.approx((600.0, 200.0))
    camera_of(viewer).center = (-5000.0, 99999.0)  # beside the image: nearest edge
    assert priority() == pytest.approx((0.0, 799.0))
    priority.disconnect()
    camera_of(viewer).center = (100 + 0.5 * 10, 0.5 * 10)
    assert priority() == pytest.approx((0.0, 799.0))


def test_live_results_create_announced_layers_before_regions_arrive(make_napari_viewer):
    """Layers announced at planning are created empty, one per flush; tiles arriving later
    fill the same layers (no layer is created mid-stream)."""
    from napari_xt.widgets.result_layers import LiveResults
    from napari_xt.widgets.run_job import ResultTiles

    viewer = make_napari_viewer()
    live = LiveResults(viewer, "img", 300, 200, 2, (0.5, 0.5), (10.0, 20.0))
    live.expect(("labels", "probabilities", "detections"), num_classes=3)
    assert live.creating and len(viewer.layers) == 0
    flushes = 0
    while live.creating:
        before = len(viewer.layers)
        live.flush()
        flushes += 1
        assert len(viewer.layers) == before + 1  # one layer per flush
    assert flushes == 5
    made = {layer.name: layer for layer in viewer.layers}
    assert made["img xT labels"].data.shape == (150, 100)
    assert not np.asarray(made["img xT labels"].data).any()
    assert len(made["img xT detections"].data) == 0
    assert [f"img xT p(class {k})" in made for k in range(3)] == [True] * 3
    tile = np.full((10, 20), 2, np.uint8)
    prob = np.full((3, 10, 20), 0.25, np.float32)
    points = np.zeros(1, dtype=[("y", float), ("x", float), ("class", int), ("score", float),
                                ("size", float)])
    points[0] = (12.0, 30.0, 1, 0.9, 8.0)
    live.add(ResultTiles(((0, 0),), {(0, 0): (slice(0, 10), slice(0, 20), tile)},
                         {(0, 0): (slice(0, 10), slice(0, 20), prob)}, points))
    live.flush()
    assert {layer.name: layer for layer in viewer.layers} == made  # same layers, updated
    assert (np.asarray(made["img xT labels"].data)[:10, :20] == 2).all()
    assert np.allclose(made["img xT detections"].data, [[12.0, 30.0]])


def test_triton_is_kept_out_only_beside_mesas_llvm_and_not_when_allowed(monkeypatch, caplog):
    import sys

    from napari_xt.widgets import models

    monkeypatch.setitem(sys.modules, "triton", None)  # (the entry is restored afterwards)
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.delenv("NAPARI_XT_ALLOW_TRITON", raising=False)
    monkeypatch.setattr(models, "_mapped_libraries", lambda: ["/usr/lib/libc.so.6"])
    assert not models.keep_triton_out() and "triton" not in sys.modules  # no Mesa LLVM
    monkeypatch.setattr(models, "_mapped_libraries",
                        lambda: ["/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"])
    monkeypatch.setenv("NAPARI_XT_ALLOW_TRITON", "1")
    assert not models.keep_triton_out() and "triton" not in sys.modules  # opted out
    monkeypatch.delenv("NAPARI_XT_ALLOW_TRITON")
    with caplog.at_level("WARNING", logger="napari_xt"):
        assert models.keep_triton_out()
    assert sys.modules["triton"] is None and "NAPARI_XT_ALLOW_TRITON=1" in caplog.text
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert not models.keep_triton_out()  # once is enough


def test_a_run_freezes_the_collector_only_when_nobody_else_has(monkeypatch):
    # napari-xt's freeze is its own: unfreezing at the end must not undo a freeze made by
    # someone else in the process, and NAPARI_XT_GC_FREEZE=0 turns it off.
    import gc

    from napari_xt.widgets import run_session

    assert gc.get_freeze_count() == 0
    monkeypatch.delenv("NAPARI_XT_GC_FREEZE", raising=False)
    try:
        assert run_session._gc_freeze(first=True)
        assert gc.get_freeze_count() > 0
        run_session._gc_thaw()
        assert gc.get_freeze_count() == 0
        gc.freeze()  # another plugin's freeze
        theirs = gc.get_freeze_count()
        assert not run_session._gc_freeze(first=True)  # left alone: no thaw to call
        assert gc.get_freeze_count() == theirs
        gc.unfreeze()
        monkeypatch.setenv("NAPARI_XT_GC_FREEZE", "0")
        assert not run_session._gc_freeze(first=True) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        run_session._FROZEN[0] = 0
