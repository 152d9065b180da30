"""Synthetic scenes of any size, generated lazily chunk by chunk.

Every pixel is a pure function of (seed, pyramid level, global pixel coordinates), computed
from integer hashes, so a chunk depends only on the seed and its chunk index: a 100k x 100k
scene costs nothing until a region is read, reading a region computes only the chunks it
covers, and any chunking gives the same values. Each pyramid level is rendered directly at
its own resolution (not downsampled from level 0), so the overview of a huge scene is cheap.

- `slide_scene`: RGB uint8 (Y, X, 3), a whole-slide-like image: tissue blobs with pink
  stroma and purple nuclei-like texture on a near-white background.
- `sar_scene`: float32 (2, Y, X), a SAR-like scene in dB: channels VV and VH, land with
  field texture, darker water with a few bright point targets, single-look speckle.

napari sample-data commands wrap these in `napari_xt._napari_io`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .io.image import MultiscaleImage
from .io.pyramid import pyramid_shapes

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def _hash(seed: int, stream: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A uint64 hash of integer coordinates (a, b) for one (seed, stream)."""
    base = _mix(np.asarray([(seed * 65537 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    a = np.asarray(a, dtype=np.int64).astype(np.uint64)
    b = np.asarray(b, dtype=np.int64).astype(np.uint64)
    return _mix(_mix(a * _GOLD + base) ^ (b * _P2))


def _uniform(seed: int, stream: int, a, b) -> np.ndarray:
    """Uniform floats in (0, 1] from the hash of (a, b)."""
    h = _hash(seed, stream, a, b)
    return ((h >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)


def _value_noise(seed: int, stream: int, y: np.ndarray, x: np.ndarray, cell: float):
    """Smooth noise in [0, 1] at level-0 coordinates y (h,) and x (w,): hashed values on a
    lattice of `cell` pixels, smoothstep-interpolated. Returns (h, w)."""
    fy, fx = y / cell, x / cell
    gy, gx = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    y0, x0 = gy.min(), gx.min()
    lat = _uniform(seed, stream, np.arange(y0, gy.max() + 2)[:, None],
                   np.arange(x0, gx.max() + 2)[None, :])
    ty, tx = fy - gy, fx - gx
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    iy, ix = gy - y0, gx - x0
    top = lat[iy][:, ix] * (1 - tx) + lat[iy][:, ix + 1] * tx
    bottom = lat[iy + 1][:, ix] * (1 - tx) + lat[iy + 1][:, ix + 1] * tx
    return top * (1 - ty[:, None]) + bottom * ty[:, None]


def _fbm(seed: int, stream: int, y, x, cells, weights):
    total = sum(weights)
    out = 0.0
    for i, (cell, w) in enumerate(zip(cells, weights)):
        out = out + w * _value_noise(seed, stream + 16 * i, y, x, cell)
    return out / total


def _coords(level: int, start: int, size: int) -> np.ndarray:
    """Level-0 coordinates of the centres of `size` level pixels from `start`."""
    f = 2.0**level
    return (np.arange(start, start + size, dtype=np.float64) + 0.5) * f - 0.5


def _spots(seed: int, stream: int, y, x, grid: float, prob: float, radius: tuple):
    """Coverage (h, w) in [0, 1] of round spots on a jittered grid: each grid cell holds a
    spot with probability `prob`, centre anywhere in the cell, radius in `radius`."""
    cy, cx = np.floor(y / grid).astype(np.int64), np.floor(x / grid).astype(np.int64)
    ry = np.arange(cy.min() - 1, cy.max() + 2)
    rx = np.arange(cx.min() - 1, cx.max() + 2)
    a, b = ry[:, None], rx[None, :]
    present = _uniform(seed, stream, a, b) < prob
    oy = (a + _uniform(seed, stream + 1, a, b)) * grid
    ox = (b + _uniform(seed, stream + 2, a, b)) * grid
    rad = radius[0] + (radius[1] - radius[0]) * _uniform(seed, stream + 3, a, b)
    cover = np.zeros((len(y), len(x)))
    iy0, ix0 = cy - ry[0], cx - rx[0]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            iy, ix = iy0 + dy, ix0 + dx
            d2 = (y[:, None] - oy[iy][:, ix]) ** 2 + (x[None, :] - ox[iy][:, ix]) ** 2
            r = rad[iy][:, ix]
            inside = np.clip(r + 0.5 - np.sqrt(d2), 0.0, 1.0) * present[iy][:, ix]
            cover = np.maximum(cover, inside)
    return cover


# ------------------------------------------------------------------------------- slide
#: From this downsampling factor on, nuclei are drawn as their mean coverage.
NUCLEI_SUBPIXEL = 8


def render_slide_chunk(seed: int, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The (h, w, 3) uint8 block of the slide scene at `level` starting at (y0, x0)."""
    y, x = _coords(level, y0, h), _coords(level, x0, w)
    f32 = np.float32
    shape = _fbm(seed, 0, y, x, (6000.0, 1500.0, 380.0), (0.6, 0.3, 0.1))
    tissue = np.clip((shape - 0.5) / 0.04, 0.0, 1.0).astype(f32)
    stain = _fbm(seed, 100, y, x, (700.0, 90.0), (0.7, 0.3)).astype(f32)
    if 2**level < NUCLEI_SUBPIXEL:
        nuclei = _spots(seed, 200, y, x, 22.0, 0.55, (3.0, 6.5)).astype(f32) * tissue
    else:  # nuclei smaller than a pixel: their mean coverage (0.55 * pi * 4.9^2 / 22^2)
        nuclei = f32(0.086) * tissue
    grain = (_uniform(seed, 300 + level, np.arange(y0, y0 + h)[:, None],
                      np.arange(x0, x0 + w)[None, :]) - 0.5).astype(f32)
    background = np.array([243.0, 241.0, 246.0], f32)
    light, dark = np.array([236.0, 170.0, 206.0], f32), np.array([196.0, 110.0, 164.0], f32)
    nucleus = np.array([86.0, 52.0, 142.0], f32)
    t = tissue[..., None]
    rgb = background + (light - background) * t + (dark - light) * (stain[..., None] * t)
    rgb += (nucleus - rgb) * (f32(0.9) * nuclei[..., None])
    rgb += f32(10.0) * grain[..., None] * (f32(0.4) + t)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _slide_block(seed: int, level: int, chunk: int, block_id=None, block_info=None):
    (iy, ix, _), (h, w, _) = block_id, block_info[None]["chunk-shape"]
    return render_slide_chunk(seed, level, iy * chunk, ix * chunk, h, w)


def slide_scene(
    height: int = 32768,
    width: int = 32768,
    *,
    seed: int = 0,
    chunk: int = 1024,
    min_size: int = 1024,
    pixel_size: float = 0.5,
) -> MultiscaleImage:
    """A lazily generated whole-slide-like RGB scene (Y, X, 3) uint8 with a pyramid."""
    levels = [
        da.map_blocks(
            _slide_block, seed, i, chunk, dtype=np.uint8,
            chunks=(_split(h, chunk), _split(w, chunk), (3,)),
            meta=np.empty((0, 0, 0), np.uint8), name=f"xt-slide-{seed}-{i}-{h}x{w}-{chunk}",
        )
        for i, (h, w) in enumerate(pyramid_shapes(height, width, min_size=min_size))
    ]
    return MultiscaleImage(
        levels, "YXC", np.uint8, channel_names=("R", "G", "B"),
        pixel_size=(pixel_size, pixel_size), unit="micrometer",
        contrast_limits=((0, 255),), source=f"synthetic slide {height}x{width} seed {seed}",
    )


# ------------------------------------------------------------------------------- SAR
def render_sar_chunk(seed: int, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The (2, h, w) float32 dB block (VV, VH) of the SAR scene at `level` from (y0, x0)."""
    y, x = _coords(level, y0, h), _coords(level, x0, w)
    land = (_fbm(seed, 0, y, x, (5000.0, 1200.0, 250.0), (0.6, 0.3, 0.1)) > 0.47).astype(float)
    fields = _fbm(seed, 100, y, x, (160.0, 40.0), (0.7, 0.3)) - 0.5
    wind = _value_noise(seed, 150, y, x, 900.0) - 0.5
    targets = _spots(seed, 200, y, x, 300.0, 0.03, (2.0, 4.0)) * (1.0 - land)
    vv = land * (-8.0 + 6.0 * fields) + (1 - land) * (-20.0 + 3.0 * wind) + 28.0 * targets
    vh = land * (-15.0 + 5.0 * fields) + (1 - land) * (-27.0 + 2.0 * wind) + 22.0 * targets
    gy, gx = np.arange(y0, y0 + h)[:, None], np.arange(x0, x0 + w)[None, :]
    out = np.empty((2, h, w), dtype=np.float32)
    for c, mean_db in enumerate((vv, vh)):
        speckle = -np.log(_uniform(seed, 400 + 8 * level + c, gy, gx))  # exponential, mean 1
        intensity = 10.0 ** (mean_db / 10.0) * np.maximum(speckle, 1e-6)
        out[c] = 10.0 * np.log10(intensity)
    return out


def _sar_block(seed: int, level: int, chunk: int, block_id=None, block_info=None):
    (_, iy, ix), (_, h, w) = block_id, block_info[None]["chunk-shape"]
    return render_sar_chunk(seed, level, iy * chunk, ix * chunk, h, w)


def sar_scene(
    height: int = 16384,
    width: int = 16384,
    *,
    seed: int = 0,
    chunk: int = 1024,
    min_size: int = 1024,
    pixel_size: float = 10.0,
) -> MultiscaleImage:
    """A lazily generated SAR-like scene (2, Y, X) float32 in dB (VV, VH) with a pyramid."""
    levels = [
        da.map_blocks(
            _sar_block, seed, i, chunk, dtype=np.float32,
            chunks=((2,), _split(h, chunk), _split(w, chunk)),
            meta=np.empty((0, 0, 0), np.float32), name=f"xt-sar-{seed}-{i}-{h}x{w}-{chunk}",
        )
        for i, (h, w) in enumerate(pyramid_shapes(height, width, min_size=min_size))
    ]
    return MultiscaleImage(
        levels, "CYX", np.float32, channel_names=("VV", "VH"), channel_colors=("FFFFFF",) * 2,
        pixel_size=(pixel_size, pixel_size), unit="meter",
        contrast_limits=((-25.0, 5.0), (-32.0, -5.0)),
        source=f"synthetic SAR {height}x{width} seed {seed}",
    )


def _split(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())
