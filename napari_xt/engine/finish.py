"""The end of a run: turn the store's working arrays into the published results.

Zarr stores get `labels/<name>` (NGFF image-label with a display pyramid), a detections
table `tables/<name>` and a classification record `classifications/<name>` through
`napari_xt.io.results`, so every reader of napari-xt results opens them; probabilities are
already in `probabilities/<name>`. In-memory runs return the arrays in the summary
(`summary["arrays"]`: labels, probabilities, heatmap (centre scores and, when the model has
one, the size map), detections, classification). Detection coordinates and sizes are level-0 pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .outputs import MapLayout
from .store import PredictionStore


def detection_table(points: np.ndarray, scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """POINT_DTYPE points at the run's level -> columns y, x, class, score, size (level 0)."""
    return {
        "y": points["y"] * scale[0],
        "x": points["x"] * scale[1],
        "class": points["class"].astype(np.int64),
        "score": points["score"].astype(np.float32),
        "size": (points["size"] * float(np.sqrt(scale[0] * scale[1]))).astype(np.float32),
    }


def classification_record(logit_sum: np.ndarray, crops: int) -> dict[str, Any]:
    mean = logit_sum / max(1, crops)
    z = np.exp(mean - mean.max())
    probs = z / z.sum()
    return {"class": int(np.argmax(mean)), "score": float(probs.max()),
            "logits": mean.tolist(), "probabilities": probs.tolist(), "crops": int(crops)}


def finish_outputs(store: PredictionStore, writer: Any, layout: MapLayout | None,
                   outputs: tuple[str, ...], name: str, source: Any,
                   record: dict[str, Any] | None) -> dict[str, Any]:
    from napari_xt.model.heads import POINT_DTYPE

    summary: dict[str, Any] = {"outputs": list(outputs)}
    points = None
    if "detections" in outputs and writer is not None and "heat" in writer.arrays:
        points = store.all_points(POINT_DTYPE)
        summary["detections"] = int(len(points))
    if record is not None:
        summary["classification"] = record
    if store.path is None:
        arrays: dict[str, Any] = {}
        if writer is not None:
            arrays.update({"heatmap" if k == "heat" else k: v for k, v in writer.arrays.items()})
        if points is not None:
            arrays["detections"] = detection_table(points, source.scale)
        if record is not None:
            arrays["classification"] = record
        summary["arrays"] = arrays
        return summary

    from napari_xt.io import results

    path = store.path
    px = None
    if source.pixel_size is not None:
        px = (source.pixel_size[0] * source.scale[0], source.pixel_size[1] * source.scale[1])
    elif tuple(source.scale) != (1.0, 1.0):  # a level > 0 of an image without physical
        px = tuple(float(v) for v in source.scale)  # size: in level-0 pixels, to overlay it
    if writer is not None and "labels" in writer.arrays:
        import dask.array as da

        work = writer.arrays["labels"]
        chunk = max(512, store.arrays.group["_work/labels"].chunks[0])
        results.write_labels(path, name, da.from_array(work, chunks=(chunk, chunk)),
                             overwrite=True, pixel_size=px, unit=source.unit,
                             properties={i: {"class": i} for i in range(layout.num_classes)})
        summary["labels"] = f"labels/{name}"
    if writer is not None and "probabilities" in writer.arrays:
        arr = writer.arrays["probabilities"]
        arr.attrs["napari-xt"] = {"kind": "probabilities", "axes": "CYX",
                                  "classes": layout.num_classes, "pixel_size": px}
        summary["probabilities"] = f"probabilities/{name}"
    if points is not None:
        results.write_detections(path, name, detection_table(points, source.scale),
                                 attrs={"source": "napari-xt predict"}, overwrite=True)
        summary["table"] = f"tables/{name}"
    if record is not None:
        results.write_classification(path, name, record, overwrite=True)
    store.remove_work()
    return summary
