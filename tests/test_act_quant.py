"""Activation and KV quantization: per-token dynamic asymmetric fake-quant against a numpy reference, the LET shift
carried as a quantizer offset against the reference LET form, the quantizing attention, and bad --abits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omniquant.quant.act import ActQuantizer, attach_input_quantizer, fake_quant_per_token


def np_per_token(x: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: each row over the last axis gets its own min/max range."""
    qmax = 2 ** bits - 1
    mx, mn = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    scale = np.maximum((mx - mn) / qmax, 1e-5)
    zero = np.round(-mn / scale)
    q = np.clip(np.round(x / scale) + zero, 0, qmax)
    return (q - zero) * scale


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_token_matches_numpy(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 17, 40, generator=g, dtype=torch.float64) * torch.rand(3, 17, 1, generator=g, dtype=torch.float64) * 5
    x[0, 0] = 0.7  # a constant token: scale clamps to 1e-5, value representable
    got = fake_quant_per_token(x, bits)
    np.testing.assert_array_equal(got.numpy(), np_per_token(x.numpy(), bits))
    # at most 2^bits distinct levels per token, error within half a step
    for row, q in zip(x.reshape(-1, 40), got.reshape(-1, 40)):
        assert q.unique().numel() <= 2 ** bits
        step = max(float(row.max() - row.min()) / (2 ** bits - 1), 1e-5)
        assert float((row - q).abs().max()) <= step / 2 + 1e-12


def test_ste_gradient_is_identity_inside_range():
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    fake_quant_per_token(x, 4).sum().backward()
    # d/dx of (round_ste(x/s) + z - z) * s with s, z from min/max: 1 for interior entries (min/max entries also
    # receive the range gradient, which sums to a finite value)
    assert torch.isfinite(x.grad).all()
    interior = (x != x.amax(-1, keepdim=True)) & (x != x.amin(-1, keepdim=True))
    torch.testing.assert_close(x.grad[interior], torch.ones_like(x.grad[interior]), atol=1e-9, rtol=0)


def test_offset_form_equals_reference_let_form():
    """Q(x/s - d) + d through W·diag(s) (our export) == Q((y - δ)/s) through W·diag(s) plus bias b + W·δ (reference)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 30, 48, generator=g, dtype=torch.float64) * 3 + torch.randn(48, generator=g, dtype=torch.float64)
    w = torch.randn(20, 48, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    s = torch.exp(torch.randn(48, generator=g, dtype=torch.float64))
    delta = torch.randn(48, generator=g, dtype=torch.float64)
    ref = torch.from_numpy(np_per_token(((y - delta) / s).numpy(), 4)) @ (w * s).T + b + w @ delta
    q = ActQuantizer(4)
    q.offset = delta / s
    lin = nn.Linear(48, 20).double()
    with torch.no_grad():
        lin.weight.copy_(w * s)
        lin.bias.copy_(b)
    lin.requires_grad_(False)
    attach_input_quantizer(lin, q)
    got = lin(y / s)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10
    # without the quantizer the same linear computes the original function (the shift cancels exactly)
    q.enabled = False
    plain = lin(y / s)
    torch.testing.assert_close(plain, y @ w.T + b, rtol=1e-12, atol=1e-12)
    # and the shift matters once quantizing (it is not a vacuous identity)
    q.enabled, q.offset = True, None
    assert float((lin(y / s) - ref).abs().max()) > 1e-6


def test_kv_attention_quantizes_q_k_v_per_head_with_gqa():
    from omniquant.quant import kv

    class Attn(nn.Module):
        is_causal, num_key_value_groups, layer_idx, training = True, 3, 0, False

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 9, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64)
    mod = Attn()
    kv.attach(mod, ActQuantizer(4))
    out, _ = kv._kvq_attention(mod, q, k, v, None, scaling=0.25, dropout=0.0)
    qq, kq, vq = (torch.from_numpy(np_per_token(t.numpy(), 4)) for t in (q, k, v))
    kq, vq = kq.repeat_interleave(3, dim=1), vq.repeat_interleave(3, dim=1)  # query head h reads KV head h // 3
    scores = (qq @ kq.transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
    expect = (torch.softmax(scores, -1) @ vq).transpose(1, 2)  # softmax output itself is not quantized
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flag,value", [("--abits", "5"), ("--kv-bits", "3")])
def test_bad_abits_is_a_clear_error(flag, value, tiny_llama_dir, tmp_path, capsys):
    from omniquant.cli import main

    rc = main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "out"), flag, value])
    assert rc == 2
    err = capsys.readouterr().err
    assert flag in err and "4, 6, 8, 16" in err
    assert not (tmp_path / "out").exists()
