"""What a model assumes about pixel values, checked on a sample of the image.

A model trained with an input normalization (per channel `(x - mean) / std`, recorded in
its checkpoint) saw values around `mean`, most within a few `std`. An image in other units
(uint8 or uint16 counts for a model trained on dB, say) goes through the same normalization
without complaint and gives wrong answers. `check_value_range` samples the image (a 3 x 3 grid of
patches of the level that will be predicted) and refuses, naming the remedy
"accept_range", when

- more than `FAR_SHARE` of the sampled values of a channel lie over `FAR_STD` std from that
  channel's training mean, or
- the image is unsigned integer while the model's training values of a channel were mostly
  negative (mean + 2 std < 0), which such an image cannot hold, or
- no sampled value of a channel is finite (all NaN or inf: such pixels are read as missing,
  so the run would predict from nothing), with or without a recorded normalization.

Nothing is rescaled: the values go to the model as they are (normalized as it was trained),
or, with `accept=True`, as they are anyway. A model without a recorded normalization takes
raw values; nothing is assumed then, and the sentence returned says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ImageIOError

FAR_STD = 6.0
FAR_SHARE = 0.5
GRID = 3  # patches a side
PATCH = 128  # pixels a side of a patch


def sample_values(source: Any, grid: int = GRID, patch: int = PATCH) -> np.ndarray:
    """(C, N) float64 finite-or-not values of `grid x grid` patches spread over an
    `ImageSource` (its level), read in the source's dtype."""
    h, w = source.height, source.width
    ph, pw = min(patch, h), min(patch, w)
    ys = np.unique(np.linspace(0, h - ph, grid).round().astype(int))
    xs = np.unique(np.linspace(0, w - pw, grid).round().astype(int))
    parts = [np.asarray(source.read_box(int(y), int(x), int(y) + ph, int(x) + pw))
             .reshape(source.channels, -1) for y in ys for x in xs]
    return np.concatenate(parts, axis=1).astype(np.float64)


def _ranges(values: np.ndarray) -> list[tuple[float, float]]:
    out = []
    for channel in values:
        finite = channel[np.isfinite(channel)]
        out.append((float(finite.min()), float(finite.max())) if finite.size else
                   (float("nan"), float("nan")))
    return out


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def check_value_range(source: Any, normalize: tuple[Sequence[float], Sequence[float]] | None,
                      accept: bool = False, where: str | None = None) -> str:
    """One sentence saying what is assumed about the values of `source` (an `ImageSource`)
    for a model trained with `normalize` ((mean, std) per channel, or None: raw values).
    Raises `ImageIOError` (remedy "accept_range") when the sample clearly does not match the
    training values, unless `accept`."""
    where = where or getattr(source, "path", None) or "the image"
    values = sample_values(source)
    ranges = _ranges(values)
    seen = "[" + ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in ranges) + "]"
    dtype = np.dtype(source.dtype)
    empty = [c for c in range(values.shape[0]) if not np.isfinite(values[c]).any()]
    missing = (f"no sampled value of channel{'s' * (len(empty) > 1)} "
               f"{', '.join(map(str, empty))} is finite (NaN or inf are read as missing "
               "pixels)") if empty else None
    if normalize is None:
        if missing and not accept:
            raise ImageIOError(f"{where}: its values ({dtype}, sampled {seen}) cannot be "
                               f"predicted from: {missing}", remedy="accept_range")
        return (f"input values: {dtype}, sampled {seen}; the model records no input "
                "normalization, so they go in unchanged")
    channels = values.shape[0]
    mean = np.resize(np.asarray(normalize[0], np.float64), channels)
    std = np.resize(np.asarray(normalize[1], np.float64), channels)
    trained = ", ".join(f"{m:.4g} +/- {s:.4g}" for m, s in zip(mean, std))
    reasons = [missing] if missing else []
    with np.errstate(invalid="ignore"):
        z = np.abs((values - mean[:, None]) / std[:, None])
    finite = np.isfinite(z)
    far = {c: float((z[c][finite[c]] > FAR_STD).mean()) for c in range(channels)
           if finite[c].any()}
    far = {c: f for c, f in far.items() if f > FAR_SHARE}
    if far:
        reasons.append(f"most sampled values lie over {FAR_STD:g} std from the training mean ("
                       + ", ".join(f"channel {c}: {f:.0%}" for c, f in far.items()) + ")")
    if dtype.kind == "u" and np.any(mean + 2 * std < 0):
        reasons.append(f"a {dtype} image cannot hold the mostly negative values it was "
                       "trained on")
    if reasons and not accept:
        raise ImageIOError(
            f"{where}: its values ({dtype}, sampled {seen}) are not what the model was "
            f"trained on (about {trained} per channel): {'; '.join(reasons)}; convert the "
            "image to the units of the training data", remedy="accept_range")
    accepted = " (accepted although they do not match)" if reasons else ""
    return (f"input values: {dtype}, sampled {seen}; normalized as the model was trained: "
            f"(x - [{_numbers(mean)}]) / [{_numbers(std)}]{accepted}")
