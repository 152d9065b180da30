"""Mamba context encoder, the xT variant.

Per layer i (names as in `mamba_ssm.Mamba`, so official checkpoints map by prefix):
`layers.{i}.norm` (LayerNorm with bias, eps `norm_eps`) and `layers.{i}.mixer` with
`in_proj` Linear(D, 2 * Di, no bias), `conv1d` depthwise Conv1d(Di, Di, d_conv, groups=Di,
padding=d_conv - 1, bias), `x_proj` Linear(Di, dt_rank + 2 * d_state, no bias), `dt_proj`
Linear(dt_rank, Di, bias), `A_log` (Di, d_state), `D` (Di,), `out_proj` Linear(Di, D, no bias);
Di = expand * D, dt_rank = ceil(D / 16).

Block: xT's block is `h = LN(h); h = h + Mixer(h)` (the residual adds to the normalised
stream); `prenorm_residual=True` gives `h = h + Mixer(LN(h))`. With `bidirectional`, layers
0, 2, 4, ... scan the reversed sequence (flip, run, flip back), as in xT. No final norm (xT
has none).

Streaming (unidirectional only): the state holds, per layer, the last d_conv - 1 conv inputs
(B, Di, d_conv - 1) and the SSM state (B, Di, d_state); two pieces with the carried state
equal one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import ContextConfig, ContextEncoder
from .scan import causal_conv, selective_scan


@dataclass
class MambaState:
    """Per-layer conv inputs (B, Di, d_conv - 1) and SSM states (B, Di, d_state)."""

    conv: tuple[torch.Tensor, ...]
    ssm: tuple[torch.Tensor, ...]
    seen: int = 0


class MambaMixer(nn.Module):
    """Selective SSM mixer; forward(x (B, L, D), conv_state, ssm_state) -> (y, conv, ssm)."""

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        d, di, n, r = cfg.dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank = di, n, r
        self.scan_chunk, self.use_kernels = cfg.scan_chunk, cfg.use_kernels
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(
            di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias
        )
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.out_proj = nn.Linear(di, d, bias=False)
        # S4D-real init: A = -(1 .. d_state) for every channel; stored as log.
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1)  # (Di, N)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(di))
        # dt_proj: weight ~ U(-r^-0.5, r^-0.5); bias = softplus^-1(dt), dt log-uniform.
        std = r**-0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(di) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                + math.log(cfg.dt_min)
            ).clamp(min=cfg.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix `x` (B, L, D) through the selective scan, continuing from `conv_state`
        (B, Di, d_conv - 1) and `ssm_state` (B, Di, d_state) when given.

        Returns (y (B, L, D), conv_state, ssm_state), the states at the end of `x`."""
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2 Di, L)
        xi, z = xz.chunk(2, dim=1)  # (B, Di, L) each
        xi, conv_state = causal_conv(
            xi, self.conv1d.weight, self.conv1d.bias, conv_state, self.use_kernels
        )
        x_dbl = self.x_proj(xi.transpose(1, 2))  # (B, L, r + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, Di, L), bias in the scan
        y, ssm_state = selective_scan(
            xi.contiguous(),
            dt.contiguous(),
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2).contiguous(),  # (B, N, L)
            c.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=ssm_state,
            chunk=self.scan_chunk,
            use_kernels=self.use_kernels,
        )
        assert y.shape[-1] == length
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state


class MambaLayer(nn.Module):
    """`norm` + `mixer`; optionally scans the reversed sequence."""

    def __init__(self, cfg: ContextConfig, reverse: bool) -> None:
        super().__init__()
        self.reverse = reverse
        self.prenorm_residual = cfg.prenorm_residual
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg)

    def forward(self, h, conv_state=None, ssm_state=None):
        """h (B, L, D) -> (h (B, L, D), conv_state, ssm_state)."""
        if self.reverse:
            h = h.flip(1)
        normed = self.norm(h)
        mixed, conv_state, ssm_state = self.mixer(normed, conv_state, ssm_state)
        h = (h if self.prenorm_residual else normed) + mixed
        if self.reverse:
            h = h.flip(1)
        return h, conv_state, ssm_state


class MambaContextEncoder(ContextEncoder):
    """forward(tokens (B, N, D), state) -> (tokens, MambaState | None).

    Bidirectional encoders return no state and refuse one (a reversed layer needs the
    whole sequence).
    """

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            MambaLayer(cfg, reverse=cfg.bidirectional and i % 2 == 0) for i in range(cfg.depth)
        )

    @property
    def streamable(self) -> bool:
        """Whether the encoder can continue from a state: no layer scans the reversed
        sequence."""
        return not any(layer.reverse for layer in self.layers)

    def forward(self, tokens, state: MambaState | None = None):
        """Contextualize tokens (B, N, D), continuing from `state` when given.

        Returns the tokens (B, N, D) and a `MambaState` (None for a bidirectional encoder). Raises
        `ValueError` for tokens that are not (B, N, `dim`), a state given to a bidirectional
        encoder, or a state of another depth."""
        self._check_tokens(tokens, self.cfg.dim)
        if not self.streamable:
            if state is not None:
                raise ValueError("a bidirectional Mamba encoder cannot continue from a state")
            h = tokens
            for layer in self.layers:
                h, _, _ = layer(h)
            return h, None
        if state is not None and len(state.conv) != len(self.layers):
            raise ValueError(f"state has {len(state.conv)} layers, encoder {len(self.layers)}")
        h, convs, ssms = tokens, [], []
        for i, layer in enumerate(self.layers):
            conv = state.conv[i] if state is not None else None
            ssm = state.ssm[i] if state is not None else None
            h, conv, ssm = layer(h, conv, ssm)
            convs.append(conv.detach())
            ssms.append(ssm.detach())
        seen = (state.seen if state is not None else 0) + tokens.shape[1]
        return h, MambaState(tuple(convs), tuple(ssms), seen)
