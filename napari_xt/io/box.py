"""`Box`: a rectangle of pixels, the one box convention of napari-xt.

A box is (y0, x0, y1, x1): the top-left corner, then the bottom-right one, ends exclusive,
so it covers rows y0:y1 and columns x0:x1. Engine regions, write blocks, correction windows
and exported training pairs all use it. Being a tuple, a box unpacks as
``y0, x0, y1, x1 = box`` and equals the plain tuple of the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Box(NamedTuple):
    """Rows y0:y1 and columns x0:x1 of an image (ends exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @classmethod
    def of(cls, value: Box | Sequence[int]) -> Box:
        """`value` as a Box: a Box, or any 4 numbers in (y0, x0, y1, x1) order."""
        if isinstance(value, Box):
            return value
        y0, x0, y1, x1 = (int(v) for v in value)
        return cls(y0, x0, y1, x1)

    @property
    def height(self) -> int:
        """Number of rows, `y1 - y0`."""
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        """Number of columns, `x1 - x0`."""
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), the shape of ``array[box.slices]``."""
        return self.height, self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices: ``array[box.slices]`` for (Y, X) arrays,
        ``array[..., *box.slices]`` for (..., Y, X)."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)
