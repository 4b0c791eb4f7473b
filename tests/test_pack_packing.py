"""Bit packing and exact pack -> unpack -> dequantize round trips for every registered scheme (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlc_schemes.packing import codes_from_fakequant, dequantize, pack_codes, unpack_codes
from mlc_schemes.schemes import SCHEMES, get_scheme

FAST = settings(max_examples=60, deadline=None)


def _reference_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLC's documented formula with Python ints: element i at bit (i % epw) * bits of word i // epw."""
    epw = 32 // bits
    n, k = codes.shape
    out = np.zeros((n, -(-k // epw)), dtype=np.uint32)
    for r in range(n):
        for i in range(k):
            out[r, i // epw] = int(out[r, i // epw]) | (int(codes[r, i]) << ((i % epw) * bits))
    return out


@FAST
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_pack_matches_bit_formula_and_round_trips(bits, n, k, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, k))
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (n, -(-k // (32 // bits)))
    np.testing.assert_array_equal(words, _reference_words(codes, bits))
    np.testing.assert_array_equal(unpack_codes(words, bits, k), codes)


@pytest.mark.parametrize("bits,k", [(3, 7), (3, 10), (2, 17), (4, 9)])
def test_padding_bits_are_zero(bits, k):
    # All-ones codes: every bit outside the k real fields must stay 0 (pad codes and int3's top 2 bits).
    words = pack_codes(np.full((2, k), 2**bits - 1), bits)
    expected_ones = k * bits
    assert sum(int(w).bit_count() for w in words[0]) == expected_ones
    if bits == 3:
        assert np.all(words >> np.uint32(30) == 0)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(np.array([[0, 8]]), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(np.array([[-1, 0]]), 4)


@pytest.mark.parametrize("name", ["q4f16_1", "q3f16_1"])
def test_mlc_symmetric_layout_and_dequant(name):
    """MLC: q = clip(round(w / s) + max_int, 0, 2 max_int), dequant (q - max_int) * s; layout by the formula."""
    scheme = get_scheme(name)
    rng = np.random.default_rng(1)
    n, k, gs = 3, 4 * scheme.group_size, scheme.group_size
    w = rng.normal(size=(n, k))
    absmax = np.abs(w.reshape(n, -1, gs)).max(axis=2)
    scale = (absmax / scheme.fixed_zero).astype(np.float16)
    s64 = np.repeat(scale.astype(np.float64), gs, axis=1)
    codes = np.clip(np.rint(w / s64) + scheme.fixed_zero, 0, 2 * scheme.fixed_zero).astype(np.int64)
    words = pack_codes(codes, scheme.bits)
    np.testing.assert_array_equal(words, _reference_words(codes, scheme.bits))
    assert scheme.elems_per_word == {"q4f16_1": 8, "q3f16_1": 10}[name]
    assert scheme.group_size % scheme.elems_per_word == 0  # a group fills whole words, as MLC requires
    deq = dequantize(unpack_codes(words, scheme.bits, k), scale, scheme.fixed_zero, gs)
    ref = ((codes - scheme.fixed_zero) * s64).astype(np.float32)  # float64 product of exact factors
    np.testing.assert_allclose(deq, ref, rtol=2**-24, atol=0)


def _fp16_scales(rng, shape, mode):
    if mode == "extreme":
        pool = np.array([2.0**-24, 6.1035e-05, 1.0, 1024.0, 65504.0], dtype=np.float16)
        return rng.choice(pool, size=shape).astype(np.float32)
    return np.exp(rng.uniform(-9, 2, size=shape)).astype(np.float16).astype(np.float32)


def _fake_quant(scheme, n, k, rng, mode):
    """Random grid (codes, fp16 scales, integer zeros) and its float32 fake-quant weight w = (q - z) * s."""
    gw = scheme.group_width(k)
    g = scheme.num_groups(k)
    scales = _fp16_scales(rng, (n, g), mode)
    if scheme.fixed_zero is not None:
        zeros = np.full((n, g), scheme.fixed_zero, dtype=np.int32)
    else:
        zeros = rng.integers(0, scheme.qmax + 1, size=(n, g)).astype(np.int32)
    codes = rng.integers(0, scheme.qmax + 1, size=(n, k))
    if mode == "constant":  # every group a single value (all codes equal; some equal to the zero -> w = 0)
        codes = np.repeat(rng.integers(0, scheme.qmax + 1, size=(n, g)), gw, axis=1)[:, :k]
    if mode == "ends":  # only the two end codes
        codes = rng.choice([0, scheme.qmax], size=(n, k))
    s = np.repeat(scales, gw, axis=1)[:, :k]
    z = np.repeat(zeros, gw, axis=1)[:, :k].astype(np.float32)
    w = (codes.astype(np.float32) - z) * s
    return w, scales, zeros, codes


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SCHEMES)), n=st.integers(1, 4), k=st.sampled_from([1, 9, 10, 40, 127, 130, 192,
       257, 320]), mode=st.sampled_from(["random", "constant", "ends", "extreme"]), seed=st.integers(0, 2**31))
def test_every_scheme_round_trips_bit_exact(name, n, k, mode, seed):
    scheme = SCHEMES[name]
    rng = np.random.default_rng(seed)
    w, scales, zeros, codes = _fake_quant(scheme, n, k, rng, mode)
    got_codes = codes_from_fakequant(w, scales, zeros, scheme.bits, scheme.group_width(k), scheme.qmax)
    words = pack_codes(got_codes, scheme.bits)
    # What is stored: fp16 scale, fp16 zero (asym) or the fixed zero (sym).
    q_scale = scales.astype(np.float16)
    zero = zeros.astype(np.float16) if scheme.stores_zero else scheme.fixed_zero
    back = dequantize(unpack_codes(words, scheme.bits, k), q_scale, zero, scheme.group_width(k))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.view(np.uint32), w.view(np.uint32))  # bit for bit, sign of zero included
    # The recovered codes are the originals (the grid is injective: every scale is positive).
    np.testing.assert_array_equal(got_codes, codes)


def test_codes_rejects_inconsistent_sidecars():
    scheme = get_scheme("w3a16g128asym")
    rng = np.random.default_rng(0)
    w, scales, zeros, _ = _fake_quant(scheme, 4, 200, rng, "random")
    args = (scheme.bits, 128, scheme.qmax)
    off_grid = w.copy()
    off_grid[1, 5] = np.nextafter(off_grid[1, 5], np.float32(np.inf))
    with pytest.raises(ValueError, match="not on the sidecar's grid"):
        codes_from_fakequant(off_grid, scales, zeros, *args)
    with pytest.raises(ValueError, match="out of range"):
        codes_from_fakequant(w * 4, scales, zeros, *args)
    with pytest.raises(ValueError, match="do not match"):
        codes_from_fakequant(w[:, :100], scales, zeros, *args)
    with pytest.raises(ValueError, match="float16"):
        codes_from_fakequant(w, scales * np.float32(1 + 2**-20), zeros, *args)
    with pytest.raises(ValueError, match="zeros"):
        codes_from_fakequant(w, scales, zeros + 8, *args)
