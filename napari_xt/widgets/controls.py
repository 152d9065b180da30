"""Small Qt building blocks shared by the napari-xt widgets."""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QSizePolicy


def status_label(text: str, tooltip: str) -> QLabel:
    """A wrapping status line that long texts (paths, messages) clip instead of widening
    the dock and shrinking the canvas."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
    label.setMinimumWidth(50)
    label.setToolTip(tooltip)
    return label


class WorkerPanel:
    """Mixin of the dock widgets that run one napari thread worker at a time (in
    `self.worker`) and can pick a place on the canvas by clicking it. The widget defines
    `TITLE`, `status` (a label), `_set_busy(busy)`, `_worker_done()` and `_picked(world)`."""

    TITLE = "napari-xt"

    def _start_worker(self) -> None:
        self._set_busy(True)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _on_error(self, err) -> None:
        from napari.utils.notifications import show_error

        show_error(f"{self.TITLE}: {err}")
        self.status.setText(f"failed: {err}")

    def _on_finished(self) -> None:
        self._worker_done()
        self.worker = None
        self._set_busy(False)

    def _toggle_pick(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def _on_click(self, viewer, event) -> None:
        if event.type == "mouse_press":
            self._picked(event.position)
