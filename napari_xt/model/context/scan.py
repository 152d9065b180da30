"""Selective scan (Mamba S6) in pure PyTorch, with the `mamba_ssm` kernel when usable.

Recurrence per channel c and state n, for t = 0 .. L-1:
    dt_t  = softplus(delta_t + delta_bias)                      (if delta_softplus)
    h_t   = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B_t[n] * x_t
    y_t   = sum_n C_t[n] * h_t + D[c] * x_t,  then  y_t *= silu(z_t)   (if z is given)

The pure path precomputes the decays and inputs of `chunk` steps at once (vectorised over
batch, channels and states) and runs a short loop inside each chunk; it is exact (no
log-space tricks that could overflow) and computes in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional CUDA kernels
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _kernel_scan
except Exception:  # any import failure means "no kernels"
    _kernel_scan = None

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv
except Exception:
    _kernel_conv = None

KERNELS_AVAILABLE = _kernel_scan is not None


def selective_scan_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch scan.

    x, delta, z (B, Di, L); A (Di, N); B, C (B, N, L); D, delta_bias (Di,);
    initial_state (B, Di, N). Returns y (B, Di, L) in x's dtype and the last state
    (B, Di, N) in the compute dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    bsz, di, length = x.shape
    n = A.shape[-1]
    xf, dt = x.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af, Bf, Cf = A.to(dtype), B.to(dtype), C.to(dtype)
    h = (
        initial_state.to(dtype)
        if initial_state is not None
        else x.new_zeros(bsz, di, n, dtype=dtype)
    )
    track_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, A, B, C, initial_state, delta_bias)
    )
    # time-major chunks (T, B, Di, N) keep every step's slice contiguous
    dt_t = dt.permute(2, 0, 1)[..., None]  # (L, B, Di, 1)
    x_t = xf.permute(2, 0, 1)[..., None]  # (L, B, Di, 1)
    b_t = Bf.permute(2, 0, 1)[:, :, None, :]  # (L, B, 1, N)
    ys = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        decay = torch.exp(dt_t[s:e] * Af)  # (T, B, Di, N)
        inp = dt_t[s:e] * x_t[s:e] * b_t[s:e]  # (T, B, Di, N)
        if track_grad:
            steps = []
            for t in range(e - s):
                h = torch.addcmul(inp[t], decay[t], h)
                steps.append(h)
            states = torch.stack(steps)
        else:  # write each step straight into its slot
            states = torch.empty_like(decay)
            for t in range(e - s):
                h = torch.addcmul(inp[t], decay[t], h, out=states[t])
        ys.append(torch.einsum("tbdn,bnt->bdt", states, Cf[:, :, s:e]))
    y = torch.cat(ys, dim=-1) if ys else xf.new_zeros(bsz, di, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xf
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype), h


def kernels_usable(x: torch.Tensor, enabled: bool = True) -> bool:
    """True when the mamba_ssm kernels imported and x lives on CUDA."""
    return enabled and KERNELS_AVAILABLE and x.is_cuda


def selective_scan(
    x,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=True,
    initial_state=None,
    chunk: int = 16,
    use_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the CUDA kernel when usable and no initial state is carried, else pure."""
    if initial_state is None and kernels_usable(x, use_kernels):
        y, last = _kernel_scan(
            x,
            delta,
            A,
            B,
            C,
            D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=True,
        )
        return y, last
    return selective_scan_reference(
        x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk
    )


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    use_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU. x (B, Di, L), weight (Di, 1, K), conv_state (B, Di, K-1).

    Returns (B, Di, L) and the new conv state: the last K-1 inputs (zeros before the start).
    """
    k = weight.shape[-1]
    fresh = conv_state is None
    if conv_state is None:
        conv_state = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    padded = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, Di, K-1+L)
    new_state = padded[:, :, padded.shape[-1] - (k - 1) :]
    if _kernel_conv is not None and kernels_usable(x, use_kernels) and fresh:
        out = _kernel_conv(x, weight.squeeze(1), bias, activation="silu")
    else:
        out = F.silu(F.conv1d(padded, weight, bias, groups=x.shape[1]))
    return out, new_state
