"""CPU matmul kernels of the TVM model against numpy float64 (dequantize from independently packed codes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from mlc_schemes.compile import make_target
from mlc_schemes.model.isa import BY_NAME
from mlc_schemes.model.kernels import QuantSpec, cpu_matmul_nt
from mlc_schemes.packing import pack_codes


def _run(func, args, m, n, out_dtype):
    # The host CPU target, as `omniquant compile` uses. (Plain generic x86-64 hits an LLVM SLP-vectorizer
    # verification error for some 3-bit shapes, e.g. K=120 g40.)
    target = make_target("llvm")
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu()
    y = tvm.runtime.empty((m, n), out_dtype, dev)
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize(
    "bits,gs,k,n,fixed_zero",
    [
        (3, 128, 192, 40, None),  # K not a multiple of the group (partial last group) nor of 10 codes/word
        (3, 128, 576, 30, None),  # SmolLM2's K with int3 g128: groups start mid-word (windowed GEMV)
        (4, 128, 320, 24, None),
        (4, 128, 576, 30, None),  # SmolLM2's K: 4.5 groups (8-word tail group); N not a multiple of 4 rows
        (2, 64, 100, 8, None),
        (4, None, 77, 9, None),  # per-channel: one group per row
        (4, 32, 96, 16, 7),  # MLC symmetric q4f16_1: fixed zero 2^(b-1)-1
        (3, 40, 120, 12, 3),  # q3f16_1
        (8, 128, 576, 20, None),  # the 8-bit embedding / lm_head scheme: the top code reaches bit 31
    ],
)
@pytest.mark.parametrize("m", [1, 5, 131])  # GEMV; blocked GEMM with a partial row block; two 128-row chunks
def test_quant_matmul_matches_numpy(bits, gs, k, n, fixed_zero, m):
    rng = np.random.default_rng(bits * 1000 + k + m)
    gw = gs or k
    groups = math.ceil(k / gw)
    qmax = 2**bits - 1 if fixed_zero is None else 2 * fixed_zero
    codes = rng.integers(0, qmax + 1, (n, k))
    scale = (rng.random((n, groups)) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(0, qmax + 1, (n, groups)).astype(np.float16) if fixed_zero is None else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = np.arange(k) // gw
    z64 = zero.astype(np.float64)[:, g] if zero is not None else float(fixed_zero)
    w = (codes - z64) * scale.astype(np.float64)[:, g]
    ref = x.astype(np.float64) @ w.T
    func = cpu_matmul_nt(n, k, "float32", "float32", QuantSpec(bits, gw, fixed_zero))
    args = [x, pack_codes(codes, bits), scale] + ([zero] if zero is not None else [])
    out = _run(func, args, m, n, "float32")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m", [1, 3, 130])  # M = 1 takes the GEMV path, M > 1 the blocked GEMM
@pytest.mark.parametrize("k", [33, 192])
def test_dense_matmul_fp16_weight_fp32_accumulation(k, m):
    rng = np.random.default_rng(k)
    n = 22  # not a multiple of the 4-row blocks
    w = rng.standard_normal((n, k)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    out = _run(cpu_matmul_nt(n, k, "float16", "float16", None, w_dtype="float16"), [x, w], m, n, "float16")
    # float32 accumulation: the only error is the final rounding to float16 (half an ulp, 2^-11 relative).
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2**-10, atol=1e-3)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "sse"])
@pytest.mark.parametrize("bits,k", [(4, 576), (3, 576), (8, 320)])
@pytest.mark.parametrize("m", [1, 9])
def test_quant_matmul_schedules_for_each_isa(isa, bits, k, m):
    """The vector width / register tiles of every ISA's schedule (16, 8 and 4 float32 lanes), all run on this CPU
    (LLVM splits wider vectors), give the numpy result: GEMV (M = 1, plain and windowed 3-bit) and blocked GEMM."""
    rng = np.random.default_rng(bits + k + m)
    n, gw = 13, 128
    groups = math.ceil(k / gw)
    codes = rng.integers(0, 2**bits, (n, k))
    codes[:, -1] = 2**bits - 1  # top codes set: the in-place extraction of the highest field
    scale = (rng.random((n, groups)) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(0, 2**bits, (n, groups)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = np.arange(k) // gw
    ref = x.astype(np.float64) @ ((codes - zero.astype(np.float64)[:, g]) * scale.astype(np.float64)[:, g]).T
    func = cpu_matmul_nt(n, k, "float32", "float32", QuantSpec(bits, gw, None), isa=BY_NAME[isa])
    out = _run(func, [x, pack_codes(codes, bits), scale, zero], m, n, "float32")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("isa_name", ["avx2", "avx512"])
@pytest.mark.parametrize("bits,k,n", [(3, 192, 48), (3, 576, 96), (3, 1408, 160), (3, 389, 48), (4, 576, 96),
                                      (4, 1100, 48), (2, 200, 64)])
#   3-bit g128: K with a partial last group; SmolLM2's K (tail of 57.6 words); two 640-column periods + a 128-column
#   tail (and 3 GEMM chunks); a last group of 5 columns inside one word. 4-bit: groups of whole words, 3 GEMM
#   chunks and a partial last word; 2-bit. N: blocks of 6, 4, 2 or 1 vectors of 8 / 16 rows
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("sym", [False, True])  # True: a fixed zero 2^(bits-1) - 1, as MLC's symmetric kinds
def test_row_interleaved_matches_numpy(isa_name, bits, k, n, m, sym):
    """g128 on the row-interleaved layout (`packing.interleave_rows`, blocks of `interleave_for` rows): GEMV (lane =
    row; groups starting mid-word at 3 bits) and the GEMM that decodes whole blocks (M > 1) against float64."""
    _check_interleaved(BY_NAME[isa_name], bits, k, n, m, 2 ** (bits - 1) - 1 if sym else None)


def test_row_interleaved_gemm_input_chunks():
    """M past one chunk of GEMM_MC input rows and not a multiple of the register tile's rows."""
    _check_interleaved(BY_NAME["avx2"], 4, 576, 48, 131, None)
    _check_interleaved(BY_NAME["avx512"], 3, 576, 64, 131, None)


@pytest.mark.parametrize("k,gs", [(576, 128), (1100, 128), (300, 40), (200, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_lookup_gemv_matches_numpy(k, gs, sym):
    """2-bit decode GEMV by table lookup (`gemv_lookup`, AVX-512): 5-bit chunks straddle codes; g40 groups start
    mid-word, so a chunk holds bits of two groups (looked up twice); partial last word and group."""
    from mlc_schemes.model import gemv_lookup
    from mlc_schemes.model.isa import AVX2, AVX512, host_isa, use_isa

    with use_isa(AVX2):  # an AVX-512 schedule built for an AVX2 target keeps gemv_interleaved
        assert not gemv_lookup.serves(QuantSpec(2, gs, None), AVX512)
    if host_isa() is not AVX512:
        pytest.skip("the permute needs an AVX-512 host")
    assert gemv_lookup.serves(QuantSpec(2, gs, None), AVX512)
    assert not gemv_lookup.serves(QuantSpec(3, gs, None), AVX512)
    assert not gemv_lookup.serves(QuantSpec(2, gs, None), AVX2)
    _check_interleaved(BY_NAME["avx512"], 2, k, 96, 1, 1 if sym else None, gs)


def _check_interleaved(isa, bits, k, n, m, fixed_zero, gs=128):
    from mlc_schemes.model.kernels import interleave_for
    from mlc_schemes.packing import interleave_rows

    rng = np.random.default_rng(k + n + m + isa.lanes + bits)
    groups = math.ceil(k / gs)
    qmax = 2**bits - 1 if fixed_zero is None else 2 * fixed_zero
    codes = rng.integers(0, qmax + 1, (n, k))
    codes[:, -1] = qmax  # the top field of the last word
    scale = (rng.random((n, groups)) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(0, qmax + 1, (n, groups)).astype(np.float16) if fixed_zero is None else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = np.arange(k) // gs
    z64 = zero.astype(np.float64)[:, g] if zero is not None else float(fixed_zero)
    ref = x.astype(np.float64) @ ((codes - z64) * scale.astype(np.float64)[:, g]).T
    block = interleave_for(QuantSpec(bits, gs, fixed_zero), n, k, isa)
    assert block % isa.lanes == 0 and n % block == 0
    func = cpu_matmul_nt(n, k, "float32", "float32", QuantSpec(bits, gs, fixed_zero, interleave=block), isa=isa)
    args = [x, interleave_rows(pack_codes(codes, bits), block), interleave_rows(scale, block)] + (
        [interleave_rows(zero, block)] if zero is not None else [])
    out = _run(func, args, m, n, "float32")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_interleave_rows_layout():
    from mlc_schemes.model.isa import AVX2, AVX512
    from mlc_schemes.model.kernels import interleave_for
    from mlc_schemes.packing import interleave_rows

    a = np.arange(6 * 3).reshape(6, 3)
    b = interleave_rows(a, 2)
    assert b.shape == (3, 3, 2) and b[1, 2, 0] == a[2, 2] and b[1, 2, 1] == a[3, 2]
    with pytest.raises(ValueError, match="blocks of 4 rows"):
        interleave_rows(a, 4)
    assert interleave_for(QuantSpec(3, 128, None), 96, 576, AVX2) == 48  # 6 vectors of 8 rows
    assert interleave_for(QuantSpec(3, 128, None), 4096, 576, AVX512) == 64  # 6 x 16 does not divide 4096: 4 x 16
    assert interleave_for(QuantSpec(4, 128, None), 64, 576, AVX2) == 32  # whole-word groups too; 4 x 8
    assert interleave_for(QuantSpec(4, 128, None), 64, 576, AVX2, int8_dot=True) == 0  # gemv_int8 reads MLC's
    assert interleave_for(QuantSpec(3, 128, None), 64, 576, AVX2, int8_dot=True) == 32  # (4-bit only)
    assert interleave_for(QuantSpec(3, 128, None), 60, 576, AVX2) == 0  # N not a multiple of the lanes
