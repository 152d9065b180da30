"""Long-context encoders: Hyper attention, Transformer-XL, Mamba, and the identity baseline.

`build_context_encoder(cfg)` picks the encoder for `cfg.kind`; every encoder has
`forward(tokens (B, N, D), state=None) -> (tokens, state)`.
"""

from __future__ import annotations

from .base import (
    CONTEXT_KINDS,
    ContextConfig,
    ContextEncoder,
    GatedMLP,
    IdentityContextEncoder,
    RMSNorm,
)
from .hyper import HyperContextEncoder, HyperState
from .mamba import MambaContextEncoder, MambaState
from .transformer_xl import TransformerXLContextEncoder, TransformerXLState

ContextState = HyperState | TransformerXLState | MambaState

CONTEXT_ENCODERS: dict[str, type[ContextEncoder]] = {
    "hyper": HyperContextEncoder,
    "transformer_xl": TransformerXLContextEncoder,
    "mamba": MambaContextEncoder,
    "none": IdentityContextEncoder,
}


def build_context_encoder(cfg: ContextConfig) -> ContextEncoder:
    """The context encoder for `cfg.kind` (see CONTEXT_KINDS)."""
    try:
        cls = CONTEXT_ENCODERS[cfg.kind]
    except KeyError:
        raise ValueError(
            f"unknown context kind {cfg.kind!r}; expected one of {sorted(CONTEXT_ENCODERS)}"
        ) from None
    return cls(cfg)


__all__ = [
    "CONTEXT_ENCODERS",
    "CONTEXT_KINDS",
    "ContextConfig",
    "ContextEncoder",
    "ContextState",
    "GatedMLP",
    "HyperContextEncoder",
    "HyperState",
    "IdentityContextEncoder",
    "MambaContextEncoder",
    "MambaState",
    "RMSNorm",
    "TransformerXLContextEncoder",
    "TransformerXLState",
    "build_context_encoder",
]
