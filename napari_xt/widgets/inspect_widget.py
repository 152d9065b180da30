"""The "Inspect context" dock widget: what did the context encoder change?

It works on the last run of the viewer's "Run xT" widget (its model, image and store). Pick a
region with the spin boxes or by clicking it in the canvas (with "pick by click" on), then:

- "Compare region": the region predicted from itself only, as a Labels layer over the
  region, with the pixels whose class differs from the stored (with-context) result, and
  the changed fraction in the status line;
- "Context-change map": the changed fraction of every finished region, as an Image layer
  with one pixel per region over the image (0: context changed nothing, 1: every pixel);
- "Contribution map": which regions made the region's answer (`napari_xt.inspect`, with the
  method chosen: attention of one layer and head, rollout over the layers, gradient or
  occlusion), as an Image layer with one pixel per region (shares of influence) and the
  region and the crops it saw outlined; for the last run, or for a result store reopened
  from disk (with the model it was made with; the image is the one the store recorded).

A click on the canvas (with "pick by click" on) picks the region and does what "on click"
says.

Computation runs in a napari thread worker (`context_probe`); layers change on the main
thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
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

from .context_probe import change_map, compare_region
from .contribution_view import contribution_job, describe, show_contributions
from .controls import WorkerPanel, status_label
from .region_grid import grid_transform
from .result_layers import class_name, label_colormap
from .run_session import last_session
from .workers import start_worker

MODE_LABELS = {"region alone": "alone", "region alone, at a crop's centre": "centred",
               "no context (identity)": "identity"}
LAYER_ONLY, LAYER_CHANGED, LAYER_MAP = "xT region only", "xT changed by context", \
    "xT context change"


def class_names(session) -> tuple[str, ...]:
    """The class names of the session's model (its config), () when it has none."""
    head = getattr(getattr(session.model, "cfg", None), "head", None)
    return tuple(getattr(head, "class_names", ()) or ())


def changes_text(alone: np.ndarray, context: np.ndarray, names, top: int = 3) -> str:
    """"; most: sea -> lake 60%, ..." — the commonest class changes (share of the changed
    pixels), by class name."""
    diff = alone != context
    if not diff.any():
        return ""
    pairs, counts = np.unique(np.stack([alone[diff], context[diff]], 1), axis=0,
                              return_counts=True)
    order = np.argsort(-counts)[:top]
    total = int(diff.sum())
    parts = [f"{class_name(names, pairs[i][0])} -> {class_name(names, pairs[i][1])} "
             f"{100 * counts[i] / total:.0f}%" for i in order]
    return "; without -> with context: " + ", ".join(parts)


def _pair_row(a: QWidget, b: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(a)
    row.addWidget(b)
    return row


class InspectWidget(WorkerPanel, QWidget):
    TITLE = "Inspect context"

    def __init__(self, viewer: napari.viewer.Viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker = None
        self.last_comparison = None
        self.change = None  # (rows, cols) float32 fractions, NaN = not computed
        self._map_dirty = False
        form = QFormLayout()
        self.row_spin, self.col_spin = QSpinBox(), QSpinBox()
        self.row_spin.setToolTip("Row of the region to inspect (0 = top).")
        self.col_spin.setToolTip("Column of the region to inspect (0 = left).")
        self.pick_check = QCheckBox("pick by click")
        self.pick_check.setToolTip("When on, clicking the image selects the region under "
                                   "the mouse and compares it.")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODE_LABELS))
        self.mode_combo.setToolTip("Region alone: the context encoder sees only this region, "
                                   "at its own position. At a crop's centre: the same, placed "
                                   "where its position says nothing about the image border. "
                                   "No context: the context encoder is skipped.")
        self.click_combo = QComboBox()
        self.click_combo.addItems(["compare region", "contribution map"])
        self.click_combo.setToolTip("What a click on the image does (with pick by click on).")
        self.method_combo = QComboBox()
        self.method_combo.addItems(["occlusion", "gradient", "attention", "rollout"])
        self.method_combo.setToolTip(
            "Occlusion: each region's content removed in turn, how much the answer changes. "
            "Gradient: the first-order estimate of that, in one pass. Attention: where the "
            "region's tokens look in one layer. Rollout: attention through all layers. "
            "Attention and rollout need an attention encoder (Hyper, Transformer-XL).")
        self.answer_combo = QComboBox()
        self.answer_combo.addItems(["classes", "detections"])
        self.answer_combo.setToolTip("Explain the region's classes, or its detections (the "
                                     "centre map of a detection model).")
        self.layer_spin, self.head_spin = QSpinBox(), QSpinBox()
        self.layer_spin.setRange(-1, 63)
        self.layer_spin.setValue(-1)
        self.layer_spin.setSpecialValueText("last")
        self.layer_spin.setToolTip("Attention: the context layer shown (last by default).")
        self.head_spin.setRange(-1, 63)
        self.head_spin.setValue(-1)
        self.head_spin.setSpecialValueText("mean")
        self.head_spin.setToolTip("Attention: one head, or the mean of the heads.")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("the last run")
        self.store_edit.setToolTip("A result store to inspect instead of the last run (its "
                                   "image is read from where the store says it was).")
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(["demo", "demo-region-only"])
        self.model_combo.setToolTip("With a store: the model its run used (checked), a zoo "
                                    "name or a checkpoint file.")
        form.addRow("region (row, col)", _pair_row(self.row_spin, self.col_spin))
        form.addRow("", self.pick_check)
        form.addRow("on click", self.click_combo)
        form.addRow("without context", self.mode_combo)
        form.addRow("explain", self.answer_combo)
        form.addRow("with", self.method_combo)
        form.addRow("layer, head", _pair_row(self.layer_spin, self.head_spin))
        form.addRow("store", self.store_edit)
        form.addRow("its model", self.model_combo)
        self.compare_button = QPushButton("Compare region")
        self.compare_button.setToolTip("Predict the region without context and show where "
                                       "the run's result (with context) differs.")
        self.map_button = QPushButton("Context-change map")
        self.map_button.setToolTip("For every finished region, the fraction of pixels whose "
                                   "class changes with context, as a heatmap layer.")
        self.view_check = QCheckBox("view without context")
        self.view_check.setToolTip("Re-decode the regions in view with the context encoder "
                                   "skipped (from the run's embedding cache where it has "
                                   "them), as a layer over the run's result; off removes it.")
        self.contrib_button = QPushButton("Contribution map")
        self.contrib_button.setToolTip("Which regions made this region's answer, as a map "
                                       "over the region grid.")
        self.status = status_label("run xT first, then inspect its regions",
                                   "Result of the last comparison.")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compare_button)
        buttons.addWidget(self.map_button)
        layout.addLayout(buttons)
        layout.addWidget(self.contrib_button)
        layout.addWidget(self.view_check)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.compare_button.clicked.connect(self.compare)
        self.map_button.clicked.connect(self.context_map)
        self.contrib_button.clicked.connect(self.contributions)
        self.store_edit.editingFinished.connect(self.sync)
        self.view_check.toggled.connect(self._toggle_view)
        self.last_view = None
        self.last_contributions = None
        self.pick_check.toggled.connect(self._toggle_pick)
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._flush_map)
        self.sync()

    # ------------------------------------------------------------------ run context
    def session(self):
        s = last_session(self.viewer)
        if s is None or s.model is None or s.planned is None:
            return None
        return s

    def sync(self) -> None:
        """Fit the spin boxes to the region grid (of the store given, else the last run)."""
        rows, cols = self._grid()
        self.row_spin.setRange(0, rows - 1)
        self.col_spin.setRange(0, cols - 1)

    def _ready(self):
        from napari.utils.notifications import show_error

        s = self.session()
        if s is None or not s.done:
            show_error("Inspect context: finish a run of the Run xT widget first")
            return None
        if self.worker is not None:
            return None
        self.sync()
        return s

    @staticmethod
    def _source(session):
        from napari_xt.io.source import ImageSource

        req = session.request
        return ImageSource(req.image, axes=req.axes, normalize=session.normalization())

    @property
    def mode(self) -> str:
        return MODE_LABELS[self.mode_combo.currentText()]

    # ------------------------------------------------------------------ one region
    def compare(self) -> None:
        s = self._ready()
        if s is None:
            return
        row, col = self.row_spin.value(), self.col_spin.value()
        self.status.setText(f"comparing region ({row}, {col})…")
        self.worker = start_worker(compare_region, s.model, self._source(s), s.store, row, col,
                                   s.planned.region_size, self.mode,
                                   stride=s.request.crop_stride)
        self.worker.returned.connect(lambda result: self._show_comparison(s, result))
        self._start_worker()

    def _show_comparison(self, session, result) -> None:
        self.last_comparison = result
        sy, sx = session.request.scale
        ty, tx = session.request.translate
        y0, x0 = result.box[:2]
        translate = (ty + y0 * sy, tx + x0 * sx)
        changed = (result.region_only != result.with_context).astype(np.uint8)
        names = class_names(session)
        for name, data in ((LAYER_ONLY, result.region_only), (LAYER_CHANGED, changed)):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            kwargs = {}
            if name == LAYER_ONLY:
                kwargs["colormap"] = label_colormap()
                if names:
                    kwargs["features"] = {"index": list(range(len(names))),
                                          "class": list(names)}
            layer = self.viewer.add_labels(data, name=name, scale=(sy, sx), translate=translate,
                                           opacity=0.7, **kwargs)
            layer.editable = False
        self.status.setText(
            f"region ({result.row}, {result.col}): {100 * result.changed_fraction:.1f}% of "
            f"pixels change class with context ({self.mode_combo.currentText()} vs the run)"
            + changes_text(result.region_only, result.with_context, names))

    # ------------------------------------------------------------------ all regions
    def context_map(self) -> None:
        s = self._ready()
        if s is None:
            return
        from napari_xt.engine.store import DONE

        states = s.region_states()
        regions = [tuple(rc) for rc in np.argwhere(states == DONE)]
        if not regions:
            self.status.setText("no finished region to inspect")
            return
        self.change = np.full(states.shape, np.nan, np.float32)
        self._ensure_map_layer(s)
        self.status.setText(f"context change of {len(regions)} regions…")
        self.worker = start_worker(change_map, s.model, self._source(s), s.store,
                                   s.planned.region_size, regions, self.mode,
                                   s.request.crop_stride)
        self.worker.yielded.connect(self._on_fraction)
        self._timer.start()
        self._start_worker()

    def _ensure_map_layer(self, session) -> None:
        scale, translate = grid_transform(session.planned.region_size, session.request.scale,
                                          session.request.translate)
        if LAYER_MAP in self.viewer.layers:
            self.viewer.layers.remove(LAYER_MAP)
        self.viewer.add_image(np.nan_to_num(self.change), name=LAYER_MAP, scale=scale,
                              translate=translate, colormap="magma", contrast_limits=(0.0, 1.0),
                              opacity=0.7)

    def _on_fraction(self, item) -> None:
        row, col, fraction = item
        self.change[row, col] = fraction
        self._map_dirty = True

    def _flush_map(self) -> None:
        if self._map_dirty and LAYER_MAP in self.viewer.layers:
            self.viewer.layers[LAYER_MAP].data = np.nan_to_num(self.change)
            self._map_dirty = False

    # ------------------------------------------------------------------ contributions
    def contributions(self) -> None:
        """The contribution map of the chosen region (last run, or the store given)."""
        from napari.utils.notifications import show_error

        if self.worker is not None:
            return
        store = self.store_edit.text().strip() or None
        row, col = self.row_spin.value(), self.col_spin.value()
        layer = None if self.layer_spin.value() < 0 else self.layer_spin.value()
        head = None if self.head_spin.value() < 0 else self.head_spin.value()
        method = self.method_combo.currentText()
        kwargs = {"layer": layer, "head": head, "answer": self.answer_combo.currentText()}
        if store is None:
            s = self._ready()
            if s is None:
                return
            kwargs.update(session=s, source=self._source(s))
        else:
            from pathlib import Path

            if not Path(store).is_dir():
                show_error(f"Inspect context: {store} is not a result store")
                return
            kwargs.update(store=store, model_choice=self.model_combo.currentText().strip())
        self.status.setText(f"contribution map of region ({row}, {col}), {method}…")
        self.worker = start_worker(contribution_job, (row, col), method, **kwargs)
        self.worker.returned.connect(self._show_contributions)
        self._start_worker()

    def _show_contributions(self, placed) -> None:
        self.last_contributions = placed
        show_contributions(self.viewer, placed)
        self.status.setText(describe(placed.map))

    def _world(self) -> tuple[tuple[int, int], int, tuple[float, float], tuple[float, float]]:
        """(grid, region size, scale, translate) of the store given, else of the last run."""
        store = self.store_edit.text().strip()
        if store:
            from napari_xt.inspect.stored import run_settings

            from .contribution_view import store_world

            run = run_settings(store)
            scale, translate = store_world(store, run)
            return run["grid"], run["region_size"], scale, translate
        s = self.session()
        if s is None:
            raise ValueError("finish a run of the Run xT widget first")
        return (s.planned.grid, s.planned.region_size, tuple(s.request.scale),
                tuple(s.request.translate))

    def _toggle_view(self, on: bool) -> None:
        """On: the regions in view re-decoded without context; off: that layer removed."""
        from napari.utils.notifications import show_error

        from .contribution_view import (
            LAYER_VIEW,
            MAX_VIEW_REGIONS,
            view_job,
            visible_regions,
        )

        if not on:
            if LAYER_VIEW in self.viewer.layers:
                self.viewer.layers.remove(LAYER_VIEW)
            return
        if self.worker is not None:
            self.view_check.setChecked(False)
            return
        try:
            grid, size, scale, translate = self._world()
        except ValueError as err:
            show_error(f"Inspect context: {err}")
            self.view_check.setChecked(False)
            return
        regions = visible_regions(self.viewer, size, grid, scale, translate)
        if not regions or len(regions) > MAX_VIEW_REGIONS:
            self.status.setText(f"{len(regions)} regions in view: zoom in to at most "
                                f"{MAX_VIEW_REGIONS}")
            self.view_check.setChecked(False)
            return
        store = self.store_edit.text().strip() or None
        if store is None:
            s = self.session()
            kwargs = {"session": s, "source": self._source(s)}
        else:
            kwargs = {"store": store, "model_choice": self.model_combo.currentText().strip()}
        self.status.setText(f"re-decoding {len(regions)} regions without context…")
        self.worker = start_worker(view_job, regions, **kwargs)
        self.worker.returned.connect(lambda out: self._show_view(out, scale, translate))
        self.worker.errored.connect(lambda err: self.view_check.setChecked(False))
        self._start_worker()

    def _show_view(self, out, scale, translate) -> None:
        from .contribution_view import show_view

        view, size = out
        self.last_view = view
        if not self.view_check.isChecked():
            return
        s = self.session()
        names = class_names(s) if s is not None else ()
        show_view(self.viewer, view, size, scale, translate, names)
        self.status.setText(
            f"{len(view.labels)} regions without context ({view.from_cache} from the "
            f"embedding cache, {view.encoded} encoded) in {view.seconds:.2f} s; compare "
            "with the run's labels (with context)" + (f"; {view.note}" if view.note else ""))

    def _grid(self) -> tuple[int, int]:
        store = self.store_edit.text().strip()
        if store:
            from napari_xt.inspect.stored import run_settings

            try:
                return run_settings(store)["grid"]
            except ValueError:
                return 1, 1
        s = self.session()
        return s.planned.grid if s is not None else (1, 1)

    # ------------------------------------------------------------------ worker and clicks
    def _set_busy(self, busy: bool) -> None:
        self.compare_button.setEnabled(not busy)
        self.map_button.setEnabled(not busy)
        self.contrib_button.setEnabled(not busy)

    def _worker_done(self) -> None:
        self._timer.stop()
        self._flush_map()
        if self.change is not None and not self.status.text().startswith(("failed", "region")):
            done = np.isfinite(self.change)
            if done.any():
                self.status.setText(
                    f"context changes {100 * float(np.nanmean(self.change)):.1f}% of pixels on "
                    f"average over {int(done.sum())} regions (max "
                    f"{100 * float(np.nanmax(self.change)):.1f}%)")

    def _picked(self, world) -> None:
        index = self.region_at(world)
        if index is not None:
            self.sync()  # (the spin boxes clamp to their range)
            self.row_spin.setValue(index[0])
            self.col_spin.setValue(index[1])
            if self.click_combo.currentText() == "contribution map":
                self.contributions()
            else:
                self.compare()

    def region_at(self, world) -> tuple[int, int] | None:
        """(row, col) of the region under a world position (of the store given, else the
        last run), or None."""
        try:
            (rows, cols), size, (sy, sx), (ty, tx) = self._world()
        except (ValueError, OSError):
            return None
        y, x = (float(world[-2]) - ty) / sy, (float(world[-1]) - tx) / sx
        row, col = int(np.floor((y + 0.5) / size)), int(np.floor((x + 0.5) / size))
        return (row, col) if 0 <= row < rows and 0 <= col < cols else None

