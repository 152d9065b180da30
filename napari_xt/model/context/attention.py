"""Attention primitives shared by the Hyper and Transformer-XL encoders.

Heads are laid out `(B, H, N, head_dim)`. `attention_lse` returns, next to the output, the
log-sum-exp of each query's scores so partial attentions over disjoint key sets can be merged
exactly (`merge_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ContextConfig, GatedMLP, RMSNorm


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    causal_offset: int | None = None,
    key_block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, keys processed in blocks (online softmax).

    q (..., Nq, d), k/v (..., Nk, d), bias additive and broadcastable to (..., Nq, Nk).
    With `causal_offset` c, query i sees key j only when j <= i + c.
    Returns out (..., Nq, d) and lse (..., Nq), both float32 (the softmax statistics stay in
    float32 under bf16 autocast too); a query that sees no key gets 0 and -inf.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    if causal_offset is not None:
        nk = min(nk, max(nq + causal_offset, 0))  # later keys are masked for every query
    if nk == 0:
        out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32)
        return out, torch.full(q.shape[:-1], float("-inf"), device=q.device)
    out = lse = None
    for start in range(0, nk, key_block):
        stop = min(start + key_block, nk)
        s = torch.matmul(q, k[..., start:stop, :].transpose(-1, -2)).float() * scale
        if bias is not None:
            s = s + bias[..., start:stop]
        if causal_offset is not None:
            qi = torch.arange(nq, device=q.device)[:, None]
            kj = torch.arange(start, stop, device=q.device)[None, :]
            s = s.masked_fill(kj > qi + causal_offset, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        vb = v[..., start:stop, :]
        o = torch.matmul(p.to(vb.dtype), vb).float() / torch.where(denom > 0, denom, 1.0)
        part_lse = (m + torch.log(denom)).squeeze(-1)
        out, lse = (o, part_lse) if out is None else merge_attention(out, lse, o, part_lse)
    return out, lse


def merge_attention(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attentions over disjoint key sets: o (..., N, d), lse (..., N)."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1 = torch.exp(l1 - m)
    w2 = torch.exp(l2 - m)
    total = w1 + w2
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / torch.where(total > 0, total, 1.0)[..., None]
    return o, m + torch.log(total)


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int, causal: bool
) -> torch.Tensor:
    """SDPA; keys = [n_past cached keys; current keys]. q (B,H,Nq,d), k/v (B,H,n_past+Nq,d)."""
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if n_past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    nq, nk = q.shape[-2], k.shape[-2]
    qi = torch.arange(nq, device=q.device)[:, None]
    kj = torch.arange(nk, device=q.device)[None, :]
    mask = kj <= qi + (nk - nq)  # (Nq, Nk) True = visible
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """`qkv` Linear(D, 3D) and `proj` Linear(D, D); heads of `head_dim`; exact attention."""

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.proj_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> q, k, v each (B, H, N, head_dim)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q, k, v, n_past: int) -> torch.Tensor:
        """q (B,H,Nq,d), k/v (B,H,n_past+Nq,d) -> (B,H,Nq,d)."""
        return exact_attention(q, k, v, n_past, self.causal)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o (B, H, N, head_dim) -> (B, N, D)."""
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class AttentionBlock(nn.Module):
    """RMSNorm -> attention -> residual -> RMSNorm -> gated GELU MLP -> residual."""

    def __init__(self, cfg: ContextConfig, attn: SelfAttention) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.dim, cfg.mlp_dim)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of hidden states h (B, M, D) -> (B, H, M, head_dim) each."""
        _, k, v = self.attn.project(self.input_layernorm(h))
        return k, v

    def forward(
        self,
        h: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, N, D), past keys/values (B, H, M, d) -> (h (B, N, D), k, v of these tokens)."""
        q, k, v = self.attn.project(self.input_layernorm(h))
        keys, values, n_past = k, v, 0
        if past is not None and past[0].shape[-2] > 0:
            n_past = past[0].shape[-2]
            keys = torch.cat([past[0].to(k.dtype), k], dim=-2)
            values = torch.cat([past[1].to(v.dtype), v], dim=-2)
        h = h + self.attn.output(self.attn.attend(q, keys, values, n_past))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v
