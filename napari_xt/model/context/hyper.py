"""Hyper context encoder: the xT "Hyper" decoder stack.

Per layer (names follow the official xT checkpoints, `decoder.layers.{i}....` maps by prefix):
`input_layernorm` (RMSNorm) -> `attn` (`attn.qkv` Linear(D, 3D) with bias, heads of 128,
causal, `attn.proj` Linear(D, D) with bias) -> residual -> `post_attention_layernorm`
(RMSNorm) -> `mlp` (`gate_proj`, `up_proj`, `down_proj`, no bias; down(gelu(gate) * up))
-> residual. No norm after the last layer (the official stack has none).

Attention is exact (`scaled_dot_product_attention`) up to `lsh_threshold` keys and LSH
HyperAttention above (see `lsh.py`). The hyperplanes are a persistent buffer
`layers.{i}.attn.lsh_projections` (head_dim, lsh_num_projs), drawn from `lsh_seed + i`, so
they are saved in the state dict and identical after a reload.

Streaming: the state keeps, per layer, the keys and values of past tokens (detached; the
last `kv_window` of them, all when None). With causal attention and an unbounded window,
processing a sequence in pieces with the carried state equals processing it whole on the
exact path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBlock, SelfAttention, exact_attention, merge_attention
from .base import ContextConfig, ContextEncoder
from .lsh import causal_lsh_attention, lsh_attention, make_lsh_projections


@dataclass
class HyperState:
    """Carried keys/values per layer, each (B, H, M, head_dim), and tokens seen so far."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    seen: int = 0


class HyperSelfAttention(SelfAttention):
    """Self-attention that switches to LSH HyperAttention above `lsh_threshold` keys."""

    def __init__(self, cfg: ContextConfig, seed: int) -> None:
        super().__init__(cfg)
        self.seed = seed
        self.threshold = cfg.lsh_threshold
        self.block_size = cfg.lsh_block_size
        self.sample_size = cfg.lsh_sample_size
        self.num_projs = cfg.lsh_num_projs
        self.register_buffer(
            "lsh_projections", make_lsh_projections(cfg.head_dim, cfg.lsh_num_projs, seed)
        )

    def reset_lsh_projections(self) -> None:
        """Redraw the hyperplanes from this layer's seed (e.g. after importing weights)."""
        fresh = make_lsh_projections(self.head_dim, self.num_projs, self.seed)
        with torch.no_grad():
            self.lsh_projections.copy_(fresh.to(self.lsh_projections.device))

    def uses_lsh(self, n_keys: int) -> bool:
        """Whether attention over `n_keys` keys (past and current) takes the LSH path
        (more than `lsh_threshold`)."""
        return n_keys > self.threshold

    def attend(self, q, k, v, n_past: int) -> torch.Tensor:
        """q (B,H,Nq,d), k/v (B,H,n_past+Nq,d) -> (B,H,Nq,d)."""
        if not self.uses_lsh(k.shape[-2]):
            return exact_attention(q, k, v, n_past, self.causal)
        scale = self.head_dim**-0.5
        proj = self.lsh_projections
        if not self.causal:
            out = lsh_attention(q, k, v, proj, scale, self.block_size, self.sample_size)[0]
            return out.to(q.dtype)
        out, lse = causal_lsh_attention(
            q,
            k[:, :, n_past:],
            v[:, :, n_past:],
            proj,
            scale,
            self.threshold,
            self.block_size,
            self.sample_size,
        )
        if n_past > 0:
            past_out, past_lse = lsh_attention(
                q,
                k[:, :, :n_past],
                v[:, :, :n_past],
                proj,
                scale,
                self.block_size,
                self.sample_size,
            )
            out, lse = merge_attention(out, lse, past_out, past_lse)
        return out.to(q.dtype)


class HyperContextEncoder(ContextEncoder):
    """`depth` Hyper layers; forward(tokens (B, N, D), state) -> (tokens, state)."""

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            AttentionBlock(cfg, HyperSelfAttention(cfg, seed=cfg.lsh_seed + i))
            for i in range(cfg.depth)
        )

    def reset_lsh_projections(self) -> None:
        """Redraw the hyperplanes of every layer from its seed."""
        for layer in self.layers:
            layer.attn.reset_lsh_projections()

    def forward(self, tokens, state: HyperState | None = None):
        """Contextualize tokens (B, N, D), continuing from `state` when given.

        Returns the tokens (B, N, D) and a `HyperState` with every layer's keys and values (the
        last `kv_window` of them), or None for the state when `kv_window` is 0. Raises
        `ValueError` for tokens that are not (B, N, `dim`) or a state of another depth."""
        self._check_tokens(tokens, self.cfg.dim)
        if state is not None and len(state.keys) != len(self.layers):
            raise ValueError(f"state has {len(state.keys)} layers, encoder {len(self.layers)}")
        window = self.cfg.kv_window
        h = tokens  # (B, N, D)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past = (state.keys[i], state.values[i]) if state is not None else None
            h, k, v = layer(h, past)
            if window == 0:
                continue
            if past is not None:
                k = torch.cat([past[0].to(k.dtype), k], dim=-2)
                v = torch.cat([past[1].to(v.dtype), v], dim=-2)
            if window is not None:
                k, v = k[:, :, -window:], v[:, :, -window:]
            keys.append(k.detach())
            values.append(v.detach())
        if window == 0:
            return h, None
        seen = (state.seen if state is not None else 0) + tokens.shape[1]
        return h, HyperState(tuple(keys), tuple(values), seen)
