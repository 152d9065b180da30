"""Whole-image context: what every crop of an image learns about the rest of the image.

A k x k crop of regions sees only itself. With a `GlobalContextConfig` in the model's
config, an image is understood in two passes of bounded cost:

1. **Scene summary.** Every region's deepest feature map (C, h, w) is averaged to one
   vector (C,) (`region_summary`); with `summary_levels`, the mean and the maximum over
   space of those shallower levels join it (a small mark's shape and colour live in the
   shallow levels: a region encoder trained for other things may no longer tell two marks
   apart in its deepest one). The region grid (rows x cols) is pooled into at most
   `grid` x `grid` cells of `cell` x `cell` regions each (`SceneGrid`); a cell keeps the
   mean and the maximum of its regions' vectors (2C,). The maximum keeps a small, strong
   cue (one bright marker) visible in a cell of many regions.
2. **Scene encoding.** The cells become tokens (Linear(2C -> D), plus a linear map of the
   shallow part that starts at zero, + LayerNorm + a fixed
   position of the cell centre and of its distance to the far borders, in region units) and
   `depth` non-causal attention blocks mix them: `scene_tokens` (1, M, D), M <= grid^2.
3. **Reading.** Before a crop's context layers run, each of its tokens reads the scene by
   cross-attention (`GlobalReader`): the query is the token plus the same position code of
   its own place in the image (so it can find the cells around it and knows how far every
   border is), keys and values are the scene tokens; a linear map of the same place code is
   added too, so the context layers learn directly which of the crop's edges are the image's
   borders. Both output maps start at zero: a model given whole-image context starts exactly
   as its crop model.
4. **The whole scene at once** (`whole_scene`): one more vector, a linear map (starting at
   zero) of the mean and the maximum over all cells (standardized with statistics of
   training scenes, `WholeScene`), is added to every token of every crop.
   A cue in one cell of thousands (one mark) reaches every token without an attention that
   must first learn to single that cell out (at first it gets 1 / M of the weight, and so
   of the gradient). It rides as one extra row after the cells' tokens (M + 1 rows).
   With `scene_detectors` K, K learned detectors are added (`SceneDetectors`): a small MLP
   scores every region's standardized summary as the scene pass streams it, and the
   maximum over all regions of each score (kept like the cells' sums: K numbers) is mapped
   to every token. The per-feature maximum drifts with the number of regions (the maximum
   of 16384 plain regions lies higher than that of 1024, and a weak cue is one feature a
   few standard deviations up); a detector that singles out the cue by a margin reads the
   same at every size. Scored per region, not per cell, a detector sees the same input
   whatever the cell size. Its map starts at zero (the model starts as without them).

Memory is flat in the image size: the summary holds grid^2 cells whatever the number of
regions (rows x cols); the scene encoder and the readers attend over at most grid^2 tokens.
Every context encoder kind (Hyper, Transformer-XL, Mamba) gets the same reader; the
scene pass is bidirectional by construction (every cell sees every other).

Layouts: region summaries (N, C') with C' = C + 2 * (channels of `summary_levels`),
deepest mean first; cells (Gr, Gc, 2C') = [mean, max] over the cell's regions; detector
peaks (K,) (the maximum over regions of each score, (B, K) batched); scene
tokens (1, M, D) with M = Gr * Gc row-major (then the whole-scene row with `whole_scene`);
token positions (B, N, 2) in token units of the image grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .context.base import ContextConfig, RMSNorm
from .context.hyper import HyperContextEncoder
from .fields import from_mapping

# fields not in configs saved before them
LATER_FIELDS = ("summary_levels", "whole_scene", "scene_detectors")


@dataclass(frozen=True)
class GlobalContextConfig:
    """Whole-image context (see the module docstring). `grid`: at most grid x grid scene
    cells; `depth` scene-encoder layers; `head_dim`, `mlp_dim` of the scene encoder and the
    reader (width = the context encoder's `dim`); `summary_levels`: region encoder levels
    shallower than the deepest (0 = the shallowest) whose mean and maximum over space join
    each region's summary (none: the deepest level's mean alone); `whole_scene`: add the
    whole-scene vector to every token (module docstring, 4.); `scene_detectors`: that many
    learned detectors over the regions added to it, each read at its maximum over regions
    (0: none; needs `whole_scene`)."""

    grid: int = 64
    depth: int = 2
    head_dim: int = 32
    mlp_dim: int = 256
    summary_levels: tuple[int, ...] = ()
    whole_scene: bool = False
    scene_detectors: int = 0

    def __post_init__(self) -> None:
        if self.grid < 1 or self.depth < 0 or self.head_dim < 1 or self.mlp_dim < 1:
            raise ValueError(f"global_context: grid, head_dim, mlp_dim >= 1 and depth >= 0, "
                             f"got {self}")
        if self.scene_detectors < 0 or (self.scene_detectors and not self.whole_scene):
            raise ValueError(f"global_context.scene_detectors must be >= 0 and needs "
                             f"whole_scene: true, got {self.scene_detectors} with whole_scene "
                             f"{self.whole_scene}")
        levels = tuple(int(v) for v in self.summary_levels)
        if any(v < 0 for v in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"global_context.summary_levels must be distinct level indices "
                             f">= 0 (0 = the shallowest), got {list(self.summary_levels)}")
        object.__setattr__(self, "summary_levels", tuple(sorted(levels)))

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict of its fields, as saved in checkpoints; fields
        added later are left out at their defaults, so a model saved before them keeps its
        config and its hash (runs, caches and stores made with it stay its own)."""
        out = asdict(self)
        defaults = asdict(GlobalContextConfig())
        for name in LATER_FIELDS:
            if out[name] == defaults[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlobalContextConfig:
        """The configuration of a mapping made by `to_dict`; raises `ValueError` for
        unknown keys or invalid values."""
        return from_mapping(cls, data)


@dataclass(frozen=True)
class SceneGrid:
    """How a rows x cols region grid is pooled into cells of `cell` x `cell` regions."""

    rows: int
    cols: int
    cell: int

    @classmethod
    def for_regions(cls, rows: int, cols: int, grid: int) -> SceneGrid:
        """The grid for `rows` x `cols` regions with cells just large enough that
        there are at most `grid` cells along each side; raises `ValueError` when there is no
        region."""
        if rows < 1 or cols < 1:
            raise ValueError(f"a scene needs at least one region, got {rows} x {cols}")
        return cls(int(rows), int(cols), max(1, math.ceil(max(rows, cols) / grid)))

    @property
    def shape(self) -> tuple[int, int]:
        """(Gr, Gc) cells."""
        return -(-self.rows // self.cell), -(-self.cols // self.cell)

    def cell_of(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat cell index of regions (rows, cols) (any shape, int64)."""
        return (rows // self.cell) * self.shape[1] + cols // self.cell

    def cell_centres(self, device: Any = None) -> torch.Tensor:
        """(M, 2) float64 centre of every cell in region units (row, col), row-major."""
        gr, gc = self.shape
        c = self.cell
        ys = torch.arange(gr, dtype=torch.float64, device=device) * c
        xs = torch.arange(gc, dtype=torch.float64, device=device) * c
        cy = (ys + torch.clamp(ys + c, max=self.rows) - 1) / 2
        cx = (xs + torch.clamp(xs + c, max=self.cols) - 1) / 2
        return torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)


class SceneSummary:
    """Running sums of region summaries per cell (streamed: regions come in any order, each
    counted once): `add(rc (N, 2), vectors (N, C))`, then `cells()` -> (Gr, Gc, 2C).
    With a `scorer` (the model's `SceneDetectors.scores`), the running maximum over regions
    of each score too (`peaks()` -> (K,)); with `keep`, every added vector (`kept()`; for
    training, which scores them again with gradients: not flat in the image size)."""

    def __init__(self, grid: SceneGrid, channels: int, scorer: Any = None,
                 keep: bool = False) -> None:
        self.grid = grid
        m = grid.shape[0] * grid.shape[1]
        self.sums = torch.zeros(m, channels, dtype=torch.float64)
        self.maxima = torch.full((m, channels), float("-inf"), dtype=torch.float64)
        self.counts = torch.zeros(m, dtype=torch.float64)
        self.scorer = scorer
        self.score_peaks: torch.Tensor | None = None
        self.vectors: list[torch.Tensor] | None = [] if keep else None

    def add(self, rc: Any, vectors: torch.Tensor) -> None:
        """Add the summaries `vectors` (N, C) of the regions at `rc` (N, 2) (row, col) to
        their cells; the caller adds each region once."""
        rc = torch.as_tensor(rc, dtype=torch.int64).reshape(-1, 2)
        v = vectors.detach().to("cpu", torch.float64)
        idx = self.grid.cell_of(rc[:, 0], rc[:, 1])
        self.sums.index_add_(0, idx, v)
        self.counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        self.maxima.scatter_reduce_(0, idx[:, None].expand_as(v), v, "amax")
        if self.scorer is not None and len(v):
            with torch.no_grad():
                peak = self.scorer(vectors.detach().float()).amax(0).to("cpu", torch.float64)
            self.score_peaks = (peak if self.score_peaks is None
                                else torch.maximum(self.score_peaks, peak))
        if self.vectors is not None:
            self.vectors.append(vectors.detach().to("cpu", torch.float32))

    def peaks(self) -> torch.Tensor | None:
        """(K,) float32: the maximum over the added regions of each detector score; None
        without a scorer or before any region."""
        return None if self.score_peaks is None else self.score_peaks.to(torch.float32)

    def kept(self) -> torch.Tensor:
        """(N, C) float32: every added vector, in the order added (needs `keep`)."""
        if self.vectors is None:
            raise ValueError("this SceneSummary was made without keep=True")
        return torch.cat(self.vectors)

    @property
    def regions(self) -> int:
        """Number of regions added so far."""
        return int(self.counts.sum())

    def cells(self) -> torch.Tensor:
        """(Gr, Gc, 2C) float32: [mean, max] of each cell's regions (zeros for a cell with
        none, e.g. every region of it failed to read)."""
        n = self.counts.clamp_min(1)[:, None]
        empty = self.counts[:, None] == 0
        mean = (self.sums / n).masked_fill(empty, 0.0)
        peak = self.maxima.masked_fill(empty, 0.0)
        gr, gc = self.grid.shape
        return torch.cat([mean, peak], -1).to(torch.float32).reshape(gr, gc, -1)


    def cells_through(self, rc: Any, vectors: torch.Tensor) -> torch.Tensor:
        """`cells()` in value, with gradients reaching `vectors` (N, C): the summaries, computed
        again with gradients, of regions at `rc` (N, 2) that were added already (training: the
        scene pass runs without gradients; the regions of the step's crops let the region
        encoder learn what the scene should hold). A region adds its share to its cell's mean
        and, where it holds the cell's maximum, to the maximum; the values stay those of
        `cells()` exactly (the gradient term is v - v.detach())."""
        rc = torch.as_tensor(rc, dtype=torch.int64).reshape(-1, 2)
        cells = self.cells()
        gr, gc, two_c = cells.shape
        c = two_c // 2
        v = vectors.float().to("cpu")
        live = v - v.detach()  # zero in value, the identity in gradient
        idx = self.grid.cell_of(rc[:, 0], rc[:, 1])
        n = self.counts.clamp_min(1).to(torch.float32)[idx, None]
        peak = self.maxima.to(torch.float32)[idx]
        # the region's own value is the cell's maximum (up to float noise between batchings)
        holds = v.detach() >= peak - (1e-4 * peak.abs() + 1e-5)
        ties = torch.zeros(gr * gc, c).index_add(0, idx, holds.float())[idx].clamp_min(1)
        mean = torch.zeros(gr * gc, c).index_add(0, idx, live / n)
        top = torch.zeros(gr * gc, c).index_add(0, idx, live * holds / ties)  # ties share
        return (cells.reshape(gr * gc, two_c) + torch.cat([mean, top], -1)).reshape(gr, gc, -1)


def region_summary(levels: list[torch.Tensor]) -> torch.Tensor:
    """Feature maps of N regions, [(N, C_l, h_l, w_l)], the `summary_levels` then the
    deepest -> one vector per region (N, C'): the deepest level's mean over space, then the
    mean and the maximum over space of each shallower level."""
    if isinstance(levels, torch.Tensor):
        raise TypeError("region_summary takes a list of feature levels, the deepest last")
    *shallow, last = [lv.float() for lv in levels]
    parts = [last.mean(dim=(-2, -1))]
    for lv in shallow:
        parts += [lv.mean(dim=(-2, -1)), lv.amax(dim=(-2, -1))]
    return torch.cat(parts, -1)


def place_code(where: torch.Tensor, rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed code of places in the image: where (..., 2) float (row, col) in region units
    -> (..., dim) float32: sin-cos of the row, the column and their distances to the far
    (bottom, right) borders, dim / 4 channels each."""
    quarter = dim // 4
    eighth = quarter // 2
    omega = 1.0 / 10000 ** (torch.arange(eighth, dtype=torch.float64, device=where.device)
                            / max(1, eighth))
    w = where.to(torch.float64)
    parts = []
    for value in (w[..., 0], w[..., 1], (rows - 1) - w[..., 0], (cols - 1) - w[..., 1]):
        a = value[..., None] * omega
        parts += [a.sin(), a.cos()]
    code = torch.cat(parts, -1)
    if code.shape[-1] < dim:
        code = F.pad(code, (0, dim - code.shape[-1]))
    return code.to(torch.float32)


@dataclass(frozen=True)
class SceneTokens:
    """The encoded scene of one image: tokens (1, M, D) and its grid."""

    tokens: torch.Tensor
    grid: SceneGrid


class GlobalReader(nn.Module):
    """h = h + proj(attention(q = norm(h) + place, k, v = scene tokens)) + at(place);
    proj and at start at 0. `at` hands the context layers the token's own place in the image
    directly (how far every border is), not only through what its query finds."""

    def __init__(self, dim: int, head_dim: int, eps: float) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"global_context.head_dim {head_dim} does not divide {dim}")
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.norm = RMSNorm(dim, eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.at = nn.Linear(dim, dim)
        for layer in (self.proj, self.at):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, place: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), place (B, N, D), scene (1 or B, M, D) -> (B, N, D)."""
        b, n, d = h.shape
        place = place.to(h.dtype)
        q = self.q(self.norm(h) + place)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(scene.to(h.dtype))
        m = kv.shape[1]
        k, v = kv.view(kv.shape[0], m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        return h + self.proj(o.transpose(1, 2).reshape(b, n, d)) + self.at(place)


class _Standardized(nn.Module):
    """Holds `shift` and `scale` buffers (kept in the checkpoint) that standardize its input
    with statistics of training scenes (`set_statistics`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    @property
    def has_statistics(self) -> bool:
        """False while shift and scale are those of a fresh map (0 and 1)."""
        return not (bool((self.shift == 0).all()) and bool((self.scale == 1).all()))

    def set_statistics(self, values: torch.Tensor) -> None:
        """Standardize with the mean and standard deviation of `values` (S, channels); a
        feature that hardly varies is not blown up (its scale is at least a tenth of the
        median one, and 1e-3)."""
        values = values.detach().to(self.shift.device, torch.float32)
        if values.ndim != 2 or values.shape[0] < 2 or values.shape[1] != self.shift.numel():
            raise ValueError(f"{type(self).__name__} statistics need (>= 2, "
                             f"{self.shift.numel()}) vectors, got {tuple(values.shape)}")
        sd = values.std(0)
        with torch.no_grad():
            self.shift.copy_(values.mean(0))
            self.scale.copy_(sd.clamp_min(max(0.1 * float(sd.median()), 1e-3)))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """(x - shift) / scale."""
        return (x - self.shift) / self.scale


class SceneDetectors(_Standardized):
    """`count` learned detectors over a scene's regions: `scores` (net(standardized region
    summary), one per detector and region) is what the scene pass keeps the maximum of over
    all regions (`SceneSummary` with this as its scorer), and `forward` maps those maxima
    to the token width (`out`, starting at zero). The summaries are standardized with the
    statistics of the regions of training scenes (`set_statistics` on summaries
    (S, channels))."""

    HIDDEN = 64

    def __init__(self, channels: int, dim: int, count: int) -> None:
        super().__init__(channels)
        self.net = nn.Sequential(nn.Linear(channels, self.HIDDEN), nn.GELU(),
                                 nn.Linear(self.HIDDEN, count))
        self.out = nn.Linear(count, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """Region summaries (..., channels) -> their scores (..., count)."""
        return self.net(self.standardized(vectors.to(self.shift.dtype)))

    def forward(self, peaks: torch.Tensor) -> torch.Tensor:
        """peaks (B, count), each score's maximum over a scene's regions -> (B, dim)."""
        return self.out(peaks.to(self.out.weight.dtype))


class WholeScene(_Standardized):
    """The whole-scene vector: proj((pooled - shift) / scale), proj starting at zero. The
    pooled mean and maximum of a scene's cells differ between scenes far less than they
    are large (a mark moves one feature by a few of its standard deviations among hundreds
    of features that sit well away from zero), so they are standardized with statistics
    of training scenes (`set_statistics` on pooled vectors (S, channels)) before the map.
    With `detectors` (`SceneDetectors` over the region summaries, `region_channels` wide),
    their map of the scene's detector peaks is added."""

    def __init__(self, channels: int, dim: int, detectors: int = 0,
                 region_channels: int = 0) -> None:
        super().__init__(channels)
        self.proj = nn.Linear(channels, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.detect = (SceneDetectors(region_channels or channels // 2, dim, detectors)
                       if detectors else None)

    def forward(self, cells: torch.Tensor, peaks: torch.Tensor | None = None) -> torch.Tensor:
        """cells (B, M, channels) [mean, max], peaks (B, K) with detectors -> (B, dim)."""
        out = self.proj(self.standardized(pooled_cells(cells)))
        if self.detect is None:
            return out
        if peaks is None:
            raise ValueError("a whole-scene vector with scene_detectors needs the scene's "
                             "detector peaks (a SceneSummary made with the model's scorer)")
        return out + self.detect(peaks.reshape(out.shape[0], -1))


def pooled_cells(cells: torch.Tensor) -> torch.Tensor:
    """cells (B, M, 2C') [mean, max] -> (B, 2C'): the mean over cells of the means, the
    maximum over cells of the maxima."""
    two = cells.shape[-1] // 2
    return torch.cat([cells[..., :two].mean(1), cells[..., two:].amax(1)], -1)


class GlobalContext(nn.Module):
    """Scene encoder and reader (see the module docstring); `channels` C of the region
    encoder's deepest level, `shallow` the channels of its `summary_levels` (in order),
    `dim` D of the context tokens."""

    def __init__(self, cfg: GlobalContextConfig, channels: int, dim: int,
                 eps: float = 1e-5, shallow: tuple[int, ...] = ()) -> None:
        super().__init__()
        if len(shallow) != len(cfg.summary_levels):
            raise ValueError(f"global_context: {len(cfg.summary_levels)} summary_levels, "
                             f"channels given for {len(shallow)}")
        self.cfg = cfg
        self.dim = dim
        self.channels = channels
        self.cell_proj = nn.Linear(2 * channels, dim)
        # the shallow levels' part of the cells (mean, max of each): starts silent, so the
        # model reads its scene as without them until it learns to use them
        self.cell_extra: nn.Linear | None = None
        if shallow:
            self.cell_extra = nn.Linear(2 * 2 * sum(shallow), dim)
            nn.init.zeros_(self.cell_extra.weight)
            nn.init.zeros_(self.cell_extra.bias)
        self.cell_norm = nn.LayerNorm(dim)
        self.whole: WholeScene | None = None  # the whole-scene vector (starts silent)
        if cfg.whole_scene:
            self.whole = WholeScene(2 * (channels + 2 * sum(shallow)), dim,
                                    cfg.scene_detectors, channels + 2 * sum(shallow))
        self.encoder = HyperContextEncoder(ContextConfig(
            kind="hyper", dim=dim, depth=cfg.depth, head_dim=cfg.head_dim,
            mlp_dim=cfg.mlp_dim, causal=False, lsh_threshold=max(4096, cfg.grid ** 2),
            norm_eps=eps))
        self.reader = GlobalReader(dim, cfg.head_dim, eps)

    def grid_for(self, rows: int, cols: int) -> SceneGrid:
        """The `SceneGrid` of a `rows` x `cols` region grid under this config's `grid`."""
        return SceneGrid.for_regions(rows, cols, self.cfg.grid)

    def scorer(self) -> Any:
        """What a `SceneSummary` scores each region with (`SceneDetectors.scores`), or None
        without `scene_detectors`."""
        return None if self.whole is None or self.whole.detect is None else self.whole.detect.scores

    def encode(self, cells: torch.Tensor, grid: SceneGrid,
               peaks: torch.Tensor | None = None) -> SceneTokens:
        """cells (Gr, Gc, 2C') (and the detector peaks (K,) with `scene_detectors`) -> the
        scene's tokens (1, Gr*Gc, D) (one row more with `whole_scene`)."""
        gr, gc, _ = cells.shape
        if (gr, gc) != grid.shape:
            raise ValueError(f"cells {tuple(cells.shape[:2])} do not match grid {grid.shape}")
        place = place_code(grid.cell_centres(cells.device), grid.rows, grid.cols, self.dim)
        if peaks is not None:
            peaks = peaks.reshape(1, -1).to(cells.device)
        return SceneTokens(self.encode_cells(cells.reshape(1, gr * gc, -1), place, peaks),
                           grid)

    def encode_cells(self, cells: torch.Tensor, place: torch.Tensor,
                     peaks: torch.Tensor | None = None) -> torch.Tensor:
        """cells (B, M, 2C') [mean, max] of the region summaries, place (M, D) the cells'
        place codes (peaks (B, K) with `scene_detectors`) -> scene tokens (B, M, D), then
        the whole-scene row with `whole_scene` (B, M + 1, D)."""
        two = cells.shape[-1] // 2
        c = self.channels
        mean, peak = cells[..., :two], cells[..., two:]
        x = self.cell_proj(torch.cat([mean[..., :c], peak[..., :c]], -1))
        if self.cell_extra is not None:
            x = x + self.cell_extra(torch.cat([mean[..., c:], peak[..., c:]], -1))
        x, _ = self.encoder(self.cell_norm(x) + place.to(x.dtype)[None])
        if self.whole is not None:
            x = torch.cat([x, self.whole(cells, peaks)[:, None]], 1)
        return x

    def read(self, tokens: torch.Tensor, token_rc: torch.Tensor, per_region: tuple[int, int],
             scene: SceneTokens) -> torch.Tensor:
        """tokens (B, N, D) at image token positions token_rc (B, N, 2) (rows, cols of the
        image's token grid, `per_region` = (h, w) tokens per region) -> tokens (B, N, D)."""
        h, w = per_region
        where = torch.stack([(token_rc[..., 0].to(torch.float64) + 0.5) / h - 0.5,
                             (token_rc[..., 1].to(torch.float64) + 0.5) / w - 0.5], -1)
        place = place_code(where, scene.grid.rows, scene.grid.cols, self.dim)
        cells = scene.tokens
        if self.whole is None:
            return self.reader(tokens, place.to(tokens.device), cells)
        out = self.reader(tokens, place.to(tokens.device), cells[:, :-1])
        return out + cells[:, -1:].to(out.dtype)
