"""The opt-in int8-activation decode GEMV (`mlc_schemes.model.gemv_int8`) against numpy float64: the same
formula from independently packed codes, and the exact dequantized matmul within the rounding bound of x."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from mlc_schemes.compile import make_target
from mlc_schemes.model import gemv_int8
from mlc_schemes.model.isa import AVX2, SSE, host_isa
from mlc_schemes.model.kernels import QuantSpec, cpu_matmul_nt
from mlc_schemes.packing import pack_codes

needs_int8_dot = pytest.mark.skipif(not host_isa().int8_dot,
                                    reason=f"host CPU ISA {host_isa().name} has no AVX2 integer dot (vpmaddubsw)")


def _run(func, args, n, out_dtype):
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=make_target("llvm"))
    dev = tvm.cpu()
    y = tvm.runtime.empty((1, n), out_dtype, dev)
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], y)
    return y.numpy()[0].astype(np.float64)


def _case(rng, n, k, gw, x_dtype):
    groups = -(-k // gw)
    codes = rng.integers(0, 16, (n, k))
    scale = (rng.random((n, groups)) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(0, 16, (n, groups)).astype(np.float16)
    x = (rng.standard_normal((1, k)) * np.exp(rng.standard_normal(k))).astype(x_dtype)  # uneven magnitudes
    x[0, :64] = 0  # an all-zero chunk: scale 0, no division by zero
    g = np.arange(k) // gw
    w = (codes - zero.astype(np.float64)[:, g]) * scale.astype(np.float64)[:, g]
    return codes, scale, zero, x, w


def _int8_reference(x, codes, scale, zero, gw):
    """The documented formula in float64 from x rounded as the kernel rounds it (float32 |x| max / 127 per 64)."""
    xf = x[0].astype(np.float32).reshape(-1, 64)
    amax = np.abs(xf).max(1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xf * inv[:, None]), -127, 127)
    d = (amax / np.float32(127)).astype(np.float64)
    xr = (xq * d[:, None]).reshape(-1)  # the activation the integer dots see
    g = np.arange(xr.size) // gw
    w = (codes - zero.astype(np.float64)[:, g]) * scale.astype(np.float64)[:, g]
    return w @ xr, d


@needs_int8_dot
@pytest.mark.parametrize("n,k,gw", [(30, 576, 64), (24, 1536, 128), (9, 4096, 128), (16, 256, 256),
                                    (12, 576, 128), (8, 448, 192)])  # partial last group (4.5, 2.33 groups)
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_int8_gemv_matches_formula_and_error_bound(n, k, gw, x_dtype):
    rng = np.random.default_rng(n * k + gw)
    codes, scale, zero, x, w = _case(rng, n, k, gw, x_dtype)
    func = cpu_matmul_nt(n, k, x_dtype, "float32", QuantSpec(4, gw, None), int8_dot=True)
    out = _run(func, [x, pack_codes(codes, 4), scale, zero], n, "float32")
    ref8, d = _int8_reference(x, codes, scale, zero, gw)
    # integer dots are exact; what is left is float32 accumulation of K/64 chunk terms
    np.testing.assert_allclose(out, ref8, rtol=1e-5, atol=1e-5 * np.abs(ref8).max())
    exact = w @ x[0].astype(np.float64)
    bound = (np.abs(w).reshape(n, -1, 64).sum(2) * d / 2).sum(1)  # sum_c d[c]/2 * sum_{k in c} |W[n, k]|
    assert np.all(np.abs(out - exact) <= bound * (1 + 1e-6) + 1e-5 * np.abs(exact).max())
    assert not np.allclose(out, exact, rtol=1e-7, atol=0)  # it really took the int8 path (rounding shows)


@needs_int8_dot
def test_int8_gemv_odd_rows_fp16_out():
    """An odd N (rows split unevenly over the tasks), float16 output (the deployed dtype)."""
    rng = np.random.default_rng(7)
    n, k, gw = 7, 512, 128
    codes, scale, zero, x, _ = _case(rng, n, k, gw, "float16")
    out = _run(cpu_matmul_nt(n, k, "float16", "float16", QuantSpec(4, gw, None), int8_dot=True),
               [x, pack_codes(codes, 4), scale, zero], n, "float16")
    ref8, _ = _int8_reference(x, codes, scale, zero, gw)
    np.testing.assert_allclose(out, ref8, rtol=2**-10, atol=1e-3 * np.abs(ref8).max())


@pytest.mark.parametrize("bits,gw,k,isa,expected", [
    (4, 128, 4096, AVX2, True),
    (4, 64, 576, AVX2, True),
    (4, 128, 576, AVX2, True),  # SmolLM2 K at g128: a partial last group of 64 columns
    (4, 128, 600, AVX2, False),  # K not a multiple of 64
    (4, 32, 4096, AVX2, False),  # a group narrower than one 64-column chunk
    (3, 128, 4096, AVX2, False),
    (8, 128, 4096, AVX2, False),  # the 8-bit lm_head: u8 x s8 pairs would saturate int16
    (4, 128, 4096, SSE, False),
])
def test_int8_eligibility(bits, gw, k, isa, expected):
    assert gemv_int8.eligible(k, QuantSpec(bits, gw, None), isa) is expected


def test_ineligible_linears_keep_the_exact_kernel():
    """Asking for int8 on a linear it cannot serve builds the float32 kernel (same PrimFunc as without)."""
    for q, k in ((QuantSpec(3, 128, None), 576), (QuantSpec(4, 128, None), 600)):
        assert cpu_matmul_nt(8, k, "float16", "float16", q, int8_dot=True) is \
            cpu_matmul_nt(8, k, "float16", "float16", q, int8_dot=False)
    q4 = QuantSpec(4, 128, None)
    if host_isa().int8_dot:
        assert cpu_matmul_nt(8, 512, "float16", "float16", q4, int8_dot=True) is not \
            cpu_matmul_nt(8, 512, "float16", "float16", q4, int8_dot=False)


@pytest.fixture(scope="module")
def tiny_w4(tmp_path_factory):
    """Llama tiny (K = 192, 320: a partial g128 group each) RTN w4a16g128asym, float32 libraries without and with
    int8 dot."""
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.paths import austen_dir
    from omniquant.tiny import make_tiny

    root = tmp_path_factory.mktemp("int8dot")
    make_tiny(root / "tiny", arch="llama")
    calibrate_checkpoint(root / "tiny", root / "fq", wbits=4, group_size=128, epochs=0, lwc=False, nsamples=1,
                         seqlen=64, calib_data=str(austen_dir() / "sensesensibility.txt"))
    pack_checkpoint(root / "fq", "w4a16g128asym", root / "packed", progress=False)
    compile_packed(root / "packed", "llvm", root / "exact.so", dtype="float32")
    if host_isa().int8_dot:
        compile_packed(root / "packed", "llvm", root / "int8.so", dtype="float32", int8_dot=True)
    return root


@needs_int8_dot
def test_int8_dot_library_changes_decode_only(tiny_w4):
    """Prefill logits equal the exact library's up to float32 summation order (exact M > 1 kernels; the int8-dot
    linears keep MLC's layout, the exact library's are row-interleaved); decode logits differ by the int8 rounding
    of x but stay close; the metadata records the choice and the library cache tells them apart."""
    from mlc_schemes.compile import read_library_meta_if_fits, read_packed_model
    from mlc_schemes.engine import Engine

    ids = np.random.default_rng(0).integers(0, 500, 24)
    logits = {}
    for name in ("exact", "int8"):
        eng = Engine(tiny_w4 / "packed", tiny_w4 / f"{name}.so")
        pre = eng.prefill(ids[:16], all_logits=True)
        dec = np.stack([eng.decode(int(t)) for t in ids[16:]])
        logits[name] = pre, dec
    scale = np.abs(logits["exact"][0]).max()
    np.testing.assert_allclose(logits["int8"][0], logits["exact"][0], rtol=0, atol=1e-5 * scale)
    diff = np.abs(logits["exact"][1] - logits["int8"][1]).max()
    assert diff > 1e-3 * scale  # far above the summation-order differences of prefill
    assert 0 < diff <= 0.05 * np.abs(logits["exact"][1]).max(), diff
    pm = read_packed_model(tiny_w4 / "packed")
    meta = read_library_meta_if_fits(tiny_w4 / "int8.so", pm, int8_dot=True)
    assert meta["int8_dot"] is True
    # what the library really uses: every 4-bit linear of the tiny model is eligible (K = 192, 320 at g128)
    mc = pm.chat["model_config"]
    hidden, inter = mc["hidden_size"], mc["intermediate_size"]
    shapes = {tuple(s) for s in meta["int8_dot_shapes"]}
    assert shapes >= {(2 * inter, hidden), (hidden, inter)} and all(k % 64 == 0 for _, k in shapes), shapes
    assert read_library_meta_if_fits(tiny_w4 / "exact.so", pm)["int8_dot_shapes"] == []
    assert read_library_meta_if_fits(tiny_w4 / "int8.so", pm) is None
    assert read_library_meta_if_fits(tiny_w4 / "exact.so", pm, int8_dot=True) is None


def test_decode_step_perplexity_equals_prefill_perplexity(tiny_w4):
    """`tvm_perplexity(steps="decode")` scores the same windows one token at a time: on an exact float32 library
    it equals the one-prefill score."""
    from transformers import AutoTokenizer

    from mlc_schemes.engine import tvm_perplexity
    from omniquant.data import load_tokens
    from omniquant.paths import austen_dir

    tokens = load_tokens(AutoTokenizer.from_pretrained(tiny_w4 / "packed"),
                         str(austen_dir() / "prideprejudice.txt"))[: 2 * 64]
    pre = tvm_perplexity(tiny_w4 / "packed", tiny_w4 / "exact.so", tokens, 64)
    dec = tvm_perplexity(tiny_w4 / "packed", tiny_w4 / "exact.so", tokens, 64, steps="decode")
    assert abs(dec - pre) / pre <= 1e-5, (pre, dec)


def test_int8_dot_needs_an_x86_llvm_target(tiny_w4, tmp_path):
    from mlc_schemes.compile import compile_packed
    from omniquant.errors import UserError

    with pytest.raises(UserError, match="--int8-dot needs an x86 llvm target"):
        compile_packed(tiny_w4 / "packed", "cuda", tmp_path / "lib.so", int8_dot=True, aot_cubin=False)
