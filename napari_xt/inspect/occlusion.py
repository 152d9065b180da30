"""Occlusion for Hyper encoders at the cost of a few layers, not of a forward per region.

Occluding region j changes only its own m tokens at the encoder's input. In the first
layer every query still sees the same keys but j's, so its softmax is updated exactly from
precomputed statistics (per query the score maximum M, the sum Z of exp(s - M) and the
weighted values U): the m old key columns are taken out and the m new ones put in, in
float64; the m queries of j itself are recomputed whole. The layers between see every
token changed and run as they are; the last layer is needed only at the chosen region's
tokens (its queries alone, against every key). What is left per region is the first
layer's MLP and the last layer's projections over every token: for the built-in model (2
layers) at 32 x 32 regions (4,096 tokens) about half the time of a forward per region
(65 s instead of 125 s on this project's 2-core CPU), the same shares to ~1e-6.

Layouts: one sequence (N tokens, D channels), heads (H, N, d); a batch of B occluded copies
(B, ...), each hiding the m tokens of one region (`hidden` (B, m) sequence positions).
"""

from __future__ import annotations

from typing import Any

import torch

MIN_TOKENS = 2048  # below, a batched forward per region is as fast (measured: 256 tokens)


def supports(model: Any, n_tokens: int, min_tokens: int = MIN_TOKENS) -> bool:
    """Whether `HyperOcclusion` applies and pays: a dense Hyper model on its exact path,
    with at least `min_tokens` tokens in the crop."""
    cfg = model.cfg.context
    return (cfg.kind == "hyper" and cfg.depth >= 1 and min_tokens <= n_tokens
            <= cfg.lsh_threshold and model.cls_token is None and model.global_context is None)


class HyperOcclusion:
    """The first layer's statistics of one crop, then the chosen region's context tokens
    for batches of occluded copies (`target_tokens`)."""

    def __init__(self, model: Any, tokens: torch.Tensor, blank: torch.Tensor,
                 target: torch.Tensor) -> None:
        ctx = model.context
        self.layers = list(ctx.layers)
        self.causal = bool(ctx.cfg.causal)
        self.x, self.blank = tokens[0], blank[0]  # (N, D)
        self.target = target  # (T,) sequence positions whose output is asked
        first = self.layers[0]
        self.scale = first.attn.head_dim ** -0.5
        self.q, self.k, self.v = (t[0] for t in first.attn.project(first.input_layernorm(tokens)))
        self.qb, self.kb, self.vb = (t[0] for t in first.attn.project(first.input_layernorm(blank)))
        n = self.x.shape[0]
        ms, zs, us = [], [], []
        for start in range(0, n, 512):  # query blocks: (H, 512, N) at a time
            qi = torch.arange(start, min(n, start + 512), device=self.x.device)
            s = (self.q[:, qi] @ self.k.transpose(-1, -2)).double() * self.scale
            if self.causal:
                s = s.masked_fill(~self._visible(len(qi), n, qi=qi), float("-inf"))
            m = s.amax(-1)
            e = torch.exp(s - m[..., None])
            ms.append(m)
            zs.append(e.sum(-1))
            us.append(e @ self.v.double())
        self.m, self.z, self.u = torch.cat(ms, 1), torch.cat(zs, 1), torch.cat(us, 1)

    def _visible(self, nq: int, nk: int, qi: torch.Tensor | None = None,
                 kj: torch.Tensor | None = None) -> torch.Tensor:
        dev = self.x.device
        qi = torch.arange(nq, device=dev) if qi is None else qi
        kj = torch.arange(nk, device=dev) if kj is None else kj
        return kj[..., None, :] <= qi[..., :, None]

    def _first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, m) -> the first layer's output of the B occluded copies (B, N, D)."""
        b, m = hidden.shape
        n, dim = self.x.shape
        heads, _, d = self.q.shape
        flat = hidden.reshape(-1)  # (B*m,)
        q = self.q.double()  # (H, N, d)
        k_old, k_new = self.k[:, flat].double(), self.kb[:, flat].double()  # (H, B*m, d)
        v_old, v_new = self.v[:, flat].double(), self.vb[:, flat].double()
        # scores of every query against the hidden keys, old and new: (H, N, B, m)
        s_old = torch.bmm(q, k_old.transpose(1, 2)).view(heads, n, b, m) * self.scale
        s_new = torch.bmm(q, k_new.transpose(1, 2)).view(heads, n, b, m) * self.scale
        if self.causal:
            vis = (hidden[None] <= torch.arange(n, device=hidden.device)[:, None, None])[None]
            s_old = s_old.masked_fill(~vis, float("-inf"))
            s_new = s_new.masked_fill(~vis, float("-inf"))
        m_new = torch.maximum(self.m[..., None], s_new.amax(-1))  # (H, N, B)
        shift = torch.exp(self.m[..., None] - m_new)
        e_old = torch.exp(s_old - m_new[..., None])  # (H, N, B, m)
        e_new = torch.exp(s_new - m_new[..., None])
        z = self.z[..., None] * shift - e_old.sum(-1) + e_new.sum(-1)  # (H, N, B)
        num = (torch.einsum("hnbm,hbmd->hnbd", e_new, v_new.view(heads, b, m, d))
               - torch.einsum("hnbm,hbmd->hnbd", e_old, v_old.view(heads, b, m, d)))
        o = (self.u[:, :, None] * shift[..., None] + num) / z[..., None]  # (H, N, B, d)
        o = o.permute(2, 0, 1, 3)  # (B, H, N, d), a view
        # the occluded region's own queries: recomputed whole against the occluded keys
        rows = torch.arange(b, device=hidden.device)[:, None]
        q_j = self.qb[:, flat].double()  # (H, B*m, d)
        s_j = torch.bmm(q_j, self.k.double().transpose(1, 2)).view(heads, b, m, n) * self.scale
        s_jj = (q_j.view(heads, b, m, d) @ k_new.view(heads, b, m, d).transpose(-1, -2)
                ) * self.scale  # (H, B, m, m): against its own (new) keys
        s_j[:, rows, :, hidden] = s_jj.permute(1, 3, 0, 2)  # (B, m_key, H, m_query)
        if self.causal:
            s_j = s_j.masked_fill(~self._visible(m, n, qi=hidden)[None], float("-inf"))
        p_j = torch.softmax(s_j, -1)  # (H, B, m, N)
        p_jj = p_j[:, rows, :, hidden].permute(2, 0, 3, 1)  # (H, B, m_query, m_key)
        o_j = (torch.bmm(p_j.view(heads, b * m, n), self.v.double()).view(heads, b, m, d)
               + p_jj @ (v_new - v_old).view(heads, b, m, d))  # (H, B, m, d)
        o[rows, :, hidden] = o_j.permute(1, 2, 0, 3)
        first = self.layers[0]
        o = o.permute(0, 2, 1, 3).to(self.x.dtype).reshape(b, n, heads * d)
        h = self.x[None].expand(b, -1, -1).clone()
        h[rows, hidden] = self.blank[hidden]
        h = h + first.attn.proj(o)
        return h + first.mlp(first.post_attention_layernorm(h))

    def target_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, m) -> the chosen region's context tokens in each copy (B, T, D)."""
        if len(self.layers) == 1:
            return self._first_layer(hidden)[:, self.target]
        h = self._first_layer(hidden)
        for blk in self.layers[1:-1]:
            h, _, _ = blk(h)
        last = self.layers[-1]
        q, k, v = last.attn.project(last.input_layernorm(h))  # (B, H, N, d)
        t = self.target
        s = (q[:, :, t] @ k.transpose(-1, -2)).float() * self.scale  # (B, H, T, N)
        if self.causal:
            s = s.masked_fill(~self._visible(len(t), k.shape[-2], qi=t), float("-inf"))
        o = torch.softmax(s, -1).to(v.dtype) @ v  # (B, H, T, d)
        b, heads, nt, d = o.shape
        h_t = h[:, t] + last.attn.proj(o.transpose(1, 2).reshape(b, nt, heads * d))
        return h_t + last.mlp(last.post_attention_layernorm(h_t))
