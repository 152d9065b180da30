"""xT: region encoder + long-context encoder + head, with the stages a streaming engine needs.

Which official forward this reproduces
--------------------------------------
The official xT iNaturalist classifier (``cls_head: xl``, e.g. the paper's `Swin-T <xT>`
Hyper 512/256):

1. a 512 px crop (B, 3, 512, 512) is cut into 2 x 2 regions of 256 px, in raster order;
2. the region encoder (timm ``swinv2_*_window16_256``, ``features_only``) runs on every region;
   its deepest map (B*4, C, 8, 8) is stitched back into the global grid (B, C, 16, 16);
3. the grid is flattened row-major over the WHOLE grid (global row, then global column; not
   region by region) to (B, 256, C) and projected by ``input_proj`` Linear(C -> 768);
4. a fixed 2-D sin-cos position of each token's global (row, col) is added: for width D the
   first D/2 channels encode the column and the last D/2 the row, each as
   [sin(p * w_k), cos(p * w_k)] with w_k = 10000 ** (-k / (D / 4)), k = 0 .. D/4 - 1;
5. a learned ``cls_token`` (1, 1, 768) is appended LAST (B, 257, 768);
6. the context layers run over the sequence: Hyper blocks are causal (RMSNorm -> attention with
   128-wide heads -> residual -> RMSNorm -> gated GELU MLP -> residual; exact attention up to
   4096 keys), Mamba blocks are ``h = LN(h); h = h + Mamba(h)`` with layers 0, 2, ... scanning
   the reversed sequence; there is no final norm;
7. the head ``cls`` = LayerNorm -> Linear(768 -> K) on the last token (the cls token).

Baselines (``cls_head: naive``, context "none"): the deepest map is averaged over all its
positions and ``mlp`` = Linear(C -> 4C) -> GELU -> LayerNorm(4C) -> Linear(4C -> K).
`XT.forward` runs exactly this on images of any size (all regions in one sequence); models
trained on k x k region crops record k in `XTConfig.crop_regions` for the engine.

Segmentation/detection: the contextualized tokens (D channels) are put back on each region's
h x w grid and replace the deepest feature level; the UNet head decodes every region to stride
1 and `forward` stitches the regions and crops the padding (region-only models decode the raw
features).

Whole-image context (`XTConfig.global_context`, see `global_context.py`): before the
context layers, every token reads an encoding of the whole image built from one summary
vector per region (`summarize` -> `SceneSummary` -> `encode_scene` -> `read_scene`). The
summaries are detached: the scene is a pass of its own (the engine runs it over every
region first, then the crops).

Layouts: images (B, C, H, W); regions (N, C, S, S); region features [(N, C_l, S/s_l, S/s_l)];
tokens (B, N, D); positions (B, N, 2) int64 global (row, col) on the token grid.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .context import ContextConfig, build_context_encoder
from .fields import from_mapping
from .global_context import (
    GlobalContext,
    GlobalContextConfig,
    SceneGrid,
    SceneSummary,
    SceneTokens,
    region_summary,
)
from .heads import HeadConfig, build_head
from .region import RegionEncoder, RegionEncoderConfig
from .tokenizer import TokenizerConfig, merge_regions, split_regions, split_subregions


@dataclass(frozen=True)
class XTConfig:
    """A whole xT model as data; saved in every checkpoint (`to_dict` / `from_dict`)."""

    name: str = "xt"
    in_chans: int = 3
    num_classes: int = 1000
    region: RegionEncoderConfig = field(default_factory=RegionEncoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    head: HeadConfig = field(default_factory=lambda: HeadConfig(num_classes=1000))
    crop_regions: int | None = None
    baseline_mlp_ratio: int = 4
    global_context: GlobalContextConfig | None = None  # None: context stops at one crop

    def __post_init__(self) -> None:
        if isinstance(self.global_context, dict):  # an override given as a mapping
            object.__setattr__(self, "global_context",
                               GlobalContextConfig.from_dict(self.global_context))
        if self.global_context is not None and self.context.kind == "none":
            raise ValueError("global_context needs a context encoder (context.kind 'none' "
                             "has no tokens to read the scene into)")
        if self.region.in_chans != self.in_chans:
            raise ValueError(
                f"region.in_chans ({self.region.in_chans}) != in_chans ({self.in_chans})"
            )
        encoder_size = self.tokenizer.sub_region_size or self.tokenizer.region_size
        if self.region.region_size != encoder_size:
            what = "sub_region_size" if self.tokenizer.sub_region_size else "region_size"
            raise ValueError(
                f"region.region_size ({self.region.region_size}) != tokenizer.{what} "
                f"({encoder_size})"
            )
        if self.head.num_classes != self.num_classes:
            raise ValueError(
                f"head.num_classes ({self.head.num_classes}) != num_classes ({self.num_classes})"
            )
        if self.crop_regions is not None and self.crop_regions < 1:
            raise ValueError(f"crop_regions must be None or >= 1, got {self.crop_regions}")
        if self.context.kind != "none":
            if self.context.dim % 4:
                raise ValueError(f"context.dim must be a multiple of 4, got {self.context.dim}")
            if self.head.dim != self.context.dim:  # the head reads context tokens
                object.__setattr__(self, "head", replace(self.head, dim=self.context.dim))

    @property
    def context_mode(self) -> str:
        """"image" when trained to read the whole image (global_context), else "crop"."""
        return "crop" if self.global_context is None else "image"

    @property
    def crop_size(self) -> int | None:
        """Pixels per side of the crops the model was trained on (None: not recorded)."""
        if self.crop_regions is None:
            return None
        return self.crop_regions * self.tokenizer.region_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); `from_dict` restores an equal config."""
        return {
            f.name: (v.to_dict() if isinstance(v, GlobalContextConfig)
                     else asdict(v) if is_dataclass(v) else v)
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XTConfig:
        """Inverse of `to_dict`; unknown fields (at any level) are a ValueError."""
        return from_mapping(cls, data)


def sincos_2d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding: positions (..., 2) (row, col) -> (..., dim) float64.

    Channels: [sin(col w), cos(col w), sin(row w), cos(row w)], w_k = 10000^(-k / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=positions.device)
                            / quarter)
    pos = positions.to(torch.float64)
    col = pos[..., 1:2] * omega
    row = pos[..., 0:1] * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=-1)


def token_layout(
    region_rc: torch.Tensor | np.ndarray, h: int, w: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global order of the tokens of regions `region_rc` (R, 2), each an h x w token map.

    Returns `order` (R*h*w,): sequence position t holds region-major token order[t] (region r,
    local (i, j) -> r*h*w + i*w + j), sorted row-major over the global grid; and `positions`
    (R*h*w, 2) int64, the global (row, col) of each token in sequence order. Layouts are
    cached (a streaming run asks for the same few thousands of times); treat them as
    read-only.
    """
    rc = np.ascontiguousarray(np.asarray(
        region_rc.cpu() if isinstance(region_rc, torch.Tensor) else region_rc,
        dtype=np.int64).reshape(-1, 2))
    key = (rc.tobytes(), int(h), int(w), str(device))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    with torch.inference_mode(False):  # cached: usable under autograd and inference alike
        out = _token_layout(torch.from_numpy(rc).to(device), int(h), int(w), device)
    _LAYOUTS[key] = out
    if len(_LAYOUTS) > 512:
        _LAYOUTS.popitem(last=False)
    return out


_LAYOUTS: OrderedDict = OrderedDict()


def _token_layout(rc: torch.Tensor, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(torch.unique(rc, dim=0)) != len(rc):
        raise ValueError("region_rc lists a region more than once")
    rows = rc[:, 0, None, None] * h + torch.arange(h, device=device)[None, :, None]
    cols = rc[:, 1, None, None] * w + torch.arange(w, device=device)[None, None, :]
    rows, cols = torch.broadcast_tensors(rows, cols)  # (R, h, w)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    order = torch.argsort(rows * (int(cols.max()) + 1) + cols, stable=True)
    return order, torch.stack([rows[order], cols[order]], dim=-1)


def token_maps(
    tokens: torch.Tensor, region_rc: torch.Tensor | np.ndarray, h: int, w: int
) -> torch.Tensor:
    """Tokens (B, N[+1], D) in global order of regions `region_rc` (R, 2) -> per-region token
    maps (B*R, D, h, w), region-major (a trailing cls token is ignored)."""
    b, r = tokens.shape[0], len(np.asarray(region_rc).reshape(-1, 2))
    order, _ = token_layout(region_rc, h, w, device=tokens.device)
    seq = tokens[:, : r * h * w][:, torch.argsort(order)]  # region-major (B, R*h*w, D)
    return seq.reshape(b * r, h, w, -1).permute(0, 3, 1, 2)


def token_sequence(maps: torch.Tensor, region_rc: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of `token_maps` for B = 1: maps (R, D, h, w) -> tokens (1, R*h*w, D) in the
    global order of regions `region_rc`."""
    r, d, h, w = maps.shape
    order, _ = token_layout(region_rc, h, w, device=maps.device)
    return maps.permute(0, 2, 3, 1).reshape(1, r * h * w, d)[:, order]


class PooledMLPHead(nn.Module):
    """Official xT baseline head: mean over tokens -> Linear(C, rC) -> GELU -> LN -> Linear(K)."""

    def __init__(self, dim: int, num_classes: int, ratio: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * ratio),
            nn.GELU(),
            nn.LayerNorm(dim * ratio),
            nn.Linear(dim * ratio, num_classes),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of pooled tokens (B, C)."""
        return self.mlp(pooled)  # (B, C) -> (B, K)


class XT(nn.Module):
    """The xT model. Stages: `encode_regions` -> `region_tokens` -> `contextualize` -> `decode`."""

    def __init__(self, cfg: XTConfig, region_weights: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.region_encoder = RegionEncoder(cfg.region, weights=region_weights)
        channels = self.region_encoder.num_features
        self.classification = cfg.head.kind == "classification"
        self.has_context = cfg.context.kind != "none"
        self.input_proj: nn.Linear | None = None
        self.context: nn.Module | None = None
        self.cls_token: nn.Parameter | None = None
        self.token_dim = cfg.context.dim if self.has_context else channels
        self.global_context: GlobalContext | None = None
        if self.has_context:
            self.input_proj = nn.Linear(channels, cfg.context.dim)
            self.context = build_context_encoder(cfg.context)
            if cfg.global_context is not None:
                levels = self.region_encoder.feature_channels
                extra = cfg.global_context.summary_levels
                if extra and extra[-1] >= len(levels) - 1:
                    raise ValueError(f"global_context.summary_levels {list(extra)}: the "
                                     f"region encoder has levels 0 to {len(levels) - 1}, "
                                     f"the deepest ({len(levels) - 1}) is always summarized")
                self.global_context = GlobalContext(
                    cfg.global_context, channels, cfg.context.dim, cfg.context.norm_eps,
                    shallow=tuple(levels[i] for i in extra))
            if self.classification:
                self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.context.dim))
                nn.init.normal_(self.cls_token, std=1e-6)
        if self.classification and not self.has_context:
            self.head = PooledMLPHead(channels, cfg.num_classes, cfg.baseline_mlp_ratio)
        else:
            self.head = build_head(
                cfg.head,
                self.region_encoder.feature_channels,
                dim=self.token_dim,
                feature_strides=self.region_encoder.feature_strides,
            )

    # ------------------------------------------------------------------ stages

    def encode_regions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C, S, S) -> multi-level features [(N, C_l, S/s_l, S/s_l)], shallow to deep.

        With a second nesting level (`tokenizer.sub_region_size` = s), every region is cut
        into (S/s)**2 sub-regions that the region encoder sees one by one; their features are
        stitched back into each region's maps, so later stages see the same layout.
        """
        self._check_channels(x, dim=1)
        sub = self.cfg.tokenizer.sub_region_size
        if sub is None:
            return self.region_encoder(x)
        n = x.shape[0]
        parts = split_subregions(x.unsqueeze(1), sub)  # (N, 1, P, C, s, s)
        p = parts.shape[2]
        side = x.shape[-1] // sub
        feats = self.region_encoder(parts.reshape(n * p, *parts.shape[3:]))
        return [merge_regions(f.reshape(n, p, *f.shape[1:]), side, side) for f in feats]

    def region_tokens(
        self, last: torch.Tensor, region_rc: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deepest features of R regions -> tokens on the global grid.

        last (B, R, C, h, w) with region_rc (R, 2) global (row, col) of each region
        -> tokens (B, R*h*w, D) row-major over the global grid (projected + 2-D sin-cos
        position when there is a context encoder; raw features otherwise) and
        positions (B, R*h*w, 2) int64 global (row, col).
        """
        b, r, c, h, w = last.shape
        order, pos = token_layout(region_rc, h, w, device=last.device)
        if len(pos) != r * h * w:
            raise ValueError(f"region_rc has {len(pos) // (h * w)} regions, features {r}")
        x = last.permute(0, 1, 3, 4, 2).reshape(b, r * h * w, c)[:, order]  # (B, N, C)
        if self.input_proj is not None:
            x = self.input_proj(x)
            x = x + sincos_2d(pos, self.token_dim).to(x.dtype)
        return x, pos.unsqueeze(0).expand(b, -1, -1)

    # ------------------------------------------------------------------ whole-image context

    def scene_grid(self, rows: int, cols: int) -> SceneGrid:
        """How an image of rows x cols regions is pooled into scene cells."""
        return self._global().grid_for(rows, cols)

    def new_summary(self, rows: int, cols: int, channels: int, keep: bool = False
                    ) -> SceneSummary:
        """An empty `SceneSummary` of an image of rows x cols regions with summaries
        `channels` wide, scoring each region with the scene detectors when the model has
        them; `keep`: keep every summary, unscored (training scores them with gradients)."""
        g = self._global()
        return SceneSummary(self.scene_grid(rows, cols), channels,
                            scorer=None if keep else g.scorer(), keep=keep)

    def summary_levels(self) -> list[int]:
        """The region encoder levels a region's scene summary is made of, the deepest last
        (the deepest alone unless `global_context.summary_levels`)."""
        deepest = len(self.region_encoder.feature_channels) - 1
        extra = () if self.cfg.global_context is None else self.cfg.global_context.summary_levels
        return [*extra, deepest]

    def summarize(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Features of N regions -> their summaries (N, C'): `feats` is every level of
        `encode_regions`, or only the `summary_levels()`, in that order."""
        levels = self.summary_levels()
        if len(feats) != len(levels):
            feats = [feats[i] for i in levels]
        return region_summary(list(feats))

    def encode_scene(self, summary: SceneSummary, cells: torch.Tensor | None = None,
                     peaks: torch.Tensor | None = None) -> SceneTokens:
        """The summed region summaries of a whole image -> its scene tokens (1, M, D), M + 1
        rows with `whole_scene`;
        `cells` (default `summary.cells()`), e.g. `summary.cells_through(...)` in training;
        `peaks` (default `summary.peaks()`) the scene detectors' maxima."""
        g = self._global()
        device = next(g.parameters()).device
        cells = summary.cells() if cells is None else cells
        peaks = summary.peaks() if peaks is None else peaks
        return g.encode(cells.to(device), summary.grid, peaks)

    def read_scene(self, tokens: torch.Tensor, token_rc: torch.Tensor,
                   per_region: tuple[int, int], scene: SceneTokens) -> torch.Tensor:
        """Tokens (B, N, D) (positions added) at image token positions token_rc (B, N, 2)
        read the scene (cross-attention) -> (B, N, D); before `contextualize`."""
        return self._global().read(tokens, token_rc, per_region, scene)

    def _global(self) -> GlobalContext:
        if self.global_context is None:
            raise ValueError(f"model {self.cfg.name!r} has no whole-image context "
                             "(its config has no global_context)")
        return self.global_context

    def contextualize(
        self,
        tokens: torch.Tensor,
        state: Any = None,
        append_cls: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        """tokens (B, N, D) (their positions already added) -> (tokens (B, N[+1], D), state);
        causal, streaming-capable.

        Classification models append the cls token LAST (when `append_cls`; stream the image
        with append_cls=False and pass it on the final piece).
        Region-only models (context "none") return the tokens unchanged and no state.
        """
        if self.context is None:
            return tokens, None
        if self.cls_token is not None and append_cls:
            b = tokens.shape[0]
            tokens = torch.cat([tokens, self.cls_token.expand(b, -1, -1).to(tokens.dtype)], 1)
        return self.context(tokens, state)

    def decode(
        self,
        tokens: torch.Tensor,
        features: list[torch.Tensor] | None = None,
        region_rc: torch.Tensor | np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Head outputs.

        Classification: tokens (B, N+1, D) with the cls token last (or (B, N, C) region-only,
        averaged) -> {"logits": (B, K)}.
        Segmentation/detection: tokens (B, R*h*w, D) in global order, `features` the regions'
        multi-level maps [(B*R, C_l, ...)] and `region_rc` (R, 2) -> {name: (B, R, K, S, S)}.
        """
        if self.classification:
            pooled = tokens[:, -1] if self.cls_token is not None else tokens.mean(dim=1)
            return {"logits": self.head(pooled)}
        if features is None or region_rc is None:
            raise ValueError("segmentation decode needs the region features and region_rc")
        deep = features[-1]  # (B*R, C, h, w)
        n, _, h, w = deep.shape
        b = tokens.shape[0]
        r = n // b
        if self.context is not None:
            deep = token_maps(tokens, region_rc, h, w)  # (B*R, D, h, w)
        maps = self.head([*features[:-1], deep])
        return {k: v.reshape(b, r, *v.shape[1:]) for k, v in maps.items()}

    # ------------------------------------------------------------------ whole image

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, H, W), any H, W -> {"logits": (B, K)} or {name: (B, K_i, H, W)}."""
        self._check_channels(x, dim=1, image=True)
        height, width = x.shape[-2:]
        regions, _, grid = split_regions(x, self.cfg.region.region_size)  # (B, R, C, S, S)
        b, r = regions.shape[:2]
        feats = self.encode_regions(regions.flatten(0, 1))
        last = feats[-1]
        rc = grid.order("raster")
        tokens, pos = self.region_tokens(last.reshape(b, r, *last.shape[1:]), rc)
        if self.global_context is not None:  # one scene per image of the batch
            read = []
            for i in range(b):  # summaries are detached: the scene is a pass of its own
                vectors = self.summarize([f[i * r:(i + 1) * r] for f in feats])
                summary = self.new_summary(grid.rows, grid.cols, vectors.shape[1])
                summary.add(rc, vectors)
                scene = self.encode_scene(summary)
                read.append(self.read_scene(tokens[i:i + 1], pos[i:i + 1],
                                            tuple(last.shape[-2:]), scene))
            tokens = torch.cat(read)
        tokens, _ = self.contextualize(tokens)
        out = self.decode(tokens, feats, rc)
        if self.classification:
            return out
        return {
            k: merge_regions(v, grid.rows, grid.cols)[..., :height, :width] for k, v in out.items()
        }

    def _check_channels(self, x: torch.Tensor, dim: int, image: bool = False) -> None:
        if x.ndim != 4:
            what = "image (B, C, H, W)" if image else "regions (N, C, S, S)"
            raise ValueError(f"expected a 4-D {what}, got shape {tuple(x.shape)}")
        if x.shape[dim] != self.cfg.in_chans:
            raise ValueError(
                f"model expects {self.cfg.in_chans} channels, image has {x.shape[dim]}"
            )
