"""The editable detections of the "Correct results" widget: a Points layer made from a
detection table and turned back into one. Table coordinates are table pixels (level 0 of
the run's image); the layer's are label pixels, `table_scale` apart. Main thread only."""

from __future__ import annotations

import numpy as np

from .result_layers import class_color


def add_points_layer(viewer, table, name: str, table_scale, scale, translate):
    """An editable Points layer of `table` (columns y, x, class, score, size). Points added
    by hand get score 1, the most common class and the median size."""
    import pandas as pd

    fy, fx = table_scale
    coords = np.stack([np.asarray(table["y"], float) / fy,
                       np.asarray(table["x"], float) / fx], 1).reshape(-1, 2)
    n = len(coords)
    features = pd.DataFrame({
        "class": np.asarray(table.get("class", np.ones(n)), np.int64),
        "score": np.asarray(table.get("score", np.ones(n)), np.float32),
        "size": np.asarray(table.get("size", np.zeros(n)), np.float32),
    })
    typical = float(np.median(features["size"])) if n else 0.0
    common = int(features["class"].mode()[0]) if n else 1
    layer = viewer.add_points(
        coords, features=features, name=name, scale=scale, translate=translate, size=8,
        face_color=np.asarray(class_color(common)), border_color="white", border_width=0.1)
    layer.feature_defaults = {"class": common, "score": 1.0, "size": typical}
    layer.events.data.connect(_score_added_points)
    return layer


def _score_added_points(event) -> None:
    """Points added by hand get score 1 (napari would copy the selected point's)."""
    if str(getattr(event, "action", "")) not in ("added", "ActionType.ADDED"):
        return
    layer = event.source
    rows = np.asarray(event.data_indices, int) % max(1, len(layer.data))
    features = layer.features
    features.loc[features.index[rows], "score"] = 1.0
    layer.features = features


def points_table(layer, table_scale) -> dict[str, np.ndarray]:
    """The layer's points as a detection table in table pixels."""
    fy, fx = table_scale
    data = np.asarray(layer.data, float).reshape(-1, 2)
    f = layer.features
    return {"y": data[:, 0] * fy, "x": data[:, 1] * fx,
            "class": f["class"].to_numpy(np.int64), "score": f["score"].to_numpy(np.float32),
            "size": f["size"].to_numpy(np.float32)}
