"""XT assembly: the official whole-image forward re-implemented naively, stages, streaming."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_xt.model import XT, XTConfig, create_model, get_config
from napari_xt.model.xt import sincos_2d, token_layout


def _official_pos_embed(dim, grid_h, grid_w):
    # The official recipe (MAE style) written out with numpy float32: meshgrid(w, h), the
    # first half of the channels from grid[0] (the column), the second from the row.
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, -1)

    def one_axis(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _naive_mamba_mixer(x, sd, p):
    """Selective SSM written as its recurrence, one time step at a time. x (B, L, D)."""
    b, length, _ = x.shape
    xi, z = F.linear(x, sd[p + "in_proj.weight"]).chunk(2, dim=-1)  # (B, L, Di) each
    w = sd[p + "conv1d.weight"][:, 0]  # (Di, K): causal depthwise convolution
    k = w.shape[1]
    padded = F.pad(xi, (0, 0, k - 1, 0))
    u = sum(padded[:, j : j + length] * w[:, j] for j in range(k)) + sd[p + "conv1d.bias"]
    u = F.silu(u)
    a = -torch.exp(sd[p + "A_log"])  # (Di, N)
    n = a.shape[1]
    rank = sd[p + "dt_proj.weight"].shape[1]
    dt, bb, cc = F.linear(u, sd[p + "x_proj.weight"]).split([rank, n, n], dim=-1)
    dt = F.softplus(F.linear(dt, sd[p + "dt_proj.weight"], sd[p + "dt_proj.bias"]))
    state = x.new_zeros(b, u.shape[-1], n)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * a)
        state = decay * state + dt[:, t, :, None] * bb[:, t, None, :] * u[:, t, :, None]
        ys.append((state * cc[:, t, None, :]).sum(-1) + sd[p + "D"] * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, sd[p + "out_proj.weight"])


def _reference_forward(model: XT, x: torch.Tensor) -> torch.Tensor:
    """Official iNat forward, step by step, reading weights by name (no XT stage methods)."""
    cfg = model.cfg
    sd = model.state_dict()
    s = cfg.region.region_size
    rows, cols = x.shape[2] // s, x.shape[3] // s
    backbone = model.region_encoder.model
    grid_rows = []
    for i in range(rows):
        row = []
        for j in range(cols):
            f = backbone(x[:, :, i * s : (i + 1) * s, j * s : (j + 1) * s])[-1]
            if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
                f = f.permute(0, 3, 1, 2)
            row.append(f)
        grid_rows.append(torch.cat(row, dim=3))
    g = torch.cat(grid_rows, dim=2)  # (B, C, rows*h, cols*w): stitched global grid
    b, c, gh, gw = g.shape
    if cfg.context.kind == "none":
        pooled = g.mean(dim=(2, 3))
        h = F.linear(pooled, sd["head.mlp.0.weight"], sd["head.mlp.0.bias"])
        h = F.layer_norm(F.gelu(h), (h.shape[-1],), sd["head.mlp.2.weight"], sd["head.mlp.2.bias"])
        return F.linear(h, sd["head.mlp.3.weight"], sd["head.mlp.3.bias"])
    seq = g.flatten(2).transpose(1, 2)  # (B, gh*gw, C), row-major
    seq = F.linear(seq, sd["input_proj.weight"], sd["input_proj.bias"])
    d = seq.shape[-1]
    seq = seq + torch.tensor(_official_pos_embed(d, gh, gw)).to(seq)
    seq = torch.cat([seq, sd["cls_token"].expand(b, 1, d)], dim=1)  # cls appended last
    n = seq.shape[1]
    heads, eps = d // cfg.context.head_dim, cfg.context.norm_eps
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg.context.depth):
        if cfg.context.kind == "mamba":  # official: layers 0, 2, ... scan the reversed sequence
            p = f"context.layers.{i}."
            h = seq.flip(1) if i % 2 == 0 else seq
            h = F.layer_norm(h, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
            h = h + _naive_mamba_mixer(h, sd, p + "mixer.")
            seq = h.flip(1) if i % 2 == 0 else h
            continue
        p = f"context.layers.{i}."
        hdn = _rms(seq, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(hdn, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(b, n, d)
        seq = seq + F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        hdn = _rms(seq, sd[p + "post_attention_layernorm.weight"], eps)
        gate = F.linear(hdn, sd[p + "mlp.gate_proj.weight"])
        up = F.linear(hdn, sd[p + "mlp.up_proj.weight"])
        seq = seq + F.linear(F.gelu(gate) * up, sd[p + "mlp.down_proj.weight"])
    cls = seq[:, -1]
    cls = F.layer_norm(cls, (d,), sd["head.cls.0.weight"], sd["head.cls.0.bias"])
    return F.linear(cls, sd["head.cls.1.weight"], sd["head.cls.1.bias"])


def _randomize(model):
    # fresh models have near-zero cls tokens and unit norms; perturb everything
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize(
    "name, shape",
    [
        ("xt_tiny_demo", (256, 256)),
        ("xt_tiny_demo", (128, 384)),
        ("xt_tiny_demo_mamba", (256, 256)),
    ],
)
def test_forward_matches_naive_official(name, shape):
    model = _randomize(create_model(name))
    x = torch.randn(2, 3, *shape)
    with torch.no_grad():
        got = model(x)["logits"]
        want = _reference_forward(model, x)
    assert got.shape == (2, 10)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forward_matches_naive_official_baseline():
    model = _randomize(create_model("xt_tiny_demo_region_only"))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], _reference_forward(model, x))


@pytest.mark.slow
def test_paper_config_swin_t_hyper_512_256_matches_naive_official():
    model = _randomize(create_model("xt_swin_t_hyper_512_256"))
    assert model.cfg.crop_regions == 2 and model.cfg.crop_size == 512
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        got = model(x)["logits"]
        want = _reference_forward(model, x)
    assert got.shape == (1, 284)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_token_layout_is_row_major_over_the_global_grid():
    # 2 x 2 regions of 2 x 2 tokens: sequence goes along global rows, crossing regions
    rc = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    order, pos = token_layout(rc, 2, 2)
    assert pos[:4].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert order[:4].tolist() == [0, 1, 4, 5]  # region 0 row 0, then region 1 row 0
    assert pos[-1].tolist() == [3, 3]
    with pytest.raises(ValueError, match="more than once"):
        token_layout(np.array([[0, 0], [0, 0]]), 2, 2)


def test_sincos_first_half_encodes_the_column():
    e = sincos_2d(torch.tensor([[0, 5], [5, 0]]), 8)
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(e[0, :4], torch.cat([(5 * w).sin(), (5 * w).cos()]))
    torch.testing.assert_close(e[1, 4:], torch.cat([(5 * w).sin(), (5 * w).cos()]))
    torch.testing.assert_close(e[0, 4:], torch.tensor([0.0, 0, 1, 1], dtype=torch.float64))


def test_streaming_by_region_rows_equals_whole_image():
    model = _randomize(create_model("xt_tiny_demo"))
    x = torch.randn(1, 3, 384, 256)
    s = 128
    with torch.no_grad():
        whole = model(x)["logits"]
        state = None
        for row in range(3):
            band = torch.stack([x[0, :, row * s : (row + 1) * s, c * s : (c + 1) * s]
                                for c in range(2)])  # (2, C, S, S)
            last = model.encode_regions(band)[-1]
            rc = np.array([[row, 0], [row, 1]])
            tokens, pos = model.region_tokens(last.unsqueeze(0), rc)
            out, state = model.contextualize(tokens, state, append_cls=row == 2)
        streamed = model.decode(out)["logits"]
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["xt_tiny_demo_xl", "xt_tiny_demo_mamba"])
def test_other_context_encoders_classify(name):
    # One class vector per image, independent of the other images of the batch, and made
    # through the context encoder (changing its last layer changes the answer).
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        a = model(x)["logits"]
        alone = model(x[1:])["logits"]
    assert a.shape == (2, 10) and torch.isfinite(a).all()
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(alone[0], a[1], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        last = list(model.context.parameters())[-1]
        last.add_(torch.randn_like(last))
        other = model(x)["logits"]
    assert not torch.allclose(other, a, atol=1e-4)


def test_segmentation_maps_cover_the_image_exactly():
    model = create_model("xt_tiny_demo_seg").eval()
    x = torch.randn(1, 3, 200, 300)  # not a multiple of the 128 px regions
    with torch.no_grad():
        out = model(x)
    assert out and all(v.shape[0] == 1 and v.shape[-2:] == (200, 300) for v in out.values())
    assert all(torch.isfinite(v).all() for v in out.values())
    # the context reaches the maps: changing the context's last MLP changes them
    with torch.no_grad():
        model.context.layers[-1].mlp.down_proj.weight.mul_(3.0)
        other = model(x)
    assert any(not torch.allclose(out[k], other[k]) for k in out)


def test_wrong_channel_count_is_a_clear_error():
    model = create_model("xt_tiny_demo")
    with pytest.raises(ValueError, match="model expects 3 channels, image has 2"):
        model(torch.randn(1, 2, 128, 128))
    model2 = create_model("xt_tiny_demo", in_chans=2)
    assert model2(torch.randn(1, 2, 128, 128))["logits"].shape == (1, 10)


def test_config_round_trips_through_json():
    cfg = get_config("xt_swin_b_mamba_512_256", num_classes=7, in_chans=2)
    again = XTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.region.in_chans == 2 and again.head.num_classes == 7
    with pytest.raises(ValueError, match="unknown XTConfig fields"):
        XTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
