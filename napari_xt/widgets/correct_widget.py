"""The "Correct results" dock widget: annotators fix a run's labels and detections.

A label pyramid cannot be painted in napari, so corrections go window by window: "Edit view"
loads the labels of a window around the camera centre (or around a click, with "pick by
click" on) into an editable Labels layer; "Save" writes the window into the store's
correction (`labels/<name>-corrected`, see `napari_xt.io.corrections`) and its pyramid,
and records the edit; the model's prediction is never modified. Detections load into an
editable Points layer with the window; saving writes the whole corrected table
(`tables/<name>-corrected`). Points added by hand get score 1.

"Remove specks" first writes a sieved copy of the result (`labels/<name>_sieve<N>`, as
`napari-xt sieve` does: pieces under N px take the label around them), shows it and makes
it the result to correct; the prediction is kept as it is.

Unsaved edits are never dropped: "Edit view" refuses while the current window has changes
(save or discard them first). Reads and writes run in a napari thread worker; layers change
on the main thread only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari.viewer

    from napari_xt.io.box import Box

from napari_xt.commands.sieve import MAX_MIN_SIZE

from .controls import WorkerPanel, status_label
from .correction_jobs import load_window, recorded_image, save_edits
from .correction_points import add_points_layer, points_table
from .result_layers import label_colormap
from .run_session import last_session
from .viewport import camera_of
from .workers import start_worker

LAYER_EDIT, LAYER_POINTS, LAYER_CORRECTED = "xT correction", "xT detections correction", \
    "xT corrected labels"
LAYER_FRAME = "xT correction window"
EDIT_LAYERS = (LAYER_EDIT, LAYER_POINTS, LAYER_FRAME)
DEFAULT_WINDOW = 1024


class CorrectWidget(WorkerPanel, QWidget):
    TITLE = "Correct results"

    def __init__(self, viewer: napari.viewer.Viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker = None
        self.window: Box | None = None  # label pixels
        self.target: tuple[str, str] | None = None  # (store, result) the window came from
        self._loaded: np.ndarray | None = None  # the window as loaded or last saved
        self._loaded_points: tuple[np.ndarray, Any] | None = None
        self._transform = ((1.0, 1.0), (0.0, 0.0))  # world (scale, translate) of a label pixel
        self._table_scale = (1.0, 1.0)  # table pixels per label pixel
        self.colors: dict[int, tuple] = {}
        self.classes: list[int] = []

        form = QFormLayout()
        self.store_edit = QLineEdit()
        self.store_edit.setToolTip("The result store (OME-Zarr) whose labels to correct.")
        browse, last = QPushButton("…"), QPushButton("last run")
        browse.setToolTip("Choose a result store folder.")
        last.setToolTip("Use the store of the last Run xT in this viewer.")
        row = QHBoxLayout()
        row.addWidget(self.store_edit, 1)
        row.addWidget(browse)
        row.addWidget(last)
        form.addRow("store", row)
        self.result_combo = QComboBox()
        self.result_combo.setToolTip("The label result to correct (its detection table of the "
                                     "same name, when there is one, is corrected with it).")
        form.addRow("result", self.result_combo)
        self.size_spin = QSpinBox()
        self.size_spin.setRange(64, 8192)
        self.size_spin.setSingleStep(256)
        self.size_spin.setValue(DEFAULT_WINDOW)
        self.size_spin.setSuffix(" px")
        self.size_spin.setToolTip("Side of the window to edit, in label pixels (centred on the "
                                  "camera, moved inside the image).")
        form.addRow("window", self.size_spin)
        self.pick_check = QCheckBox("pick by click")
        self.pick_check.setToolTip("When on, clicking the image edits the window around the "
                                   "click.")
        form.addRow("", self.pick_check)
        self.edit_button = QPushButton("Edit view")
        self.edit_button.setToolTip("Load the labels (and detections) of the window around "
                                    "the camera centre into editable layers.")
        self.save_button = QPushButton("Save")
        self.save_button.setToolTip("Write the edited window into the store's correction; "
                                    "the prediction itself is kept as it is.")
        self.discard_button = QPushButton("Discard")
        self.discard_button.setToolTip("Drop the unsaved edits of this window.")
        buttons = QHBoxLayout()
        for b in (self.edit_button, self.save_button, self.discard_button):
            buttons.addWidget(b)
        self.sieve_spin = QSpinBox()
        self.sieve_spin.setRange(2, MAX_MIN_SIZE)
        self.sieve_spin.setValue(64)
        self.sieve_spin.setSuffix(" px")
        self.sieve_spin.setToolTip("Pieces of one label smaller than this take the label "
                                   "around them (64 px suits the built-in models).")
        self.sieve_button = QPushButton("Remove specks")
        self.sieve_button.setToolTip(
            "Write a copy of the result in which small pieces take the label around them "
            "(labels/<result>_sieve<N>), show it and choose it for correcting; the result "
            "itself is kept as it is.")
        specks = QHBoxLayout()
        specks.addWidget(self.sieve_spin, 1)
        specks.addWidget(self.sieve_button)
        form.addRow("specks under", specks)
        self.export_button = QPushButton("Export training pairs…")
        self.export_button.setToolTip(
            "Write the saved corrections as training pairs (image around the corrected "
            "windows, corrected labels and detections) to fine-tune a model with "
            "`napari-xt train`.")
        self.status = status_label("run xT or choose a result store, then edit a window",
                                   "What was loaded or saved last.")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.export_button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        browse.clicked.connect(self._browse)
        last.clicked.connect(self.use_last_run)
        self.store_edit.editingFinished.connect(self.refresh_results)
        self.edit_button.clicked.connect(lambda: self.edit_view())
        self.save_button.clicked.connect(self.save)
        self.discard_button.clicked.connect(self.discard)
        self.export_button.clicked.connect(self._export_clicked)
        self.sieve_button.clicked.connect(lambda: self.remove_specks())
        self.pick_check.toggled.connect(self._toggle_pick)
        self.use_last_run()
        self._set_busy(False)

    # ------------------------------------------------------------------ store and result
    @property
    def store(self) -> str:
        return self.store_edit.text().strip()

    @property
    def result(self) -> str:
        return self.result_combo.currentText()

    def use_last_run(self) -> None:
        s = last_session(self.viewer)
        if s is not None and s.store:
            self.store_edit.setText(str(s.store))
            self.refresh_results()

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Result store", self.store)
        if path:
            self.store_edit.setText(path)
            self.refresh_results()

    def refresh_results(self) -> None:
        from napari_xt.io import list_results
        from napari_xt.io.corrections import predicted

        names = predicted(list_results(self.store)["labels"]) if self.store else []
        current = self.result
        self.result_combo.clear()
        self.result_combo.addItems(names)
        if current in names:
            self.result_combo.setCurrentText(current)

    def _world_transform(self, labels) -> tuple[tuple[float, float], tuple[float, float]]:
        """World (scale, translate) of a label pixel: the last run's when this is its
        store, else the labels' own pixel size, placed as the napari-xt reader places them."""
        s = last_session(self.viewer)
        if s is not None and s.store and Path(s.store) == Path(self.store):
            return tuple(s.request.scale), tuple(s.request.translate)
        from napari_xt._napari_io import store_attrs, store_shift

        return tuple(labels.pixel_size or (1.0, 1.0)), store_shift(self.store,
                                                                  store_attrs(self.store))

    # ------------------------------------------------------------------ editing
    @property
    def dirty(self) -> bool:
        """True when the edit layers hold changes that are not saved."""
        return self._labels_dirty() or self._points_dirty()

    def _labels_dirty(self) -> bool:
        return (self._loaded is not None and LAYER_EDIT in self.viewer.layers
                and not np.array_equal(np.asarray(self.viewer.layers[LAYER_EDIT].data),
                                       self._loaded))

    def _points_dirty(self) -> bool:
        if self._loaded_points is None or LAYER_POINTS not in self.viewer.layers:
            return False
        data, features = self._loaded_points
        layer = self.viewer.layers[LAYER_POINTS]
        return not (np.array_equal(layer.data, data) and layer.features.equals(features))

    def window_at(self, world) -> Box:
        """The window of the chosen size centred on a world position, moved inside the
        label image, in label pixels."""
        from napari_xt.io import Box, read_labels

        labels = read_labels(self.store, self.result)
        (sy, sx), (ty, tx) = self._world_transform(labels)
        h, w = labels.levels[0].shape
        cy, cx = (float(world[-2]) - ty) / sy, (float(world[-1]) - tx) / sx
        n = self.size_spin.value()
        ny, nx = min(n, h), min(n, w)
        y0 = int(np.clip(round(cy - ny / 2), 0, h - ny))
        x0 = int(np.clip(round(cx - nx / 2), 0, w - nx))
        return Box(y0, x0, y0 + ny, x0 + nx)

    def _ready(self) -> bool:
        """True when a new job may start: no job running, a result chosen, no unsaved edits
        (says why not)."""
        from napari.utils.notifications import show_warning

        if self.worker is not None:
            return False
        if not self.store or not self.result:
            show_warning("Correct results: choose a result store with a label result first")
            return False
        if self.dirty:
            show_warning("Correct results: save or discard the edits of the current window "
                         "first")
            return False
        return True

    def edit_view(self, world=None) -> bool:
        """Load the window around `world` (default: the camera centre) for editing.
        Returns False (and says why) when it cannot."""
        from napari.utils.notifications import show_warning

        if not self._ready():
            return False
        if world is None:
            world = camera_of(self.viewer).center
        try:
            box = self.window_at(world)
        except Exception as err:  # noqa: BLE001 - a missing/corrupt store: say so
            show_warning(f"Correct results: {err}")
            return False
        self.status.setText(f"loading rows {box.y0}:{box.y1}, columns {box.x0}:{box.x1}…")
        target = (self.store, self.result)
        self.worker = start_worker(load_window, *target, box)
        self.worker.returned.connect(lambda loaded: self._show_window(loaded, target))
        self._start_worker()
        return True

    def _show_window(self, loaded: dict[str, Any], target: tuple[str, str]) -> None:
        from napari.utils.notifications import show_warning

        from napari_xt.io import Box

        box, labels = Box.of(loaded["box"]), loaded["labels"]
        if self.dirty:  # never replace unsaved edits
            show_warning("Correct results: the current window has unsaved edits; save or "
                         "discard them, then edit the next window")
            return
        self.window, self.colors = box, loaded["colors"]
        self.target = target  # saves go where the window came from, whatever the controls say
        self._loaded_points = None
        self.classes = loaded["classes"]
        self._transform = self._world_transform(loaded["meta"])
        self._table_scale = loaded["table_scale"]
        (sy, sx), (ty, tx) = self._transform
        translate = (ty + box.y0 * sy, tx + box.x0 * sx)
        for name in EDIT_LAYERS:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        frame = self.viewer.add_shapes(
            [[[box.y0 - 0.5, box.x0 - 0.5], [box.y1 - 0.5, box.x1 - 0.5]]],
            shape_type="rectangle", name=LAYER_FRAME, scale=(sy, sx), translate=(ty, tx),
            edge_color="white", face_color="transparent",
            edge_width=2 * max(1, box.height // 256))
        frame.editable = False
        layer = self.viewer.add_labels(labels, name=LAYER_EDIT, scale=(sy, sx),
                                       translate=translate, opacity=0.7,
                                       colormap=label_colormap(self.colors))
        self._loaded = labels.copy()
        if loaded["points"] is not None:
            points = add_points_layer(self.viewer, loaded["points"], LAYER_POINTS,
                                      self._table_scale, (sy, sx), (ty, tx))
            self._loaded_points = (points.data.copy(), points.features.copy())
        layer.selected_label = 1 if 1 in self.classes or not self.classes else self.classes[0]
        self._activate_edit_layer()
        self.status.setText(
            f"editing rows {box.y0}:{box.y1}, columns {box.x0}:{box.x1} of {target[1]!r}"
            f" (classes {self.classes}); paint, then Save")

    def _activate_edit_layer(self) -> None:
        if LAYER_EDIT in self.viewer.layers:
            layer = self.viewer.layers[LAYER_EDIT]
            self.viewer.layers.selection.active = layer
            layer.mode = "paint"

    def discard(self) -> None:
        for name in EDIT_LAYERS:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self.window = self._loaded = self._loaded_points = None
        self.status.setText("edits discarded")
        self._set_busy(False)

    def remove_specks(self) -> bool:
        """Write (or, when it is there already for this result, reuse) the sieved copy of
        the chosen result, show it as a Labels layer and choose it. False when it cannot."""
        from napari.utils.notifications import show_warning

        from napari_xt.commands.sieve import is_sieved, sieve_result, sieved_name, up_to_date

        if not self._ready():
            return False
        n, source = self.sieve_spin.value(), self.result
        out = sieved_name(source, n)
        if (Path(self.store) / "labels" / out).exists():
            if not up_to_date(self.store, out, source, n):
                renew = (f"napari-xt sieve STORE --name {source} --min-size {n} --overwrite "
                         "renews it" if is_sieved(Path(self.store) / "labels" / out)
                         else "it is another result, never replaced; choose another size")
                show_warning(f"Correct results: {out} is in the store but was not sieved "
                             f"from {source!r} as it is now; it is never replaced here "
                             f"({renew})")
                return False
            self._show_sieved(out)
            return True
        self.status.setText(f"removing specks under {n} px from {source!r}…")
        self.worker = start_worker(sieve_result, self.store, source, n)
        self.worker.returned.connect(lambda _: self._show_sieved(out))
        self._start_worker()
        return True

    def _show_sieved(self, name: str) -> None:
        from napari_xt.io import read_labels

        labels = read_labels(self.store, name)
        (sy, sx), (ty, tx) = self._world_transform(labels)
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        data = labels.levels if len(labels.levels) > 1 else labels.levels[0]
        self.viewer.add_labels(data, name=name, scale=(sy, sx), translate=(ty, tx),
                               multiscale=len(labels.levels) > 1,
                               colormap=label_colormap(labels.colors))
        self.refresh_results()
        self.result_combo.setCurrentText(name)
        self.status.setText(f"{name} written beside the prediction; it is the result to "
                            "correct now")

    def save(self) -> bool:
        """Save the edited window (and the detections) into the store's correction."""
        from napari.utils.notifications import show_warning

        if self.worker is not None or self.window is None:
            if self.window is None:
                show_warning("Correct results: nothing to save; edit a window first")
            return False
        if not self.dirty:
            self.status.setText("nothing changed in this window since it was loaded or saved")
            return False
        labels = np.asarray(self.viewer.layers[LAYER_EDIT].data).copy() \
            if self._labels_dirty() else None
        table = snapshot = None
        if self._points_dirty():
            layer = self.viewer.layers[LAYER_POINTS]
            snapshot = (layer.data.copy(), layer.features.copy())  # what this save holds
            table = self._points_table()
        self.status.setText("saving…")
        self.worker = start_worker(save_edits, *self.target, self.window, labels, table)
        self.worker.returned.connect(lambda out: self._saved(out, labels, snapshot))
        self._start_worker()
        return True

    def _points_table(self) -> dict[str, np.ndarray] | None:
        if self._loaded_points is None or LAYER_POINTS not in self.viewer.layers:
            return None
        return points_table(self.viewer.layers[LAYER_POINTS], self._table_scale)

    def _saved(self, out: dict[str, Any], labels, points_snapshot) -> None:
        if labels is not None:
            self._loaded = labels
        if points_snapshot is not None:
            self._loaded_points = points_snapshot
        self._show_corrected()
        edit = out.get("edit")
        parts = []
        if edit is not None:
            n = out["edits"]
            parts.append(f"saved the window: {edit.changed:,} pixels changed"
                         f" ({n} edit{'s' if n != 1 else ''} in {self.target[1]}-corrected)")
        if out.get("points") is not None:
            parts.append(f"{out['points']} detections saved")
        self.status.setText("; ".join(parts) or "saved")

    def _show_corrected(self) -> None:
        """Show (or refresh) the correction's pyramid under the edit layer."""
        from napari_xt.io import read_labels
        from napari_xt.io.corrections import corrected_name, has_correction

        store, result = self.target
        if not has_correction(store, result):
            return
        lab = read_labels(store, corrected_name(result))
        data = lab.levels if len(lab.levels) > 1 else lab.levels[0]
        if LAYER_CORRECTED in self.viewer.layers:
            self.viewer.layers.remove(LAYER_CORRECTED)
        scale, translate = self._transform
        layer = self.viewer.add_labels(data, name=LAYER_CORRECTED, scale=scale,
                                       translate=translate, multiscale=len(lab.levels) > 1,
                                       opacity=0.5, colormap=label_colormap(lab.colors))
        layer.editable = False
        # keep the edit layers on top, the edit layer selected for painting
        for name in EDIT_LAYERS:
            if name in self.viewer.layers:
                layers = self.viewer.layers
                layers.move(layers.index(name), len(layers))
        self._activate_edit_layer()

    # ------------------------------------------------------------------ training pairs
    def _run_image(self):
        """(image, axes, margin) of the last run when this is its store, else None."""
        s = last_session(self.viewer)
        if s is None or not s.store or Path(s.store) != Path(self.store):
            return None
        margin = 256
        if s.model is not None and s.planned is not None:
            margin = int(s.planned.region_size * max(1, getattr(s.model.cfg, "crop_regions",
                                                                1) or 1))
        return s.request.image, s.request.axes, margin

    def _export_clicked(self) -> None:
        image = self._run_image()
        if image is None:  # a store from disk: the image the run recorded, or ask for it
            path = recorded_image(self.store)
            if path is None:
                path, _ = QFileDialog.getOpenFileName(
                    self, "The image the run was made on (Cancel: choose a folder image)")
            if not path:  # OME-Zarr and zarr images are folders
                path = QFileDialog.getExistingDirectory(self, "The image the run was made on")
            if not path:
                return
            image = (path, None, None)  # default margin
        out = QFileDialog.getExistingDirectory(self, "Folder for the training pairs",
                                               str(Path(self.store).parent))
        if out:
            self.export(out, *image)

    def export(self, out_dir: str, image=None, axes: str | None = None,
               margin: int | None = None) -> bool:
        """Export the saved corrections as training pairs into `out_dir` (the image
        defaults to the last run's when this is its store)."""
        from napari.utils.notifications import show_warning

        if self.worker is not None:
            return False
        if image is None:
            run_image = self._run_image()
            if run_image is None:
                show_warning("Correct results: give the image the run was made on")
                return False
            image, axes, default_margin = run_image
            margin = default_margin if margin is None else margin
        from napari_xt.train.from_corrections import export_pairs

        self.status.setText("exporting training pairs…")
        self.worker = start_worker(export_pairs, self.store, image, out_dir, name=self.result,
                                   overwrite=True,  # the current corrections replace older pairs
                                   margin=256 if margin is None else int(margin), axes=axes)
        self.worker.returned.connect(lambda pairs: self._exported(pairs, out_dir))
        self._start_worker()
        return True

    def _exported(self, pairs, out_dir: str) -> None:
        labelled = sum(p.labelled for p in pairs)
        points = sum(p.points for p in pairs)
        self.status.setText(
            f"{len(pairs)} training pair(s) in {out_dir}: {labelled:,} corrected pixels, "
            f"{points} detections; fine-tune with napari-xt train (model: {{checkpoint: …}}, "
            "data: {kind: zarr, train_paths: [this folder]})")

    # ------------------------------------------------------------------ worker and clicks
    def _worker_done(self) -> None:
        pass

    def _set_busy(self, busy: bool) -> None:
        for name in (LAYER_EDIT, LAYER_POINTS):  # no edits while a window loads or saves
            if name in self.viewer.layers:
                self.viewer.layers[name].editable = not busy
        self.edit_button.setEnabled(not busy)
        self.save_button.setEnabled(not busy and self.window is not None)
        self.discard_button.setEnabled(not busy and self.window is not None)
        self.export_button.setEnabled(not busy)
        self.sieve_button.setEnabled(not busy)

    def _picked(self, world) -> None:
        self.edit_view(world)
