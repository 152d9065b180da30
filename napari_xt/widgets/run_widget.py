"""The "Run xT" dock widget: pick an image, a model and options; run; watch; cancel.

A thin shell over `napari_xt.engine.run`: the engine's event generator runs in a napari
thread worker (`run_job.run_events`); every event comes back to the main thread through the
worker's `yielded` signal and is handed to `RunSession`, which paints the region grid,
updates the progress bar and the result layers. Nothing here computes a prediction.

Nothing the user had is lost: the output goes through the result store, which refuses
files, folders that are not napari-xt stores and the input image itself, whatever the
controls say. With "resume a matching store" unticked, a napari-xt store already at the
output is replaced only after `confirm_replace` said yes, and the unticked box is never
saved: every new widget starts with resume on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari.viewer

from .controls import status_label
from .image_choice import ImageChoice, image_choices
from .models import (
    CHECKPOINT_FILTER,
    DEMO_MODEL,
    LOAD_CHECKPOINT,
    built_in_names,
    is_checkpoint,
    run_tag,
    training_note,
    zoo_names,
)
from .run_job import RunRequest
from .run_session import RunSession
from .settings import WidgetSettings

DEVICES = ("auto", "cpu", "cuda", "mps")
ORDERS = {"raster": "raster", "zigzag": "zigzag", "viewport-first": "viewport"}
BLENDS = {"context tokens": "tokens", "decoded outputs": "outputs"}
CONTEXTS = {"as the model was trained": None, "crop": "crop", "whole image": "image"}
DEFAULTS = {"model": DEMO_MODEL, "device": "auto", "batch_size": 4, "order": "viewport-first",
            "crop_stride": 0, "blend": "context tokens", "context": "as the model was trained",
            "carry_state": False,
            "probabilities": True, "threshold": 0.5, "cache": True, "checkpoints": [],
            "cluster": ""}
# "resume a matching store" is not saved: unticked it replaces a store, which a widget
# opened later must not do silently


def parse_cluster(text: str) -> str:
    """The workers control: "" (this process), "N" (N >= 1 local workers) or a scheduler
    address; anything else is a ValueError naming what is expected."""
    text = text.strip()
    if not text or "://" in text:
        return text
    if text.isdigit() and int(text) >= 1:
        return "" if int(text) == 1 else str(int(text))
    raise ValueError(f"workers: {text!r} is neither a number of local workers nor a "
                     "scheduler address such as tcp://host:8786")


def confirm_replace(parent, path: str, kind: str) -> bool:
    """Ask before a run replaces the napari-xt store at `path` (True: replace). Tests
    replace this function; the store removes only what napari-xt wrote there."""
    from qtpy.QtWidgets import QMessageBox

    what = ("results of an older napari-xt version" if kind == "legacy"
            else "the results of a napari-xt run")
    answer = QMessageBox.question(
        parent, "Replace the results?",
        f"{path} holds {what}.\n\nStart afresh and replace them? Only what napari-xt "
        "wrote there is removed; tick 'resume a matching store' to continue a matching "
        "run instead.", QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def preload() -> None:
    """Do the one-time imports now, on the main thread, while the dock opens: in the worker
    the engine/model imports would hold the interpreter for seconds mid-run, and napari's
    first Labels/Image/Points layers import pandas, scipy and pint lazily (~2 s)."""
    import numpy as np
    from napari.layers import Image, Labels, Points

    from .models import keep_triton_out

    keep_triton_out()
    import timm  # noqa: F401

    import napari_xt.engine.execution  # noqa: F401
    import napari_xt.engine.run  # noqa: F401
    import napari_xt.model.checkpoint  # noqa: F401

    Labels(np.zeros((2, 2), np.uint8))
    Image(np.zeros((2, 2), np.float32))
    Points(np.zeros((1, 2)), features={"class": [0]})


class RunWidget(QWidget):
    """Dock widget running xT on an image layer of `viewer`."""

    def __init__(self, viewer: napari.viewer.Viewer, settings_path: str | None = None,
                 parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.settings = WidgetSettings("run", settings_path)
        self.session: RunSession | None = None
        self._choices: list[ImageChoice] = []
        self._default_store = ""  # the output the controls last proposed
        self.last_session: RunSession | None = None
        self._when_done: list = []  # callbacks for the end of the current run (`when_done`)
        preload()
        self._build()
        self._restore()
        self.refresh_images()
        for name in ("inserted", "removed", "reordered"):
            getattr(viewer.layers.events, name).connect(self.refresh_images)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to process (2-D grey or RGB; channel layers "
                                    "split from one file can be run together as a stack).")
        self.level_combo = QComboBox()
        self.level_combo.setToolTip("Pyramid level of a multiscale image: 0 is full "
                                    "resolution, higher levels are faster and coarser.")
        self.level_note = status_label("", "How the chosen level compares with the pixels "
                                       "the model was trained on.")
        self.level_note.setVisible(False)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model: the built-in demo model (crop context), its "
                                    "whole-image context version (demo-image), that "
                                    "version taught the beacon task too (demo-beacon) or "
                                    "its region-only baseline, a zoo model (random weights) or a "
                                    "checkpoint file (Load checkpoint…).")
        self.model_combo.addItem(DEMO_MODEL)
        self.model_combo.addItems(built_in_names())
        self.model_combo.addItems(zoo_names())
        self.model_combo.addItem(LOAD_CHECKPOINT)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("Where the model runs; auto picks CUDA, then MPS, "
                                     "then the CPU.")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setToolTip("Regions encoded together; lower it if the device runs "
                                   "out of memory (the run also backs off by itself).")
        self.stride_spin = QSpinBox()
        self.stride_spin.setRange(0, 64)
        self.stride_spin.setSpecialValueText("default (k / 2)")
        self.stride_spin.setToolTip("Regions between the starts of neighbouring context crops "
                                    "(crops hold k x k regions, k from the model): 1 overlaps "
                                    "most, k not at all.")
        self.blend_combo = QComboBox()
        self.blend_combo.addItems(list(BLENDS))
        self.blend_combo.setToolTip("How overlapping crops are merged: average each region's "
                                    "context tokens over its crops and decode it once "
                                    "(fast), or decode it in every crop and average the "
                                    "outputs (3-4x the decoder work).")
        self.context_combo = QComboBox()
        self.context_combo.addItems(list(CONTEXTS))
        self.context_combo.setToolTip("What each region sees: 'crop' the crops that cover it; "
                                      "'whole image' also a summary of every region of the "
                                      "image, made by a first pass over all regions and read "
                                      "by every crop (only models trained for it). Cost: with "
                                      "the embedding cache about the time of crop context "
                                      "(the first pass encodes what the crops then reuse); "
                                      "without it the regions are encoded twice. Default: "
                                      "the mode the model was trained for.")
        self.carry_check = QCheckBox("carry context between crops")
        self.carry_check.setToolTip("Pass the context encoder's state (e.g. Transformer-XL "
                                    "memory) from one crop to the next in visiting order.")
        self.probs_check = QCheckBox("probability maps")
        self.probs_check.setToolTip("Also write and show per-class probability heatmaps.")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setToolTip("Detection score threshold (models with a centre "
                                       "heatmap).")
        self.order_combo = QComboBox()
        self.order_combo.addItems(list(ORDERS))
        self.order_combo.setToolTip("Region order: raster or zigzag strips, or viewport-first "
                                    "(regions around the camera centre first, following the "
                                    "camera while it runs).")
        self.cache_check = QCheckBox("cache region embeddings")
        self.cache_check.setToolTip("Keep region embeddings in the store so a rerun with "
                                    "another context setting skips the region encoder.")
        self.resume_check = QCheckBox("resume a matching store")
        self.resume_check.setToolTip("Continue an interrupted run in the same store: finished "
                                     "regions are kept, not recomputed. Off: start afresh, "
                                     "replacing a napari-xt store at the output after you "
                                     "confirm (never anything else). Ticked again in every "
                                     "new widget.")
        self.cluster_edit = QLineEdit()
        self.cluster_edit.setPlaceholderText("this process")
        self.cluster_edit.setToolTip("Where the run works: empty, this process; a number N, N "
                                     "local worker processes; a dask scheduler address "
                                     "(tcp://host:8786), that cluster. With workers the "
                                     "image's blocks run in parallel (raster order; the same "
                                     "results), each worker loads the model once; needs "
                                     "napari-xt[distributed].")
        self.store_edit = QLineEdit()
        self.store_edit.setToolTip("Output OME-Zarr store. Default: beside the image file, "
                                   "or a temporary folder for images without a file, one "
                                   "per model and level.")
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose the output store folder.")
        browse.clicked.connect(self._browse_store)
        store_row = QHBoxLayout()
        store_row.addWidget(self.store_edit)
        store_row.addWidget(browse)
        for label, w in (("image", self.image_combo), ("level", self.level_combo),
                         ("", self.level_note),
                         ("model", self.model_combo), ("device", self.device_combo),
                         ("batch size", self.batch_spin), ("crop stride", self.stride_spin),
                         ("merge crops by", self.blend_combo),
                         ("context", self.context_combo),
                         ("", self.carry_check), ("", self.probs_check),
                         ("detection threshold", self.threshold_spin),
                         ("order", self.order_combo), ("", self.cache_check),
                         ("", self.resume_check), ("workers", self.cluster_edit)):
            form.addRow(label, w)
        form.addRow("output", store_row)
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Start the run in the background; results appear as they "
                                   "are written.")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop at the next region; finished regions stay in the "
                                      "store and a rerun resumes from them.")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.status = status_label("ready", "State of the current or last run.")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(self._on_run_changed)
        self.level_combo.currentIndexChanged.connect(self._on_run_changed)
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)

    # ------------------------------------------------------------------ settings
    def _restore(self) -> None:
        values = {**DEFAULTS, **self.settings.load()}
        for path in values.get("checkpoints") or []:
            if Path(path).is_file():
                self._add_checkpoint_item(path)
        self._select(self.model_combo, values["model"])
        self._select(self.device_combo, values["device"])
        self._select(self.order_combo, values["order"])
        self.batch_spin.setValue(int(values["batch_size"]))
        self.stride_spin.setValue(int(values["crop_stride"]))
        self.cluster_edit.setText(str(values.get("cluster") or ""))
        self._select(self.blend_combo, values["blend"])
        self._select(self.context_combo, values["context"])
        self.carry_check.setChecked(bool(values["carry_state"]))
        self.probs_check.setChecked(bool(values["probabilities"]))
        self.threshold_spin.setValue(float(values["threshold"]))
        self.cache_check.setChecked(bool(values["cache"]))
        self.resume_check.setChecked(True)  # never restored unticked (see DEFAULTS)

    def save_settings(self) -> None:
        items = [self.model_combo.itemText(i) for i in range(self.model_combo.count())]
        self.settings.save({
            "model": self.model_combo.currentText(), "device": self.device_combo.currentText(),
            "order": self.order_combo.currentText(), "batch_size": self.batch_spin.value(),
            "crop_stride": self.stride_spin.value(), "blend": self.blend_combo.currentText(),
            "context": self.context_combo.currentText(),
            "carry_state": self.carry_check.isChecked(),
            "probabilities": self.probs_check.isChecked(),
            "threshold": self.threshold_spin.value(), "cache": self.cache_check.isChecked(),
            "cluster": self.cluster_edit.text().strip(),
            "checkpoints": [t for t in items if t not in (DEMO_MODEL, LOAD_CHECKPOINT)
                            and Path(t).is_file()],
        })

    @staticmethod
    def _select(combo: QComboBox, text: str) -> None:
        i = combo.findText(str(text))
        if i >= 0:
            combo.setCurrentIndex(i)

    # ------------------------------------------------------------------ images and models
    def refresh_images(self, event=None) -> None:
        current = self.image_combo.currentText()
        self._choices = image_choices(self.viewer.layers)
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems([c.label for c in self._choices])
        self._select(self.image_combo, current)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current or not current:
            self._on_image_changed()
        else:
            self.run_button.setEnabled(self.session is None)

    def current_image(self) -> ImageChoice | None:
        i = self.image_combo.currentIndex()
        return self._choices[i] if 0 <= i < len(self._choices) else None

    def select_image(self, label: str) -> None:
        self._select(self.image_combo, label)

    def _on_image_changed(self, index: int | None = None) -> None:
        choice = self.current_image()
        self.level_combo.clear()
        if choice is not None:
            for i, (h, w) in enumerate(choice.level_shapes()):
                self.level_combo.addItem(f"{i}: {w} x {h}")
        self.level_combo.setEnabled(choice is not None and choice.multiscale)
        self._on_run_changed()
        self.run_button.setEnabled(choice is not None and self.session is None)

    def _on_run_changed(self, index: int | None = None) -> None:
        """Image, level or model changed: propose the matching output (unless another one
        was chosen) and say whether the level is coarser than the model was trained on."""
        choice = self.current_image()
        text = self.store_edit.text().strip()
        if not text or text == self._default_store:
            self._default_store = self.default_store(choice)
            self.store_edit.setText(self._default_store)
        note = None
        if choice is not None:
            level = max(0, self.level_combo.currentIndex())
            note = training_note(self.model_combo.currentText(), level,
                                 choice.level_factor(level))
        self.level_note.setText(note or "")
        self.level_note.setVisible(bool(note))

    @property
    def tag(self) -> str:
        """What this run is called in layer names and the default output."""
        return run_tag(self.model_combo.currentText(), max(0, self.level_combo.currentIndex()))

    def default_store(self, choice: ImageChoice | None) -> str:
        """Beside the image file if it has one, else in a temporary folder; one store per
        model and level (`<image>.<tag>.xt.zarr`), so another model's run keeps the first."""
        if choice is None:
            return ""

        def safe(text: str) -> str:
            return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)

        name, tag = safe(choice.layer.name), safe(self.tag)
        path = choice.source_path()
        if path:
            p = Path(path)
            stem = p.name.split(".")[0] or name
            return str(p.parent / f"{stem}.{tag}.xt.zarr")
        return str(Path(tempfile.gettempdir()) / "napari-xt" / f"{name}.{tag}.xt.zarr")

    def _browse_store(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output store folder")
        if folder:
            self.store_edit.setText(str(Path(folder) / Path(self.store_edit.text()).name))

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemText(index) != LOAD_CHECKPOINT:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Load an xT checkpoint", "", CHECKPOINT_FILTER)
        if path:
            self.set_checkpoint(path)
        else:
            self._select(self.model_combo, DEMO_MODEL)

    def _add_checkpoint_item(self, path: str) -> None:
        if self.model_combo.findText(path) < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, path)

    def set_checkpoint(self, path: str) -> None:
        """Use a checkpoint file as the model (what "Load checkpoint…" does after its dialog)."""
        self._add_checkpoint_item(str(path))
        self._select(self.model_combo, str(path))

    def forget_checkpoint(self, path: str) -> None:
        """Take a checkpoint the loader refused out of the model list (and the settings)."""
        i = self.model_combo.findText(str(path))
        if i < 0:
            return
        if self.model_combo.currentIndex() == i:
            self._select(self.model_combo, DEMO_MODEL)
        self.model_combo.removeItem(i)
        self.save_settings()

    # ------------------------------------------------------------------ running
    def request(self) -> RunRequest:
        """The run the controls describe (main thread: reads layers)."""
        choice = self.current_image()
        if choice is None:
            raise ValueError("no image layer to run on")
        model = self.model_combo.currentText()
        if model == LOAD_CHECKPOINT:
            raise ValueError("choose a checkpoint file first")
        level = max(0, self.level_combo.currentIndex())
        array, axes = choice.level_array(level)
        scale, translate = choice.level_transform(level)
        store = self.store_edit.text().strip()
        return RunRequest(
            image=array, axes=axes, level=level, name=choice.layer.name, model=model,
            device=self.device_combo.currentText(), batch_size=self.batch_spin.value(),
            crop_stride=self.stride_spin.value() or None,
            blend=BLENDS[self.blend_combo.currentText()],
            context=CONTEXTS[self.context_combo.currentText()],
            carry_state=self.carry_check.isChecked(), probabilities=self.probs_check.isChecked(),
            threshold=self.threshold_spin.value(),
            order=ORDERS[self.order_combo.currentText()], store=store,
            cache=self.cache_check.isChecked(), resume=self.resume_check.isChecked(),
            scale=scale, translate=translate, channels=choice.channels,
            pyramid=choice.pyramid(), tag=self.tag,
            cluster=parse_cluster(self.cluster_edit.text()),
        )

    def start(self) -> RunSession | None:
        """Start a run with the current controls; returns its session (None if refused)."""
        if self.session is not None:
            return None
        from napari.utils.notifications import show_error

        try:
            request = self.request()
            if not request.store:
                raise ValueError("choose an output store")
        except ValueError as err:
            show_error(f"Run xT: {err}")
            return None
        if not request.resume:
            from dataclasses import replace

            from napari_xt.engine.store import store_kind

            kind = store_kind(request.store)
            if kind in ("store", "legacy"):  # anything else the store refuses by itself
                if not confirm_replace(self, request.store, kind):
                    self.status.setText(f"not started: {request.store} kept as it is")
                    return None
                request = replace(request, replace=True)
        self.save_settings()
        self.session = RunSession(self.viewer, request, on_done=self._on_done,
                                  on_status=self.status.setText)
        self._set_running(True)
        self.session.start()
        return self.session

    def cancel(self) -> None:
        if self.session is not None:
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling at the next region…")
            self.session.cancel()

    def when_done(self, callback) -> None:
        """Call `callback(session)` once, when the current run ends (any outcome), after the
        widget is ready for another run (a callback may start one)."""
        self._when_done.append(callback)

    def _on_done(self, session: RunSession) -> None:
        self.last_session = session
        self.session = None
        self._set_running(False)
        model = session.request.model
        if session.outcome == "failed" and session.model is None and is_checkpoint(model):
            self.forget_checkpoint(model)  # the loader refused it: not offered again
            self.status.setText(f"{self.status.text()} (removed from the model list)")
        callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            callback(session)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running and self.current_image() is not None)
        self.cancel_button.setEnabled(running)
        for w in (self.image_combo, self.level_combo, self.model_combo, self.device_combo,
                  self.batch_spin, self.stride_spin, self.blend_combo, self.context_combo,
                  self.carry_check,
                  self.probs_check,
                  self.threshold_spin, self.order_combo, self.cache_check, self.resume_check,
                  self.store_edit, self.cluster_edit):
            w.setEnabled(not running)
        if not running:
            choice = self.current_image()
            self.level_combo.setEnabled(choice is not None and choice.multiscale)

    @property
    def running(self) -> bool:
        return self.session is not None
