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
