"""The one error type of the io package.

Every failure to read, interpret or write an image or a result raises `ImageIOError` with a
message that names the path (and, where it applies, the axis, level or chunk at fault).
It subclasses `ValueError` so callers that already catch bad values keep working.

An error the user can lift by choosing something (the axes of a bare array, a plane, a TIFF
series, replacing an output) names its `remedy` as a key with `values`; the message ends
with the remedy in Python words (`PYTHON_REMEDIES`), and the command line and the widgets
spell the same key in their own words (`napari_xt.engine.spelling`). `problem` is the
message without the remedy.
"""

from __future__ import annotations

from typing import Any

PYTHON_REMEDIES = {
    "axes": "pass axes= (e.g. axes='YX', 'YXC', 'CYX' or 'TCZYX' with plane={{'t': 0, "
            "'z': 0}})",
    "plane": "choose a plane, e.g. plane={plane}",
    "series": "choose one with series=N (open_image, or an ImagePath for the engine)",
    "overwrite_it": "pass overwrite=True to replace it",
    "accept_range": "pass accept=True to run on these values as they are",
}


def python_value(value: Any) -> str:
    """A remedy value as Python source: mappings as dicts, the rest as they print."""
    return repr(dict(value)) if isinstance(value, dict) else str(value)


class ImageIOError(ValueError):
    """An image or result could not be read, interpreted or written."""

    def __init__(self, message: str, *, remedy: str | None = None, **values: Any) -> None:
        self.problem, self.remedy, self.values = message, remedy, values
        if remedy is not None:
            text = PYTHON_REMEDIES[remedy].format(
                **{k: python_value(v) for k, v in values.items()})
            message = f"{message}; {text}"
        super().__init__(message)
