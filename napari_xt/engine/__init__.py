"""Streaming inference: any image size, flat memory, resumable, with typed progress events.

Public API: `run(image, model, store=None, **options) -> Execution` (an iterator of events;
see `run.py`), the events in `events.py`, `RegionPlan` (`plan.py`), the result store
(`store/`: `create_store`, `open_result`), `EmbeddingCache` (`cache.py`), `pick_device`
(`device.py`). The core never imports Qt or napari; zarr and dask are needed only for
persistent stores and the embedding cache (`store=None` with a numpy / np.memmap image runs
with torch and numpy alone).

A region's way, file by file (docs/architecture.md has the diagram): run.py (validation,
the frozen `RunSpec`) -> execution.py (the loop) -> features.py (reads through source.py
and pipeline.py, the cache, the encoder, the feature slab) -> crops.py (context per crop,
blending, the decode queue; scratch.py holds the blending accumulators) -> outputs.py
(batched finalisation) -> store/ (shards, commits, publishing). regions.py keeps every
region's lifecycle state; device.py the device, autocast and out-of-memory back-off;
spelling.py how refusals name their remedy.

Design choices where the engine departs from the first sketch, and why:

- Decoding is per region, as the model defines it. `XT.decode` (and `XT.forward`, which
  training uses) runs the UNet head on each region's own feature maps; the head's
  GroupNorm statistics and zero padding are per region. Decoding a stitched crop-level map
  would give outputs the model was never trained to produce and would break
  "engine == model forward" on an image that fits one crop.
- Overlapping crops are merged by their context, not by their decodes (blend="tokens", the
  default): each region's contextualized token map is averaged over the crops covering it
  with the crops' windows (at token resolution), and the region is decoded ONCE from the
  averaged tokens with its own skip features. Averaging decoded outputs instead
  (blend="outputs") decodes every region in each of its 3-4 crops: the decoder, the
  costliest stage on CPU, ran ~3.5-4x per region, and its share grew with the image (border
  regions have fewer crops), so time per megapixel was not flat. Measured on held-out
  synthetic scenes larger than the demo model's crop (`benchmarks/blend_quality.py`),
  token blending was also the more accurate of the two. On an image that fits one crop
  both equal the model's forward. Seams at region boundaries are those of the model
  itself (tests compare against the model's own forward, and against a toy model whose
  crops disagree).
- Token positions are crop-local (the crop's top-left region is (0, 0)), as in training on
  k x k crops; global positions on a 100 x 100 region grid would be far outside the
  sin-cos range the model has seen.
- Default crop stride is max(1, k // 2) regions, not 1: every interior region boundary is
  still strictly inside some crop, while each region is contextualized in at most 4 crops
  instead of k^2 (16 for k = 4). `crop_stride=1` gives the densest blending.
- Per-region scratch accumulators live in memory (on the device), never in the store:
  scratch of unfinished regions is discarded at resume anyway, so persisting it buys
  nothing. Strip order bounds the live ones to about (strip_width * stride + k) * k regions;
  the (k - stride) boundary columns waiting for the next strip, whose number grows with the
  grid's height, are spilled exactly to a scratch folder beyond that (`scratch.py`).
- The reader's tile cache is sized to one strip's working set (`ImageSource.fit_tile_cache`),
  not a fixed cap that a larger image would fill.
- When the embedding cache is on, features are rounded to fp16 (what the cache stores)
  before use, so a resumed or re-run prediction equals an uninterrupted one exactly (with
  either blend: every decode call holds one fixed number of regions, padded, whichever
  regions a crop has left to decode).
- Regions whose pixels cannot be read are never zero-filled: with on_error="continue" the
  crops around them run without their tokens and the region stays "failed" (label 0) until
  a rerun resumes it.
"""

from .events import (
    Cancelled,
    ContextStep,
    Event,
    Failed,
    Finished,
    Notice,
    Planned,
    RegionDecoded,
    RegionEncoded,
    RegionFailed,
    Written,
)
from .plan import ORDERS, Crop, RegionPlan
from .run import EngineInputError, run

__all__ = [
    "ORDERS",
    "Cancelled",
    "ContextStep",
    "Crop",
    "EngineInputError",
    "Event",
    "Failed",
    "Finished",
    "Notice",
    "Planned",
    "RegionDecoded",
    "RegionEncoded",
    "RegionFailed",
    "RegionPlan",
    "Written",
    "run",
]
