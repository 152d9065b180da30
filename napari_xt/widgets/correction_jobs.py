"""The reads and writes of the "Correct results" widget, run in its thread worker (no Qt,
no layers): load a window and the detection table, save the edited window and table."""

from __future__ import annotations

from typing import Any


def load_window(store: str, name: str, box) -> dict[str, Any]:
    """Worker: the window's current labels (correction first) and the detection table."""
    from napari_xt.io import list_results, read_labels
    from napari_xt.io.corrections import read_corrected_detections, read_window, table_scale

    meta = read_labels(store, name)
    labels = read_window(store, name, box)
    points = None
    if name in list_results(store)["tables"]:
        points = read_corrected_detections(store, name)
    classes = sorted(meta.properties) or sorted(meta.colors)
    return {"box": box, "labels": labels, "colors": meta.colors, "classes": classes,
            "meta": meta, "points": points, "table_scale": table_scale(store)}


def save_edits(store: str, name: str, box, labels, table) -> dict[str, Any]:
    """Worker: write the window and the table into the store's corrections."""
    from napari_xt.io.corrections import edits, save_detections, save_window

    out: dict[str, Any] = {"edit": None, "points": None}
    if labels is not None:
        out["edit"] = save_window(store, name, box, labels)
        out["edits"] = len(edits(store, name))
    if table is not None:
        save_detections(store, name, table)
        out["points"] = len(table["y"])
    return out


def recorded_image(store: str) -> str | None:
    """The image file the store's run read, when its provenance names one that exists."""
    from pathlib import Path

    from napari_xt.io.corrections import run_provenance

    image = run_provenance(store).get("image")
    path = image.get("path") if isinstance(image, dict) else None
    return path if isinstance(path, str) and path != "array" and Path(path).exists() else None
