"""Shared pieces of the context encoders: configuration, interface, norms and the MLP.

Every context encoder maps a token sequence `(B, N, D)` to a sequence of the same shape and
returns a state that lets a caller continue the sequence in a later call (streaming).
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fields import from_mapping

CONTEXT_KINDS = ("hyper", "transformer_xl", "mamba", "none")


@dataclass(frozen=True)
class ContextConfig:
    """Configuration of a context encoder; saved inside checkpoints (see `to_dict`).

    Shared: `kind`, `dim`, `depth`, `norm_eps`.
    Attention encoders (hyper, transformer_xl): `head_dim` (heads = dim // head_dim), `mlp_dim`
    (gated GELU MLP width), `causal`, `qkv_bias`, `proj_bias`.
    Hyper: exact attention up to `lsh_threshold` keys, LSH HyperAttention above it with
    `2 ** lsh_num_projs` angular buckets, sorted blocks of `lsh_block_size` keys and a
    deterministic strided residual sample of `lsh_sample_size` keys (0 disables it);
    projections drawn from `lsh_seed`. `kv_window`: how many past keys/values per layer the
    streaming state keeps (None: all of them, exact streaming; 0: no state).
    Transformer-XL: `chunk_len` tokens per segment, `mem_len` detached past tokens per layer.
    Mamba: `d_state`, `d_conv`, `expand`, `dt_rank` (None: ceil(dim / 16)), the dt
    initialisation range `dt_min`/`dt_max`/`dt_init_floor`, `conv_bias`; `bidirectional`
    reverses the scan of every even-indexed layer (0, 2, ...) as in xT; `prenorm_residual`
    False keeps xT's block `h = LN(h); h = h + Mamba(h)`, True uses `h = h + Mamba(LN(h))`;
    `scan_chunk` steps per vectorised chunk of the pure PyTorch scan; `use_kernels` allows the
    `mamba_ssm` CUDA kernels when they import and the input is on CUDA.
    """

    kind: str = "hyper"
    dim: int = 768
    depth: int = 2
    norm_eps: float = 1e-5
    # attention encoders
    head_dim: int = 128
    mlp_dim: int = 3072
    causal: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    # hyper
    lsh_threshold: int = 4096
    lsh_num_projs: int = 7
    lsh_block_size: int = 256
    lsh_sample_size: int = 256
    lsh_seed: int = 0
    kv_window: int | None = None
    # transformer-xl
    chunk_len: int = 256
    mem_len: int = 512
    # mamba
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bidirectional: bool = True
    prenorm_residual: bool = False
    scan_chunk: int = 16
    use_kernels: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"unknown context kind {self.kind!r}; expected one of {CONTEXT_KINDS}")
        if self.dim <= 0 or self.depth < 0:
            raise ValueError(f"dim must be positive and depth non-negative, got {self}")
        if self.kind in ("hyper", "transformer_xl") and self.dim % self.head_dim:
            raise ValueError(f"dim {self.dim} is not a multiple of head_dim {self.head_dim}")
        if self.kind == "transformer_xl" and (self.chunk_len <= 0 or self.mem_len < 0):
            raise ValueError("transformer_xl needs chunk_len > 0 and mem_len >= 0")
        if self.kv_window is not None and self.kv_window < 0:
            raise ValueError("kv_window must be None or >= 0")
        if self.d_conv < 1 or self.scan_chunk < 1:
            raise ValueError("d_conv and scan_chunk must be >= 1")

    @property
    def num_heads(self) -> int:
        """Number of attention heads, `dim // head_dim`."""
        return self.dim // self.head_dim

    @property
    def d_inner(self) -> int:
        """Width of the Mamba inner stream, `expand * dim`."""
        return self.expand * self.dim

    @property
    def resolved_dt_rank(self) -> int:
        """Rank of the Mamba dt projection: `dt_rank`, or `ceil(dim / 16)` when None."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.dim / 16)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict of its fields, as saved in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextConfig:
        """The configuration of a mapping made by `to_dict`; raises `ValueError` for
        unknown keys or invalid values."""
        return from_mapping(cls, data)


class ContextEncoder(nn.Module, abc.ABC):
    """Interface: `forward(tokens (B, N, D), state=None) -> (tokens, state)`.

    The tokens already carry their 2-D sin-cos position (added by `XT.region_tokens`).
    `state` is the encoder's own state class or None (start fresh).
    """

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @abc.abstractmethod
    def forward(
        self,
        tokens: torch.Tensor,
        state: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """Each encoder defines its own pass over the sequence."""

    @staticmethod
    def _check_tokens(tokens: torch.Tensor, dim: int) -> None:
        if tokens.ndim != 3 or tokens.shape[-1] != dim:
            raise ValueError(f"expected tokens (B, N, {dim}), got {tuple(tokens.shape)}")


class IdentityContextEncoder(ContextEncoder):
    """kind "none": the region-only baseline; tokens pass through unchanged, no state."""

    def forward(self, tokens, state=None):
        """The tokens (B, N, D) unchanged and no state; raises `ValueError` when they
        are not (B, N, `dim`)."""
        self._check_tokens(tokens, self.cfg.dim)
        return tokens, None


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned `weight` (D,)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (..., D) normalised by its root mean square and scaled by `weight`."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GatedMLP(nn.Module):
    """`down(gelu(gate(x)) * up(x))`, no biases; (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`down(gelu(gate(x)) * up(x))` of `x` (..., D) -> (..., D)."""
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))
