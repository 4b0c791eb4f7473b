"""Weight quantizer with LWC: formulas against an independent float64 reference, padding rule, exact codes."""

import math

import numpy as np
import pytest
import torch

from omniquant.quant.codes import dequantize, recompute_codes
from omniquant.quant.lwc import LWCQuantizer
from omniquant.quant.spec import WeightQuantSpec, to_groups


def reference_fake_quant(w: np.ndarray, bits, gs, symmetric, gamma=None, beta=None):
    """float64 numpy re-implementation of docs/formats.md + omniquant.quant.lwc (edge padding, range contains 0)."""
    n, k = w.shape
    gs = k if gs == -1 else gs
    g = math.ceil(k / gs)
    out = np.empty_like(w)
    for r in range(n):
        for j in range(g):
            cols = w[r, j * gs : min((j + 1) * gs, k)]
            mx, mn = cols.max(), cols.min()
            if gamma is not None:
                mx, mn = mx / (1 + math.exp(-gamma[r, j])), mn / (1 + math.exp(-beta[r, j]))
            if symmetric:
                zmid = 2 ** (bits - 1) - 1
                scale = np.clip(max(abs(mx), abs(mn)) / zmid, 1e-5, 1e4)
                scale = float(np.float16(scale))
                zero, qmax = zmid, 2 ** bits - 2
            else:
                mx, mn = max(mx, 0.0), min(mn, 0.0)
                qmax = 2 ** bits - 1
                scale = float(np.float16(np.clip((mx - mn) / qmax, 1e-5, 1e4)))
                zero = np.clip(np.round(-mn / scale), 0, qmax)
            q = np.clip(np.round(cols / scale) + zero, 0, qmax)
            out[r, j * gs : j * gs + len(cols)] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_matches_float64_reference(bits, gs, symmetric):
    torch.manual_seed(bits * 100 + gs)
    w = torch.randn(12, 200) * 0.05  # K=200: ragged last group for gs 32 and 128
    quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(bits, gs, symmetric), lwc=False)
    got = quant(w.double()).numpy()
    ref = reference_fake_quant(w.double().numpy(), bits, gs, symmetric)
    # fp64 vs the reference: identical up to round-half ties of w/scale (measure-zero with random data)
    assert np.abs(got - ref).max() <= 1e-12


def test_lwc_logits_enter_as_sigmoid_clipping():
    torch.manual_seed(0)
    w = torch.randn(4, 64, dtype=torch.float64)
    quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(3, 32), lwc=True).double()
    with torch.no_grad():
        quant.upbound_factor.copy_(torch.randn(4, 2))
        quant.lowbound_factor.copy_(torch.randn(4, 2))
    ref = reference_fake_quant(w.numpy(), 3, 32, False, quant.upbound_factor.detach().numpy(),
                               quant.lowbound_factor.detach().numpy())
    assert np.abs(quant(w).detach().numpy() - ref).max() <= 1e-12


def test_lwc_gradients_flow_through_ste():
    w = torch.randn(8, 128)
    quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(3, 64), lwc=True)
    loss = (quant(w) - w).pow(2).sum()
    loss.backward()
    assert quant.upbound_factor.grad is not None and quant.upbound_factor.grad.abs().sum() > 0
    assert quant.lowbound_factor.grad.abs().sum() > 0


def test_edge_padding_keeps_last_group_statistics():
    w = torch.arange(1, 2 * 200 + 1, dtype=torch.float32).reshape(2, 200)
    g = to_groups(w, 128)
    assert g.shape == (2, 2, 128)
    last_real = w[:, 128:]
    assert torch.equal(g[:, 1].amax(-1), last_real.amax(-1)) and torch.equal(g[:, 1].amin(-1), last_real.amin(-1))
    assert torch.equal(g.reshape(2, -1)[:, :200], w)


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(3, 256)
    w[1] = 0.3
    w[2, :128] = -1.25
    for sym in (False, True):
        quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(3, 128, sym), lwc=False)
        wq, _, _ = quant.export(w)
        assert torch.isfinite(wq).all()
        assert torch.equal(wq[0], w[0])
        if not sym:  # asymmetric: the range contains 0 and the constant hits the end code
            assert torch.allclose(wq[1], w[1], rtol=1e-3) and torch.allclose(wq[2], w[2], rtol=1e-3)


@pytest.mark.parametrize("bits,gs,sym", [(2, 128, False), (3, 128, False), (4, 64, False), (4, 32, True),
                                         (3, 40, True), (8, -1, False)])
def test_export_codes_roundtrip_bit_exact(bits, gs, sym):
    torch.manual_seed(1)
    w = torch.randn(16, 576) * 0.02  # SmolLM2's hidden size: 576 = 4.5 x 128
    quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(bits, gs, sym), lwc=True)
    with torch.no_grad():
        quant.upbound_factor.uniform_(-1, 4)
        quant.lowbound_factor.uniform_(-1, 4)
    wq, scales, zeros = quant.export(w)
    assert scales.dtype == torch.float32 and zeros.dtype == torch.int32
    assert torch.equal(scales.half().float(), scales), "scales must be float16-exact"
    codes = recompute_codes(wq, scales, zeros, bits, gs, sym)
    qmax = 2**bits - 2 if sym else 2**bits - 1
    assert int(codes.min()) >= 0 and int(codes.max()) <= qmax
    assert torch.equal(dequantize(codes, scales, zeros, gs), wq)


def test_bad_spec_rejected():
    with pytest.raises(ValueError):
        WeightQuantSpec(5)
    with pytest.raises(ValueError):
        WeightQuantSpec(4, 0)


@pytest.mark.parametrize("with_offset", [False, True])
def test_fused_fake_quant_gradients_equal_the_ste_graph(with_offset):
    """GroupFakeQuant's hand-written backward == autograd through the composed straight-through formula (float64),
    with many codes clamped at 0 and qmax so both branches of every gradient are exercised."""
    from omniquant.quant.fakequant import GroupFakeQuant, round_ste

    gen = torch.Generator().manual_seed(3)
    n, g, gs, qmax = 6, 3, 16, 7
    wg = torch.randn(n, g, gs, generator=gen, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(n, g, generator=gen, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    zero = torch.randint(0, qmax + 1, (n, g), generator=gen).double().requires_grad_()
    v = (torch.rand(n, g, gs, generator=gen, dtype=torch.float64) - 0.5).requires_grad_() if with_offset else None
    upstream = torch.randn(n, g, gs, generator=gen, dtype=torch.float64)
    inputs = [t for t in (wg, scale, zero, v) if t is not None]

    out = GroupFakeQuant.apply(wg, scale, zero, v, qmax)
    x = wg / scale[..., None] + (0 if v is None else v)
    q = (round_ste(x) + zero[..., None]).clamp(0, qmax)
    ref = (q - zero[..., None]) * scale[..., None]
    clamped = ((x.round() + zero[..., None] < 0) | (x.round() + zero[..., None] > qmax)).double().mean()
    assert 0.2 < clamped < 0.8
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad((out * upstream).sum(), inputs),
                    torch.autograd.grad((ref * upstream).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_offset", [False, True])
def test_no_grad_fake_quant_equals_the_training_forward(with_offset):
    """`GroupFakeQuant.values` (what a quantizer runs under no_grad: export, the quantized stream) gives the same bits
    as the autograd forward, codes clamped at both ends included; a quantizer's no_grad output equals its grad one."""
    from omniquant.quant.fakequant import GroupFakeQuant

    gen = torch.Generator().manual_seed(4)
    n, g, gs, qmax = 8, 4, 32, 7
    wg = torch.randn(n, g, gs, generator=gen) * 3
    scale = torch.rand(n, g, generator=gen) * 0.3 + 0.1
    zero = torch.randint(0, qmax + 1, (n, g), generator=gen).float()
    v = (torch.rand(n, g, gs, generator=gen) - 0.5) if with_offset else None
    ref = GroupFakeQuant.apply(wg.clone().requires_grad_(), scale, zero, v, qmax)
    got = GroupFakeQuant.values(wg, scale, zero, v, qmax)
    s, z = scale[..., None], zero[..., None]
    assert (ref == -z * s).any() and (ref == (qmax - z) * s).any()  # codes at both ends of the range
    assert torch.equal(got, ref.detach())

    w = torch.randn(16, 96, generator=gen)
    quant = LWCQuantizer(tuple(w.shape), WeightQuantSpec(3, 32))
    with torch.no_grad():
        plain = quant(w)
    assert torch.equal(plain, quant(w.clone().requires_grad_()).detach())


def test_checkpointed_and_plain_quant_linear_give_the_same_gradients(monkeypatch):
    """Large linears recompute the fake-quant weight in the backward pass; the gradients must not change."""
    from omniquant.quant import qlinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40, bias=True)
    x = torch.randn(5, 64)
    grads = []
    for min_numel in (1 << 30, 1):
        monkeypatch.setattr(qlinear, "CHECKPOINT_MIN_NUMEL", min_numel)
        ql = qlinear.QuantLinear(lin, WeightQuantSpec(bits=3, group_size=16))
        ql(x).square().sum().backward()
        grads.append([p.grad.clone() for p in ql.wquant.parameters()])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
