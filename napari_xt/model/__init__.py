"""Models: tokenizer, region encoders, context encoders, heads and the xT assembly.

Public API (resolved lazily, so importing this package does not import torch or timm):

- `create_model(name, num_classes=None, in_chans=None, region_weights=None, **overrides) -> XT`
- `get_config(name, **overrides) -> XTConfig`, `list_models(pattern=None) -> list[str]`
- `XT`, `XTConfig` and the nested configs `RegionEncoderConfig`, `TokenizerConfig`,
  `ContextConfig`, `HeadConfig`
- `save_checkpoint(model, path, extra_metadata=None, overwrite=False)`,
  `load_checkpoint(path, device="cpu", in_chans=None) -> XT`, `model_hash(model) -> str`,
  `import_official_checkpoint(path, name_or_config, strict=True, **overrides) -> XT`,
  `CheckpointError`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "create_model": "zoo",
    "get_config": "zoo",
    "list_models": "zoo",
    "PAPER_PARAMS": "zoo",
    "XT": "xt",
    "XTConfig": "xt",
    "RegionEncoderConfig": "region",
    "RegionEncoder": "region",
    "TokenizerConfig": "tokenizer",
    "ContextConfig": "context",
    "HeadConfig": "heads",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_metadata": "checkpoint",
    "model_hash": "checkpoint",
    "import_official_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
}

__all__ = [
    "CheckpointError",
    "ContextConfig",
    "HeadConfig",
    "PAPER_PARAMS",
    "RegionEncoder",
    "RegionEncoderConfig",
    "TokenizerConfig",
    "XT",
    "XTConfig",
    "create_model",
    "get_config",
    "import_official_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_hash",
    "read_metadata",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from .checkpoint import (
        CheckpointError,
        import_official_checkpoint,
        load_checkpoint,
        model_hash,
        read_metadata,
        save_checkpoint,
    )
    from .context import ContextConfig
    from .heads import HeadConfig
    from .region import RegionEncoder, RegionEncoderConfig
    from .tokenizer import TokenizerConfig
    from .xt import XT, XTConfig
    from .zoo import PAPER_PARAMS, create_model, get_config, list_models


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
