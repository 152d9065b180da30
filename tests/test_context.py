"""Context encoders: config, registry, Hyper (exact + LSH) and Transformer-XL."""

import math

import pytest
import torch

from napari_xt.model.context import (
    ContextConfig,
    HyperContextEncoder,
    HyperState,
    IdentityContextEncoder,
    MambaContextEncoder,
    TransformerXLContextEncoder,
    TransformerXLState,
    build_context_encoder,
)
from napari_xt.model.context.attention import attention_lse
from napari_xt.model.context.lsh import causal_lsh_attention, lsh_attention, lsh_buckets

SMALL = dict(dim=32, head_dim=16, mlp_dim=64, depth=2)


def test_config_roundtrip_validation_and_registry():
    cfg = ContextConfig(kind="transformer_xl", chunk_len=8, mem_len=4)
    assert ContextConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_heads == 6 and cfg.d_inner == 1536 and cfg.resolved_dt_rank == 48
    with pytest.raises(ValueError):
        ContextConfig(kind="lstm")
    with pytest.raises(ValueError):
        ContextConfig(kind="hyper", dim=100, head_dim=128)
    with pytest.raises(ValueError):
        ContextConfig.from_dict({"kind": "hyper", "bogus": 1})
    kinds = {
        "hyper": HyperContextEncoder,
        "transformer_xl": TransformerXLContextEncoder,
        "mamba": MambaContextEncoder,
        "none": IdentityContextEncoder,
    }
    for kind, cls in kinds.items():
        assert type(build_context_encoder(ContextConfig(kind=kind, **SMALL))) is cls


@pytest.mark.parametrize("kind", ["hyper", "transformer_xl", "mamba", "none"])
def test_builds_on_meta(kind):
    with torch.device("meta"):
        enc = build_context_encoder(ContextConfig(kind=kind, depth=2))
    assert all(t.device.type == "meta" for t in enc.state_dict().values())


def test_identity_is_region_only_baseline():
    enc = build_context_encoder(ContextConfig(kind="none", dim=8))
    x = torch.randn(2, 5, 8)
    y, state = enc(x)
    assert torch.equal(y, x) and state is None
    with pytest.raises(ValueError):
        enc(torch.randn(2, 5, 7))


def test_hyper_layer_names_and_param_count_at_768():
    enc = HyperContextEncoder(ContextConfig(kind="hyper", depth=2))
    names = {k for k in enc.state_dict() if k.startswith("layers.1.")}
    assert names == {
        "layers.1.input_layernorm.weight",
        "layers.1.attn.qkv.weight",
        "layers.1.attn.qkv.bias",
        "layers.1.attn.proj.weight",
        "layers.1.attn.proj.bias",
        "layers.1.attn.lsh_projections",
        "layers.1.post_attention_layernorm.weight",
        "layers.1.mlp.gate_proj.weight",
        "layers.1.mlp.up_proj.weight",
        "layers.1.mlp.down_proj.weight",
    }
    d, m = 768, 3072
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + 3 * d * m + 2 * d
    assert per_layer == 9_441_792
    assert sum(p.numel() for p in enc.parameters()) == 2 * per_layer
    assert enc.layers[0].attn.lsh_projections.shape == (128, 7)


def _naive_block(layer, h, mask):
    """One attention block by hand with an explicit boolean mask (N, N), True = visible."""
    x = layer.input_layernorm(h)
    q, k, v = layer.attn.project(x)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    h = h + layer.attn.output(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def test_hyper_exact_path_equals_naive_softmax():
    enc = HyperContextEncoder(ContextConfig(kind="hyper", **SMALL))
    x = torch.randn(2, 40, 32)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    ref = x
    for layer in enc.layers:
        ref = _naive_block(layer, ref, causal)
    y, state = enc(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(state, HyperState) and state.seen == 40
    assert state.keys[0].shape == (2, 2, 40, 16)
    # a later token cannot change an earlier output
    x2 = x.clone()
    x2[:, 30:] += 1.0
    torch.testing.assert_close(enc(x2)[0][:, :30], y[:, :30])
    assert not torch.allclose(enc(x2)[0][:, 30:], y[:, 30:])


def test_hyper_streaming_with_state_equals_whole():
    enc = HyperContextEncoder(ContextConfig(kind="hyper", **SMALL))
    x = torch.randn(2, 48, 32)
    whole, _ = enc(x)
    state, parts = None, []
    for a, b in [(0, 16), (16, 24), (24, 48)]:
        y, state = enc(x[:, a:b], state=state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
    assert state.seen == 48 and state.keys[1].shape[2] == 48
    assert not state.keys[0].requires_grad
    windowed = HyperContextEncoder(ContextConfig(kind="hyper", kv_window=10, **SMALL))
    _, st = windowed(x[:, :16])
    assert st.keys[0].shape[2] == 10
    stateless = HyperContextEncoder(ContextConfig(kind="hyper", kv_window=0, **SMALL))
    assert stateless(x)[1] is None


def _pair(threshold):
    kw = dict(SMALL, lsh_block_size=16, lsh_sample_size=8)
    exact = HyperContextEncoder(ContextConfig(kind="hyper", lsh_threshold=10**9, **kw))
    lsh = HyperContextEncoder(ContextConfig(kind="hyper", lsh_threshold=threshold, **kw))
    lsh.load_state_dict(exact.state_dict())
    return exact, lsh


def test_lsh_used_only_above_threshold(monkeypatch):
    exact, lsh = _pair(threshold=64)
    calls = []
    import napari_xt.model.context.hyper as hyper_mod

    original = hyper_mod.causal_lsh_attention
    monkeypatch.setattr(
        hyper_mod,
        "causal_lsh_attention",
        lambda *a, **k: calls.append(a[0].shape[2]) or original(*a, **k),
    )
    x = torch.randn(1, 64, 32)
    torch.testing.assert_close(lsh(x)[0], exact(x)[0])
    assert calls == []
    x = torch.randn(1, 200, 32)
    y_lsh, y_exact = lsh(x)[0], exact(x)[0]
    assert calls == [200, 200]  # once per layer
    assert not torch.allclose(y_lsh, y_exact, atol=1e-4)
    # 200 -> halves of 100 -> 50: the first 50 tokens stay on the exact path
    torch.testing.assert_close(y_lsh[:, :50], y_exact[:, :50])
    assert not torch.allclose(y_lsh[:, 100:], y_exact[:, 100:], atol=1e-4)


def test_lsh_deterministic_across_save_load():
    cfg = ContextConfig(kind="hyper", lsh_threshold=64, lsh_block_size=16, **SMALL)
    a = HyperContextEncoder(cfg)
    again = HyperContextEncoder(cfg)
    torch.testing.assert_close(
        again.layers[0].attn.lsh_projections, a.layers[0].attn.lsh_projections
    )
    b = HyperContextEncoder(ContextConfig(**dict(cfg.to_dict(), lsh_seed=7)))
    assert not torch.equal(b.layers[0].attn.lsh_projections, a.layers[0].attn.lsh_projections)
    sd = a.state_dict()
    assert "layers.0.attn.lsh_projections" in sd
    b.load_state_dict(sd)
    x = torch.randn(2, 160, 32)
    ya = a(x)[0]
    torch.testing.assert_close(a(x)[0], ya, atol=0, rtol=0)
    torch.testing.assert_close(b(x)[0], ya, atol=0, rtol=0)
    b.layers[0].attn.lsh_projections.zero_()
    b.reset_lsh_projections()  # redraws from the layer seed (here lsh_seed=7)
    fresh = HyperContextEncoder(b.cfg)
    assert torch.equal(b.layers[0].attn.lsh_projections, fresh.layers[0].attn.lsh_projections)


def test_lsh_buckets_are_angular():
    proj = torch.randn(16, 7)
    x = torch.randn(50, 16)
    torch.testing.assert_close(lsh_buckets(3.0 * x, proj), lsh_buckets(x, proj))
    # every sign pattern gets its own bucket; neighbouring buckets differ by one hyperplane
    signs = ((torch.arange(128)[:, None] >> torch.arange(7)) & 1).float() * 2 - 1  # (128, 7)
    buckets = lsh_buckets(signs, torch.eye(7))
    assert sorted(buckets.tolist()) == list(range(128))
    by_bucket = signs[torch.argsort(buckets)]
    assert ((by_bucket[1:] != by_bucket[:-1]).sum(-1) == 1).all()


def test_lsh_causal_mask_respected():
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 256, 16), torch.randn(2, 2, 256, 16)
    t0 = 150
    v = torch.zeros(2, 2, 256, 16)
    v[:, :, t0 + 1 :] = 1.0  # only future keys carry signal
    out, lse = causal_lsh_attention(q, k, v, torch.randn(16, 7), 0.25, 32, 16, 8)
    assert torch.count_nonzero(out[:, :, : t0 + 1]) == 0
    assert (out[:, :, t0 + 1 :] > 0).all()
    assert torch.isfinite(lse).all()


def _clustered(n, d, n_clusters, generator):
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=generator), dim=-1)
    labels = torch.randint(n_clusters, (n,), generator=generator)
    noise = 0.05 * torch.randn(n, d, generator=generator)
    return 6.0 * (centres[labels] + noise), labels


def test_lsh_approximates_exact_on_clustered_inputs():
    g = torch.Generator().manual_seed(3)
    n, d = 1024, 16
    x, labels = _clustered(n, d, 8, g)
    q = k = x[None, None]  # (1, 1, N, d)
    values = torch.randn(8, d, generator=g)
    v = (values[labels] + 0.1 * torch.randn(n, d, generator=g))[None, None]
    proj = torch.randn(d, 7, generator=g)
    scale = d**-0.5
    exact, _ = attention_lse(q, k, v, scale)
    approx, _ = lsh_attention(q, k, v, proj, scale, block_size=64, sample_size=64)
    err = (approx - exact).norm() / exact.norm()
    baseline = (v.mean(2, keepdim=True).expand_as(exact) - exact).norm() / exact.norm()
    assert err < 0.1 and baseline > 0.5, (err, baseline)
    exact_c, _ = attention_lse(q, k, v, scale, causal_offset=0)
    approx_c, _ = causal_lsh_attention(q, k, v, proj, scale, 128, 64, 64)
    err_c = (approx_c - exact_c).norm() / exact_c.norm()
    assert err_c < 0.15, err_c


def test_attention_lse_blocks_match_one_pass():
    q, k, v = torch.randn(2, 10, 8), torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    o1, l1 = attention_lse(q, k, v, 0.3, causal_offset=27, key_block=8)
    o2, l2 = attention_lse(q, k, v, 0.3, causal_offset=27, key_block=1000)
    s = (q @ k.transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(10, 37, dtype=torch.bool).tril(27).logical_not(), -math.inf)
    torch.testing.assert_close(o1, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(l1, torch.logsumexp(s, -1))
    torch.testing.assert_close(l2, l1)


def _txl_mask(n, chunk, mem, causal=True):
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    start = (t // chunk) * chunk
    upper = j <= t if causal else j < start + chunk
    return upper & (j >= start - mem)


@pytest.mark.parametrize(("n", "causal"), [(40, True), (37, True), (37, False)])
def test_transformer_xl_chunked_equals_masked_reference(n, causal):
    cfg = ContextConfig(kind="transformer_xl", chunk_len=8, mem_len=12, causal=causal, **SMALL)
    enc = TransformerXLContextEncoder(cfg)
    x = torch.randn(2, n, 32)
    mask = _txl_mask(n, 8, 12, causal)
    ref = x
    for layer in enc.layers:
        ref = _naive_block(layer, ref, mask)
    y, state = enc(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(state, TransformerXLState) and state.seen == n
    # the memory matters: without it the result changes
    no_mem = TransformerXLContextEncoder(ContextConfig(**dict(cfg.to_dict(), mem_len=0)))
    no_mem.load_state_dict(enc.state_dict())
    assert not torch.allclose(no_mem(x)[0][:, 8:], y[:, 8:], atol=1e-4)
    torch.testing.assert_close(no_mem(x)[0][:, :8], y[:, :8])


def test_transformer_xl_streams_across_calls_with_detached_bounded_memory():
    cfg = ContextConfig(kind="transformer_xl", chunk_len=8, mem_len=12, **SMALL)
    enc = TransformerXLContextEncoder(cfg)
    x = torch.randn(1, 40, 32, requires_grad=True)
    whole, _ = enc(x)
    y1, state = enc(x[:, :16])
    assert all(m.shape == (1, 12, 32) and not m.requires_grad for m in state.memory)
    y2, state = enc(x[:, 16:], state=state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, atol=1e-5, rtol=1e-5)
    assert state.seen == 40 and all(m.shape[1] <= cfg.mem_len for m in state.memory)
    y2.sum().backward()  # gradients stop at the memory
    assert x.grad[:, :16].abs().sum() == 0 and x.grad[:, 16:].abs().sum() > 0


@pytest.mark.parametrize("kind", ["hyper", "transformer_xl", "mamba"])
def test_bfloat16_weights_run_and_stay_close_to_float32(kind):
    cfg = ContextConfig(
        kind=kind, lsh_threshold=64, lsh_block_size=16, chunk_len=32, mem_len=32, **SMALL
    )
    enc = build_context_encoder(cfg)
    x = torch.randn(1, 200, 32)
    ref, _ = enc(x)
    y, _ = enc.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 0.05, err


def test_attention_lse_without_visible_keys():
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 6)
    out, lse = attention_lse(q, k[:, :0], v[:, :0], 0.5)
    assert out.shape == (1, 3, 6) and torch.count_nonzero(out) == 0
    assert torch.isinf(lse).all()
    out, lse = attention_lse(q, k, v, 0.5, causal_offset=-1)  # query 0 sees nothing
    assert torch.count_nonzero(out[:, 0]) == 0 and torch.isinf(lse[:, 0])
    expected = torch.softmax(q[0, 2] @ k[0, :2].T * 0.5, -1) @ v[0, :2]
    torch.testing.assert_close(out[0, 2], expected)
