"""Engine outputs and stores: embedding cache reuse and signature checks, overwrite rules,
detections equal to whole-image NMS."""

import numpy as np
import pytest
from test_engine import CountingXT, marked_image, seg_model

from napari_xt.engine import Finished, Notice, RegionEncoded, run
from napari_xt.engine.cache import CacheMismatchError
from napari_xt.engine.store import StoreError
from napari_xt.model import create_model
from napari_xt.model.xt import XT


def test_cache_reuse_and_signature_mismatch(tmp_path):
    img = marked_image(3, 3)
    cache = tmp_path / "emb.zarr"
    model = seg_model(CountingXT)
    list(run(img, model, tmp_path / "a.zarr", cache=cache))
    assert len(model.encoded_ids) == 9
    model.encoded_ids.clear()
    # other thresholds / outputs: a new store, the encoder is not run again
    events = list(run(img, model, tmp_path / "b.zarr", cache=cache, threshold=0.7,
                      outputs=("labels", "probabilities")))
    assert isinstance(events[-1], Finished)
    assert model.encoded_ids == []
    assert all(e.from_cache for e in events if isinstance(e, RegionEncoded))
    # another model (different weights) must not use the cache silently
    other = seg_model()
    with pytest.raises(CacheMismatchError, match="model_hash"):
        run(img, other, tmp_path / "c.zarr", cache=cache)
    # another image content, same shape
    changed = img.copy()
    changed[5, 5, 1] += 1
    with pytest.raises(CacheMismatchError, match="image"):
        run(changed, model, tmp_path / "d.zarr", cache=cache)


def test_rebuild_reports_a_notice(tmp_path):
    img = marked_image(2, 2)
    out = tmp_path / "o.zarr"
    list(run(img, seg_model(), out))
    other = seg_model()
    events = list(run(img, other, out, overwrite=True, cache="rebuild"))
    assert any(isinstance(e, Notice) and e.kind == "cache" for e in events)
    assert isinstance(events[-1], Finished)


def test_existing_results_are_not_overwritten(tmp_path):
    img = marked_image(2, 2)
    out = tmp_path / "o.zarr"
    list(run(img, seg_model(), out))
    with pytest.raises(StoreError, match="different run"):
        run(img, seg_model(), out, threshold=0.9)
    events = list(run(img, seg_model(), out, threshold=0.9, overwrite=True, cache="rebuild"))
    assert isinstance(events[-1], Finished)


def test_detections_match_whole_image_nms():
    from napari_xt.model.heads import points_from_heatmap

    model = seg_model(head={"outputs": (("centre", 1), ("size", 1))})
    img = np.random.default_rng(3).random((64 * 4 - 10, 64 * 3, 3)).astype(np.float32)
    fin = list(run(img, model, None, cache=False, outputs=("labels", "detections"),
                   threshold=0.55, min_distance=3))[-1]
    table = fin.summary["arrays"]["detections"]
    heat = fin.summary["arrays"]["heatmap"]  # (1 + size, H, W) blended centre and size
    ref = points_from_heatmap(heat[:1], heat[1:2], threshold=0.55, min_distance=3)
    assert len(ref) > 10
    got = sorted(zip(table["y"].tolist(), table["x"].tolist()))
    assert got == sorted(zip(ref["y"].tolist(), ref["x"].tolist()))
    assert fin.summary["detections"] == len(ref)


def test_carried_context_state_reaches_later_crops():
    model = XT(create_model("xt_tiny_demo_seg", crop_regions=2, tokenizer={"region_size": 64},
                            head={"decoder_channels": (32, 16, 16, 8, 8)},
                            context={"kind": "transformer_xl", "chunk_len": 16,
                                     "mem_len": 48}).cfg).eval()
    img = marked_image(3, 4)
    runs = {}
    for carry in (False, True):
        fin = list(run(img, model, None, cache=False, carry_state=carry,
                       outputs=("labels", "probabilities")))[-1]
        runs[carry] = fin.summary["arrays"]["probabilities"].astype(np.float32)
    # the first crop has no memory either way; later crops see the earlier ones
    np.testing.assert_allclose(runs[True][:, :64, :64], runs[False][:, :64, :64], atol=1e-3)
    assert np.abs(runs[True] - runs[False]).max() > 1e-2


def test_a_store_with_corrections_is_never_wiped(tmp_path):
    from napari_xt.io import read_labels
    from napari_xt.io.corrections import edits, save_window

    img = marked_image(2, 2)
    out = tmp_path / "o.zarr"
    model = seg_model()
    list(run(img, model, out))
    fixed = np.zeros((8, 8), np.uint8)
    save_window(out, "prediction", (0, 0, 8, 8), fixed)
    with pytest.raises(StoreError, match="corrections.*labels/prediction-corrected"):
        run(img, model, out, resume=False)  # a fresh start of the same run
    with pytest.raises(StoreError, match="corrections"):
        run(img, model, out, threshold=0.9, overwrite=True)
    from napari_xt.engine.spelling import CLI

    # the refusal names the interface's own remedy: no flag allows deleting corrections
    with pytest.raises(StoreError, match="no option allows that: choose another --out"):
        run(img, model, out, threshold=0.9, overwrite=True, spelling=CLI)
    # resuming the finished run is harmless: it keeps the correction as it was
    events = list(run(img, model, out))
    assert isinstance(events[-1], Finished)
    assert len(edits(out, "prediction")) == 1
    corrected = np.asarray(read_labels(out, "prediction-corrected").levels[0])
    assert (corrected[:8, :8] == 0).all()


def test_provenance_says_how_table_pixels_relate_to_label_pixels(tmp_path):
    from napari_xt.io import from_arrays, read_labels
    from napari_xt.io.corrections import table_scale

    big = marked_image(4, 4)
    image = from_arrays([big, big[::2, ::2]], axes="YXC")
    out = tmp_path / "o.zarr"
    assert isinstance(list(run(image, seg_model(), out, level=1))[-1], Finished)
    assert read_labels(out, "prediction").levels[0].shape == (128, 128)
    assert table_scale(out) == (2.0, 2.0)  # tables are in level-0 pixels
