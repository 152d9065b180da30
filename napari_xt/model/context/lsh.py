"""Angular-LSH HyperAttention (Han et al., 2023), deterministic variant.

What is implemented:

- Hashing: `P` random hyperplanes (a `(head_dim, P)` tensor the caller stores as a buffer);
  the sign pattern of a vector is read as a Gray code and decoded to an integer bucket in
  `[0, 2**P)`, so buckets adjacent in sort order differ by one hyperplane.
- Non-causal attention: queries and keys are sorted by bucket; sorted keys are cut into blocks
  of `block_size` (the last one padded and masked) and sorted queries into as many equal
  blocks; each query block attends exactly to its key block. A residual component attends to
  `sample_size` keys taken at a fixed stride over the original key order (no randomness),
  excluding keys already in the query's block, weighted by `Nk / sample_size`; both parts
  are merged through their log-sum-exp.
- Causal attention: up to `threshold` keys it is exact. Above, the sequence is halved: each
  half is handled causally (recursively) and the lower-left quadrant, where every key precedes
  every query, with the non-causal LSH attention. No query ever receives weight from a later
  key.
"""

from __future__ import annotations

import math

import torch

from .attention import attention_lse, merge_attention


def make_lsh_projections(head_dim: int, num_projs: int, seed: int) -> torch.Tensor:
    """Random hyperplanes (head_dim, num_projs) drawn from a seeded CPU generator.

    Under `torch.device("meta")` an uninitialised meta tensor is returned instead.
    """
    if torch.empty(0).device.type == "meta":
        return torch.empty(head_dim, num_projs)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(head_dim, num_projs, generator=gen, device="cpu").to(torch.empty(0).device)


def lsh_buckets(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """x (..., N, d), projections (d, P) -> bucket ids (..., N) in [0, 2**P)."""
    gray = (torch.matmul(x, projections.to(x.dtype)) > 0).long()  # (..., N, P)
    binary = torch.cumsum(gray, dim=-1) % 2  # Gray -> binary, most significant bit first
    weights = 2 ** torch.arange(gray.shape[-1] - 1, -1, -1, device=x.device)
    return (binary * weights).sum(-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, d), index (B, H, M) -> (B, H, M, d)."""
    return torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projections: torch.Tensor,
    scale: float,
    block_size: int,
    sample_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal LSH attention. q (B,H,Nq,d), k/v (B,H,Nk,d) -> out (B,H,Nq,d), lse (B,H,Nq)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if nk <= block_size or nq == 0:
        return attention_lse(q, k, v, scale)
    q_order = torch.argsort(lsh_buckets(q, projections), dim=-1, stable=True)  # (B, H, Nq)
    k_order = torch.argsort(lsh_buckets(k, projections), dim=-1, stable=True)  # (B, H, Nk)
    n_blocks = math.ceil(nk / block_size)
    q_block = math.ceil(nq / n_blocks)
    k_pad, q_pad = n_blocks * block_size - nk, n_blocks * q_block - nq

    qs = torch.nn.functional.pad(_gather_rows(q, q_order), (0, 0, 0, q_pad))
    ks = torch.nn.functional.pad(_gather_rows(k, k_order), (0, 0, 0, k_pad))
    vs = torch.nn.functional.pad(_gather_rows(v, k_order), (0, 0, 0, k_pad))
    key_bias = torch.zeros(n_blocks * block_size, device=q.device, dtype=torch.float32)
    key_bias[nk:] = float("-inf")
    out, lse = attention_lse(
        qs.view(b, h, n_blocks, q_block, d),
        ks.view(b, h, n_blocks, block_size, d),
        vs.view(b, h, n_blocks, block_size, d),
        scale,
        bias=key_bias.view(n_blocks, 1, block_size),
    )
    out = out.reshape(b, h, -1, d)[:, :, :nq]  # sorted query order
    lse = lse.reshape(b, h, -1)[:, :, :nq]

    n_samples = min(sample_size, nk)
    if n_samples > 0:
        sample = (torch.arange(n_samples, device=q.device) * nk) // n_samples  # (S,)
        k_rank = torch.argsort(k_order, dim=-1)  # sorted position of each key
        sample_block = k_rank[..., sample] // block_size  # (B, H, S)
        query_block = torch.arange(nq, device=q.device) // q_block  # (Nq,)
        same = query_block[None, None, :, None] == sample_block[:, :, None, :]  # (B,H,Nq,S)
        bias = torch.zeros(same.shape, device=q.device, dtype=torch.float32)
        bias = bias.masked_fill(same, float("-inf"))
        out_res, lse_res = attention_lse(
            qs[:, :, :nq], k[:, :, sample], v[:, :, sample], scale, bias=bias
        )
        out, lse = merge_attention(out, lse, out_res, lse_res + math.log(nk / n_samples))

    q_rank = torch.argsort(q_order, dim=-1)  # back to the original query order
    return _gather_rows(out, q_rank), torch.gather(lse, 2, q_rank)


def causal_lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projections: torch.Tensor,
    scale: float,
    threshold: int,
    block_size: int,
    sample_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention, q/k/v (B, H, N, d) aligned; exact up to `threshold` tokens."""
    n = q.shape[2]
    if n <= threshold:
        return attention_lse(q, k, v, scale, causal_offset=0)
    m = n // 2
    args = (projections, scale, threshold, block_size, sample_size)
    top, top_lse = causal_lsh_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], *args)
    diag, diag_lse = causal_lsh_attention(q[:, :, m:], k[:, :, m:], v[:, :, m:], *args)
    off, off_lse = lsh_attention(
        q[:, :, m:], k[:, :, :m], v[:, :, :m], projections, scale, block_size, sample_size
    )
    bottom, bottom_lse = merge_attention(diag, diag_lse, off, off_lse)
    return torch.cat([top, bottom], dim=2), torch.cat([top_lse, bottom_lse], dim=2)
