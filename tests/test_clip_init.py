"""Clipping start (`--clip-init`, omniquant/quant/clip_init.py): the per-group error search (unweighted and
input-weighted) against a float64 numpy brute force, the input second moments against a direct computation, each
recipe starting exactly at the searched range, and the calibration CLI / checkpoint (`auto` resolved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omniquant.quant.clip_init import (
    GRID,
    init_clipping,
    input_second_moments,
    mse_clip_ratio,
)
from omniquant.quant.lwc import LWC_INIT, LWCQuantizer
from omniquant.quant.recipes import BEST, RECIPES
from omniquant.quant.spec import WeightQuantSpec, to_groups


def _rtn_error_np(w: np.ndarray, r: float, bits: int, gs: int, sym: bool, h: np.ndarray | None = None) -> np.ndarray:
    """float64 per-group squared error [N, G] of round-to-nearest on the range [r min, r max] (real columns only),
    each column weighted by h [K] (default 1), written from the formula of docs/formats.md (fp16 scale, integer
    zero, range holding 0)."""
    h = np.ones(w.shape[1]) if h is None else h.astype(np.float64)
    n, k = w.shape
    g = -(-k // gs)
    out = np.zeros((n, g))
    qmax = 2 ** bits - 2 if sym else 2 ** bits - 1
    for j in range(g):
        wg = w[:, j * gs:(j + 1) * gs].astype(np.float64)
        hi, lo = r * wg.max(1).astype(np.float32), r * wg.min(1).astype(np.float32)
        if sym:
            s = np.maximum(np.abs(hi), np.abs(lo)) / (2 ** (bits - 1) - 1)
            z = np.full(n, 2 ** (bits - 1) - 1, dtype=np.float64)
        else:
            hi, lo = np.maximum(hi, 0), np.minimum(lo, 0)
            s = (hi - lo) / qmax
        s = np.clip(s, 1e-5, 1e4).astype(np.float16).astype(np.float64)
        if not sym:
            z = np.clip(np.rint(-lo / s), 0, qmax)
        q = np.clip(np.rint(wg / s[:, None]) + z[:, None], 0, qmax)
        out[:, j] = ((((q - z[:, None]) * s[:, None] - wg) ** 2) * h[j * gs:(j + 1) * gs]).sum(1)
    return out


@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "act"])
@pytest.mark.parametrize("bits,gs,sym", [(2, 64, False), (3, 128, False), (4, 32, True)])
def test_search_picks_the_lowest_error_ratio(bits, gs, sym, weighted):
    """The chosen ratio's error (float64 reference, columns weighted by h for `act`) is the grid's minimum, up to
    float32 near-ties; the ragged last group counts its real columns only; ratio 1.0 (min/max) is in the grid, so
    the error never exceeds RTN's."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_t(3, size=(16, 300)) * 0.02).astype(np.float32)  # heavy tails: clipping pays off
    h = (rng.lognormal(0, 1.5, 300) if weighted else np.ones(300)).astype(np.float32)  # outlier input columns
    spec = WeightQuantSpec(bits, gs, sym)
    wt = torch.from_numpy(w)
    wg = to_groups(wt, gs)
    ratio = mse_clip_ratio(wg, wg.amax(-1), wg.amin(-1), spec, w.shape[1],
                           torch.from_numpy(h) if weighted else None).numpy()
    assert set(np.unique(ratio)) <= {np.float32(r) for r in GRID}
    errs = np.stack([_rtn_error_np(w, r, bits, gs, sym, h) for r in GRID])  # [R, N, G]
    chosen = np.take_along_axis(errs, np.searchsorted(-np.array(GRID, np.float32), -ratio)[None], 0)[0]
    np.testing.assert_allclose(chosen, errs.min(0), rtol=1e-4)
    assert (chosen <= errs[0] * (1 + 1e-4)).all()
    assert (ratio < 1).mean() > 0.5  # heavy-tailed groups do clip


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("sym", [False, True])
def test_each_recipe_starts_at_the_searched_range(recipe, sym):
    """After `init_clipping`, the recipe's fake-quant weight is round-to-nearest on [r min, r max] (Block-AP bit for
    bit; LWC through sigmoid(logit r), with groups at r = 1 kept at LWC's own init 0.982)."""
    torch.manual_seed(0)
    w = torch.randn(12, 200) ** 3 * 0.02
    spec = WeightQuantSpec(2, 64, sym)
    q = RECIPES[recipe].make(tuple(w.shape), spec)
    init_clipping(q, w, "mse")
    wg = to_groups(w, 64)
    ratio = mse_clip_ratio(wg, wg.amax(-1), wg.amin(-1), spec, 200)
    if recipe == "blockap":
        ref_ratio = ratio
    else:
        ref_ratio = torch.sigmoid(torch.logit(ratio.double()).clamp(max=LWC_INIT)).float()
        assert torch.equal(q.upbound_factor == LWC_INIT, ratio == 1.0)
    # the reference: plain LWC (no learning) of the range scaled by ref_ratio, through the same min/max rule
    ref = LWCQuantizer(tuple(w.shape), spec, lwc=False)
    ref.stats = lambda x: (wg, wg.amax(-1) * ref_ratio, wg.amin(-1) * ref_ratio)
    with torch.no_grad():
        got, want = q(w), ref(w)
    if recipe == "blockap":
        assert torch.equal(got, want)
    else:  # sigmoid(logit(r)) is r to float32 rounding: a code may flip where a weight sits on a rounding edge
        assert (got != want).float().mean() < 0.01
    with torch.no_grad():
        assert ((got - w) ** 2).sum() < ((RECIPES[recipe].make(tuple(w.shape), spec)(w) - w) ** 2).sum()


def test_minmax_and_rtn_are_left_alone():
    w = torch.randn(4, 128)
    spec = WeightQuantSpec(3, 128)
    q = LWCQuantizer(tuple(w.shape), spec)
    init_clipping(q, w, "minmax")
    assert (q.upbound_factor == LWC_INIT).all()
    rtn = LWCQuantizer(tuple(w.shape), spec, lwc=False)
    init_clipping(rtn, w, "mse")  # nothing to start: plain round-to-nearest has no clipping parameters
    assert rtn.upbound_factor is None
    with pytest.raises(ValueError, match="clip init must be one of"):
        init_clipping(q, w, "percentile")
    with pytest.raises(ValueError, match="'act' needs the input second moments"):
        init_clipping(q, w, "act")


def test_input_second_moments_are_the_mean_square_of_each_input_column():
    torch.manual_seed(0)
    lins = {"a": torch.nn.Linear(6, 5), "b": torch.nn.Linear(5, 3)}
    xs = [torch.randn(2, 7, 6) * torch.arange(1, 7) for _ in range(3)]
    m = input_second_moments(lins, lambda: [lins["b"](lins["a"](x)) for x in xs])
    xa = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    with torch.no_grad():
        xb = lins["a"](xa.float()).double()
    torch.testing.assert_close(m["a"], xa.pow(2).mean(0).float())
    torch.testing.assert_close(m["b"], xb.pow(2).mean(0).float(), rtol=1e-5, atol=1e-6)
    assert not lins["a"]._forward_pre_hooks  # hooks removed


def test_calibrate_records_and_applies_clip_init(tiny_llama_dir, calib_text, tmp_path, capsys):
    """--epochs 0 quantizes with the start itself: the mse start has a lower weight error than min/max's, and the
    checkpoint records which one (`auto` resolved to the recipe's); an unknown value is refused by the CLI."""
    from safetensors.torch import load_file

    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.cli import main

    orig = load_file(str(tiny_llama_dir / "model.safetensors"))
    err = {}
    for kind in ("mse", "minmax"):
        out = calibrate_checkpoint(tiny_llama_dir, tmp_path / kind, wbits=2, group_size=64, epochs=0, clip_init=kind)
        qc = json.loads((out / "quant_config.json").read_text())
        assert qc["clip_init"] == qc["calibration"]["clip_init"] == kind
        new = load_file(str(out / "model.safetensors"))
        err[kind] = sum(float(((new[f"{n}.weight"].float() - orig[f"{n}.weight"].float()) ** 2).sum())
                        for n in qc["quantized_linears"])
    assert err["mse"] < 0.9 * err["minmax"]
    # auto: the recipe's own; `act` reads calibration inputs, so without training it is `mse`
    best = RECIPES[BEST[2]].clip_init
    for recipe, epochs, want in (("lwc", 0, "minmax"), ("blockap", 0, "mse"), ("blockap", 1, "act"),
                                 ("best", 0, "mse" if best == "act" else best)):
        out = calibrate_checkpoint(tiny_llama_dir, tmp_path / f"auto-{recipe}-{epochs}", wbits=2, group_size=64,
                                   epochs=epochs, recipe=recipe, nsamples=2, seqlen=32, calib_data=calib_text)
        qc = json.loads((out / "quant_config.json").read_text())
        assert qc["calibration"]["clip_init"] == "auto" and qc["clip_init"] == want
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--clip-init", "p99"])
    assert e.value.code == 2 and "invalid choice: 'p99'" in capsys.readouterr().err


def test_search_in_row_chunks_equals_one_pass(monkeypatch):
    """The search runs over row chunks (bounded temporaries at 7B sizes): chunking changes nothing."""
    import omniquant.quant.clip_init as ci

    torch.manual_seed(1)
    w = torch.randn(37, 300) ** 3
    wg = to_groups(w, 64)
    spec, h = WeightQuantSpec(2, 64), torch.rand(300)
    one = mse_clip_ratio(wg, wg.amax(-1), wg.amin(-1), spec, 300, h)
    monkeypatch.setattr(ci, "SEARCH_CHUNK", 5 * 320)  # 5 rows per chunk, a ragged last chunk
    assert torch.equal(mse_clip_ratio(wg, wg.amax(-1), wg.amin(-1), spec, 300, h), one)
