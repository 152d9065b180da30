"""Result layers of a run, filled progressively and completed from the store at the end.

While a run streams, finished regions arrive as preview tiles (`run_job.ResultTiles`): they
are copied into small in-memory mirrors and pushed to the layers at most a few times a
second. At the end the labels layer switches to the store's multiscale label pyramid and
the points to the final detection table, and a classifier's record becomes a rectangle
around the image labelled with the class. All layers keep the world transform of the
processed level's pixels (for a pyramid level: the layer's scale times the level's factor,
shifted by (f - 1) / 2 level-0 pixels, as napari draws that level).

Each run's layers are named after the image and the run (`tag`: the model, and the level
when it is not 0), carry `metadata["napari-xt"]` = {"store", "run", "output"} and are kept
when another run starts: only the layers of the same store are replaced (that run resumes
or replaces them). Class names come from the model's config (or the store's metadata).
Main thread only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASS_COLORS = (
    (0.95, 0.35, 0.2, 1.0), (0.2, 0.65, 1.0, 1.0), (1.0, 0.85, 0.15, 1.0),
    (0.6, 0.3, 0.9, 1.0), (0.2, 0.85, 0.45, 1.0), (1.0, 0.45, 0.75, 1.0),
    (0.55, 0.9, 0.9, 1.0), (0.9, 0.6, 0.3, 1.0), (0.7, 0.7, 0.7, 1.0), (0.4, 0.4, 1.0, 1.0),
)
FEATURES = ("class", "score", "size")


def class_color(k: int) -> tuple[float, float, float, float]:
    return CLASS_COLORS[int(k) % len(CLASS_COLORS)]


def label_colormap(colors=None):
    """napari colormap of class labels: the result's RGBA (0-255) colours where it has
    them, the class palette otherwise, 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    palette = {k: class_color(k) for k in range(1, 256)}
    palette.update({int(k): tuple(np.asarray(v, float) / 255.0)
                    for k, v in (colors or {}).items()})
    palette.update({0: (0.0, 0.0, 0.0, 0.0), None: (0.0, 0.0, 0.0, 0.0)})
    return DirectLabelColormap(color_dict=palette)


def layer_names(image_name: str, tag: str = "") -> dict[str, str]:
    base = f"{image_name} xT {tag}".rstrip()
    return {"labels": f"{base} labels", "points": f"{base} detections",
            "probability": f"{base} p({{name}})", "classification": f"{base} class"}


def class_name(names: Sequence[str], k: int) -> str:
    k = int(k)
    return str(names[k]) if 0 <= k < len(names) else f"class {k}"


def same_path(a, b) -> bool:
    from pathlib import Path

    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def _zeros_like(old: np.ndarray | None, shape, dtype) -> np.ndarray:
    """A zero mirror of `dtype`, keeping what `old` (a narrower mirror) already holds."""
    new = np.zeros(shape, dtype=dtype)
    if old is not None:
        new[...] = old
    return new


class LiveResults:
    """Mirrors and layers of one run's outputs."""

    def __init__(self, viewer, image_name: str, height: int, width: int, stride: int,
                 scale: Sequence[float], translate: Sequence[float],
                 table_scale: Sequence[float] = (1.0, 1.0), *, tag: str = "",
                 store: str | None = None, class_names: Sequence[str] = (),
                 point_names: Sequence[str] = ()) -> None:
        self.viewer = viewer
        self.table_scale = tuple(float(v) for v in table_scale)  # table px per label px
        self.names = layer_names(image_name, tag)
        self.tag, self.store = tag, (str(store) if store else None)
        self.height, self.width = int(height), int(width)
        self.class_names = tuple(str(n) for n in class_names)
        self.point_names = tuple(str(n) for n in point_names)
        self.classification_layer = None
        self.classification: dict | None = None  # the store's record, once finished
        self.stride = int(stride)
        self.scale = tuple(float(s) for s in scale)
        self.translate = tuple(float(t) for t in translate)
        self.shape = (-(-height // stride), -(-width // stride))
        self.labels: np.ndarray | None = None
        self.probs: np.ndarray | None = None
        self._points: list[np.ndarray] = []
        self.labels_layer = self.points_layer = None
        self.prob_layers: list = []
        self._dirty = {"labels": False, "probs": False, "points": False}
        self.final = False
        self._remove_old()

    # ------------------------------------------------------------------ helpers
    @property
    def preview_scale(self) -> tuple[float, float]:
        return self.scale[0] * self.stride, self.scale[1] * self.stride

    def _remove_old(self) -> None:
        """Remove the layers of an earlier run into the same store (this run resumes or
        replaces that store); other runs' layers stay. Without a store: the same names."""
        for layer in list(self.viewer.layers):
            meta = layer.metadata.get("napari-xt") if isinstance(layer.metadata, dict) else None
            if self.store is not None:
                if isinstance(meta, dict) and same_path(meta.get("store"), self.store):
                    self.viewer.layers.remove(layer)
            elif layer.name in (self.names["labels"], self.names["points"],
                                self.names["classification"]) or layer.name.startswith(
                    self.names["probability"].split("{")[0]):
                self.viewer.layers.remove(layer)

    def _meta(self, output: str) -> dict:
        return {"napari-xt": {"store": self.store, "run": self.tag, "output": output}}

    def _owned(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    def layers(self) -> list:
        return [lay for lay in (self.labels_layer, self.points_layer, *self.prob_layers,
                                self.classification_layer) if self._owned(lay)]

    def _label_features(self, names: Sequence[str]):
        import pandas as pd

        values = list(range(len(names)))
        return pd.DataFrame({"index": values, "class": [str(n) for n in names]})

    # ------------------------------------------------------------------ live updates
    def expect(self, outputs: Sequence[str], num_classes: int) -> None:
        """Announce the layers the run will fill, so they are created (empty, one per
        `flush`) as soon as the run is planned, before regions stream: creating a napari
        layer stalls the event loop (0.2-0.5 s on software OpenGL), regions arriving do not."""
        if "labels" in outputs and self.labels is None:
            self.labels = np.zeros(self.shape, np.uint8 if num_classes < 256 else np.uint16)
            self._dirty["labels"] = True
        if "probabilities" in outputs and self.probs is None and num_classes > 0:
            self.probs = np.zeros((num_classes, *self.shape), np.float32)
            self._dirty["probs"] = True
        if "detections" in outputs:
            self._dirty["points"] = True

    def add(self, tiles) -> None:
        """Copy a `ResultTiles` into the mirrors (cheap; drawn at the next `flush`)."""
        for (ys, xs, tile) in tiles.labels.values():
            if self.labels is None or np.dtype(tile.dtype).itemsize > self.labels.itemsize:
                self.labels = _zeros_like(self.labels, self.shape, tile.dtype)
            self.labels[ys, xs] = tile
            self._dirty["labels"] = True
        for (ys, xs, tile) in tiles.probabilities.values():
            if self.probs is None or self.probs.shape[0] != tile.shape[0]:
                self.probs = np.zeros((tile.shape[0], *self.shape), dtype=np.float32)
            self.probs[:, ys, xs] = tile
            self._dirty["probs"] = True
        if tiles.points is not None and len(tiles.points):
            self._points.append(tiles.points)
            self._dirty["points"] = True

    @property
    def creating(self) -> bool:
        """True while announced layers (see `expect`) still wait to be created."""
        if self._dirty["labels"] and self.labels is not None and not self._owned(
                self.labels_layer):
            return True
        if self._dirty["points"] and not self._owned(self.points_layer):
            return True
        return bool(self._dirty["probs"] and self._missing_probabilities())

    def _missing_probabilities(self) -> list[int]:
        """Classes whose probability layer does not exist (yet, or any more)."""
        if self.probs is None:
            return []
        return [k for k in range(self.probs.shape[0])
                if k >= len(self.prob_layers) or not self._owned(self.prob_layers[k])]

    def flush(self, new_layers: int | None = 1) -> None:
        """Push changed mirrors to their layers. Creating a layer costs napari 0.1-0.4 s, so
        at most `new_layers` are created per call (None: no limit); the others wait for the
        next call, their updates kept."""
        budget = [np.inf if new_layers is None else new_layers]

        def may_create(layer) -> bool:
            if self._owned(layer):
                return True
            if budget[0] < 1:
                return False
            budget[0] -= 1
            return True

        if self._dirty["labels"] and self.labels is not None and may_create(self.labels_layer):
            if self._owned(self.labels_layer) and self.labels_layer.data is self.labels:
                self.labels_layer.refresh()  # written in place: refresh, no copy
            else:
                self._set_labels(self.labels, self.preview_scale)
            self._dirty["labels"] = False
        if self._dirty["points"] and may_create(self.points_layer):
            self._set_points(np.concatenate(self._points) if self._points else
                             {k: np.zeros(0) for k in ("y", "x", *FEATURES)})
            self._dirty["points"] = False
        if self._dirty["probs"] and self.probs is not None:
            missing = self._missing_probabilities()
            if not missing or may_create(None):
                # hidden layers get their data when shown, and at the end
                self._set_probabilities(self.probs, create=None if new_layers is None else 1)
                self._dirty["probs"] = len(missing) > 1

    def _set_labels(self, data, scale, multiscale: bool = False, colors=None) -> None:
        if self._owned(self.labels_layer) and not multiscale and not self.labels_layer.multiscale:
            self.labels_layer.data = data
            self.labels_layer.scale = scale
            return
        if self._owned(self.labels_layer):
            self.viewer.layers.remove(self.labels_layer)
        kwargs = {}
        if self.class_names:
            kwargs["features"] = self._label_features(self.class_names)
        self.labels_layer = self.viewer.add_labels(
            data, name=self.names["labels"], scale=scale, translate=self.translate,
            multiscale=multiscale, opacity=0.5,
            colormap=label_colormap(colors), metadata=self._meta("labels"), **kwargs,
        )
        self.labels_layer.editable = False

    def _set_probabilities(self, probs: np.ndarray, create: int | None = None) -> None:
        cmaps = ("red", "blue", "yellow", "magenta", "green", "cyan")
        for k in range(probs.shape[0]):
            name = self.names["probability"].format(name=class_name(self.class_names, k))
            if k < len(self.prob_layers) and self._owned(self.prob_layers[k]):
                if self.prob_layers[k].visible:
                    self.prob_layers[k].data = probs[k].copy()
                continue
            if create is not None:
                if create < 1:
                    return
                create -= 1
            layer = self.viewer.add_image(
                probs[k].copy(), name=name, scale=self.preview_scale, translate=self.translate,
                colormap=cmaps[k % len(cmaps)], contrast_limits=(0.0, 1.0), opacity=0.6,
                blending="additive", visible=False, metadata=self._meta(f"probability {k}"),
            )
            layer.events.visible.connect(lambda event, k=k: self._show_probability(k))
            self.prob_layers.append(layer)

    def _show_probability(self, k: int) -> None:
        layer = self.prob_layers[k]
        if layer.visible and self.probs is not None and self._owned(layer):
            layer.data = self.probs[k].copy()

    def _set_points(self, table) -> None:
        import pandas as pd

        coords = np.stack([np.asarray(table["y"], float), np.asarray(table["x"], float)], 1)
        classes = np.asarray(table["class"], np.int64)
        features = pd.DataFrame({
            "class": classes,
            "class_name": [class_name(self.point_names, k) for k in classes],
            "score": np.asarray(table["score"], np.float32),
            "size": np.asarray(table["size"], np.float32),
        })
        size = np.nan_to_num(features["size"].to_numpy(float), nan=0.0)
        size = np.clip(size, 6.0, None)
        colors = np.array([class_color(k) for k in features["class"]]).reshape(-1, 4)
        if not len(colors):  # napari cannot take an empty colour array
            colors = "#{:02x}{:02x}{:02x}".format(*(round(255 * v) for v in class_color(1)[:3]))
        if self._owned(self.points_layer):  # in place: no new layer, no flicker
            layer = self.points_layer
            layer.data = coords
            layer.features = features
            layer.size = size
            layer.face_color = colors
            return
        self.points_layer = self.viewer.add_points(
            coords, features=features, name=self.names["points"], scale=self.scale,
            translate=self.translate, size=size, face_color=colors, border_color="white",
            border_width=0.1, opacity=0.9, metadata=self._meta("detections"),
        )
        self.points_layer.editable = False

    # ------------------------------------------------------------------ end of run
    def finish(self, store: str) -> None:
        """Replace the previews by the store's final results (labels pyramid, table)."""
        from napari_xt.io import list_results, read_detections, read_labels
        from napari_xt.io.corrections import predicted

        self.flush(new_layers=None)
        for k, layer in enumerate(self.prob_layers):
            if self._owned(layer) and self.probs is not None:
                layer.data = self.probs[k].copy()
        results = {k: predicted(v) for k, v in list_results(store).items()}
        if results["labels"]:
            lab = read_labels(store, results["labels"][0])
            levels = lab.levels
            multiscale = len(levels) > 1
            if not self.class_names and lab.properties:
                top = max(lab.properties)
                self.class_names = tuple(str(lab.properties.get(k, {}).get("class", f"class {k}"))
                                         for k in range(top + 1))
            self._set_labels(levels if multiscale else levels[0], self.scale,
                             multiscale=multiscale, colors=lab.colors)
        if results["tables"]:
            table = read_detections(store, results["tables"][0])
            if len(table["y"]):  # the table is in level-0 pixels, the layers in level pixels
                fy, fx = self.table_scale
                self._set_points({**table, "y": np.asarray(table["y"], float) / fy,
                                  "x": np.asarray(table["x"], float) / fx})
        if results.get("classifications"):
            from napari_xt.io import read_classification

            self.classification = read_classification(store, results["classifications"][0])
            self._set_classification(self.classification)
        self.final = True

    def _set_classification(self, record: dict) -> None:
        """The record as a rectangle around the processed image, labelled "class (score)";
        features and metadata hold the class, its name, the score and the crop count."""
        from napari_xt._napari_io import classification_shapes

        data, kwargs = classification_shapes(record, self.height, self.width,
                                             self.class_names)
        if self._owned(self.classification_layer):
            self.viewer.layers.remove(self.classification_layer)
        kwargs["metadata"] = {**kwargs["metadata"], **self._meta("classification")}
        self.classification_layer = self.viewer.add_shapes(
            data, name=self.names["classification"], scale=self.scale,
            translate=self.translate, **kwargs)
        self.classification_layer.editable = False

    def describe_classification(self) -> str | None:
        """"name (score)" of the finished classifier run, None for other runs."""
        if self.classification is None:
            return None
        from napari_xt._napari_io import classification_text

        return classification_text(self.classification, self.class_names)
