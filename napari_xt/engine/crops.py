"""`CropRunner`: the context step of crops, blending across crops, and decoding.

One path for one crop or many: `run(group)` takes crops of one shape (B = len(group); a
single crop is a group of one), stitches each crop's regions' deepest features into a token
sequence with crop-local positions (`region_tokens`), `contextualize`s the B sequences in
one batch, then blends across overlapping crops:

- blend="tokens" (default): each region's contextualized token map, weighted by the crop's
  window at token resolution, is added to the region's accumulator; once every crop
  covering a region is done the region is decoded ONCE from its blended tokens. The decoder
  (the costliest stage on CPU) runs once per region whatever the overlap;
- blend="outputs": the crop's unfinished regions are decoded in every covering crop and the
  window-weighted output maps (probabilities) are averaged (about 3-4 decodes per region
  at the default stride).

Regions whose covering crops are all done go, in one batch, to `finalize(indices, values)`
(values (R, C_tot, S, S), already divided by their window weights). Crops run together only
when alike (`batchable`: same shape, every region to decode and readable, no carried context
state, dense head). On device out-of-memory a group is split in halves and decoding goes in
halved chunks (kept that small for the rest of the run).

With whole-image context (`scene`, the `SceneTokens` of the scene pass) every crop's
tokens read the scene at their place in the image before the context layers run.

Interface: `CropRunner(spec, book, features, accumulators, notices, finalize, store,
scene=None)`;
`batchable(crop, group)`; `run(group) -> Iterator[Event]`; `flush() -> Iterator[Event]` (the
regions still queued for decoding); `context_state` (carried state).
Layouts: features per level (B, R, C_l, h_l, w_l); tokens (B, N, D); token maps
(B*R, D, h, w); output maps {name: (B, R, K, S, S)}; accumulators (C, s, s) + weights (s, s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from napari_xt.model.xt import token_maps, token_sequence

from .device import autocast, device_name, is_oom, release
from .events import ContextStep, Event, Notice, RegionDecoded, Written
from .outputs import blendable
from .regions import CONTEXTUALIZED, RegionBook
from .scratch import Accumulators

Index = tuple[int, int]
PAD_ROW = 1 << 30  # grid row of the zero regions that fill a decode call

class CropRunner:
    """The context step, the blending across crops and the decoding of one run (see the module
    docstring); made once per run by `Execution` and called from the engine's thread in crop
    visiting order.

    `spec` is the run's `RunSpec`, `book` its `RegionBook`, `features` its `FeatureSupply`, `acc`
    the blending `Accumulators`; out-of-memory notices are appended to `notices`;
    `finalize(indices, values)` receives the regions whose covering crops are all done, values
    (R, C_tot, S, S); `store` receives a classifier's crop logits (`put_crop`); `scene` is the
    `SceneTokens` of whole-image context (None: each crop's context is the crop alone)."""

    def __init__(self, spec: Any, book: RegionBook, features: Any, acc: Accumulators,
                 notices: list[Event], finalize: Callable[[list[Index], torch.Tensor], None],
                 store: Any, scene: Any = None) -> None:
        self.spec, self.book, self.features, self.acc = spec, book, features, acc
        self.scene = scene  # SceneTokens of whole-image context (None: the crop alone)
        self.notices, self.finalize, self.store = notices, finalize, store
        self.model = spec.model
        self.classify = spec.layout is None
        self.windows: dict[tuple[int, ...], torch.Tensor] = {}
        self.group_regions = spec.batch_size  # regions per batched context/decode call
        # regions per decode call, always exactly (the last call padded): a region's output
        # then does not depend on which regions share its call (bit-identical resumes)
        self.decode_chunk = max(16, 2 * spec.batch_size)
        self.context_state: Any = None  # the context encoder's state, carried crop to crop
        self._queue: list[tuple[Index, torch.Tensor]] = []  # complete regions to decode

    def batchable(self, crop: Any, group: list[Any]) -> bool:
        """Whether `crop` may join `group` in one batched `run`: never with carried context state
        or a classification head, nor when its shape differs from the group's or one of its
        regions is already final or failed. The caller bounds a group's size by `group_regions`."""
        if self.spec.carry_state or self.classify:
            return False
        if group and (crop.rows, crop.cols) != (group[0].rows, group[0].cols):
            return False
        book = self.book
        return not any(book.final[i] or not book.usable(i) for i in crop.regions())

    # ------------------------------------------------------------------ context
    def run(self, group: list[Any]) -> Iterator[Event]:
        """Runs the context step of `group` (crops of one shape, B = len(group); nothing for an
        empty group) and blends it; a generator of the run's events (`RegionEncoded`,
        `RegionFailed` and `Notice` from reading the features, a `ContextStep` per crop,
        `RegionDecoded`, and `Written` for a classifier).

        With blend="tokens" the regions whose covering crops are now all done are queued and
        decoded in calls of exactly `decode_chunk` regions (`flush` decodes what is left); with
        blend="outputs" they go to `finalize` at once. A group in which a region failed to read
        or lost its features runs one crop at a time; on device out-of-memory a group of several
        crops is split in halves (a single crop's error propagates)."""
        if not group:
            return
        book, features = self.book, self.features
        for crop in group:
            yield from features.ensure(crop.regions())
        if len(group) > 1 and any(not book.usable(i) or i not in features
                                  for c in group for i in c.regions()):
            for crop in group:  # a read failure or an eviction: one crop at a time
                yield from self.run([crop])
            return
        regions = [[i for i in c.regions() if book.usable(i)] for c in group]
        if not regions[0]:
            return
        if len(regions[0]) < group[0].rows * group[0].cols:  # a region of the crop failed:
            book.tainted.update(regions[0])  # its context lacked it; the rerun redoes them
        first = group[0]
        rc = np.array([(r - first.row0, c - first.col0) for r, c in regions[0]], np.int64)
        t = time.perf_counter()
        b, r = len(group), len(regions[0])
        everything = [i for regs in regions for i in regs]
        try:
            # the context step reads only the deepest level; blend="outputs" decodes the
            # crop's regions after it and needs every level
            flat = features.stack(everything,
                                  deepest=self.classify or self.spec.blend == "tokens")
            levels = [lv.reshape(b, r, *lv.shape[1:]) for lv in flat]  # [(B, R, C_l, h, w)]
            with torch.inference_mode(), autocast(self.spec.device):
                tokens, pos = self.model.region_tokens(levels[-1], rc)  # (B, N, D), (B, N, 2)
                if self.scene is not None:  # each token reads the whole image's scene
                    h, w = levels[-1].shape[-2:]
                    origin = torch.tensor([[c.row0 * h, c.col0 * w] for c in group],
                                          device=pos.device)
                    tokens = self.model.read_scene(tokens, pos + origin[:, None], (h, w),
                                                   self.scene)
                state = self.context_state if self.spec.carry_state else None
                tokens, state = self.model.contextualize(tokens, state)  # (B, N[+1], D)
            if self.spec.carry_state:
                self.context_state = state
        except Exception as err:
            if not is_oom(err) or len(group) == 1:
                raise
            yield from self._split(group)
            return
        seconds = (time.perf_counter() - t) / len(group)
        for crop, regs in zip(group, regions):
            book.advance(regs, CONTEXTUALIZED)
            book.counts["crops"] += 1
            yield ContextStep(crop.index, tuple(regs), seconds)
        if self.classify:
            yield from self._classify(first, tokens)
        elif self.spec.blend == "tokens":
            yield from self._blend_tokens(group, regions, rc, tokens, levels)
        else:
            yield from self._blend_outputs(group, regions, rc, tokens, levels)

    def _split(self, group: list[Any]) -> Iterator[Event]:
        half = len(group) // 2
        regions = sum(c.rows * c.cols for c in group)
        self.group_regions = max(1, min(self.group_regions, regions // 2))
        release(self.spec.device)
        self.notices.append(Notice(
            f"{device_name(self.spec.device)} out of memory in context/decode: {len(group)} "
            f"crops -> {half} at a time", "oom"))
        yield from self.run(group[:half])
        yield from self.run(group[half:])

    # ------------------------------------------------------------------ blending
    def _blend_tokens(self, group, regions, rc, tokens, levels) -> Iterator[Event]:
        h, w = levels[-1].shape[-2:]
        r = len(rc)
        with torch.inference_mode():
            maps = token_maps(tokens, rc, h, w).float()  # (B*R, D, h, w), one layout
        complete: list[Index] = []
        for b, (crop, regs) in enumerate(zip(group, regions)):
            todo = [n for n, i in enumerate(regs) if not self.book.final[i]]
            complete += self._accumulate(crop, [regs[n] for n in todo],
                                         maps[b * r:(b + 1) * r][todo])
        yield from self._decode_blended(complete)

    def _blend_outputs(self, group, regions, rc, tokens, levels) -> Iterator[Event]:
        """Decode each crop's unfinished regions from the crop's own tokens (in calls of
        exactly `decode_chunk` regions, as `_decode_queued`) and add their output maps to the
        regions' accumulators; regions whose covering crops are now all done are finalised."""
        h, w = levels[-1].shape[-2:]
        r = len(rc)
        with torch.inference_mode():
            deep = token_maps(tokens, rc, h, w)  # (B*R, D, h, w)
        flat = [lv.flatten(0, 1) for lv in levels]  # [(B*R, C_l, h_l, w_l)]
        for b, (crop, regs) in enumerate(zip(group, regions)):
            sub = [n for n, i in enumerate(regs) if not self.book.final[i]]
            if not sub:
                continue
            t = time.perf_counter()
            rows = [b * r + n for n in sub]
            values = self._decode_fixed(deep[rows], [lv[rows] for lv in flat], rc[sub])
            decoded = [regs[n] for n in sub]
            self.book.counts["decoded"] += len(decoded)
            yield RegionDecoded(tuple(decoded), time.perf_counter() - t)
            self._finish(self._accumulate(crop, decoded, values))

    def _finish(self, complete: list[Index]) -> None:
        """Finalise accumulated regions (blend="outputs"): sum / weight, in one batch."""
        if not complete:
            return
        slots = [self.acc.pop(i) for i in complete]
        values = torch.stack([a / w.clamp_min(1e-12) for a, w in slots])  # (R, C, S, S)
        self.finalize(complete, values)

    def _accumulate(self, crop: Any, regions: list[Index], values: torch.Tensor) -> list[Index]:
        """values (R, C, s, s) (output maps, or token maps h x w): window-weighted sums per
        region; returns the regions whose covering crops are now all done."""
        if not regions:
            return []
        hw = tuple(values.shape[-2:])
        wins = self._windows(crop, regions, hw)  # (R, s, s)
        weighted = values * wins[:, None]  # one op for the whole crop (a fresh tensor)
        parts, weights = weighted.unbind(0), wins.unbind(0)
        # accumulators in memory: the same additions, in one call each (not two per region)
        # and before any other comes back from disk (which may spill one of them)
        sums, adds, wsums, wadds, rest = [], [], [], [], []
        for j, idx in enumerate(regions):
            slot = self.acc.resident(idx)
            if slot is None:
                rest.append(j)
                continue
            sums.append(slot[0])
            adds.append(parts[j])
            wsums.append(slot[1])
            wadds.append(weights[j])
        if sums:
            torch._foreach_add_(sums, adds)
            torch._foreach_add_(wsums, wadds)
        for j in rest:
            idx = regions[j]
            slot = self.acc.get(idx)
            if slot is None:  # the first crop's weighted map is the accumulator itself
                self.acc.new(idx, parts[j], weights[j].clone())
            else:  # brought back from disk
                slot[0] += parts[j]
                slot[1] += weights[j]
        return self.book.crop_passed(crop, regions)

    def _windows(self, crop: Any, regions: list[Index], hw: tuple[int, int]) -> torch.Tensor:
        """(R, s, s) windows of `crop` over `regions`, stacked once per kind of crop."""
        plan = self.spec.plan
        key = (tuple(plan.window_key(crop, *idx) for idx in regions), *hw)
        stack = self.windows.get(key)
        if stack is None:
            stack = torch.stack([self._window(crop, idx, hw) for idx in regions])
            self.windows[key] = stack
        return stack

    def _decode_blended(self, regions: list[Index]) -> Iterator[Event]:
        """Queue complete regions (their blended token maps) for decoding, and decode the
        queue in calls of exactly `decode_chunk` regions. Fixed-size calls make a region's
        output independent of which regions share its call, so a resumed run equals an
        uninterrupted one bit for bit; the queue makes that free (no padding but in the
        last call of a run, `flush`)."""
        if not regions:
            return
        for idx in regions:
            acc, wsum = self.acc.pop(idx)
            self._queue.append((idx, acc / wsum))  # (D, h, w) blended token map
            self.features.hold(idx)
        while len(self._queue) >= self.decode_chunk:
            yield from self._decode_queued(self.decode_chunk)

    def flush(self) -> Iterator[Event]:
        """Decode what is still queued (the last call padded to the fixed size)."""
        while self._queue:
            yield from self._decode_queued(min(self.decode_chunk, len(self._queue)))

    def _decode_queued(self, n: int) -> Iterator[Event]:
        t = time.perf_counter()
        batch, self._queue = self._queue[:n], self._queue[n:]
        regions = [i for i, _ in batch]
        blended = torch.stack([m for _, m in batch])  # (R, D, h, w)
        feats = self.features.stack(regions)  # [(R, C_l, h_l, w_l)]
        rc = np.array(regions, np.int64)  # global (row, col): only orders the tokens
        values = self._decode_fixed(blended, feats, rc)
        for idx in regions:
            self.features.release(idx)
        self.book.counts["decoded"] += len(regions)
        yield RegionDecoded(tuple(regions), time.perf_counter() - t)
        self.finalize(regions, values)

    def _decode_fixed(self, deep: torch.Tensor, feats: list[torch.Tensor],
                      rc: np.ndarray) -> torch.Tensor:
        """Blendable maps (n, C, S, S) of n regions from their token maps `deep` (n, D, h, w),
        their features `feats` [(n, C_l, h_l, w_l)] and distinct positions `rc` (n, 2) (they
        only order the tokens), decoded in calls of exactly `decode_chunk` regions, the last
        padded with zero regions: a region's output then does not depend on which regions
        share its call."""
        n_all = len(rc)

        def part(sel: list[int]) -> torch.Tensor:
            n, pad = len(sel), self.decode_chunk - len(sel)
            whole = n == n_all
            levels = feats if whole else [lv[sel] for lv in feats]
            maps_in = (deep if whole else deep[sel]).to(levels[-1].dtype)
            where = rc[sel]
            if pad > 0:  # zero regions at positions after every real one
                levels = [torch.cat([lv, lv.new_zeros((pad, *lv.shape[1:]))]) for lv in levels]
                maps_in = torch.cat([maps_in, maps_in.new_zeros((pad, *maps_in.shape[1:]))])
                extra = np.stack([np.full(pad, PAD_ROW), np.arange(pad)], axis=1)
                where = np.concatenate([where, extra])
            with torch.inference_mode(), autocast(self.spec.device):
                maps = self.model.decode(token_sequence(maps_in, where), levels, where)
                return blendable({k: v[0, :n] for k, v in maps.items()}, self.spec.layout)

        return self._chunked(list(range(n_all)), part)

    def _chunked(self, sub: list[int], decode: Any) -> torch.Tensor:
        """`decode(part)` -> blendable maps (R', C, S, S) of the regions `sub`, called
        `decode_chunk` regions at a time; on device out-of-memory the chunk is halved (down
        to one region, then the error propagates) and kept that small for the rest of the
        run (results may then differ from an earlier run's in the last bits)."""
        parts: list[torch.Tensor] = []
        start = 0
        while start < len(sub):
            size = self.decode_chunk
            part = sub[start:start + size]
            try:
                parts.append(decode(part))
            except Exception as err:
                if not is_oom(err) or len(part) == 1:
                    raise
                self.decode_chunk = max(1, len(part) // 2)
                release(self.spec.device)
                self.notices.append(Notice(
                    f"{device_name(self.spec.device)} out of memory in decode: {len(part)} "
                    f"regions -> {self.decode_chunk} at a time", "oom"))
                continue
            start += len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _window(self, crop: Any, idx: Index, hw: tuple[int, int]) -> torch.Tensor:
        """The crop's blending window over region idx, (S, S) pixels averaged to hw."""
        plan = self.spec.plan
        key = (*plan.window_key(crop, *idx), *hw)
        if key not in self.windows:
            w = torch.from_numpy(plan.region_window(crop, *idx))  # (S, S)
            if tuple(w.shape) != hw:  # token resolution: the mean weight over each token
                w = torch.nn.functional.adaptive_avg_pool2d(w[None, None], hw)[0, 0]
            self.windows[key] = w.to(self.spec.device)
        return self.windows[key]

    # ------------------------------------------------------------------ classification
    def _classify(self, crop: Any, tokens: torch.Tensor) -> Iterator[Event]:
        t = time.perf_counter()
        with torch.inference_mode(), autocast(self.spec.device):
            logits = self.model.decode(tokens)["logits"][0].float().cpu().numpy()  # (K,)
        self.store.put_crop(crop.index, logits)
        self.book.done_crops.add(crop.index)
        finished = [i for i in self.book.crop_passed(crop, crop.regions())
                    if self.book.usable(i)]
        self.book.finalize(finished)
        yield RegionDecoded(tuple(crop.regions()), time.perf_counter() - t)
        if finished:
            self.book.counts["written"] += len(finished)
            yield Written(tuple(finished), 0.0, self.book.done, self.spec.plan.num_regions)
