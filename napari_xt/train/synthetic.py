"""A synthetic SAR-like scene whose right answer needs context beyond one region.

Classes (mask values): 0 land, 1 sea, 2 lake. Sea and lake water look identical locally (same
backscatter, same speckle, same coast statistics): water is "sea" when its body touches the
scene border and "lake" when land encloses it. Water bodies smaller than `min_body_px` pixels
are filled with land, so every water body spans several regions and one region alone cannot
tell sea from lake. Layout: in most scenes the sea enters from one random side with a meandering
coast; lakes lie inland, kept `margin_px` from the sea and the border, with shores of the same
meanders. The coast bends on the same length scale as lake shores (`feature_px`) and lakes
hold about as much water as the sea (default `lake_fraction`: 48 % sea / 52 % lake water, and
as many targets on each, over 100 held-out scenes), so neither the shape of a shore nor the
majority class answers the question for one region.

Bright point targets (elongated blobs, identical in look wherever they are) are "vessels"
(target class 1) when they float on sea, and "not vessels" (target class 0: buoys on lakes,
bright structures on land) elsewhere. Only vessels are detection targets; the others are
there so that a detector must know where the sea is.

Laziness: a cheap global layout (the class of every `layout_cell` x `layout_cell` block, plus
smooth texture fields at that resolution) is built once; pixels are rendered per window. Speckle
comes from fixed tiles seeded by (seed, tile row, tile col) and targets from fixed target cells
seeded by (seed, cell row, cell col), so any window of any scene renders the same pixels whatever
the chunking, and a window costs only its own size (plus the layout).

Beacon variant (`beacon=True`), a task whose answer lies far away: no sea enters from a
side; every water body lies inland, and one beacon (a bright `beacon_px` mark on land,
anywhere in the scene) sets the class of all of them: a ring (bright in VV and VH) makes every
water body "sea", a cross (bright in VV only) makes every one "lake". Beacon kind and place are
drawn per scene, each kind with probability 1/2. A region, or a crop, that does not see the
beacon cannot do better than chance on water; only context across the whole image can.

Image layout: (C, H, W) float32 in dB, C = 2 (VV, VH) or 1 (VV). Mask: (H, W) uint8.
Targets: dict of 1-D arrays `y`, `x` (float pixel centre), `cls` (1 vessel, 0 not), `size`
(length in pixels), `angle` (radians).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from napari_xt.model.fields import from_mapping

LAND, SEA, LAKE = 0, 1, 2
CLASS_NAMES = ("land", "sea", "lake")
TARGET_NAMES = ("not_vessel", "vessel")

_LAYOUT, _SPECKLE, _TARGETS, _BEACON = 0, 1, 2, 3  # stream ids mixed into the seeds
RING, CROSS = 1, 0  # beacon kinds: every water body is sea (ring) or lake (cross)


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of a synthetic scene; `seed` picks one scene among infinitely many."""

    height: int = 256
    width: int = 256
    channels: int = 2
    layout_cell: int = 4  # pixels per layout block (coasts are staircases of this step)
    sea_probability: float = 0.85  # chance that the sea enters from one (random) side
    sea_depth_px: tuple[float, float] = (40.0, 120.0)  # how far the sea reaches in, range
    coast_wiggle_px: float = 12.0  # amplitude of the coastline's meanders
    lake_fraction: float = 0.55  # fraction of the inland zone that starts as lake water
    feature_px: float = 20.0  # smoothing length of the lake field and the coast, in pixels
    margin_px: int = 12  # land kept between lakes and the sea or the scene border
    min_body_px: int = 3000  # water bodies smaller than this become land
    looks: float = 4.0  # speckle: multi-look gamma shape
    tile: int = 64  # speckle tile size in pixels
    target_cell: int = 32  # one target cell draws its own targets
    targets_per_cell: float = 0.35  # Poisson rate of candidate targets per target cell
    land_target_keep: float = 0.3  # fraction of candidates kept when they fall on land
    target_length: tuple[float, float] = (4.0, 10.0)  # pixels
    beacon: bool = False  # the beacon variant (see the module docstring)
    beacon_px: int = 40  # size of the beacon mark

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"scene size must be positive, got {self.height} x {self.width}")
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 (VV) or 2 (VV, VH), got {self.channels}")
        if not 0.0 < self.lake_fraction < 1.0 or not 0.0 <= self.sea_probability <= 1.0:
            raise ValueError("lake_fraction must be in (0, 1), sea_probability in [0, 1]")
        if min(self.layout_cell, self.tile, self.target_cell) <= 0:
            raise ValueError("layout_cell, tile and target_cell must be positive")
        if self.beacon and not 8 <= self.beacon_px <= min(self.height, self.width) // 2:
            raise ValueError(f"beacon_px must be in [8, half the scene side], got "
                             f"{self.beacon_px} for a {self.height} x {self.width} scene")

    def to_dict(self) -> dict:
        """The configuration as a dict of its fields (`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SceneConfig:
        """Inverse of `to_dict` (lists become tuples); unknown keys are a ValueError."""
        return from_mapping(cls, data)


def _layout_classes(water: np.ndarray, min_cells: int) -> np.ndarray:
    """water (h, w) bool -> classes (h, w) uint8: land, sea (touches border) or lake."""
    labels, count = ndimage.label(water)  # 4-connectivity, as the pixel grid sees it
    if count == 0:
        return np.zeros(water.shape, np.uint8)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    border = np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    )
    kind = np.full(count + 1, LAKE, np.uint8)
    kind[border] = SEA
    kind[sizes < min_cells] = LAND
    kind[0] = LAND
    return kind[labels]


def _water_layout(rng: np.random.Generator, shape: tuple[int, int], cfg: SceneConfig):
    """(h, w) bool water at layout resolution: a sea entering from one random side with a
    meandering coast (or none), and lakes inland, kept `margin_px` away from sea and border."""
    h, w = shape
    c = cfg.layout_cell
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sea = np.zeros(shape, bool)
    if rng.uniform() < cfg.sea_probability:
        side = int(rng.integers(4))  # 0 top, 1 right, 2 bottom, 3 left
        depth_in = (yy, w - 1 - xx, h - 1 - yy, xx)[side] * c  # pixels from that side
        along = (xx, yy, xx, yy)[side]
        n = int(along.max()) + 1
        profile = ndimage.gaussian_filter1d(rng.standard_normal(n), cfg.feature_px / c,
                                            mode="reflect")
        profile = (profile - profile.min()) / (np.ptp(profile) + 1e-12)
        lo, hi = cfg.sea_depth_px
        depth = lo + (hi - lo) * profile[along.astype(int)]
        wiggle = cfg.coast_wiggle_px * _smooth_noise(rng, shape, 8.0 / c)
        sea = depth_in < depth + wiggle
    else:
        _smooth_noise(rng, shape, 8.0 / c)  # keep the stream aligned whatever the branch
    margin = max(1, int(round(cfg.margin_px / c)))
    to_sea = ndimage.distance_transform_edt(~sea) if sea.any() else np.full(shape, np.inf)
    to_border = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    inland = (to_sea > margin) & (to_border >= margin)
    # the same small-scale meanders as the coast, so lake shores look like sea shores
    field = _smooth_noise(rng, shape, cfg.feature_px / c)
    field = field + 0.25 * _smooth_noise(rng, shape, 8.0 / c)
    lakes = np.zeros(shape, bool)
    if inland.any():
        lakes = inland & (field > np.quantile(field[inland], 1.0 - cfg.lake_fraction))
    return sea | lakes


def _no_sea(cfg: SceneConfig) -> SceneConfig:
    from dataclasses import replace

    return replace(cfg, sea_probability=0.0)


def _place_beacon(rng: np.random.Generator, layout: np.ndarray,
                  cfg: SceneConfig) -> tuple[int, float, float]:
    """(kind, centre y, centre x): a beacon on land, clear of water and of the border."""
    c = cfg.layout_cell
    kind = int(rng.integers(2))
    clear = int(np.ceil((cfg.beacon_px / 2 + cfg.margin_px) / c))
    land = layout == LAND
    away = ndimage.distance_transform_edt(land) > clear  # blocks from any water
    h, w = layout.shape
    inner = np.zeros_like(away)
    inner[clear:h - clear, clear:w - clear] = True
    where = np.argwhere(away & inner)
    if len(where) == 0:  # no land clear enough: the most central land block
        where = np.argwhere(land & inner) if (land & inner).any() else np.array([[h // 2, w // 2]])
    r, col = where[int(rng.integers(len(where)))]
    return kind, (r + 0.5) * c, (col + 0.5) * c


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


class SyntheticScene:
    """One scene: `read(y0, x0, y1, x1) -> (image (C, h, w) dB, mask (h, w))`, `targets(...)`.

    Built lazily: the constructor computes only the layout at `layout_cell` resolution.
    """

    def __init__(self, seed: int, config: SceneConfig | None = None) -> None:
        self.seed = int(seed)
        self.config = cfg = config or SceneConfig()
        c = cfg.layout_cell
        self.layout_shape = (-(-cfg.height // c), -(-cfg.width // c))
        rng = np.random.default_rng([self.seed, _LAYOUT])
        sigma = cfg.feature_px / c
        layout_cfg = cfg if not cfg.beacon else _no_sea(cfg)
        water = _water_layout(rng, self.layout_shape, layout_cfg)
        # the layout block grid may overhang the image; only blocks inside decide connectivity
        # through the border, which is the border of the padded block grid (same thing up to
        # less than one block)
        self.layout = _layout_classes(water, max(1, cfg.min_body_px // (c * c)))
        self.beacon: tuple[int, float, float] | None = None  # (kind, centre y, centre x) px
        if cfg.beacon:
            self.beacon = _place_beacon(np.random.default_rng([self.seed, _BEACON]),
                                        self.layout, cfg)
            water_class = SEA if self.beacon[0] == RING else LAKE
            self.layout = np.where(self.layout != LAND, water_class, LAND).astype(np.uint8)
        # texture fields at layout resolution: land brightness, land patches, water wind
        self._land_db = 2.0 * _smooth_noise(rng, self.layout_shape, 3.0)
        self._patch_db = rng.uniform(-2.5, 2.5, self.layout_shape)
        self._wind_db = 1.5 * _smooth_noise(rng, self.layout_shape, 2.0 * sigma)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the scene in pixels."""
        return self.config.height, self.config.width

    def _check_window(self, y0: int, x0: int, y1: int, x1: int) -> None:
        h, w = self.shape
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"window ({y0}, {x0}, {y1}, {x1}) outside the {h} x {w} scene")

    def mask(self, y0: int = 0, x0: int = 0, y1: int | None = None, x1: int | None = None):
        """Classes (h, w) uint8 of the window (nearest upsampling of the layout)."""
        y1 = self.shape[0] if y1 is None else y1
        x1 = self.shape[1] if x1 is None else x1
        self._check_window(y0, x0, y1, x1)
        c = self.config.layout_cell
        rows = np.arange(y0, y1) // c
        cols = np.arange(x0, x1) // c
        return self.layout[rows[:, None], cols[None, :]]

    def _interp(self, field: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        c = self.config.layout_cell
        yy = (np.arange(y0, y1) + 0.5) / c - 0.5
        xx = (np.arange(x0, x1) + 0.5) / c - 0.5
        coords = np.meshgrid(yy, xx, indexing="ij")
        return ndimage.map_coordinates(field, coords, order=1, mode="nearest")

    def _speckle(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """(C, h, w) multiplicative gamma speckle, tile-seeded so chunking never matters."""
        cfg = self.config
        t = cfg.tile
        out = np.empty((cfg.channels, y1 - y0, x1 - x0), np.float64)
        for ty in range(y0 // t, (y1 - 1) // t + 1):
            for tx in range(x0 // t, (x1 - 1) // t + 1):
                rng = np.random.default_rng([self.seed, _SPECKLE, ty, tx])
                tile = rng.gamma(cfg.looks, 1.0 / cfg.looks, (cfg.channels, t, t))
                ya, yb = max(y0, ty * t), min(y1, ty * t + t)
                xa, xb = max(x0, tx * t), min(x1, tx * t + t)
                out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[
                    :, ya - ty * t : yb - ty * t, xa - tx * t : xb - tx * t
                ]
        return out

    def _cell_targets(self, cy: int, cx: int) -> dict[str, np.ndarray]:
        cfg = self.config
        rng = np.random.default_rng([self.seed, _TARGETS, cy, cx])
        n = rng.poisson(cfg.targets_per_cell)
        y = cy * cfg.target_cell + rng.uniform(0, cfg.target_cell, n)
        x = cx * cfg.target_cell + rng.uniform(0, cfg.target_cell, n)
        size = rng.uniform(*cfg.target_length, n)
        angle = rng.uniform(0, np.pi, n)
        keep_draw = rng.uniform(0, 1, n)
        h, w = self.shape
        inside = (y < h) & (x < w)
        y, x, size, angle, keep_draw = y[inside], x[inside], size[inside], angle[inside], keep_draw[
            inside
        ]
        c = cfg.layout_cell
        where = self.layout[(y // c).astype(int), (x // c).astype(int)]
        keep = (where != LAND) | (keep_draw < cfg.land_target_keep)
        cls = (where == SEA).astype(np.int64)
        return {"y": y[keep], "x": x[keep], "cls": cls[keep], "size": size[keep],
                "angle": angle[keep]}

    def targets(self, y0: int = 0, x0: int = 0, y1: int | None = None, x1: int | None = None,
                margin: float = 0.0) -> dict[str, np.ndarray]:
        """Targets whose centre lies in the window grown by `margin` pixels, scene coordinates."""
        y1 = self.shape[0] if y1 is None else y1
        x1 = self.shape[1] if x1 is None else x1
        self._check_window(y0, x0, y1, x1)
        tc = self.config.target_cell
        parts = [
            self._cell_targets(cy, cx)
            for cy in range(max(0, int((y0 - margin) // tc)), int((y1 - 1 + margin) // tc) + 1)
            for cx in range(max(0, int((x0 - margin) // tc)), int((x1 - 1 + margin) // tc) + 1)
        ]
        keys = ("y", "x", "cls", "size", "angle")
        out = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in keys}
        out["cls"] = out["cls"].astype(np.int64)
        sel = (
            (out["y"] >= y0 - margin) & (out["y"] < y1 + margin)
            & (out["x"] >= x0 - margin) & (out["x"] < x1 + margin)
        )
        return {k: v[sel] for k, v in out.items()}

    def read(self, y0: int = 0, x0: int = 0, y1: int | None = None, x1: int | None = None):
        """Render a window: image (C, h, w) float32 dB and mask (h, w) uint8."""
        y1 = self.shape[0] if y1 is None else y1
        x1 = self.shape[1] if x1 is None else x1
        mask = self.mask(y0, x0, y1, x1)
        land = mask == LAND
        c = self.config.layout_cell
        patches = self._patch_db[
            (np.arange(y0, y1) // c)[:, None], (np.arange(x0, x1) // c)[None, :]
        ]
        land_db = -8.0 + self._interp(self._land_db, y0, x0, y1, x1) + patches
        water_db = -20.0 + self._interp(self._wind_db, y0, x0, y1, x1)
        vv = np.where(land, land_db, water_db)
        vv_lin = 10.0 ** (vv / 10.0)
        vh_lin = 10.0 ** ((vv - np.where(land, 7.0, 9.0)) / 10.0)
        lin = np.stack([vv_lin, vh_lin])[: self.config.channels]
        lin = lin + self._target_intensity(y0, x0, y1, x1)[None] * np.array(
            [1.0, 0.3]
        )[: self.config.channels, None, None]
        if self.beacon is not None:
            lin = lin + self._beacon_intensity(y0, x0, y1, x1)
        image = 10.0 * np.log10(lin * self._speckle(y0, x0, y1, x1) + 1e-6)
        return image.astype(np.float32), mask

    def _beacon_intensity(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """(C, h, w) linear intensity of the beacon in the window (zeros when outside)."""
        kind, cy, cx = self.beacon
        cfg = self.config
        half = cfg.beacon_px / 2
        out = np.zeros((cfg.channels, y1 - y0, x1 - x0))
        ya, yb = max(y0, int(cy - half)), min(y1, int(np.ceil(cy + half)))
        xa, xb = max(x0, int(cx - half)), min(x1, int(np.ceil(cx + half)))
        if ya >= yb or xa >= xb:
            return out
        yy, xx = np.mgrid[ya:yb, xa:xb] + 0.5
        dy, dx = (yy - cy) / half, (xx - cx) / half  # -1 .. 1 over the mark
        if kind == RING:
            r = np.hypot(dy, dx)
            mark = (r > 0.6) & (r < 0.95)
            weights = (1.0, 1.0)
        else:
            mark = ((np.abs(dy) < 0.2) | (np.abs(dx) < 0.2)) & (np.maximum(abs(dy), abs(dx)) < 0.95)
            weights = (1.0, 0.05)
        for ch in range(cfg.channels):
            out[ch, ya - y0:yb - y0, xa - x0:xb - x0] = 2.0 * weights[ch] * mark
        return out

    def _target_intensity(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """(h, w) linear intensity added by the targets (bright elongated blobs)."""
        reach = self.config.target_length[1]
        t = self.targets(y0, x0, y1, x1, margin=reach)
        out = np.zeros((y1 - y0, x1 - x0))
        for y, x, size, angle in zip(t["y"], t["x"], t["size"], t["angle"], strict=True):
            ya, yb = max(y0, int(y - reach)), min(y1, int(y + reach) + 1)
            xa, xb = max(x0, int(x - reach)), min(x1, int(x + reach) + 1)
            if ya >= yb or xa >= xb:
                continue
            yy, xx = np.mgrid[ya:yb, xa:xb] + 0.5
            u = (yy - y) * np.cos(angle) + (xx - x) * np.sin(angle)
            v = -(yy - y) * np.sin(angle) + (xx - x) * np.cos(angle)
            blob = 3.0 * np.exp(-0.5 * ((u / (size / 2.5)) ** 2 + (v / 1.0) ** 2))
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] += blob
        return out


def make_scene(seed: int, config: SceneConfig | None = None):
    """A whole scene at once: (image (C, H, W) float32 dB, mask (H, W) uint8, targets dict)."""
    scene = SyntheticScene(seed, config)
    image, mask = scene.read()
    return image, mask, scene.targets()
