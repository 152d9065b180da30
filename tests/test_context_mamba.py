"""Mamba context encoder: selective scan, parameterisation, bidirectionality, streaming."""

import math

import pytest
import torch
import torch.nn.functional as F

import napari_xt.model.context.scan as scan_mod
from napari_xt.model.context import ContextConfig, MambaContextEncoder, MambaState
from napari_xt.model.context.scan import (
    KERNELS_AVAILABLE,
    selective_scan,
    selective_scan_reference,
)

SMALL = dict(kind="mamba", dim=16, depth=2, d_state=4)


def _naive_scan(x, delta, A, B, C, D, z, delta_bias, h0):
    """Step-by-step recurrence, float64."""
    dt = F.softplus(delta + delta_bias[:, None])
    h = h0.clone()
    ys = []
    for t in range(x.shape[-1]):
        h = (
            torch.exp(dt[:, :, t, None] * A) * h
            + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        )
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D[:, None] * x
    return y * F.silu(z), h


@pytest.mark.parametrize(("chunk", "parallel"), [(1, False), (5, False), (64, False), (5, True)])
def test_scan_equals_naive_recurrence_float64(chunk, parallel, monkeypatch):
    monkeypatch.setattr(scan_mod, "PARALLEL_CHUNK", 4)  # several doubling chunks of 5 steps
    g = torch.Generator().manual_seed(0)
    b, di, n, length = 2, 6, 4, 23

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, delta, z = r(b, di, length), r(b, di, length), r(b, di, length)
    A = -torch.rand(di, n, generator=g, dtype=torch.float64) * 3
    B, C, D, bias, h0 = r(b, n, length), r(b, n, length), r(di), r(di), r(b, di, n)
    y, last = selective_scan_reference(
        x, delta, A, B, C, D, z, bias, True, h0, chunk=chunk, parallel=parallel
    )
    y_ref, last_ref = _naive_scan(x, delta, A, B, C, D, z, bias, h0)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)
    # split in two with the carried state equals one pass
    y1, h1 = selective_scan_reference(
        x[..., :9], delta[..., :9], A, B[..., :9], C[..., :9], D, z[..., :9], bias, True, h0
    )
    y2, _ = selective_scan_reference(
        x[..., 9:], delta[..., 9:], A, B[..., 9:], C[..., 9:], D, z[..., 9:], bias, True, h1
    )
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_ref, rtol=1e-12, atol=1e-12)


def test_mamba_names_shapes_init_and_param_count_at_768():
    enc = MambaContextEncoder(ContextConfig(kind="mamba", dim=768, depth=2))
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items() if k.startswith("layers.0.")}
    assert shapes == {
        "layers.0.norm.weight": (768,),
        "layers.0.norm.bias": (768,),
        "layers.0.mixer.in_proj.weight": (3072, 768),
        "layers.0.mixer.conv1d.weight": (1536, 1, 4),
        "layers.0.mixer.conv1d.bias": (1536,),
        "layers.0.mixer.x_proj.weight": (48 + 32, 1536),
        "layers.0.mixer.dt_proj.weight": (1536, 48),
        "layers.0.mixer.dt_proj.bias": (1536,),
        "layers.0.mixer.A_log": (1536, 16),
        "layers.0.mixer.D": (1536,),
        "layers.0.mixer.out_proj.weight": (768, 1536),
    }
    assert sum(p.numel() for p in enc.layers[0].parameters()) == 3_772_416
    mixer = enc.layers[0].mixer
    torch.testing.assert_close(mixer.A_log[7], torch.log(torch.arange(1.0, 17.0)))
    assert torch.equal(mixer.D, torch.ones(1536))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert mixer.dt_proj.weight.abs().max() <= 48**-0.5
    assert [layer.reverse for layer in enc.layers] == [True, False]


def test_mixer_matches_manual_formula():
    torch.manual_seed(0)
    enc = MambaContextEncoder(ContextConfig(bidirectional=False, **SMALL))
    layer = enc.layers[0]
    m = layer.mixer
    x = torch.randn(2, 11, 16)
    normed = layer.norm(x)
    xi, z = m.in_proj(normed).transpose(1, 2).chunk(2, dim=1)
    xi = F.silu(m.conv1d(xi)[..., :11])
    dt, b, c = torch.split(m.x_proj(xi.transpose(1, 2)), [1, 4, 4], dim=-1)
    dt = m.dt_proj(dt).transpose(1, 2)  # bias included here
    y, _ = _naive_scan(
        xi.double(),
        dt.double(),
        -torch.exp(m.A_log).double(),
        b.transpose(1, 2).double(),
        c.transpose(1, 2).double(),
        m.D.double(),
        z.double(),
        torch.zeros(32).double(),
        torch.zeros(2, 32, 4).double(),
    )
    expected = normed + m.out_proj(y.float().transpose(1, 2))  # xT: residual on LN(h)
    out, _, _ = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    pre = MambaContextEncoder(ContextConfig(bidirectional=False, prenorm_residual=True, **SMALL))
    pre.load_state_dict(enc.state_dict())
    torch.testing.assert_close(pre.layers[0](x)[0], expected - normed + x, atol=1e-5, rtol=1e-5)


def test_bidirectional_layers_see_the_future_and_refuse_state():
    x = torch.randn(1, 12, 16)
    x2 = x.clone()
    x2[:, -1] += torch.randn(16)  # not a constant shift, which LayerNorm would remove
    bi = MambaContextEncoder(ContextConfig(bidirectional=True, **SMALL))
    y, state = bi(x)
    assert state is None
    assert not torch.allclose(bi(x2)[0][:, 0], y[:, 0])
    with pytest.raises(ValueError):
        bi(x, state=MambaState((), ()))
    uni = MambaContextEncoder(ContextConfig(bidirectional=False, **SMALL))
    torch.testing.assert_close(uni(x2)[0][:, :-1], uni(x)[0][:, :-1])
    # a reversed layer equals flip -> forward layer -> flip
    fwd = MambaContextEncoder(ContextConfig(bidirectional=False, **SMALL))
    fwd.load_state_dict(bi.state_dict())
    torch.testing.assert_close(
        bi.layers[0](x)[0], fwd.layers[0](x.flip(1))[0].flip(1), atol=1e-6, rtol=1e-6
    )


def test_unidirectional_streaming_with_carried_state_equals_whole():
    enc = MambaContextEncoder(ContextConfig(bidirectional=False, scan_chunk=4, **SMALL))
    x = torch.randn(2, 21, 16)
    whole, final = enc(x)
    state, parts = None, []
    for a, b in [(0, 9), (9, 11), (11, 21)]:  # the 2-token piece is shorter than the conv
        y, state = enc(x[:, a:b], state=state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
    assert state.seen == 21
    assert state.conv[0].shape == (2, 32, 3) and state.ssm[1].shape == (2, 32, 4)
    torch.testing.assert_close(state.ssm[1], final.ssm[1], atol=1e-5, rtol=1e-5)
    assert not state.ssm[0].requires_grad


def test_dispatch_uses_pure_path_on_cpu():
    x = torch.randn(1, 4, 5)
    A = -torch.ones(4, 2)
    B, C = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    y1, s1 = selective_scan(x, x, A, B, C, use_kernels=True)
    y2, s2 = selective_scan_reference(x, x, A, B, C)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert math.isfinite(float(y1.sum()))


@pytest.mark.skipif(
    not (KERNELS_AVAILABLE and torch.cuda.is_available()), reason="needs mamba_ssm and CUDA"
)
def test_kernel_matches_pure_path():
    torch.manual_seed(0)
    cfg = ContextConfig(kind="mamba", dim=64, depth=2)
    enc = MambaContextEncoder(cfg).cuda()
    pure = MambaContextEncoder(ContextConfig(**dict(cfg.to_dict(), use_kernels=False))).cuda()
    pure.load_state_dict(enc.state_dict())
    x = torch.randn(2, 300, 64, device="cuda")
    torch.testing.assert_close(enc(x)[0], pure(x)[0], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("parallel", [False, True])
def test_scan_gradients_match_naive_recurrence(parallel):
    g = torch.Generator().manual_seed(5)
    b, di, n, length = 1, 3, 2, 11

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, delta, z, B, C, D, bias, h0 = (
        r(b, di, length),
        r(b, di, length),
        r(b, di, length),
        r(b, n, length),
        r(b, n, length),
        r(di),
        r(di),
        r(b, di, n),
    )
    A = (-torch.rand(di, n, generator=g, dtype=torch.float64)).requires_grad_(True)
    inputs = (x, delta, A, B, C, D, z, bias, h0)
    y, last = selective_scan_reference(
        x, delta, A, B, C, D, z, bias, True, h0, chunk=4, parallel=parallel
    )
    ours = torch.autograd.grad((y.sum() + last.square().sum()), inputs)
    y_ref, last_ref = _naive_scan(x, delta, A, B, C, D, z, bias, h0)
    ref = torch.autograd.grad((y_ref.sum() + last_ref.square().sum()), inputs)
    for a, b_ in zip(ours, ref):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
