"""The end of a run: detection tables, classification records, provenance, and the summary of
an in-memory run (`summary["arrays"]`: labels, probabilities, heatmap (centre scores and,
when the model has one, the size map), detections, classification). Persistent stores are
finished by the store itself (`engine.store.publish`). Detection coordinates and sizes are
level-0 pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
    """The image's classification from its crops: the mean of `logit_sum` (K,) over `crops`, its
    softmax `probabilities`, the winning `class` and its probability as `score`, as a JSON-able
    dict."""
    mean = np.asarray(logit_sum, np.float64) / max(1, crops)
    z = np.exp(mean - mean.max())
    probs = z / z.sum()
    return {"class": int(np.argmax(mean)), "score": float(probs.max()),
            "logits": mean.tolist(), "probabilities": probs.tolist(), "crops": int(crops)}


def memory_summary(store: Any, spec: Any, record: dict[str, Any] | None) -> dict[str, Any]:
    """The `Finished.summary` of an in-memory run: the outputs, the number of detections and the
    classification record, and `arrays` (labels, probabilities, `heatmap`, the detection table in
    level-0 pixels, the classification record) as the store holds them."""
    summary: dict[str, Any] = {"outputs": list(spec.outputs)}
    arrays: dict[str, Any] = {}
    for key, value in store.arrays.items():
        arrays["heatmap" if key == "heat" else key] = value
    if "heat" in store.arrays:
        points = store.points()
        summary["detections"] = int(len(points))
        arrays["detections"] = detection_table(points, spec.source.scale)
    if record is not None:
        summary["classification"] = record
        arrays["classification"] = record
    summary["arrays"] = arrays
    return summary


def provenance(spec: Any, complete: bool) -> dict[str, Any]:
    """What a store records about the run that wrote it."""
    import datetime

    from napari_xt import __version__

    sig = spec.signature
    return {
        "complete": complete, "model": spec.model.cfg.name, "model_hash": sig["model_hash"],
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "image": sig["image"], "level": spec.source.level,
        # level-0 pixels per pixel of the processed level (tables are in level-0 pixels)
        "level_scale": [float(v) for v in spec.source.scale],
        "settings": {k: v for k, v in sig.items() if k != "image"},
        # the model calls' sizes: a resume with another batch size may differ in last bits
        "batch_size": int(spec.batch_size),
        "device": str(spec.device),
    }
