"""Crop stages of the compute loop (a mixin of `stages.Execution`).

Per crop: stitch its regions' deepest features into a token sequence with crop-local
positions (`region_tokens`), `contextualize`, `decode` the crop's unfinished regions and
add the window-weighted maps to the per-region accumulators; a region whose covering crops
are all done is finalised and handed to the writer. Alike crops (same shape, every region
to decode, no carried state) run together, B crops per context/decode batch, up to about
`batch_size` regions.

Layouts: features per level (R, C_l, h_l, w_l) per crop, (B, R, ...) batched; tokens
(B, N, D); maps {name: (B, R, K, S, S)}; accumulators (C_tot, S, S) + weights (S, S).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .device import autocast, device_name, is_oom, release
from .events import ContextStep, Event, Notice, RegionDecoded, Written
from .outputs import blendable, finalize_region
from .store import STATE_CONTEXT, STATE_DONE

Index = tuple[int, int]


class CropStages:
    """Needs from the host: model, plan, device, lru, acc, windows, state, final, failed,
    remaining, counts, layout, outputs, writer, carry_state, classify, bad, batch_size,
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
        for b, crop in enumerate(group):  # maps: {name: (B, R, K, S, S)}
            with torch.inference_mode():
                values = blendable({k: v[b] for k, v in maps.items()}, self.layout)
            regions = tuple(crop.regions())
            self.counts["decoded"] += len(regions)
            yield RegionDecoded(regions, seconds)
            self._accumulate(crop, regions, values)

    def _accumulate(self, crop: Any, regions: tuple[Index, ...], values: torch.Tensor) -> None:
        """values (R, C_tot, S, S): window-weighted sums per region; finalise complete ones."""
        for j, idx in enumerate(regions):
            win = self._window(crop, idx)
            slot = self.acc.get(idx)
            if slot is None:
                slot = self.acc.new(idx, torch.zeros_like(values[j]), torch.zeros_like(win))
            slot[0] += values[j] * win
            slot[1] += win
            self.remaining[idx] -= 1
            if self.remaining[idx] == 0:
                self._final(idx)

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
        t = time.perf_counter()
        values = self._decode_chunks(crop, tokens, pos, levels, rc, sub, len(regions))
        decoded = tuple(regions[n] for n in sub)
        self.counts["decoded"] += len(decoded)
        yield RegionDecoded(decoded, time.perf_counter() - t)
        self._accumulate(crop, decoded, values)

    def _decode_chunks(self, crop: Any, tokens: torch.Tensor, pos: torch.Tensor,
                       levels: list[torch.Tensor], rc: np.ndarray, sub: list[int],
                       n_regions: int) -> torch.Tensor:
        """Blendable maps (R', C, S, S) of the crop's regions `sub`, decoded `decode_chunk`
        regions at a time; on device out-of-memory the chunk is halved (down to one region,
        then the error propagates) and kept that small for the rest of the run."""
        parts: list[torch.Tensor] = []
        start = 0
        while start < len(sub):
            size = len(sub) if self.decode_chunk is None else self.decode_chunk
            part = sub[start:start + size]
            try:
                parts.append(self._decode_part(crop, tokens, pos, levels, rc, part,
                                               len(part) == n_regions))
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

    def _window(self, crop: Any, idx: Index) -> torch.Tensor:
        key = self.plan.window_key(crop, *idx)
        if key not in self.windows:
            w = self.plan.region_window(crop, *idx)  # (S, S)
            self.windows[key] = torch.from_numpy(w).to(self.device)
        return self.windows[key]

    def _final(self, idx: Index) -> None:
        acc, wsum = self.acc.pop(idx)
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

