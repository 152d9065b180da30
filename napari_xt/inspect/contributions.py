"""Contribution maps: how much each region of a crop influenced one region's output.

Layouts: a crop of R regions gives tokens (1, N, D) in the model's global order (N = R*h*w,
plus the cls token last for classifiers); `owner` (N,) is the crop-local index of the region
each token belongs to (-1 for the cls token); a map is (crop rows, crop cols) per crop and
(grid rows, grid cols) over the image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_xt.engine.plan import Crop, RegionPlan
from napari_xt.model.xt import token_layout

from . import occlusion

METHODS = ("attention", "rollout", "gradient", "occlusion")
ATTENTION_KINDS = ("hyper", "transformer_xl")
OCCLUSION_BYTES = 2**28  # token copies of the crop per occlusion batch (about 256 MB)
FAST_BYTES = 2**27  # float64 working copies of the crop per batch of the exact update


@dataclass(frozen=True)
class ContributionMap:
    """The influence of every region on `region`, as shares that sum to 1 over the regions
    it saw (`values`, (rows, cols) float32 over the whole grid, NaN where it saw nothing)."""

    region: tuple[int, int]
    method: str
    values: np.ndarray
    spans: tuple[tuple[int, int, int, int], ...]  # (row0, col0, rows, cols) of each crop seen
    weights: tuple[float, ...]  # the run's blending weight of each crop for the region
    layer: int | None = None
    head: int | None = None
    pixel: tuple[int, int] | None = None  # (y, x) in the region, when one pixel was asked
    seconds: float = 0.0
    note: str = ""
    output: str | None = None  # the head map explained (None: the class logits)

    @property
    def self_share(self) -> float:
        """The share of the region itself."""
        return float(self.values[self.region])

    def top(self, n: int = 5) -> list[tuple[tuple[int, int], float]]:
        """The `n` most influential regions, largest first."""
        v = np.nan_to_num(self.values, nan=-1.0)
        flat = np.argsort(-v, axis=None)[:n]
        return [((int(i), int(j)), float(v[i, j])) for i, j in
                zip(*np.unravel_index(flat, v.shape)) if v[i, j] >= 0]


@dataclass
class CropInputs:
    """What the contribution methods need of one crop: the `crop`, its regions'
    crop-relative (row, col) `rc` (R, 2), their features `feats`, the context input `tokens`
    (1, N, D) and the crop-local region `owner` (N,) of each token, the chosen region `target`
    and the sequence positions of its tokens, the positions whose output is explained
    (`queries`), the region's (h, w) inside the image (`valid`), and the `pixel` and `output`
    map asked."""

    crop: Crop
    rc: np.ndarray  # (R, 2) (row, col) of the crop's regions from its corner, raster order
    #                 (the positions the engine gives the model: crop-relative)
    feats: list[torch.Tensor]  # [(R, C_l, h_l, w_l)]
    tokens: torch.Tensor  # (1, N, D) context input (positions added), cls token not yet
    owner: np.ndarray  # (N,) crop-local region of each token
    target: int  # crop-local index of the chosen region
    target_seq: torch.Tensor  # (h*w,) sequence positions of its tokens, region raster order
    queries: np.ndarray  # sequence positions whose output is asked (its tokens, or one)
    valid: tuple[int, int]  # (h, w) of the region inside the image
    pixel: tuple[int, int] | None = None
    output: str | None = None  # the head map explained (None: class logits, else the first)


# ---------------------------------------------------------------------- entry point
def contribution_map(model: Any, source: Any, region: tuple[int, int], method: str = "occlusion",
                     *, crop_regions: int | None = None, stride: int | None = None,
                     layer: int | None = None, head: int | None = None,
                     pixel: tuple[int, int] | None = None,
                     output: str | None = None) -> ContributionMap:
    """The contribution map of `region` (row, col) of `source` (an `ImageSource`, normalised
    as the model expects) under `model`, with the engine's crops (`crop_regions` x
    `crop_regions` regions at `stride`, default the model's own and half of it). `output`:
    the head map whose answer is explained (default the class logits; e.g. "centre" for
    detections, each channel read as a yes/no probability)."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    cfg = model.cfg
    if output is not None:
        maps = dict(cfg.head.maps) if not model.classification else {"logits": 0}
        if output not in maps:
            raise ValueError(f"the model has no output {output!r} (it has: "
                             f"{', '.join(maps)})")
    if cfg.global_context is not None and method in ("attention", "rollout"):
        raise ValueError(f"model {cfg.name!r} reads the whole image (whole-image context): a "
                         "crop's attention does not show what the scene brought; use the "
                         "gradient or occlusion method")
    kind = cfg.context.kind
    if method in ("attention", "rollout") and kind not in ATTENTION_KINDS + ("none",):
        raise ValueError(f"the {kind} context encoder has no attention to show: use the "
                         "gradient or occlusion method")
    s = cfg.region.region_size if cfg.tokenizer.sub_region_size is None \
        else cfg.tokenizer.region_size
    plan = RegionPlan(source.height, source.width, s, crop_regions or cfg.crop_regions or 1,
                      stride)
    row, col = (int(v) for v in region)
    if not (0 <= row < plan.rows and 0 <= col < plan.cols):
        raise ValueError(f"region ({row}, {col}) is outside the {plan.rows} x {plan.cols} grid")
    if pixel is not None:
        y0, x0, y1, x1 = plan.box(row, col)
        if not (0 <= pixel[0] < y1 - y0 and 0 <= pixel[1] < x1 - x0):
            raise ValueError(f"pixel {pixel} is outside region ({row}, {col}) "
                             f"({y1 - y0} x {x1 - x0} px)")
    crops = [c for c in plan.crops if c.contains(row, col)]
    # the run's blending weight of each crop: over the region, or at the pixel asked
    weights = np.array([float(plan.region_window(c, row, col).mean() if pixel is None else
                              plan.region_window(c, row, col)[pixel[0], pixel[1]])
                        for c in crops])
    weights = weights / weights.sum()
    values = np.zeros(plan.grid, np.float64)
    seen = np.zeros(plan.grid, bool)
    note = ""
    if cfg.global_context is not None:  # the whole image, through the scene
        from .whole_image import Scene, image_contribution

        scene = Scene(model, source, plan)
        for crop, w in zip(crops, weights):
            inputs = _crop_inputs(model, source, plan, crop, (row, col), pixel, output)
            raw = image_contribution(model, inputs, scene, method,
                                     lambda out, i=inputs: _target_probs(model, out, i),
                                     blank_tokens(model, inputs))
            total = float(raw.sum())
            if np.isfinite(total) and total > 0:
                values += w * raw / total
            else:
                values[row, col] += w
                note = "no measurable influence (the output did not change)"
        seen[:] = True
    for crop, w in zip(crops if cfg.global_context is None else [], weights):
        part, note = crop_contribution(model, source, plan, crop, (row, col), method,
                                       layer=layer, head=head, pixel=pixel, output=output)
        sl = (slice(crop.row0, crop.row0 + crop.rows), slice(crop.col0, crop.col0 + crop.cols))
        values[sl] += w * part
        seen[sl] = True
    out = np.where(seen, values, np.nan).astype(np.float32)
    return ContributionMap((row, col), method, out,
                           tuple((c.row0, c.col0, c.rows, c.cols) for c in crops),
                           tuple(float(w) for w in weights), layer, head,
                           None if pixel is None else (int(pixel[0]), int(pixel[1])),
                           time.perf_counter() - t0, note, output)


def crop_contribution(model: Any, source: Any, plan: RegionPlan, crop: Crop,
                      region: tuple[int, int], method: str, *, layer: int | None = None,
                      head: int | None = None, pixel: tuple[int, int] | None = None,
                      output: str | None = None) -> tuple[np.ndarray, str]:
    """(crop rows, crop cols) shares (sum 1) of the regions of `crop` in the output of
    `region`, and a note (empty, or why the map is trivial)."""
    inputs = _crop_inputs(model, source, plan, crop, region, pixel, output)
    r = len(inputs.rc)
    if model.context is None:  # region-only: nothing but the region itself is read
        per_region = np.zeros(r)
        per_region[inputs.target] = 1.0
        return per_region.reshape(crop.rows, crop.cols), "region-only model: no context"
    if method in ("attention", "rollout"):
        raw = _attention_contribution(model, inputs, method, layer, head)
    elif method == "gradient":
        raw = _gradient_contribution(model, inputs)
    else:
        raw = _occlusion_contribution(model, inputs)
    total = float(raw.sum())
    note = ""
    if not np.isfinite(total) or total <= 0:
        raw, note = np.zeros(r), "no measurable influence (the output did not change)"
        raw[inputs.target] = 1.0
        total = 1.0
    return (raw / total).reshape(crop.rows, crop.cols), note


# ---------------------------------------------------------------------- inputs
def _crop_inputs(model: Any, source: Any, plan: RegionPlan, crop: Crop,
                 region: tuple[int, int], pixel: tuple[int, int] | None,
                 output: str | None = None) -> CropInputs:
    s = plan.region_size
    regions = crop.regions()
    device = next(model.parameters()).device
    pixels = np.stack([source.read(plan.box(*rc), s)[0] for rc in regions])  # (R, C, S, S)
    rc = np.array(regions, np.int64) - np.array([crop.row0, crop.col0])  # as the engine
    with torch.no_grad():
        feats = model.encode_regions(torch.from_numpy(pixels).to(device))
        last = feats[-1]
        tokens, _ = model.region_tokens(last[None], rc)
    h, w = last.shape[-2:]
    order, _ = token_layout(rc, h, w, device=tokens.device)
    order_np = order.cpu().numpy()
    owner = order_np // (h * w)  # sequence position -> crop-local region
    inverse = np.argsort(order_np)  # region-major token -> sequence position
    target = regions.index((int(region[0]), int(region[1])))
    target_seq = inverse[target * h * w:(target + 1) * h * w]
    y0, x0, y1, x1 = plan.box(*region)
    if pixel is None:
        queries = target_seq
    else:
        i, j = int(pixel[0]) * h // s, int(pixel[1]) * w // s
        queries = target_seq[i * w + j:i * w + j + 1]
    return CropInputs(crop, rc, feats, tokens, owner, target,
                      torch.as_tensor(target_seq, device=tokens.device), queries,
                      (y1 - y0, x1 - x0), pixel, output)


def _target_probs(model: Any, out: torch.Tensor, inputs: CropInputs) -> torch.Tensor:
    """Context tokens of B copies of the crop (B, N[+1], D) -> the chosen region's class
    probabilities (B, K, P) over its P pixels (or the one pixel), or (B, K, 1) for an image
    classifier."""
    if model.classification:
        return torch.softmax(model.decode(out)["logits"].float(), dim=1)[..., None]
    return _region_probs(model, out[:, inputs.target_seq], inputs)


def _region_probs(model: Any, tok: torch.Tensor, inputs: CropInputs) -> torch.Tensor:
    """The chosen region's context tokens (B, h*w, D), in its raster order -> its class
    probabilities (B, K, P) (see `_target_probs`)."""
    b = tok.shape[0]
    t = inputs.target
    feats = [f[t:t + 1].expand(b, *f.shape[1:]) for f in inputs.feats]
    rc = inputs.rc[t:t + 1]
    maps = model.decode(tok, feats, rc)
    name = inputs.output or ("logits" if "logits" in maps else next(iter(maps)))
    x = maps[name][:, 0].float()  # (B, K, S, S)
    if name == "logits":
        probs = torch.softmax(x, dim=1)
    else:  # a centre (score) map: each channel a yes/no probability
        p = torch.sigmoid(x)
        probs = torch.cat([1 - p, p], dim=1)
    hv, wv = inputs.valid
    if inputs.pixel is not None:
        py, px = inputs.pixel
        return probs[:, :, py:py + 1, px:px + 1].flatten(2)
    return probs[:, :, :hv, :wv].flatten(2)


def _per_region(values: torch.Tensor | np.ndarray, owner: np.ndarray, r: int) -> np.ndarray:
    """Per-token values (N[+1],) -> sums per crop region (R,) (the cls token left out)."""
    v = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else values
    v = np.asarray(v, np.float64)[: len(owner)]
    return np.bincount(owner, weights=v, minlength=r)


# ---------------------------------------------------------------------- gradient, occlusion
def _gradient_contribution(model: Any, inputs: CropInputs) -> np.ndarray:
    """|gradient . (tokens - blank tokens)| per token, summed per region: the first-order
    estimate of what occluding each region changes (plain gradient x input is blind across
    tokens in a pre-norm encoder, which sees other tokens only through a scale-free norm)."""
    tokens = inputs.tokens.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out, _ = model.contextualize(tokens)
        probs = _target_probs(model, out, inputs)  # (1, K, P)
        chosen = probs.detach().argmax(1, keepdim=True)  # the classes it predicts
        score = torch.log(probs.gather(1, chosen).clamp_min(1e-12)).sum()
        (grad,) = torch.autograd.grad(score, tokens)
    delta = tokens.detach() - blank_tokens(model, inputs)
    per_token = (grad * delta).sum(-1).abs()[0]  # (N,)
    return _per_region(per_token, inputs.owner, len(inputs.rc))


def blank_tokens(model: Any, inputs: CropInputs) -> torch.Tensor:
    """The context input of regions with no content (1, N, D): the projection of zero
    features plus each token's own position (so occluding a region removes what it shows,
    not where it is)."""
    with torch.no_grad():
        last = inputs.feats[-1]
        zeros = torch.zeros_like(last)[None]
        blank, _ = model.region_tokens(zeros, inputs.rc)
    return blank


def _occlusion_contribution(model: Any, inputs: CropInputs) -> np.ndarray:
    r = len(inputs.rc)
    tokens = inputs.tokens
    blank = blank_tokens(model, inputs)
    n, d = tokens.shape[1:]
    owner = torch.as_tensor(inputs.owner, device=tokens.device)
    out = np.zeros(r)
    if occlusion.supports(model, n):  # exact, from the first layer's statistics
        with torch.no_grad():
            ref = _target_probs(model, model.contextualize(tokens)[0], inputs)
            fast = occlusion.HyperOcclusion(model, tokens, blank, inputs.target_seq)
            hidden_all = torch.as_tensor(np.stack([np.flatnonzero(inputs.owner == j)
                                                   for j in range(r)]), device=tokens.device)
            chunk = max(1, min(r, FAST_BYTES // max(1, n * d * 8)))
            for start in range(0, r, chunk):
                hidden = hidden_all[start:start + chunk]
                probs = _region_probs(model, fast.target_tokens(hidden), inputs)
                change = 0.5 * (probs - ref).abs().sum(1).mean(1)
                out[start:start + len(hidden)] = change.double().cpu().numpy()
        return out
    chunk = max(1, min(r, OCCLUSION_BYTES // max(1, n * d * 4)))
    with torch.no_grad():
        ref = _target_probs(model, model.contextualize(tokens)[0], inputs)  # (1, K, P)
        for start in range(0, r, chunk):
            sources = torch.arange(start, min(r, start + chunk), device=tokens.device)
            hide = owner[None, :] == sources[:, None]  # (B, N)
            batch = torch.where(hide[..., None], blank, tokens)  # (B, N, D)
            probs = _target_probs(model, model.contextualize(batch)[0], inputs)
            change = 0.5 * (probs - ref).abs().sum(1).mean(1)  # total variation per copy
            out[start:start + len(sources)] = change.double().cpu().numpy()
    return out


# ---------------------------------------------------------------------- attention
def _attention_contribution(model: Any, inputs: CropInputs, method: str, layer: int | None,
                            head: int | None) -> np.ndarray:
    tokens = inputs.tokens
    if model.cls_token is not None:
        queries = np.array([tokens.shape[1]])  # an image classifier answers in its cls token
    else:
        queries = inputs.queries
    with torch.no_grad():
        _, mats, shares = attention_matrices(model, tokens)
    depth = len(mats)
    if method == "attention":
        which = depth - 1 if layer is None else int(layer)
        if not 0 <= which < depth:
            raise ValueError(f"layer {layer} does not exist ({depth} context layers)")
        a = mats[which]  # (H, N', N')
        if head is not None:
            if not 0 <= int(head) < a.shape[0]:
                raise ValueError(f"head {head} does not exist ({a.shape[0]} heads)")
            a = a[int(head)]
        else:
            a = a.mean(0)
        rows = a[torch.as_tensor(queries, device=a.device)]  # (q, N')
    else:
        dev = mats[0].device
        q = torch.as_tensor(queries, device=dev)
        n = mats[0].shape[-1]
        rows = torch.zeros((len(queries), n), dtype=torch.float64, device=dev)
        rows[torch.arange(len(queries), device=dev), q] = 1.0
        for a, share in zip(reversed(mats), reversed(shares)):
            # rows of (A_L ... A_1): A_l = share * (head-mean attention) + (1 - share) * I,
            # per query the part of its new residual stream that attention brought
            w = share.double()[:, None]
            mixed = w * a.mean(0).double()
            diag = torch.arange(n, device=dev)
            mixed[diag, diag] += 1.0 - w[:, 0]
            rows = rows @ mixed
    return _per_region(rows.mean(0), inputs.owner, len(inputs.rc))


def attention_matrices(model: Any, tokens: torch.Tensor
                       ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The context encoder's forward over tokens (1, N, D) (the cls token appended as
    `contextualize` does), with every layer's attention probabilities: (output (1, N', D),
    [(H, N', N')] per layer, row i the weights query i gives every key, 0 for keys it
    cannot see; [(N',)] per layer, the share of attention in each token's new residual
    stream). Exact attention only: a Hyper crop above its LSH threshold is refused."""
    if tokens.shape[0] != 1:
        raise ValueError("attention_matrices takes one sequence (B = 1)")
    ctx = model.context
    kind = model.cfg.context.kind
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"the {kind} context encoder has no attention")
    if model.cls_token is not None:
        tokens = torch.cat([tokens, model.cls_token.to(tokens.dtype)], 1)
    n = tokens.shape[1]
    if kind == "hyper":
        if n > model.cfg.context.lsh_threshold:
            raise ValueError(f"the crop has {n} tokens, above the encoder's exact-attention "
                             f"limit ({model.cfg.context.lsh_threshold}): its attention is "
                             "approximate (LSH); use the gradient or occlusion method")
        h = tokens
        mats, shares = [], []
        for blk in ctx.layers:
            h, p, share = _block(blk, h, None, 0, ctx.cfg.causal)
            mats.append(p[0])
            shares.append(share[0])
        return h, mats, shares
    cfg = ctx.cfg
    mats = [tokens.new_zeros((cfg.num_heads, n, n), dtype=torch.float32) for _ in ctx.layers]
    shares = [tokens.new_zeros(n, dtype=torch.float32) for _ in ctx.layers]
    memory = [tokens[:, :0] for _ in ctx.layers]
    outputs = []
    for start in range(0, n, cfg.chunk_len):
        h = tokens[:, start:start + cfg.chunk_len]
        t = h.shape[1]
        for i, blk in enumerate(ctx.layers):
            mem = memory[i]
            past = blk.keys_values(mem) if mem.shape[1] > 0 else None
            m = mem.shape[1]
            if cfg.mem_len > 0:
                joined = torch.cat([mem, h], 1)
                memory[i] = joined[:, -cfg.mem_len:]
            first = start - m  # sequence position of the first key
            h, p, share = _block(blk, h, past, m, cfg.causal)
            mats[i][:, start:start + t, first:first + m + t] = p[0]
            shares[i][start:start + t] = share[0]
        outputs.append(h)
    return torch.cat(outputs, 1), mats, shares


def _block(blk: Any, h: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
           n_past: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attention block (the same arithmetic as `AttentionBlock.forward` with exact
    attention), also returning its attention probabilities (B, H, Nq, n_past + Nq) and,
    per query, the share of attention in what the residual stream becomes (B, Nq):
    |attention output| / (|attention output| + |token|)."""
    attn = blk.attn
    q, k, v = attn.project(blk.input_layernorm(h))
    if past is not None:
        k = torch.cat([past[0].to(k.dtype), k], -2)
        v = torch.cat([past[1].to(v.dtype), v], -2)
    s = (q @ k.transpose(-1, -2)).float() * attn.head_dim ** -0.5
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        visible = (torch.arange(nk, device=q.device)[None, :]
                   <= torch.arange(nq, device=q.device)[:, None] + n_past)
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1)
    added = attn.output(p.to(v.dtype) @ v)  # (B, Nq, D)
    a, r = added.norm(dim=-1).float(), h.norm(dim=-1).float()
    share = a / (a + r).clamp_min(1e-12)  # (B, Nq) of the new token that attention brought
    h = h + added
    h = h + blk.mlp(blk.post_attention_layernorm(h))
    return h, p, share
