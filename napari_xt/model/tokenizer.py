"""Nested tokenization: an image of any size -> regions -> (optionally) sub-regions.

The image is never resized. Its right and bottom edges are zero-padded up to a whole number of
regions and a validity mask records which pixels are real. Regions are square, `S x S`, and are
laid out on a `rows x cols` grid; a scan order says in which sequence the regions are visited:

- ``raster``: row by row, left to right.
- ``zigzag`` (boustrophedon): even rows left to right, odd rows right to left, so consecutive
  regions in the sequence are always neighbours in the image.

With ``sub_region_size`` set, every region is split once more into ``(S / s)**2`` sub-regions
of ``s x s`` pixels (raster order inside the region): the second nesting level.

Layouts: images ``(B, C, H, W)``; regions ``(B, R, C, S, S)``; sub-regions
``(B, R, P, C, s, s)`` with ``P = (S // s) ** 2``; masks use ``C = 1`` and dtype bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SCAN_ORDERS = ("raster", "zigzag")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def _check_order(order: str) -> str:
    if order not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {order!r}; expected one of {SCAN_ORDERS}")
    return order


@dataclass(frozen=True)
class TokenizerConfig:
    """How an image is cut into regions (and sub-regions) and in which order they are visited."""

    region_size: int = 256
    sub_region_size: int | None = None
    order: str = "raster"

    def __post_init__(self) -> None:
        _check_positive_int("region_size", self.region_size)
        _check_order(self.order)
        if self.sub_region_size is not None:
            sub = _check_positive_int("sub_region_size", self.sub_region_size)
            if sub > self.region_size or self.region_size % sub != 0:
                raise ValueError(
                    f"sub_region_size ({sub}) must divide region_size ({self.region_size})"
                )


@dataclass(frozen=True)
class RegionGrid:
    """The grid of `region_size` squares covering a `height x width` image (padded right/bottom)."""

    height: int
    width: int
    region_size: int

    def __post_init__(self) -> None:
        _check_positive_int("height", self.height)
        _check_positive_int("width", self.width)
        _check_positive_int("region_size", self.region_size)

    @property
    def rows(self) -> int:
        """Number of region rows, `ceil(height / region_size)`."""
        return -(-self.height // self.region_size)

    @property
    def cols(self) -> int:
        """Number of region columns, `ceil(width / region_size)`."""
        return -(-self.width // self.region_size)

    @property
    def padded_height(self) -> int:
        """Height in pixels of the grid, `rows * region_size` (>= `height`)."""
        return self.rows * self.region_size

    @property
    def padded_width(self) -> int:
        """Width in pixels of the grid, `cols * region_size` (>= `width`)."""
        return self.cols * self.region_size

    @property
    def num_regions(self) -> int:
        """Number of regions, `rows * cols`."""
        return self.rows * self.cols

    def _check_cell(self, row: int, col: int) -> None:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"region ({row}, {col}) outside the {self.rows} x {self.cols} grid")

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Image pixels `(y0, x0, y1, x1)` (end exclusive) of region `(row, col)`, clipped."""
        self._check_cell(row, col)
        s = self.region_size
        y0, x0 = row * s, col * s
        return y0, x0, min(y0 + s, self.height), min(x0 + s, self.width)

    def index(self, row: int, col: int) -> int:
        """Raster index of region `(row, col)`: its position in `split_regions` output."""
        self._check_cell(row, col)
        return row * self.cols + col

    def order(self, kind: str = "raster") -> np.ndarray:
        """Region visiting order: int64 array (R, 2) of (row, col)."""
        _check_order(kind)
        rr, cc = np.meshgrid(
            np.arange(self.rows, dtype=np.int64), np.arange(self.cols, dtype=np.int64),
            indexing="ij",
        )
        if kind == "zigzag":
            cc[1::2] = cc[1::2, ::-1]
        return np.stack([rr.ravel(), cc.ravel()], axis=1)

    def order_indices(self, kind: str = "raster") -> np.ndarray:
        """Raster indices (R,) of the regions in visiting order `kind`."""
        rc = self.order(kind)
        return rc[:, 0] * self.cols + rc[:, 1]

    def valid_mask(self) -> np.ndarray:
        """Bool (padded_height, padded_width): True on real image pixels, False on padding."""
        mask = np.zeros((self.padded_height, self.padded_width), dtype=bool)
        mask[: self.height, : self.width] = True
        return mask

    def valid_fraction(self) -> np.ndarray:
        """Float64 (rows, cols): fraction of each region covered by real pixels."""
        s = self.region_size
        h = np.minimum(self.height - np.arange(self.rows) * s, s) / s
        w = np.minimum(self.width - np.arange(self.cols) * s, s) / s
        return np.outer(h, w)


def _as_image(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a tensor (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"image has a zero-sized dimension: shape {tuple(x.shape)}")
    return x


def _to_cells(x: torch.Tensor, rows: int, cols: int, s: int) -> torch.Tensor:
    # (B, C, rows*s, cols*s) -> (B, rows*cols, C, s, s), raster order
    b, c = x.shape[:2]
    x = x.reshape(b, c, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, rows * cols, c, s, s)


def _from_cells(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # (B, rows*cols, C, s, s) raster order -> (B, C, rows*s, cols*s)
    b, r, c, s, s2 = x.shape
    x = x.reshape(b, rows, cols, c, s, s2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * s, cols * s2)


def split_regions(
    x: torch.Tensor, region_size: int, order: str = "raster"
) -> tuple[torch.Tensor, torch.Tensor, RegionGrid]:
    """Cut an image into square regions.

    x: (B, C, H, W), any H, W and channel count.
    Returns regions (B, R, C, S, S) (zero-padded right/bottom), valid (B, R, 1, S, S) bool
    (an expanded view: do not write into it) and the `RegionGrid`. Regions come in raster order
    unless `order` names another scan order (see `RegionGrid.order`).
    """
    x = _as_image(x)
    region_size = _check_positive_int("region_size", region_size)
    _check_order(order)
    b, _, h, w = x.shape
    grid = RegionGrid(h, w, region_size)
    padded = F.pad(x, (0, grid.padded_width - w, 0, grid.padded_height - h))
    regions = _to_cells(padded, grid.rows, grid.cols, region_size)
    mask = torch.from_numpy(grid.valid_mask()).to(x.device)[None, None]
    valid = _to_cells(mask, grid.rows, grid.cols, region_size)
    if order != "raster":
        idx = torch.from_numpy(grid.order_indices(order)).to(x.device)
        regions, valid = regions[:, idx], valid[:, idx]
    return regions, valid.expand(b, -1, -1, -1, -1), grid


def merge_regions(
    regions: torch.Tensor, rows: int, cols: int, order: str = "raster"
) -> torch.Tensor:
    """Stitch regions back into an image: (B, R, C, s, s) -> (B, C, rows*s, cols*s).

    `s` may differ from the region size (e.g. a stride-32 feature map per region). The result
    keeps the padding; crop with `[..., :H, :W]` (in units of the map) to get the image back.
    """
    rows = _check_positive_int("rows", rows)
    cols = _check_positive_int("cols", cols)
    _check_order(order)
    if regions.ndim != 5:
        raise ValueError(f"expected regions (B, R, C, s, s), got shape {tuple(regions.shape)}")
    if regions.shape[1] != rows * cols:
        raise ValueError(
            f"{regions.shape[1]} regions cannot fill a {rows} x {cols} grid ({rows * cols})"
        )
    if order != "raster":
        grid = RegionGrid(rows, cols, 1)
        inverse = np.argsort(grid.order_indices(order))
        regions = regions[:, torch.from_numpy(inverse).to(regions.device)]
    return _from_cells(regions, rows, cols)


def split_subregions(regions: torch.Tensor, sub_region_size: int) -> torch.Tensor:
    """Second nesting level: (B, R, C, S, S) -> (B, R, P, C, s, s), P = (S // s)**2.

    Sub-regions are in raster order inside each region.
    """
    sub = _check_positive_int("sub_region_size", sub_region_size)
    if regions.ndim != 5 or regions.shape[-1] != regions.shape[-2]:
        raise ValueError(f"expected regions (B, R, C, S, S), got shape {tuple(regions.shape)}")
    b, r, c, s, _ = regions.shape
    if s % sub != 0:
        raise ValueError(f"sub_region_size ({sub}) must divide region_size ({s})")
    k = s // sub
    cells = _to_cells(regions.reshape(b * r, c, s, s), k, k, sub)  # (B*R, P, C, s, s)
    return cells.reshape(b, r, k * k, c, sub, sub)


def merge_subregions(subregions: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_subregions`: (B, R, P, C, s, s) -> (B, R, C, S, S)."""
    if subregions.ndim != 6:
        raise ValueError(
            f"expected sub-regions (B, R, P, C, s, s), got shape {tuple(subregions.shape)}"
        )
    b, r, p, c, s1, s2 = subregions.shape
    k = int(round(p**0.5))
    if k * k != p:
        raise ValueError(f"{p} sub-regions per region is not a square number")
    out = _from_cells(subregions.reshape(b * r, p, c, s1, s2), k, k)
    return out.reshape(b, r, c, k * s1, k * s2)


@dataclass(frozen=True)
class TokenizedImage:
    """An image cut by `tokenize`.

    regions: (B, R, C, S, S), or (B, R, P, C, s, s) when nested; R in `order` sequence.
    valid:   same layout with C = 1, bool.
    order:   int64 (R, 2) of (row, col) of each region in sequence order.
    """

    regions: torch.Tensor
    valid: torch.Tensor
    grid: RegionGrid
    config: TokenizerConfig
    order: np.ndarray = field(repr=False)

    @property
    def nested(self) -> bool:
        """Whether the regions are cut into sub-regions (`config.sub_region_size` set)."""
        return self.config.sub_region_size is not None


def tokenize(x: torch.Tensor, config: TokenizerConfig) -> TokenizedImage:
    """Cut x (B, C, H, W) into regions (and sub-regions) as `config` says."""
    regions, valid, grid = split_regions(x, config.region_size, config.order)
    if config.sub_region_size is not None:
        regions = split_subregions(regions, config.sub_region_size)
        valid = split_subregions(valid, config.sub_region_size)
    return TokenizedImage(regions, valid, grid, config, grid.order(config.order))


def untokenize(tokens: TokenizedImage) -> torch.Tensor:
    """Inverse of `tokenize`: back to the image (B, C, H, W), padding cropped."""
    regions = tokens.regions
    if tokens.nested:
        regions = merge_subregions(regions)
    grid = tokens.grid
    image = merge_regions(regions, grid.rows, grid.cols, tokens.config.order)
    return image[..., : grid.height, : grid.width]
