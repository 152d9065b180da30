"""Region encoder: a timm backbone that turns each region into multi-level feature maps.

`RegionEncoder(cfg)(x (N, C, S, S)) -> [(N, C_l, S / s_l, S / s_l), ...]`, NCHW, shallow to
deep, with `feature_channels`, `feature_strides` and `num_features` (deepest channels).

The backbone is always created with ``pretrained=False``; weights only ever come from a local
file (`weights=` or `load_weights`). Construction works under ``with torch.device("meta"):``
(for parameter counting of large configurations without allocating them).

Families
--------
- Hierarchical backbones (swin, swinv2, convnext, hiera, ...): timm ``features_only``.
  swin/swinv2 produce NHWC maps; they are returned NCHW (a permuted view, channels-last
  strided). ``img_size=region_size`` is passed to every model whose constructor accepts it.
- Plain ViTs (vit, deit, eva, ...: every level at one stride p): four blocks evenly spread over
  the depth (for 12 blocks: 2, 5, 8, 11) are taken through ``forward_intermediates`` and turned
  into a pyramid at strides p/4, p/2, p, 2p (two / one 2x2 transposed convolutions, identity,
  2x2 max-pool; levels whose stride would not be an integer are left out).

State-dict key names (timm 1.0.31)
----------------------------------
The timm features module is kept as ``self.model``, so keys are:

- swin / swinv2 (``FeatureListNet``): ``model.patch_embed.proj.*``, ``model.patch_embed.norm.*``,
  ``model.layers_{i}.downsample.{reduction,norm}.*`` (i >= 1; swinv2 downsamples at the start of
  a stage), ``model.layers_{i}.blocks.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,attn.qkv,attn.proj}.*``
  and, swinv2 only, ``attn.{logit_scale,q_bias,v_bias,cpb_mlp.0,cpb_mlp.2}``. The buffers
  ``relative_coords_table``, ``relative_position_index``, ``attn_mask`` and ``k_bias`` are not
  persistent (not in the state dict). No final ``norm`` and no ``head``. This is the layout of
  official xT checkpoints (``encoder.model.patch_embed.*``, ``encoder.model.layers_0.*``) with
  the ``encoder.`` prefix removed.
- convnext (``FeatureListNet``): ``model.stem_0.*``, ``model.stem_1.*``, ``model.stages_{i}.*``.
- hiera, vit (``FeatureGetterNet`` wrapping the whole model): ``model.model.<timm key>``, e.g.
  ``model.model.pos_embed``, ``model.model.blocks.{j}.*``; the ViT pyramid is ``pyramid.{l}.*``.

A plain timm state dict (``layers.0.*``, ``stem.0.*``, ``blocks.0.*``, with ``head``/``norm``
classifier keys) is accepted too: it is renamed to the layout above, its classifier keys are
ignored, and the ViT pyramid (not part of timm) keeps its fresh initialization.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# top-level timm module names that only serve the classifier; ignored in plain timm files
_CLASSIFIER_KEYS = frozenset(
    {"head", "norm", "fc_norm", "fc", "classifier", "head_drop", "pre_logits", "attn_pool"}
)
_PYRAMID_FACTORS = (4.0, 2.0, 1.0, 0.5)  # shallow -> deep resampling of single-stride features


@dataclass(frozen=True)
class RegionEncoderConfig:
    """Which timm backbone encodes a region, at which size, for how many input channels."""

    backbone: str = "swinv2_tiny_window16_256"
    region_size: int = 256
    in_chans: int = 3
    drop_path_rate: float = 0.0
    out_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        for name in ("region_size", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.out_indices is not None:
            indices = tuple(int(i) for i in self.out_indices)
            if not indices:
                raise ValueError("out_indices must name at least one level (or be None)")
            object.__setattr__(self, "out_indices", indices)


def _create(cfg: RegionEncoderConfig, **kwargs) -> nn.Module:
    import timm

    kwargs = dict(pretrained=False, in_chans=cfg.in_chans, **kwargs)
    # passed where the model accepts them (timm's own drop-path default is often 0.1, not 0)
    accepted = _optional_args(cfg.backbone)
    if cfg.drop_path_rate and "drop_path_rate" not in accepted:
        raise ValueError(
            f"timm backbone {cfg.backbone!r} has no stochastic depth: drop_path_rate must be 0, "
            f"got {cfg.drop_path_rate}"
        )
    optional = {"img_size": cfg.region_size, "drop_path_rate": float(cfg.drop_path_rate)}
    optional = {k: v for k, v in optional.items() if k in accepted}
    return timm.create_model(cfg.backbone, **optional, **kwargs)


_OPTIONAL_ARGS = ("img_size", "drop_path_rate")


@functools.cache
def _optional_args(backbone: str) -> frozenset[str]:
    """Which of `_OPTIONAL_ARGS` the model class of timm `backbone` takes.

    The class is found by building the default model once on the meta device (no memory, no
    random numbers drawn); its constructor's signature names the arguments. A constructor
    with ``**kwargs`` is followed up its base classes (e.g. timm's ``LevitDistilled`` passes
    everything on to ``Levit``), stopping at ``nn.Module``.
    """
    import timm
    from timm.models import parse_model_name

    source, name = parse_model_name(backbone)
    if source is None and not timm.is_model(name):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"unknown timm backbone {backbone!r}; close names: {', '.join(close) or 'none'}"
        )
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        probe = timm.create_model(backbone, pretrained=False)
    accepted: set[str] = set()
    for klass in type(probe).__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        accepted |= {p.name for p in params if p.name in _OPTIONAL_ARGS}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(accepted)


def _single_stride_indices(cfg: RegionEncoderConfig) -> tuple[int, ...] | None:
    """Evenly spread block indices for a single-stride model (ViT); None for hierarchical ones."""
    with torch.device("meta"):
        probe = _create(cfg)
    info = getattr(probe, "feature_info", None)
    if not isinstance(info, list) or not info or not isinstance(info[0], dict):
        return None
    reductions = {int(i["reduction"]) for i in info}
    if len(reductions) != 1 or len(info) <= 4:
        return None
    n_levels = len(_pyramid_factors(reductions.pop(), 4))
    depth = len(info)
    return tuple(round((i + 1) * depth / n_levels) - 1 for i in range(n_levels))


def _pyramid_factors(stride: int, n: int) -> tuple[float, ...]:
    usable = [f for f in _PYRAMID_FACTORS if f <= 1.0 or stride % f == 0]
    if n > len(usable):
        raise ValueError(
            f"a stride-{stride} backbone gives at most {len(usable)} pyramid levels, "
            f"{n} out_indices were asked for"
        )
    return tuple(usable[-n:])


def _resampler(factor: float, channels: int) -> nn.Module:
    if factor == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
        )
    if factor == 2.0:
        return nn.ConvTranspose2d(channels, channels, 2, stride=2)
    if factor == 1.0:
        return nn.Identity()
    return nn.MaxPool2d(2)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and all(torch.is_tensor(v) for v in inner.values()):
            state = inner
            break
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: [{', '.join(items[:limit])}{more}]"


class RegionEncoder(nn.Module):
    """timm backbone -> multi-level NCHW features of one region each.

    forward: x (N, C, S, S) with C = cfg.in_chans, S = cfg.region_size
          -> list of (N, feature_channels[l], S / feature_strides[l], S / feature_strides[l]).
    """

    def __init__(self, cfg: RegionEncoderConfig, weights: str | Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        indices = cfg.out_indices
        if indices is None:
            indices = _single_stride_indices(cfg)
        extra = {} if indices is None else {"out_indices": indices}
        self.model = _create(cfg, features_only=True, **extra)
        info = self.model.feature_info
        channels = [int(c) for c in info.channels()]
        strides = [int(r) for r in info.reduction()]
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"  # timm Format is a str
        self.pyramid: nn.ModuleList | None = None
        if len(set(strides)) == 1 and (len(strides) > 1 or cfg.out_indices is None):
            factors = _pyramid_factors(strides[0], len(strides))
            self.pyramid = nn.ModuleList(_resampler(f, c) for f, c in zip(factors, channels))
            strides = [int(strides[0] / f) for f in factors]
        if cfg.region_size % strides[-1] != 0:
            raise ValueError(
                f"region_size {cfg.region_size} is not a multiple of the deepest stride "
                f"{strides[-1]} of {cfg.backbone}"
            )
        self.feature_channels: list[int] = channels
        self.feature_strides: list[int] = strides
        self.num_features: int = channels[-1]
        if weights is not None:
            self.load_weights(weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of regions `x` (N, C, S, S), shallow to deep:
        [(N, C_l, S / s_l, S / s_l)] for the strides `feature_strides`; raises `ValueError` when `x`
        is not (N, `in_chans`, `region_size`, `region_size`)."""
        # x: (N, C, S, S) -> [(N, C_l, S / s_l, S / s_l)] shallow -> deep
        s, c = self.cfg.region_size, self.cfg.in_chans
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2:] != (s, s):
            raise ValueError(
                f"{self.cfg.backbone} region encoder expects (N, {c}, {s}, {s}), "
                f"got {tuple(x.shape)}"
            )
        feats = list(self.model(x))
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]  # (N, h, w, C) -> (N, C, h, w)
        if self.pyramid is not None:
            feats = [resample(f) for resample, f in zip(self.pyramid, feats)]
        return feats

    def _timm_names(self, file_keys: set[str]) -> dict[str, str]:
        """Map plain timm state-dict names (as found in `file_keys`) to our names."""
        names: dict[str, str] = {}
        for ours in self.state_dict():
            if not ours.startswith("model."):
                continue
            inner = ours[len("model.") :]
            if hasattr(self.model, "model") and inner.startswith("model."):
                candidates = [inner[len("model.") :]]
            else:
                top, _, rest = inner.partition(".")
                flat = re.sub(r"_(\d+)$", r".\1", top)  # FeatureListNet: layers.0 -> layers_0
                candidates = [f"{flat}.{rest}" if rest else flat, inner]
            for name in candidates:
                if name in file_keys:
                    names[name] = ours
                    break
        return names

    def load_weights(self, path: str | Path) -> None:
        """Load a local weights file (.safetensors, or a torch file read with weights_only=True).

        Accepts our own state dict or a plain timm one. Any missing, unexpected or mis-shaped
        key raises one ValueError naming them (timm classifier keys are ignored).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"region encoder weights not found: {path}")
        state = _read_state_dict(path)
        ours = self.state_dict()
        optional: set[str] = set()
        if not set(state) & set(ours):  # plain timm layout: rename, drop classifier keys
            names = self._timm_names(set(state))
            state = {
                names.get(k, k): v
                for k, v in state.items()
                if k in names or k.split(".")[0] not in _CLASSIFIER_KEYS
            }
            optional = {k for k in ours if k.startswith("pyramid.")}
        missing = [k for k in ours if k not in state and k not in optional]
        unexpected = [k for k in state if k not in ours]
        mismatched = (
            f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}"
            for k, v in state.items()
            if k in ours and v.shape != ours[k].shape
        )
        mismatched = list(mismatched)
        if missing or unexpected or mismatched:
            parts = [
                _listing(title, items)
                for title, items in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("shape mismatches (file vs model)", mismatched),
                )
                if items
            ]
            raise ValueError(
                f"weights file {path} does not fit region encoder {self.cfg.backbone} "
                f"(in_chans={self.cfg.in_chans}, region_size={self.cfg.region_size}): "
                + "; ".join(parts)
            )
        if any(p.is_meta for p in self.parameters()):
            raise ValueError("cannot load weights into a region encoder built on the meta device")
        self.load_state_dict(state, strict=not optional)
