"""What a run writes: the dense map layout, per-region finalisation and the writer thread.

Dense heads give named maps (`model.cfg.head.maps`). Each crop's maps are turned into
blendable quantities first (softmax over the class logits, sigmoid of centre/heatmap
logits, raw values otherwise), multiplied by the crop window and summed per region; a final
region is `sum / weight`. From it: labels = argmax of the class probabilities (uint8, or
uint16 above 255 classes), probabilities (float16), and for detections the centre heatmap
(float16) from which points are taken once the region and its 8 neighbours are final
(max-pool NMS needs `min_distance` pixels of the neighbours; so the result equals NMS over
the whole image). Non-finite input pixels are 0 in labels, probabilities and heatmaps.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .store import STATE_DONE, PredictionStore

OUTPUT_KINDS = ("labels", "probabilities", "detections", "classification")


@dataclass(frozen=True)
class MapLayout:
    """Channel slices of the blended per-region stack (C_tot, S, S)."""

    transforms: tuple[tuple[str, int, int, str], ...]  # (map name, start, stop, transform)
    probs: tuple[int, int] | None  # class probabilities (segmentation)
    heat: tuple[int, int] | None  # centre / heatmap scores (detection)
    size: tuple[int, int] | None
    channels: int
    num_classes: int
    label_dtype: np.dtype = field(default=np.dtype(np.uint8))


def map_layout(head_cfg: Any) -> MapLayout:
    transforms, start = [], 0
    probs = heat = size = None
    for name, k in head_cfg.maps:
        kind = "raw"
        if name == "logits":
            kind, probs = "softmax", (start, start + k)
        elif name in ("heatmap", "centre", "center"):
            kind, heat = "sigmoid", (start, start + k)
        elif name == "size":
            size = (start, start + k)
        transforms.append((name, start, start + k, kind))
        start += k
    dtype = np.dtype(np.uint8 if head_cfg.num_classes <= 255 else np.uint16)
    return MapLayout(tuple(transforms), probs, heat, size, start, head_cfg.num_classes, dtype)


def blendable(maps: dict[str, torch.Tensor], layout: MapLayout) -> torch.Tensor:
    """{name: (R, K_i, S, S)} logits -> (R, C_tot, S, S) float32 values to average."""
    parts = []
    for name, _, _, kind in layout.transforms:
        x = maps[name].float()
        if kind == "softmax":
            x = torch.softmax(x, dim=1)
        elif kind == "sigmoid":
            x = torch.sigmoid(x)
        parts.append(x)
    return torch.cat(parts, dim=1)


def finalize_region(acc: torch.Tensor, wsum: torch.Tensor, bad: np.ndarray | None,
                    hw: tuple[int, int], layout: MapLayout, outputs: tuple[str, ...]
                    ) -> dict[str, np.ndarray]:
    """acc (C_tot, S, S) weighted sums, wsum (S, S) -> numpy tiles cropped to hw."""
    h, w = hw
    out = (acc / wsum.clamp_min(1e-12))[:, :h, :w]  # (C_tot, h, w)
    mask = None if bad is None else torch.from_numpy(bad[:h, :w]).to(out.device)
    if mask is not None:
        out = out.masked_fill(mask, 0.0)
    tiles: dict[str, np.ndarray] = {}
    if layout.probs is not None:
        probs = out[layout.probs[0]:layout.probs[1]]
        if "labels" in outputs:
            labels = probs.argmax(0)
            if mask is not None:
                labels = labels.masked_fill(mask, 0)
            tiles["labels"] = labels.cpu().numpy().astype(layout.label_dtype)
        if "probabilities" in outputs:
            tiles["probabilities"] = probs.half().cpu().numpy()
    if "detections" in outputs and layout.heat is not None:
        parts = [out[layout.heat[0]:layout.heat[1]]]
        if layout.size is not None:
            parts.append(out[layout.size[0]:layout.size[0] + 1])
        tiles["heat"] = torch.cat(parts).float().cpu().numpy()
    return tiles


class RegionWriter:
    """Writer thread: final region tiles -> store arrays, region state, detections.

    `put(index, box, tiles)`; `written()` returns (indices, seconds) batches done so far;
    `close()` waits for the queue; an error is kept and re-raised by `check()`.
    """

    def __init__(self, store: PredictionStore, plan: Any, layout: MapLayout,
                 outputs: tuple[str, ...], state: np.ndarray, state_array: Any,
                 detect: dict[str, Any] | None = None, detected: np.ndarray | None = None,
                 name: str = "prediction") -> None:
        self.store, self.plan, self.layout, self.outputs = store, plan, layout, outputs
        self.state, self.state_array = state, state_array
        self.detect = detect
        self.detected = detected if detected is not None else np.zeros(plan.grid, bool)
        h, w, s = plan.height, plan.width, plan.region_size
        self.arrays: dict[str, Any] = {}
        if "labels" in outputs and layout.probs is not None:
            self.arrays["labels"] = store.array("_work/labels", (h, w), (s, s),
                                                layout.label_dtype)
        if "probabilities" in outputs and layout.probs is not None:
            k = layout.probs[1] - layout.probs[0]
            self.arrays["probabilities"] = store.array(f"probabilities/{name}",
                                                       (k, h, w), (k, s, s), np.float16)
        if "detections" in outputs and layout.heat is not None:
            k = layout.heat[1] - layout.heat[0] + (layout.size is not None)
            self.arrays["heat"] = store.array("_work/heat", (k, h, w), (k, s, s), np.float32)
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.done: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="napari-xt-writer", daemon=True)
        self.thread.start()

    def put(self, index: tuple[int, int], tiles: dict[str, np.ndarray]) -> None:
        self.check()
        self.queue.put((index, tiles))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def written(self) -> list[tuple[tuple[tuple[int, int], ...], float]]:
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; nothing more is written
            batch = [item]
            while len(batch) < 16:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            try:
                for index, tiles in batch:
                    self._write(index, tiles)
                self.state_array[...] = self.state
                self._detect_ready([i for i, _ in batch])
            except BaseException as err:  # reported by check() in the compute thread
                self.error = err
                continue
            self.done.put((tuple(i for i, _ in batch), time.perf_counter() - t0))

    def _write(self, index: tuple[int, int], tiles: dict[str, np.ndarray]) -> None:
        y0, x0, y1, x1 = self.plan.box(*index)
        for name, tile in tiles.items():
            arr = self.arrays.get(name)
            if arr is None:
                continue
            if tile.ndim == 2:
                arr[y0:y1, x0:x1] = tile
            else:
                arr[:, y0:y1, x0:x1] = tile
        self.state[index] = STATE_DONE

    def _detect_ready(self, indices: list[tuple[int, int]]) -> None:
        """Points of every region whose 3 x 3 neighbourhood is final and not yet done."""
        if "heat" not in self.arrays or self.detect is None:
            return
        rows, cols = self.plan.grid
        todo = set()
        for r, c in indices:
            for i in range(max(0, r - 1), min(rows, r + 2)):
                for j in range(max(0, c - 1), min(cols, c + 2)):
                    todo.add((i, j))
        for r, c in sorted(todo):
            if self.detected[r, c]:
                continue
            near = self.state[max(0, r - 1):r + 2, max(0, c - 1):c + 2]
            if (near == STATE_DONE).all():
                self.store.write_points((r, c), self._points(r, c))
                self.detected[r, c] = True

    def _points(self, r: int, c: int) -> np.ndarray:
        from napari_xt.model.heads import points_from_heatmap

        md = int(self.detect["min_distance"])
        y0, x0, y1, x1 = self.plan.box(r, c)
        ya, xa = max(0, y0 - md), max(0, x0 - md)
        yb, xb = min(self.plan.height, y1 + md), min(self.plan.width, x1 + md)
        block = torch.from_numpy(np.asarray(self.arrays["heat"][:, ya:yb, xa:xb],
                                            dtype=np.float32))
        k = self.layout.heat[1] - self.layout.heat[0]
        size = block[k:k + 1] if self.layout.size is not None else None
        pts = points_from_heatmap(block[:k], size, threshold=self.detect["threshold"],
                                  min_distance=md)
        pts["y"] += ya
        pts["x"] += xa
        inside = (pts["y"] >= y0) & (pts["y"] < y1) & (pts["x"] >= x0) & (pts["x"] < x1)
        return pts[inside]

