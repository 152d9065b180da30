"""Axis handling: from a file's native axes to one of `YX`, `YXC`, `CYX`.

Files name their axes in many ways (`TCZYX` in OME, `YXS` for interleaved TIFF samples,
`ZYXS` for SVS focal planes, xarray-style dimension names in plain zarr). `select_plane`
squeezes singleton axes, picks the requested T/Z (or other) plane, and refuses anything else
with a message naming the axes and the plane to choose (remedies "axes" and "plane").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dask.array as da

from .errors import ImageIOError

_NAME_TO_AXIS = {
    "y": "Y",
    "x": "X",
    "c": "C",
    "s": "C",
    "channel": "C",
    "channels": "C",
    "band": "C",
    "bands": "C",
    "sample": "C",
    "samples": "C",
    "rgb": "C",
    "t": "T",
    "time": "T",
    "z": "Z",
    "depth": "Z",
}


def axes_from_names(names: Sequence[str | None]) -> str | None:
    """Axis letters from dimension names (`["y", "x", "band"]` -> `"YXC"`), or None."""
    letters = []
    for name in names:
        if name is None:
            return None
        letter = _NAME_TO_AXIS.get(str(name).lower())
        if letter is None:
            return None
        letters.append(letter)
    out = "".join(letters)
    return out if len(set(out)) == len(out) else None


def guess_axes(shape: Sequence[int], where: str) -> str:
    """Axes for a bare array: 2-D is YX; 3-D is YXC when the last axis is 1-4 long (RGB(A)),
    CYX when the first axis is short; anything else must be told (remedy "axes")."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if 1 <= shape[-1] <= 4 and shape[0] > 4:
            return "YXC"
        if shape[0] <= 64 and shape[0] < min(shape[1:]):
            return "CYX"
    raise ImageIOError(f"{where}: cannot tell the axes of an array of shape {shape}",
                       remedy="axes")


def select_plane(
    levels: list[da.Array],
    axes: str,
    plane: Mapping[str, int] | None,
    where: str,
) -> tuple[list[da.Array], str]:
    """Reduce every level to `YX`, `YXC` or `CYX`.

    `axes` are the native letters (`S` = interleaved samples counts as a channel axis);
    axes other than Y, X and the channel axis are removed: indexed at `plane[letter]` when
    given, squeezed when of size 1, refused otherwise.
    """
    axes = axes.upper()
    if len(axes) != levels[0].ndim or len(set(axes)) != len(axes):
        raise ImageIOError(f"{where}: axes {axes!r} do not fit an array of shape {levels[0].shape}")
    if "Y" not in axes or "X" not in axes:
        raise ImageIOError(f"{where}: axes {axes!r} have no Y and X; not a 2-D image")
    chosen = {str(k).upper(): int(v) for k, v in (plane or {}).items()}
    for key in chosen:
        if key not in axes:
            raise ImageIOError(
                f"{where}: plane names axis {key!r}, which the image does not have "
                f"(axes {axes!r}, shape {tuple(levels[0].shape)})"
            )
    shape0 = dict(zip(axes, levels[0].shape))
    channel = _channel_letter(axes, shape0, chosen, where)
    index: list[int | slice] = []
    kept = ""
    unresolved = []
    for letter in axes:
        size = shape0[letter]
        if letter == channel and size == 1 and letter not in chosen:
            index.append(0)
        elif letter in ("Y", "X") or letter == channel:
            if letter in chosen:
                raise ImageIOError(f"{where}: plane cannot select on axis {letter!r}")
            index.append(slice(None))
            kept += "C" if letter == channel else letter
        elif letter in chosen:
            i = chosen[letter]
            if not 0 <= i < size:
                raise ImageIOError(
                    f"{where}: plane {letter.lower()}={i} is out of range; axis {letter} "
                    f"has size {size} (axes {axes!r})"
                )
            index.append(i)
        elif size == 1:
            index.append(0)
        else:
            unresolved.append(f"{letter}={size}")
    if unresolved:
        example = {u.split("=")[0].lower(): 0 for u in unresolved}
        raise ImageIOError(
            f"{where}: image has axes {axes!r} (shape {tuple(levels[0].shape)}) with "
            f"{', '.join(unresolved)}; only Y, X and one channel axis can be used",
            remedy="plane", plane=example)
    out = [lv[tuple(index)] for lv in levels]
    target = ("YXC" if kept.endswith("C") else "CYX") if "C" in kept else "YX"
    if kept != target:
        order = [kept.index(letter) for letter in target]
        out = [lv.transpose(order) for lv in out]
    return out, target


def _channel_letter(axes: str, shape: dict[str, int], chosen: dict[str, int], where: str) -> str:
    """Which native axis becomes C: `C` or `S`; both with size > 1 cannot be shown."""
    has_c = "C" in axes and "C" not in chosen
    has_s = "S" in axes and "S" not in chosen
    if has_c and has_s:
        if shape["S"] == 1:
            return "C"
        if shape["C"] == 1:
            chosen.setdefault("C", 0)
            return "S"
        raise ImageIOError(
            f"{where}: image has both channels (C={shape['C']}) and interleaved samples "
            f"(S={shape['S']}); only one channel axis can be used", remedy="plane",
            plane={"c": 0})
    if has_s:
        return "S"
    if has_c:
        return "C"
    return ""
