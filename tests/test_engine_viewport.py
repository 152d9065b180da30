"""Viewport-first: when the camera moves mid-run, the regions now in view come next, not
after everything the read-ahead had queued for the old view; nothing is encoded twice."""

from test_engine import CountingXT, marked_image, seg_model

from napari_xt.engine import Finished, run


def test_moved_viewport_is_served_without_draining_the_old_queue(tmp_path):
    rows = cols = 6
    img = marked_image(rows, cols)
    model = seg_model(CountingXT)
    calls = {"n": 0}

    def priority():
        calls["n"] += 1
        return None if calls["n"] == 1 else (6 * 64 - 1.0, 6 * 64 - 1.0)  # jump to the far corner

    events = list(run(img, model, tmp_path / "out.zarr", order="viewport", point=(0.0, 0.0),
                      priority=priority, batch_size=2, strip_width=1))
    assert isinstance(events[-1], Finished)
    far = rows * cols - 1  # id of region (5, 5)
    ids = model.encoded_ids
    # first crop (4 regions) + at most the prefetch depth of 2-region batches + the new crop
    assert ids.index(far) < 4 + 3 * 2 + 4, ids
    # with the embedding cache, evicted regions come back from the cache: each encoded once
    assert sorted(ids) == list(range(rows * cols))
