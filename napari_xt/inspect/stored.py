"""Contribution maps of a run reopened from its result store, and pictures of them.

`inspect_store(store, image, model, region, method)` checks that `model` is the model the
run used (its hash) and `image` the image it read (shape, dtype, content fingerprint), then
computes the map with the run's own level, normalisation, crop size and stride (all read
from the store's run signature). `render_map(cm)` draws a map as an RGB picture (a magma-like
ramp, the region outlined in cyan, the crops it saw in white); `save_map` writes .png, .npy
or .json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .contributions import ContributionMap, contribution_map


class InspectError(ValueError):
    """The store, image or model cannot be inspected together (one line, for the user)."""


def run_settings(store: str | os.PathLike) -> dict[str, Any]:
    """What the run that wrote `store` used: level, normalisation, crop size and stride,
    region size, model hash, image identity."""
    from napari_xt.engine.store import open_result

    try:
        reader = open_result(store)
    except Exception as err:  # noqa: BLE001 - any unreadable store is one message
        raise InspectError(f"{store}: not a napari-xt result store") from err
    sig = reader.signature
    if not sig:
        raise InspectError(f"{store}: the store records no run to inspect")
    missing = [k for k in ("region_size", "crop_regions", "crop_stride", "normalize", "image")
               if k not in sig or (sig[k] is None and k != "normalize")]
    if missing:
        raise InspectError(f"{store}: the store does not record its run's "
                           f"{', '.join(missing)} (an older napari-xt?); run predict again "
                           "to inspect it")
    image = dict(sig.get("image", {}))
    norm = sig.get("normalize")
    return {"level": int(image.get("level", 0) or 0), "image": image,
            "normalize": None if norm is None else (tuple(norm[0]), tuple(norm[1])),
            "crop_regions": int(sig["crop_regions"]), "name": sig.get("name", "prediction"),
            "crop_stride": int(sig["crop_stride"]), "region_size": int(sig["region_size"]),
            "model_hash": sig.get("model_hash"), "model": sig.get("model"),
            "context": sig.get("context", "crop"), "grid": reader.grid,
            "carry_state": bool(sig.get("carry_state", False))}


def open_run(store: str | os.PathLike, image: Any, model: Any, *, axes: str | None = None,
             check: bool = True) -> tuple[dict[str, Any], Any]:
    """(run settings, `ImageSource` of `image` as the run read it) after checking that
    `model` and `image` are those of the run of `store` (an `InspectError` otherwise)."""
    from napari_xt.io.source import ImageSource
    from napari_xt.model.checkpoint import model_hash

    run = run_settings(store)
    if run["carry_state"]:
        raise InspectError("the run carried the context state from crop to crop; "
                           "contribution maps follow single crops (rerun without it)")
    if check and run["model_hash"] and model_hash(model) != run["model_hash"]:
        raise InspectError(f"the model is not the one the run used ({run['model']!r}, by its "
                           "weights); pass that model with --model")
    try:
        source = ImageSource(image, level=run["level"], axes=axes, normalize=run["normalize"])
    except (ValueError, OSError) as err:
        raise InspectError(f"cannot read the image: {err}") from err
    if check and run["image"]:
        mine = source.identity()
        differs = [k for k in ("shape", "dtype", "fingerprint") if k in run["image"]
                   and json.dumps(run["image"][k]) != json.dumps(mine[k])]
        if differs:
            raise InspectError(f"the image differs from the one the run read (in: "
                               f"{', '.join(differs)}); pass the image the run was made on")
    if model.cfg.region.region_size != run["region_size"] and \
            model.cfg.tokenizer.region_size != run["region_size"]:
        raise InspectError(f"the model's regions ({model.cfg.tokenizer.region_size} px) are "
                           f"not the run's ({run['region_size']} px)")
    return run, source


def inspect_store(store: str | os.PathLike, image: Any, model: Any, region: tuple[int, int],
                  method: str = "occlusion", *, axes: str | None = None, check: bool = True,
                  **kw: Any) -> ContributionMap:
    """The contribution map of `region` in the run of `store` (see the module docstring);
    `kw` go to `contribution_map` (layer, head, pixel, output)."""
    run, source = open_run(store, image, model, axes=axes, check=check)
    try:
        return contribution_map(model, source, region, method,
                                crop_regions=run["crop_regions"], stride=run["crop_stride"],
                                **kw)
    except ValueError as err:
        raise InspectError(str(err)) from err


# ---------------------------------------------------------------------- pictures
_RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
                 np.float32)  # dark to bright (magma-like anchors)


def ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 (..., 3) along the ramp; NaN -> grey."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(v.astype(np.int64), len(_RAMP) - 2)
    t = (v - i)[..., None]
    rgb = _RAMP[i] * (1 - t) + _RAMP[i + 1] * t
    rgb[np.isnan(values)] = 96.0
    return np.rint(rgb).astype(np.uint8)


def render_map(cm: ContributionMap, cell: int | None = None) -> np.ndarray:
    """(rows * cell, cols * cell, 3) uint8: the shares scaled to the largest one, the region
    outlined in cyan, each crop it saw outlined in white (`cell`: pixels a region, default
    about 512 px for the grid's longer side)."""
    v = cm.values
    cell = cell or max(4, 512 // max(v.shape))
    top = np.nanmax(v) if np.isfinite(v).any() else 1.0
    rgb = ramp(v / (top if top > 0 else 1.0))
    img = np.repeat(np.repeat(rgb, cell, 0), cell, 1)

    def outline(r0, c0, rows, cols, colour, width):
        y0, x0, y1, x1 = r0 * cell, c0 * cell, (r0 + rows) * cell, (c0 + cols) * cell
        img[y0:y0 + width, x0:x1] = colour
        img[y1 - width:y1, x0:x1] = colour
        img[y0:y1, x0:x0 + width] = colour
        img[y0:y1, x1 - width:x1] = colour

    for span in cm.spans:
        outline(*span, (255, 255, 255), 1)
    outline(cm.region[0], cm.region[1], 1, 1, (0, 255, 255), max(1, cell // 6))
    return img


def check_out(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where `save_map` may write: a .png, .npy or .json file in an existing folder, not an
    existing file unless `overwrite` (an `InspectError` naming the CLI flag otherwise)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".npy", ".json"):
        raise InspectError(f"--out {path}: give a .png, .npy or .json file")
    if not path.parent.is_dir():
        raise InspectError(f"--out {path}: the folder {path.parent} does not exist")
    if path.exists() and (path.is_dir() or not overwrite):
        raise InspectError(f"--out {path} exists; pass --overwrite to replace it"
                           if not path.is_dir() else f"--out {path} is a folder")
    return path


def save_map(cm: ContributionMap, path: str | os.PathLike) -> Path:
    """Write the map: .png (the picture), .npy (the (rows, cols) shares), .json (all)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        return _save(cm, path, suffix)
    except OSError as err:
        raise InspectError(f"--out {path}: cannot write it: {err}") from err


def _save(cm: ContributionMap, path: Path, suffix: str) -> Path:
    if suffix == ".png":
        from napari_xt.io.png import write_png

        return write_png(path, render_map(cm))
    if suffix == ".npy":
        np.save(path, cm.values)
        return path
    if suffix == ".json":
        doc = {"region": list(cm.region), "method": cm.method, "layer": cm.layer,
               "head": cm.head, "pixel": None if cm.pixel is None else list(cm.pixel),
               "self_share": cm.self_share, "spans": [list(s) for s in cm.spans],
               "weights": list(cm.weights), "seconds": cm.seconds, "note": cm.note,
               "top": [[list(rc), share] for rc, share in cm.top(10)],
               "values": [[None if not np.isfinite(x) else float(x) for x in row]
                          for row in cm.values]}
        path.write_text(json.dumps(doc, indent=1))
        return path
    raise InspectError(f"--out {path}: give a .png, .npy or .json file")
