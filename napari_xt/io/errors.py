"""The one error type of the io package.

Every failure to read, interpret or write an image or a result raises `ImageIOError` with a
message that names the path (and, where it applies, the axis, level or chunk at fault).
It subclasses `ValueError` so callers that already catch bad values keep working.
"""

from __future__ import annotations


class ImageIOError(ValueError):
    """An image or result could not be read, interpreted or written."""
