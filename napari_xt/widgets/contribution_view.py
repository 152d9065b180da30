"""Contribution maps in napari: which regions made a region's answer.

`contribution_job(...)` (worker thread, no Qt) computes a `napari_xt.inspect` map for the
viewer's last run or for a result store reopened from disk; `show_contributions(...)` (main
thread) shows it as an Image layer with one pixel per region over the image (magma, with a
colour bar; NaN where the region saw nothing) and a Shapes layer with the region outlined
and the crops it saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .region_grid import grid_transform

LAYER_CONTRIB, LAYER_SPAN = "xT contributions", "xT context seen"


@dataclass(frozen=True)
class Placed:
    """A map and where it lies in the viewer's world."""

    map: Any  # napari_xt.inspect.ContributionMap
    region_size: int
    scale: tuple[float, float]  # world size of one pixel of the run's level
    translate: tuple[float, float]
    where: str  # "the last run" or the store's path


def store_world(store: str | Path, run: dict[str, Any] | None = None
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of a stored run's level in napari's world: the pixel size of its
    labels (or probabilities) as the napari reader shows them; 1 without either (`run`: its
    `run_settings` when already read)."""
    from napari_xt.inspect.stored import run_settings
    from napari_xt.io import read_labels, read_probabilities

    name = (run or run_settings(store))["name"]
    for read in (read_labels, read_probabilities):
        try:
            size = read(store, name).pixel_size
        except (ValueError, OSError, KeyError):
            continue
        if size:
            return (float(size[0]), float(size[1])), (0.0, 0.0)
        break
    return (1.0, 1.0), (0.0, 0.0)


ANSWERS = ("classes", "detections")
CENTRE_MAPS = ("centre", "center", "heatmap")


def output_for(model: Any, answer: str) -> str | None:
    """The head map that gives `answer`: None for the classes, the centre map for
    detections (a ValueError when the model has none)."""
    if answer == "classes":
        return None
    maps = [name for name, _ in getattr(model.cfg.head, "maps", ())]
    for name in CENTRE_MAPS:
        if name in maps:
            return name
    raise ValueError(f"model {model.cfg.name!r} finds no detections (no centre map)")


def contribution_job(region: tuple[int, int], method: str, *, session: Any = None,
                     source: Any = None, store: str | None = None, model_choice: str = "demo",
                     layer: int | None = None, head: int | None = None,
                     answer: str = "classes") -> Placed:
    """The map of `region` for the last run (`session` and its `source`), or for the run of
    `store` with the model `model_choice` (checked against the store) on the image the
    store recorded; `answer`: explain its classes or its detections."""
    from napari_xt.inspect import contribution_map

    if store is None:
        plan, req = session.planned, session.request
        if getattr(req, "carry_state", False):
            raise ValueError("the last run carried the context state from crop to crop; "
                             "contribution maps follow single crops (run without it)")
        cm = contribution_map(session.model, source, region, method,
                              crop_regions=plan.crop_regions, stride=req.crop_stride,
                              layer=layer, head=head, output=output_for(session.model, answer))
        return Placed(cm, plan.region_size, tuple(req.scale), tuple(req.translate),
                      "the last run")
    from napari_xt.inspect.stored import inspect_store

    run, path, model = _stored_run(store, model_choice)
    cm = inspect_store(store, path, model, region, method, layer=layer, head=head,
                       output=output_for(model, answer))
    scale, translate = store_world(store, run)
    return Placed(cm, run["region_size"], scale, translate, str(store))


def _stored_run(store: str, model_choice: str) -> tuple[dict[str, Any], str, Any]:
    """(run settings, image path, model in eval mode) for a store reopened from disk: the
    image where the store recorded it, the model loaded from `model_choice`."""
    from napari_xt.inspect.stored import InspectError, run_settings

    from .models import load_model

    run = run_settings(store)
    path = run["image"].get("path")
    if not path or not Path(path).exists():
        raise InspectError(f"the image the run read ({path or 'an array'}) is not on this "
                           "machine; inspect it with napari-xt inspect STORE IMAGE")
    model, _, _ = load_model(model_choice)
    return run, path, model.eval()


def show_contributions(viewer: Any, placed: Placed) -> tuple[Any, Any]:
    """Show a placed map (replacing an earlier one): (image layer, shapes layer)."""
    cm, s = placed.map, placed.region_size
    scale, translate = grid_transform(s, placed.scale, placed.translate)
    for name in (LAYER_CONTRIB, LAYER_SPAN):
        if name in viewer.layers:
            viewer.layers.remove(name)
    top = float(np.nanmax(cm.values)) if np.isfinite(cm.values).any() else 1.0
    image = viewer.add_image(cm.values, name=LAYER_CONTRIB, scale=scale, translate=translate,
                             colormap="magma", contrast_limits=(0.0, max(top, 1e-6)),
                             opacity=0.75, blending="translucent")
    image.colorbar.visible = True
    image.metadata["contribution"] = {"region": cm.region, "method": cm.method,
                                      "self_share": cm.self_share, "where": placed.where}
    (sy, sx), (ty, tx) = placed.scale, placed.translate

    def rect(r0: int, c0: int, rows: int, cols: int) -> np.ndarray:
        y0, x0 = ty + (r0 * s - 0.5) * sy, tx + (c0 * s - 0.5) * sx
        y1, x1 = ty + ((r0 + rows) * s - 0.5) * sy, tx + ((c0 + cols) * s - 0.5) * sx
        return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])

    shapes = [rect(*span) for span in cm.spans] + [rect(cm.region[0], cm.region[1], 1, 1)]
    colours = ["white"] * len(cm.spans) + ["cyan"]
    widths = [max(sy, sx) * s / 16] * len(cm.spans) + [max(sy, sx) * s / 8]
    kinds = ["crop"] * len(cm.spans) + ["region"]
    span = viewer.add_shapes(shapes, shape_type="rectangle", name=LAYER_SPAN,
                             edge_color=colours, face_color="transparent", edge_width=widths,
                             features={"kind": kinds})
    span.editable = False
    return image, span


def describe(cm: Any, names: int = 3) -> str:
    """One line: the region's own share and the regions that mattered most."""
    others = [f"({i}, {j}) {100 * v:.0f}%" for (i, j), v in cm.top(names + 1)
              if (i, j) != cm.region][:names]
    note = f" ({cm.note})" if cm.note else ""
    return (f"region {cm.region}, {cm.method}: {100 * cm.self_share:.0f}% from itself, "
            f"{100 * (1 - cm.self_share):.0f}% from other regions; most: {', '.join(others)}"
            f" - {cm.seconds:.2f} s{note}")


# ---------------------------------------------------------------------- the view without context
LAYER_VIEW = "xT view without context"
MAX_VIEW_REGIONS = 1024


def visible_regions(viewer: Any, region_size: int, grid: tuple[int, int],
                    scale: tuple[float, float], translate: tuple[float, float]
                    ) -> list[tuple[int, int]]:
    """The regions of the grid that the canvas shows now (camera centre, zoom, size)."""
    from .viewport import camera_of

    camera = camera_of(viewer)
    cy, cx = (float(v) for v in list(camera.center)[-2:])
    zoom = float(camera.zoom) or 1.0
    h, w = (float(v) for v in getattr(viewer.canvas, "size", (800, 1200)))
    (sy, sx), (ty, tx) = scale, translate
    y0, y1 = ((cy - h / (2 * zoom)) - ty) / sy, ((cy + h / (2 * zoom)) - ty) / sy
    x0, x1 = ((cx - w / (2 * zoom)) - tx) / sx, ((cx + w / (2 * zoom)) - tx) / sx
    s = region_size
    r0, r1 = max(0, int(np.floor(y0 / s))), min(grid[0] - 1, int(np.floor(y1 / s)))
    c0, c1 = max(0, int(np.floor(x0 / s))), min(grid[1] - 1, int(np.floor(x1 / s)))
    return [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def view_job(regions: list[tuple[int, int]], *, session: Any = None, source: Any = None,
             store: str | None = None, model_choice: str = "demo") -> tuple[Any, int]:
    """(`napari_xt.inspect.view.ViewLabels`, region size) of `regions` without context, for
    the last run (its model, image and store's cache) or for the run of `store`."""
    from napari_xt.inspect.view import labels_without_context

    if store is None:
        s = session.planned.region_size
        return labels_without_context(session.model, source, regions, region_size=s,
                                      store=session.store,
                                      stride=session.request.crop_stride), s
    from napari_xt.inspect.stored import open_run

    _, path, model = _stored_run(store, model_choice)
    run, src = open_run(store, path, model)  # the model and image checked
    return labels_without_context(model, src, regions, region_size=run["region_size"],
                                  store=store, stride=run["crop_stride"]), run["region_size"]


def show_view(viewer: Any, view: Any, region_size: int, scale: tuple[float, float],
              translate: tuple[float, float], names: tuple[str, ...] = ()) -> Any:
    """The view's labels without context as a Labels layer over those regions."""
    from napari_xt.inspect.view import mosaic

    from .result_layers import label_colormap

    data, (y0, x0) = mosaic(view, region_size)
    (sy, sx), (ty, tx) = scale, translate
    if LAYER_VIEW in viewer.layers:
        viewer.layers.remove(LAYER_VIEW)
    kwargs = {}
    if names:
        kwargs["features"] = {"index": list(range(len(names))), "class": list(names)}
    layer = viewer.add_labels(data, name=LAYER_VIEW, scale=(sy, sx),
                              translate=(ty + y0 * sy, tx + x0 * sx), opacity=0.7,
                              colormap=label_colormap(), **kwargs)
    layer.editable = False
    return layer
