"""Crop stages of the compute loop (a mixin of `stages.Execution`).

Per crop: stitch its regions' deepest features into a token sequence with crop-local
positions (`region_tokens`), `contextualize`, then blend across overlapping crops:

- blend="tokens" (default): add each region's contextualized token map, weighted by the
  crop's window at token resolution, to the region's accumulator; once every crop covering
  a region is done, `decode` the region ONCE from its blended tokens and finalise it. The
  decoder (the costliest stage on CPU) runs once per region whatever the overlap;
- blend="outputs": `decode` the crop's unfinished regions in every covering crop and add the
  window-weighted output maps (probabilities) to the accumulators (about 3-4 decodes per
  region at the default stride).

A region whose covering crops are all done is finalised and handed to the writer. Alike
crops (same shape, every region to decode, no carried state) run together, B crops per
context/decode batch, up to about `batch_size` regions.

Layouts: features per level (R, C_l, h_l, w_l) per crop, (B, R, ...) batched; tokens
(B, N, D); maps {name: (B, R, K, S, S)}; accumulators (C_tot, S, S) + weights (S, S) for
outputs, (D, h, w) + (h, w) for tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from napari_xt.model.xt import token_maps, token_sequence

from .device import autocast, device_name, is_oom, release
from .events import ContextStep, Event, Notice, RegionDecoded, Written
from .outputs import blendable, finalize_region
from .store import STATE_CONTEXT, STATE_DONE

Index = tuple[int, int]


class CropStages:
    """Needs from the host: model, plan, device, lru, acc, windows, state, final, failed,
    remaining, counts, layout, outputs, writer, carry_state, classify, bad, batch_size, blend,
    group_regions and decode_chunk (out-of-memory limits), pending (notices),
    logits/crop_done arrays (classification) and `_ensure`."""

    def _batchable(self, crop: Any, group: list[Any]) -> bool:
        """Crops are run together when they are alike: same shape, every region to decode
        and readable, no carried state (which is sequential), dense head."""
        if self.carry_state or self.classify:
            return False
        if group and (crop.rows, crop.cols) != (group[0].rows, group[0].cols):
            return False
        return not any(self.final[i] or i in self.failed for i in crop.regions())

    def _flush(self, group: list[Any]) -> Iterator[Event]:
        """Context and decode of several crops in one batch (B = len(group)). On device
        out-of-memory the group is split in halves (and later groups kept that small)."""
        if len(group) <= 1:
            for crop in group:
                yield from self._crop(crop)
            return
        for crop in group:
            yield from self._ensure(crop.regions())
        if any(i in self.failed or i not in self.lru for c in group for i in c.regions()):
            for crop in group:  # a read failure or an eviction: one crop at a time
                yield from self._crop(crop)
            return
        t = time.perf_counter()
        first = group[0]
        rc = np.array([(r - first.row0, c - first.col0) for r, c in first.regions()], np.int64)
        feats = [[self.lru.get(i) for i in c.regions()] for c in group]
        try:
            levels = [torch.stack([torch.stack([f[lv] for f in fs]) for fs in feats])
                      for lv in range(len(feats[0][0]))]  # [(B, R, C_l, h_l, w_l)]
            with torch.inference_mode(), autocast(self.device):
                tokens, pos = self.model.region_tokens(levels[-1], rc)  # (B, N, D), (B, N, 2)
                tokens, _ = self.model.contextualize(tokens, pos)
            t_context = (time.perf_counter() - t) / len(group)
            t = time.perf_counter()
            if self.blend != "tokens":
                with torch.inference_mode(), autocast(self.device):
                    maps = self.model.decode(tokens, [lv.flatten(0, 1) for lv in levels], rc)
        except Exception as err:
            if not is_oom(err):
                raise
            half = len(group) // 2
            regions = sum(c.rows * c.cols for c in group)
            self.group_regions = max(1, min(self.group_regions, regions // 2))
            levels = tokens = maps = None
            release(self.device)
            self.pending.append(Notice(
                f"{device_name(self.device)} out of memory in context/decode: {len(group)} "
                f"crops -> {half} at a time", "oom"))
            yield from self._flush(group[:half])
            yield from self._flush(group[half:])
            return
        seconds = (time.perf_counter() - t) / len(group)
        for crop in group:
            for i in crop.regions():
                self.state[i] = max(self.state[i], STATE_CONTEXT)
            self.counts["crops"] += 1
            yield ContextStep(crop.index, tuple(crop.regions()), t_context)
        if self.blend == "tokens":
            h, w = levels[-1].shape[-2:]
            r = len(rc)
            with torch.inference_mode():
                maps = token_maps(tokens, rc, h, w).float()  # (B*R, D, h, w), one layout
            complete: list[Index] = []
            for b, crop in enumerate(group):
                complete += self._accumulate(crop, tuple(crop.regions()),
                                             maps[b * r:(b + 1) * r])
            yield from self._decode_blended(complete)
            return
        for b, crop in enumerate(group):  # maps: {name: (B, R, K, S, S)}
            with torch.inference_mode():
                values = blendable({k: v[b] for k, v in maps.items()}, self.layout)
            regions = tuple(crop.regions())
            self.counts["decoded"] += len(regions)
            yield RegionDecoded(regions, seconds)
            for idx in self._accumulate(crop, regions, values):
                self._final(idx, *self.acc.pop(idx))

    def _accumulate(self, crop: Any, regions: tuple[Index, ...],
                    values: torch.Tensor) -> list[Index]:
        """values (R, C, s, s) (output maps, or token maps h x w): window-weighted sums per
        region; returns the regions whose covering crops are now all done."""
        complete = []
        for j, idx in enumerate(regions):
            win = self._window(crop, idx, tuple(values.shape[-2:]))
            slot = self.acc.get(idx)
            if slot is None:
                slot = self.acc.new(idx, torch.zeros_like(values[j]), torch.zeros_like(win))
            slot[0] += values[j] * win
            slot[1] += win
            self.remaining[idx] -= 1
            if self.remaining[idx] == 0:
                complete.append(idx)
        return complete

    def _decode_blended(self, regions: list[Index]) -> Iterator[Event]:
        """Decode complete regions once from their blended token maps and finalise them."""
        if not regions:
            return
        t = time.perf_counter()
        slots = [self.acc.pop(i) for i in regions]
        blended = torch.stack([acc / wsum for acc, wsum in slots])  # (R, D, h, w)
        feats = [self.lru.get(i) for i in regions]
        rc = np.array(regions, np.int64)  # global (row, col): only orders the tokens

        def part(sel: list[int]) -> torch.Tensor:
            levels = [torch.stack([feats[n][lv] for n in sel]) for lv in range(len(feats[0]))]
            deep = blended[sel].to(levels[-1].dtype)
            with torch.inference_mode(), autocast(self.device):
                maps = self.model.decode(token_sequence(deep, rc[sel]), levels, rc[sel])
                return blendable({k: v[0] for k, v in maps.items()}, self.layout)

        values = self._chunked(list(range(len(regions))), part)
        self.counts["decoded"] += len(regions)
        yield RegionDecoded(tuple(regions), time.perf_counter() - t)
        one = torch.ones((), device=values.device)
        for j, idx in enumerate(regions):
            self._final(idx, values[j], one)

    def _crop(self, crop: Any) -> Iterator[Event]:
        yield from self._ensure(crop.regions())
        regions = [i for i in crop.regions() if i not in self.failed]
        if not regions:
            return
        t = time.perf_counter()
        feats = [self.lru.get(i) for i in regions]
        levels = [torch.stack([f[lv] for f in feats]) for lv in range(len(feats[0]))]
        rc = np.array([(r - crop.row0, c - crop.col0) for r, c in regions], np.int64)  # (R, 2)
        model = self.model
        with torch.inference_mode(), autocast(self.device):
            last = levels[-1].unsqueeze(0)  # (1, R, C, h, w)
            tokens, pos = model.region_tokens(last, rc)  # (1, N, D), (1, N, 2)
            state = self.context_state if self.carry_state else None
            tokens, state = model.contextualize(tokens, pos, state)  # (1, N[+1], D)
            if self.carry_state:
                self.context_state = state
        for i in regions:
            self.state[i] = max(self.state[i], STATE_CONTEXT)
        self.counts["crops"] += 1
        yield ContextStep(crop.index, tuple(regions), time.perf_counter() - t)
        if self.classify:
            yield from self._classify(crop, tokens)
            return
        sub = [n for n, i in enumerate(regions) if not self.final[i]]
        if not sub:
            return
        if self.blend == "tokens":
            h, w = levels[-1].shape[-2:]
            with torch.inference_mode():
                maps = token_maps(tokens, rc, h, w)[sub].float()  # (R', D, h, w)
            yield from self._decode_blended(
                self._accumulate(crop, tuple(regions[n] for n in sub), maps))
            return
        t = time.perf_counter()
        values = self._chunked(sub, lambda part: self._decode_part(
            crop, tokens, pos, levels, rc, part, len(part) == len(regions)))
        decoded = tuple(regions[n] for n in sub)
        self.counts["decoded"] += len(decoded)
        yield RegionDecoded(decoded, time.perf_counter() - t)
        for idx in self._accumulate(crop, decoded, values):
            self._final(idx, *self.acc.pop(idx))

    def _chunked(self, sub: list[int], decode: Any) -> torch.Tensor:
        """`decode(part)` -> blendable maps (R', C, S, S) of the regions `sub`, called
        `decode_chunk` regions at a time; on device out-of-memory the chunk is halved (down
        to one region, then the error propagates) and kept that small for the rest of the
        run."""
        parts: list[torch.Tensor] = []
        start = 0
        while start < len(sub):
            size = len(sub) if self.decode_chunk is None else self.decode_chunk
            part = sub[start:start + size]
            try:
                parts.append(decode(part))
            except Exception as err:
                if not is_oom(err) or len(part) == 1:
                    raise
                self.decode_chunk = max(1, len(part) // 2)
                release(self.device)
                self.pending.append(Notice(
                    f"{device_name(self.device)} out of memory in decode: {len(part)} regions "
                    f"-> {self.decode_chunk} at a time", "oom"))
                continue
            start += len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_part(self, crop: Any, tokens: torch.Tensor, pos: torch.Tensor,
                     levels: list[torch.Tensor], rc: np.ndarray, part: list[int],
                     whole: bool) -> torch.Tensor:
        h, w = levels[-1].shape[-2:]
        if not whole:  # keep the tokens of the regions being decoded
            keep = torch.zeros(crop.rows, crop.cols, dtype=torch.bool, device=pos.device)
            keep[torch.as_tensor(rc[part, 0]), torch.as_tensor(rc[part, 1])] = True
            mask = keep[pos[0, :, 0] // h, pos[0, :, 1] // w]
            tokens = tokens[:, : pos.shape[1]][:, mask]
        with torch.inference_mode(), autocast(self.device):
            maps = self.model.decode(tokens, [lv[part] for lv in levels], rc[part])
            return blendable({k: v[0] for k, v in maps.items()}, self.layout)  # (R', C, S, S)

    def _window(self, crop: Any, idx: Index, hw: tuple[int, int]) -> torch.Tensor:
        """The crop's blending window over region idx, (S, S) pixels averaged to hw."""
        key = (*self.plan.window_key(crop, *idx), *hw)
        if key not in self.windows:
            w = torch.from_numpy(self.plan.region_window(crop, *idx))  # (S, S)
            if tuple(w.shape) != hw:  # token resolution: the mean weight over each token
                w = torch.nn.functional.adaptive_avg_pool2d(w[None, None], hw)[0, 0]
            self.windows[key] = w.to(self.device)
        return self.windows[key]

    def _final(self, idx: Index, acc: torch.Tensor, wsum: torch.Tensor) -> None:
        y0, x0, y1, x1 = self.plan.box(*idx)
        tiles = finalize_region(acc, wsum, self.bad.pop(idx, None), (y1 - y0, x1 - x0),
                                self.layout, self.outputs)
        self.final[idx] = True
        self.writer.put(idx, tiles)

    def _classify(self, crop: Any, tokens: torch.Tensor) -> Iterator[Event]:
        t = time.perf_counter()
        with torch.inference_mode(), autocast(self.device):
            logits = self.model.decode(tokens)["logits"][0].float().cpu().numpy()  # (K,)
        self.logits[crop.index] = logits
        self.logit_array[crop.index] = logits
        self.crop_done[crop.index] = True
        self.crop_done_array[...] = self.crop_done
        finished = []
        for idx in crop.regions():
            self.remaining[idx] -= 1
            if self.remaining[idx] == 0 and idx not in self.failed:
                self.state[idx] = STATE_DONE
                finished.append(idx)
        self.state_array[...] = self.state
        yield RegionDecoded(tuple(crop.regions()), time.perf_counter() - t)
        if finished:
            self.counts["written"] += len(finished)
            yield Written(tuple(finished), 0.0, int((self.state == STATE_DONE).sum()),
                          self.plan.num_regions)

