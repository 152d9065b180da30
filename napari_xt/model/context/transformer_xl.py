"""Transformer-XL context encoder with a memory that is really carried.

The sequence is cut into segments of `chunk_len` tokens. Each layer keeps the detached
hidden states it received for the previous segments (at most `mem_len` tokens) and its
queries attend to [memory; current segment] (causal inside the segment when `causal`).
The memory is returned as the state, so a caller may stream segment by segment across calls;
memory size is flat in the image size.

Layers use the same block as the Hyper encoder (RMSNorm, exact SDPA, gated GELU MLP) and the
same parameter names. Positions: the caller adds the 2-D sin-cos position of each token's
global (row, col) to the tokens, which stays meaningful across segments; no relative bias.

Equivalence: processing N tokens in segments equals one pass with the mask where token t of
the segment starting at s sees key j iff max(0, s - mem_len) <= j and (j <= t if causal
else j < s + chunk_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBlock, SelfAttention
from .base import ContextConfig, ContextEncoder


@dataclass
class TransformerXLState:
    """Per-layer memory of detached past hidden states, each (B, M, D) with M <= mem_len."""

    memory: tuple[torch.Tensor, ...]
    seen: int = 0


class TransformerXLContextEncoder(ContextEncoder):
    """forward(tokens (B, N, D), state) -> (tokens (B, N, D), TransformerXLState)."""

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(
            AttentionBlock(cfg, SelfAttention(cfg)) for _ in range(cfg.depth)
        )

    def forward(self, tokens, state: TransformerXLState | None = None):
        """Contextualize tokens (B, N, D) segment by segment, continuing from the
        memory in `state` when given.

        Returns the tokens (B, N, D) and a `TransformerXLState` holding each layer's memory after
        the last segment. Raises `ValueError` for tokens that are not (B, N, `dim`) or a state of
        another depth."""
        self._check_tokens(tokens, self.cfg.dim)
        b, n, d = tokens.shape
        mem_len, chunk = self.cfg.mem_len, self.cfg.chunk_len
        if state is None:
            memory = [tokens.new_zeros(b, 0, d) for _ in self.layers]
            seen = 0
        else:
            if len(state.memory) != len(self.layers):
                n_mem, n_layers = len(state.memory), len(self.layers)
                raise ValueError(f"state has {n_mem} layers, encoder {n_layers}")
            memory, seen = [m.to(tokens.dtype) for m in state.memory], state.seen
        outputs = []
        for start in range(0, n, chunk):
            h = tokens[:, start : start + chunk]  # (B, T, D)
            for i, layer in enumerate(self.layers):
                mem = memory[i]
                past = layer.keys_values(mem) if mem.shape[1] > 0 else None
                if mem_len > 0:
                    memory[i] = torch.cat([mem, h], dim=1)[:, -mem_len:].detach()
                h, _, _ = layer(h, past)
            outputs.append(h)
        out = torch.cat(outputs, dim=1) if outputs else tokens
        return out, TransformerXLState(tuple(memory), seen + n)
