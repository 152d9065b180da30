"""Named model configurations: the xT iNaturalist table, Hiera rows, and small CPU demos.

Paper table (iNaturalist 2018, Reptilia super-class, 284 classes as in the official configs).
Regions are 256 px for SwinV2 (timm ``swinv2_{tiny,small,base}_window16_256`` and, for L,
``swinv2_large_window12to16_192to256``), 224 px for Hiera. ``a/b`` in a name: the model
trains on a x a px crops of b px regions (``crop_regions`` = a / b). Context encoders have width
768; Hyper and XL stack 2 layers, Mamba 4 (these depths reproduce the published parameter
counts; see `PAPER_PARAMS`). Baselines (no context) pool the deepest map into an MLP head
(C -> 4C -> K), as the official ``naive`` head does.

XL rows use our Transformer-XL encoder (the Hyper block, carried memory) with 64-token
segments (one 256 px region of 8 x 8 tokens) and a 192-token memory (the other three regions
of a 512 px crop); the official code streams region by region, ours in segments of the global
row-major sequence.
"""

from __future__ import annotations

import difflib
from dataclasses import is_dataclass, replace
from typing import Any

from .context import ContextConfig
from .fields import check_fields
from .heads import HeadConfig
from .region import RegionEncoderConfig
from .tokenizer import TokenizerConfig
from .xt import XT, XTConfig

INAT_CLASSES = 284

_SWIN = {
    "t": "swinv2_tiny_window16_256",
    "s": "swinv2_small_window16_256",
    "b": "swinv2_base_window16_256",
    "l": "swinv2_large_window12to16_192to256",
}
_HIERA = {"b": "hiera_base_224", "b_plus": "hiera_base_plus_224"}

# Parameter counts printed in the paper's iNaturalist table (millions).
PAPER_PARAMS: dict[str, float] = {
    "swinv2_t_baseline": 31,
    "xt_swin_t_hyper_256_256": 47,
    "xt_swin_t_hyper_512_256": 47,
    "xt_swin_t_xl_512_256": 47,
    "xt_swin_t_mamba_512_256": 44,
    "swinv2_s_baseline": 52,
    "xt_swin_s_hyper_256_256": 69,
    "xt_swin_s_hyper_512_256": 69,
    "xt_swin_s_xl_512_256": 69,
    "swinv2_b_baseline": 92,
    "xt_swin_b_hyper_256_256": 107,
    "xt_swin_b_hyper_512_256": 107,
    "xt_swin_b_xl_512_256": 107,
    "xt_swin_b_mamba_512_256": 103,
    "swinv2_l_baseline": 206,
    "xt_swin_l_hyper_256_256": 215,
    "xt_swin_l_hyper_512_256": 215,
    "xt_swin_l_xl_512_256": 215,
    "xt_swin_l_mamba_512_256": 212,
}


def _context(kind: str) -> ContextConfig:
    if kind == "none":
        return ContextConfig(kind="none", depth=0)
    if kind == "hyper":
        return ContextConfig(kind="hyper", dim=768, depth=2, mlp_dim=3072, causal=True)
    if kind == "xl":
        return ContextConfig(
            kind="transformer_xl", dim=768, depth=2, mlp_dim=3072, causal=True,
            chunk_len=64, mem_len=192,
        )
    if kind == "mamba":
        return ContextConfig(kind="mamba", dim=768, depth=4, d_state=16, d_conv=4, expand=2)
    raise ValueError(kind)


def _classifier(name: str, backbone: str, size: int, context: str, crop: int) -> XTConfig:
    return XTConfig(
        name=name,
        in_chans=3,
        num_classes=INAT_CLASSES,
        region=RegionEncoderConfig(backbone=backbone, region_size=size, in_chans=3),
        tokenizer=TokenizerConfig(region_size=size),
        context=_context(context),
        head=HeadConfig(kind="classification", num_classes=INAT_CLASSES),
        crop_regions=crop,
    )


def _paper_table() -> dict[str, XTConfig]:
    table: dict[str, XTConfig] = {}
    for size_key, backbone in _SWIN.items():
        base = f"swinv2_{size_key}_baseline"
        table[base] = _classifier(base, backbone, 256, "none", 1)
        rows = [("hyper_256_256", "hyper", 1), ("hyper_512_256", "hyper", 2),
                ("xl_512_256", "xl", 2)]
        if size_key != "s":  # the paper has no Swin-S Mamba row
            rows.append(("mamba_512_256", "mamba", 2))
        for suffix, context, crop in rows:
            name = f"xt_swin_{size_key}_{suffix}"
            table[name] = _classifier(name, backbone, 256, context, crop)
    for size_key, backbone in _HIERA.items():
        base = f"hiera_{size_key}_baseline"
        table[base] = _classifier(base, backbone, 224, "none", 1)
        for suffix, context in (("hyper_448_224", "hyper"), ("xl_448_224", "xl")):
            name = f"xt_hiera_{size_key}_{suffix}"
            cfg = _classifier(name, backbone, 224, context, 2)
            if context == "xl":  # 7 x 7 tokens per 224 px region
                cfg = replace(cfg, context=replace(cfg.context, chunk_len=49, mem_len=147))
            table[name] = cfg
    return table


def _demo_table() -> dict[str, XTConfig]:
    """Small models that run in well under a second per 512 px on 2 CPU cores."""
    region = RegionEncoderConfig(backbone="test_convnext2", region_size=128, in_chans=3)
    tokenizer = TokenizerConfig(region_size=128)
    small = dict(dim=128, depth=2, head_dim=32, mlp_dim=256)
    demos = {
        "xt_tiny_demo": XTConfig(
            name="xt_tiny_demo", in_chans=3, num_classes=10, region=region, tokenizer=tokenizer,
            context=ContextConfig(kind="hyper", **small),
            head=HeadConfig(kind="classification", num_classes=10), crop_regions=4,
        ),
        "xt_tiny_demo_xl": XTConfig(
            name="xt_tiny_demo_xl", in_chans=3, num_classes=10, region=region,
            tokenizer=tokenizer,
            context=ContextConfig(kind="transformer_xl", chunk_len=16, mem_len=48, **small),
            head=HeadConfig(kind="classification", num_classes=10), crop_regions=4,
        ),
        "xt_tiny_demo_mamba": XTConfig(
            name="xt_tiny_demo_mamba", in_chans=3, num_classes=10, region=region,
            tokenizer=tokenizer,
            context=ContextConfig(kind="mamba", dim=128, depth=2, d_state=8),
            head=HeadConfig(kind="classification", num_classes=10), crop_regions=4,
        ),
        "xt_tiny_demo_region_only": XTConfig(
            name="xt_tiny_demo_region_only", in_chans=3, num_classes=10, region=region,
            tokenizer=tokenizer, context=ContextConfig(kind="none", depth=0),
            head=HeadConfig(kind="classification", num_classes=10), crop_regions=1,
        ),
        "xt_tiny_demo_seg": XTConfig(
            name="xt_tiny_demo_seg", in_chans=3, num_classes=2, region=region,
            tokenizer=tokenizer, context=ContextConfig(kind="hyper", **small),
            head=HeadConfig(kind="segmentation", num_classes=2), crop_regions=4,
        ),
    }
    return demos


_REGISTRY: dict[str, XTConfig] = {**_paper_table(), **_demo_table()}


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted zoo names; `pattern` keeps names containing it."""
    return sorted(n for n in _REGISTRY if pattern is None or pattern in n)


def _merge(obj: Any, key: str, value: Any) -> Any:
    current = getattr(obj, key)
    if is_dataclass(current) and isinstance(value, dict):
        check_fields(type(current), value)
        return replace(current, **value)
    return value


def get_config(name: str, **overrides: Any) -> XTConfig:
    """The zoo config `name` with `overrides` applied.

    `num_classes=` and `in_chans=` also update the head and region encoder; other keys are
    XTConfig fields, nested ones as dicts of changes (``context={"depth": 4}``) or whole
    configs. Unknown names raise KeyError listing close names.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (list_models() gives all names)")
    return apply_overrides(_REGISTRY[name], **overrides)


def apply_overrides(cfg: XTConfig, **overrides: Any) -> XTConfig:
    """`cfg` with `overrides` applied, as `get_config` does for zoo models."""
    num_classes = overrides.pop("num_classes", None)
    in_chans = overrides.pop("in_chans", None)
    check_fields(XTConfig, overrides)
    changes = {k: _merge(cfg, k, v) for k, v in overrides.items()}
    if num_classes is not None:
        changes["num_classes"] = num_classes
        changes["head"] = replace(changes.get("head", cfg.head), num_classes=num_classes)
    if in_chans is not None:
        changes["in_chans"] = in_chans
        changes["region"] = replace(changes.get("region", cfg.region), in_chans=in_chans)
    if "tokenizer" in changes and "region" not in changes:
        size = changes["tokenizer"].region_size
        changes["region"] = replace(cfg.region, region_size=size)
    return replace(cfg, **changes)


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    region_weights: str | None = None,
    **overrides: Any,
) -> XT:
    """Build zoo model `name` (random init; `region_weights` a local backbone weights file)."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if in_chans is not None:
        overrides["in_chans"] = in_chans
    return XT(get_config(name, **overrides), region_weights=region_weights)
