"""Selective scan (Mamba S6) in pure PyTorch, with the `mamba_ssm` kernel when usable.

Recurrence per channel c and state n, for t = 0 .. L-1:
    dt_t  = softplus(delta_t + delta_bias)                      (if delta_softplus)
    h_t   = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B_t[n] * x_t
    y_t   = sum_n C_t[n] * h_t + D[c] * x_t,  then  y_t *= silu(z_t)   (if z is given)

The pure path precomputes the decays and inputs of `chunk` steps at once (vectorised over
batch, channels and states) and runs a short loop inside each chunk (best on CPU) or, on
CUDA, a log-depth doubling scan over chunks of 256 steps (few kernel launches). Both are
exact (no log-space tricks that could overflow) and compute in float32 (float64 stays).
When gradients are tracked each chunk is checkpointed: only its inputs are kept and the
(T, B, Di, N) states are recomputed in the backward pass, so memory grows with L * Di,
not L * Di * N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernels
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _kernel_scan
except Exception:  # any import failure means "no kernels"
    _kernel_scan = None

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv
except Exception:
    _kernel_conv = None

KERNELS_AVAILABLE = _kernel_scan is not None
PARALLEL_CHUNK = 256


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
    parallel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch scan.

    x, delta, z (B, Di, L); A (Di, N); B, C (B, N, L); D, delta_bias (Di,);
    initial_state (B, Di, N). Returns y (B, Di, L) in x's dtype and the last state
    (B, Di, N) in the compute dtype. `parallel` (default: on CUDA) scans chunks of
    `PARALLEL_CHUNK` steps with a log-depth doubling scan instead of a step loop.
    """
    if parallel is None:
        parallel = x.is_cuda
    if parallel:
        chunk = max(chunk, PARALLEL_CHUNK)
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
        args = (dt_t[s:e], x_t[s:e], b_t[s:e], Cf[:, :, s:e], Af, h, parallel, track_grad)
        if track_grad:  # keep only the chunk inputs; recompute the (T, B, Di, N) states
            y_c, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y_c, h = _scan_chunk(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1) if ys else xf.new_zeros(bsz, di, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xf
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype), h


def _scan_chunk(dt_c, x_c, b_c, c_c, A, h, parallel: bool, track_grad: bool):
    """One chunk: dt_c, x_c (T, B, Di, 1), b_c (T, B, 1, N), c_c (B, N, T), A (Di, N),
    h (B, Di, N) -> y (B, Di, T) without the D and z terms, last state (B, Di, N)."""
    decay = torch.exp(dt_c * A)  # (T, B, Di, N)
    inp = dt_c * x_c * b_c  # (T, B, Di, N)
    if parallel:
        states = _doubling_scan(decay, inp, h)
        h = states[-1]
    elif track_grad:  # unbind: one backward node per chunk instead of one per step
        steps = []
        for inp_t, decay_t in zip(inp.unbind(0), decay.unbind(0)):
            h = torch.addcmul(inp_t, decay_t, h)
            steps.append(h)
        states = torch.stack(steps)
    else:  # write each step straight into its slot
        states = torch.empty_like(decay)
        for t in range(decay.shape[0]):
            h = torch.addcmul(inp[t], decay[t], h, out=states[t])
    return torch.einsum("tbdn,bnt->bdt", states, c_c), h


def _doubling_scan(decay: torch.Tensor, inp: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of h_t = decay_t * h_{t-1} + inp_t for one chunk, (T, B, Di, N).

    Hillis-Steele inclusive scan over the pairs (a, b) with (a1, b1) then (a2, b2) =
    (a1 * a2, a2 * b1 + b2); only products of decays (<= 1) appear, so it is stable.
    """
    a, b = decay, inp
    offset = 1
    while offset < a.shape[0]:
        b = torch.cat([b[:offset], torch.addcmul(b[offset:], a[offset:], b[:-offset])])
        a = torch.cat([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    return torch.addcmul(b, a, h0)


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
