"""Block-AP's GPTQ weight start (`--weight-start gptq`, omniquant/quant/gptq_start.py): the compensated columns
against a float64 numpy reference written from the OBS update (explicit inverse Hessian, one column removed at a
time), the Gram matrices against a direct computation, the quantizer rounding to GPTQ's codes, and the CLI's
refusal where there is nothing to start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniquant.errors import UserError
from omniquant.quant.blockap import BlockAPQuantizer
from omniquant.quant.clip_init import init_clipping
from omniquant.quant.gptq_start import DAMP, gptq_columns, input_grams, start_at_gptq
from omniquant.quant.spec import WeightQuantSpec, from_groups, to_groups


def _gptq_np(w, h, s, z, gs, qmax, damp=DAMP):
    """float64 reference: quantize column c, move the later columns by -e H^-1[c, later] / H^-1[c, c], then drop c
    from the inverse Hessian (H^-1 - H^-1[:, c] H^-1[c, :] / H^-1[c, c]). Returns each column's value when rounded."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    k = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    out = np.zeros_like(w)
    for c in range(k):
        g = c // gs
        out[:, c] = w[:, c]
        q = (np.clip(np.rint(w[:, c] / s[:, g]) + z[:, g], 0, qmax) - z[:, g]) * s[:, g]
        e = (w[:, c] - q) / hinv[c, c]
        w[:, c + 1:] -= np.outer(e, hinv[c, c + 1:])
        hinv -= np.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    return out


def _codes(w, s, z, gs, qmax):
    return np.clip(np.rint(w / np.repeat(s, gs, 1)[:, : w.shape[1]]) + np.repeat(z, gs, 1)[:, : w.shape[1]], 0, qmax)


def _problem(seed, n=24, k=300, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, k)) @ (0.3 * rng.standard_normal((k, k)) + np.eye(k))  # correlated inputs
    x[:, list(dead)] = 0
    w = (rng.standard_t(4, size=(n, k)) * 0.05).astype(np.float32)
    return x, w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits,gs", [(2, 128), (3, 64), (4, 32)])
def test_columns_match_the_obs_reference(bits, gs):
    """Every column's pre-rounding value equals the float64 reference (float32 tolerance), the codes are the
    same, and the layer's output error on the calibration inputs is below round-to-nearest's on the same grid.
    K = 300 spans lazy-batch blocks (128 columns) and a ragged last group."""
    x, w, h = _problem(bits)
    spec = WeightQuantSpec(bits, gs)
    q = BlockAPQuantizer(w.shape, spec)
    wt = torch.from_numpy(w)
    init_clipping(q, wt, "act", torch.from_numpy(np.diag(h).copy()).float())
    with torch.no_grad():
        s, z = (t.numpy().astype(np.float64) for t in q.qparams(wt))
    got = gptq_columns(wt, torch.from_numpy(h), torch.from_numpy(s), torch.from_numpy(z), gs, spec.qmax).numpy()
    want = _gptq_np(w, h, s, z, gs, spec.qmax)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    codes = _codes(got.astype(np.float64), s, z, gs, spec.qmax)
    assert (codes == _codes(want, s, z, gs, spec.qmax)).mean() > 0.999  # a float32 tie may flip one code

    def out_err(c):
        deq = (c - np.repeat(z, gs, 1)[:, :300]) * np.repeat(s, gs, 1)[:, :300]
        return float(((x @ (deq - w).T) ** 2).mean())

    assert out_err(codes) < 0.8 * out_err(_codes(w.astype(np.float64), s, z, gs, spec.qmax))


def test_a_dead_input_column_keeps_its_weights():
    """A column whose input is always 0 is neither moved by the others nor passes its error on: GPTQ on the
    remaining columns is unchanged, and the dead column is rounded as it stands."""
    x, w, h = _problem(7, k=200, dead=(5, 150))
    s = np.full((w.shape[0], 2), 0.05)
    z = np.full((w.shape[0], 2), 2.0)
    got = gptq_columns(torch.from_numpy(w), torch.from_numpy(h), torch.from_numpy(s), torch.from_numpy(z), 128,
                       3).numpy()
    np.testing.assert_array_equal(got[:, [5, 150]], w[:, [5, 150]])
    np.testing.assert_allclose(got, _gptq_np(w, h, s, z, 128, 3), rtol=1e-4, atol=1e-5)


def test_input_grams_are_the_mean_outer_products_and_shared_inputs_share_one():
    torch.manual_seed(0)
    lins = {"a": torch.nn.Linear(6, 5), "b": torch.nn.Linear(6, 4), "c": torch.nn.Linear(5, 3)}
    xs = [torch.randn(2, 7, 6) * torch.arange(1, 7) for _ in range(3)]
    grams = input_grams(lins, lambda: [(lins["b"](x), lins["c"](lins["a"](x))) for x in xs])
    xa = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    with torch.no_grad():
        xc = lins["a"](xa.float()).double()
    torch.testing.assert_close(grams["a"], xa.T @ xa / xa.shape[0], rtol=1e-5, atol=1e-5)  # float32 per call
    torch.testing.assert_close(grams["c"], xc.T @ xc / xc.shape[0], rtol=1e-5, atol=1e-5)
    assert grams["b"] is grams["a"]  # fed the same tensor
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the block loop's bf16 forwards: the Gram stays float32
        g16 = input_grams(lins, lambda: [lins["c"](lins["a"](x)) for x in xs])
    torch.testing.assert_close(g16["a"], grams["a"])


def test_blockap_rounds_to_the_gptq_codes_on_unchanged_scales():
    """start_at_gptq sets weight_delta only: scales and zeros are the clipping start's, and the quantizer's
    fake-quant weight is GPTQ's rounding of the compensated columns; linears sharing a Gram matrix (stacked as
    one weight) get what each would get alone."""
    x, w, h = _problem(3, n=20, k=192)
    spec = WeightQuantSpec(2, 64)
    ht = torch.from_numpy(h)

    class Lin(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.wquant = BlockAPQuantizer(tuple(weight.shape), spec)
            init_clipping(self.wquant, self.weight, "act", torch.diagonal(ht).float())

    wt = torch.from_numpy(w)
    pair = {"q": Lin(wt[:12].clone()), "k": Lin(wt[12:].clone())}
    alone = {"q": Lin(wt[:12].clone())}
    with torch.no_grad():
        before = {n: m.wquant.qparams(m.weight) for n, m in pair.items()}
    start_at_gptq(pair, {"q": ht, "k": ht})
    start_at_gptq(alone, {"q": ht})
    with torch.no_grad():
        for name, m in pair.items():
            s, z = m.wquant.qparams(m.weight)
            assert torch.equal(s, before[name][0]) and torch.equal(z, before[name][1])
            target = gptq_columns(m.weight, ht, s, z, 64, spec.qmax)
            sg, zg = s[..., None], z[..., None]
            want = from_groups((torch.clamp(torch.round(to_groups(target, 64) / sg) + zg, 0, 3) - zg) * sg, 192)
            assert torch.equal(m.wquant(m.weight), want), name
        assert torch.equal(alone["q"].wquant(alone["q"].weight), pair["q"].wquant(pair["q"].weight))


def test_gptq_start_needs_blockap_and_training(tiny_llama_dir, calib_text, tmp_path, capsys):
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.cli import main

    for recipe, epochs in (("lwc", 1), ("blockap", 0)):
        with pytest.raises(UserError, match="--weight-start gptq"):
            calibrate_checkpoint(tiny_llama_dir, tmp_path / f"{recipe}{epochs}", recipe=recipe, epochs=epochs,
                                 weight_start="gptq", nsamples=2, seqlen=32, calib_data=calib_text)
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--weight-start", "obq"])
    assert e.value.code == 2 and "invalid choice: 'obq'" in capsys.readouterr().err
