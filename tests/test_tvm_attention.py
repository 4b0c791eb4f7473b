"""CPU attention kernels (mlc_schemes.model.attention_cpu) against a float64 numpy softmax attention.

Each kernel is called the way TVM's paged KV cache runtime calls the kernel it replaces: same arguments, same
outputs (attention output and base-2 log-sum-exp), pages given in a shuffled order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from mlc_schemes.compile import make_target  # noqa: E402
from mlc_schemes.model import attention_cpu as ac  # noqa: E402

H_KV, H_Q, D, PAGE = 2, 6, 32, 16
SM = 1 / math.sqrt(D)


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=make_target("llvm"))["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _reference(q, k, v, causal):
    """q [n, H_Q, D], k/v [kv, H_KV, D] -> (out [n, H_Q, D], lse [n, H_Q]) in float64; causal: row r sees keys
    < kv - n + r + 1 (the new tokens are the last n)."""
    n, kv = q.shape[0], k.shape[0]
    out, lse = np.zeros((n, H_Q, D)), np.zeros((n, H_Q))
    for r in range(n):
        vis = kv - n + r + 1 if causal else kv
        for h in range(H_Q):
            s = k[:vis, h * H_KV // H_Q].astype(np.float64) @ q[r, h].astype(np.float64) * SM * math.log2(math.e)
            p = np.exp2(s - s.max())
            out[r, h] = p @ v[:vis, h * H_KV // H_Q].astype(np.float64) / p.sum()
            lse[r, h] = s.max() + math.log2(p.sum())
    return out, lse


def _paged(kv_len, rng):
    """A page pool holding kv_len tokens of K/V in shuffled pages -> (pages, page ids, last page length, k, v)."""
    npages = math.ceil(kv_len / PAGE)
    pool = rng.standard_normal((npages + 3, 2, H_KV, PAGE, D)).astype(np.float16)
    ids = rng.permutation(npages + 3)[:npages].astype(np.int32)
    k = np.concatenate([pool[i, 0].transpose(1, 0, 2) for i in ids])[:kv_len]
    v = np.concatenate([pool[i, 1].transpose(1, 0, 2) for i in ids])[:kv_len]
    return pool, ids, kv_len - (npages - 1) * PAGE, k, v


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("n", [1, 17, 40])
def test_ragged_prefill(n, causal):
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((n, h, D)).astype(np.float16) for h in (H_Q, H_KV, H_KV))
    f = _compile(ac.attention_prefill_ragged_cpu(H_KV, H_Q, D, "float16"))
    out, lse = _t(np.zeros((n, H_Q, D), np.float16)), _t(np.zeros((n, H_Q), np.float32))
    ind = _t(np.array([0, n], np.int32))
    f(_t(q), ind, _t(k), _t(v), ind, _t(np.zeros(n, np.int32)), _t(np.zeros(1, np.int32)), out, lse,
      causal, 0, 1.0, 1e4, SM)
    ref_out, ref_lse = _reference(q, k, v, causal)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-3)  # fp16 output rounding
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=1e-5)


@pytest.mark.parametrize("kv_len", [1, 16, 37, 150])
def test_paged_decode(kv_len):
    rng = np.random.default_rng(kv_len)
    pool, ids, last, k, v = _paged(kv_len, rng)
    q = rng.standard_normal((1, H_Q, D)).astype(np.float16)
    f = _compile(ac.attention_decode_cpu(H_KV, H_Q, D, "float16"))
    out, lse = _t(np.zeros((1, H_Q, D), np.float16)), _t(np.zeros((1, H_Q), np.float32))
    zero = _t(np.zeros(1, np.int32))
    f(_t(q), _t(pool), _t(np.array([0, len(ids)], np.int32)), _t(ids), _t(np.array([last], np.int32)), zero, zero,
      out, lse, 0, 1.0, 1e4, SM)
    ref_out, ref_lse = _reference(q, k, v, causal=False)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-3)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=1e-5)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_over_a_cached_prefix(causal):
    """New tokens (n = 9) against 45 cached ones: the continuation of a prompt in chunks or a chat turn."""
    rng = np.random.default_rng(7)
    n, kv_len = 9, 45
    pool, ids, last, k, v = _paged(kv_len, rng)
    q = rng.standard_normal((n, H_Q, D)).astype(np.float16)
    f = _compile(ac.attention_prefill_paged_cpu(H_KV, H_Q, D, "float16"))
    out, lse = _t(np.zeros((n, H_Q, D), np.float16)), _t(np.zeros((n, H_Q), np.float32))
    f(_t(q), _t(np.array([0, n], np.int32)), _t(pool), _t(np.array([0, len(ids)], np.int32)), _t(ids),
      _t(np.array([last], np.int32)), _t(np.zeros(1, np.int32)), _t(np.zeros(n, np.int32)), out, lse,
      causal, 0, 1.0, 1e4, SM)
    ref_out, ref_lse = _reference(q, k, v, causal)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-3)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=1e-5)


def test_empty_sequence_gives_zero_output_and_tvms_lse():
    pool = np.zeros((2, 2, H_KV, PAGE, D), np.float16)
    f = _compile(ac.attention_decode_cpu(H_KV, H_Q, D, "float16"))
    out, lse = _t(np.ones((1, H_Q, D), np.float16)), _t(np.zeros((1, H_Q), np.float32))
    zero = _t(np.zeros(1, np.int32))
    f(_t(np.ones((1, H_Q, D), np.float16)), _t(pool), _t(np.array([0, 0], np.int32)), _t(np.zeros(1, np.int32)),
      zero, zero, zero, out, lse, 0, 1.0, 1e4, SM)
    assert not out.numpy().any() and (lse.numpy() == -5e4).all()


def test_exp2_poly_relative_error():
    from tvm.script import tirx as T

    from mlc_schemes.model.kernels import exp2_poly

    n = 4096

    @T.prim_func
    def f(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in T.vectorized(n):
            y[i] = exp2_poly(x[i])

    x = np.linspace(-125.9, 126.9, n).astype(np.float32)
    y = _t(np.zeros(n, np.float32))
    _compile(f)(_t(x), y)
    np.testing.assert_allclose(y.numpy(), np.exp2(x.astype(np.float64)), rtol=2e-7)


def test_patch_is_scoped_and_keeps_tvm_kernels_for_sliding_window():
    from tvm.relax.frontend.nn.llm import kv_cache

    original = kv_cache._attention_decode_cpu
    with ac.patched_cpu_attention():
        assert kv_cache._attention_decode_cpu is not original
        ours = kv_cache._attention_decode_cpu(H_KV, H_Q, D, "float16", False, {})
        theirs = kv_cache._attention_decode_cpu(H_KV, H_Q, D, "float16", True, {})
    assert kv_cache._attention_decode_cpu is original
    assert "batch_decode_paged_kv_cpu" in ours.script() and "sliding_window" in theirs.script()


@pytest.mark.parametrize("scaling", [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("apply_rope", [1, 0])
def test_rope_split_equals_tvms_kernel(scaling, apply_rope):
    """Same q / k / v as TVM's `llama_rope_with_position_map` (the kernel it replaces), positions out of order."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    n, theta = 11, 10000.0
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((n, H_Q + 2 * H_KV, D)).astype(np.float16)
    pos = rng.permutation(200)[:n].astype(np.int32)
    outs = []
    for fn in (ac.rope_cpu(theta, 1.0, D, H_Q, H_KV, "float16", scaling, D),
               llama_rope_with_position_map(theta, 1.0, D, H_Q, H_KV, "float16", scaling, D)):
        q, k, v = (_t(np.zeros((n, h, D), np.float16)) for h in (H_Q, H_KV, H_KV))
        _compile(fn)(_t(qkv), _t(pos), q, k, v, apply_rope)
        outs.append([a.numpy().astype(np.float32) for a in (q, k, v)])
    for ours, theirs in zip(*outs):
        np.testing.assert_allclose(ours, theirs, atol=2e-3)  # one float16 ulp at |x| ~ 2
    assert (outs[0][2] == qkv[:, H_Q + H_KV:].astype(np.float32)).all()


# --- sliding-window (local) layers: mlc_schemes.model.attention_sliding_cpu -----------------------------------------
def _window(n_keys, offset, rng):
    """Pages holding a sliding window of n_keys tokens that starts `offset` slots into its first page (TVM's layout
    after earlier tokens slid out) -> (pages, page ids, length_info [3, 1], k, v)."""
    npages = math.ceil((offset + n_keys) / PAGE)
    pool, ids, last, k, v = _paged(npages * PAGE, rng)
    last = offset + n_keys - (npages - 1) * PAGE
    info = np.array([[last], [offset], [0]], np.int32)  # last page length, window offset, attention sink
    return pool, ids, info, k[offset:offset + n_keys], v[offset:offset + n_keys]


@pytest.mark.parametrize("n_keys,offset", [(1, 0), (16, 5), (23, 9)])
def test_sliding_decode_sees_the_window(n_keys, offset):
    from mlc_schemes.model.attention_sliding_cpu import attention_decode_sliding_cpu

    rng = np.random.default_rng(n_keys)
    pool, ids, info, k, v = _window(n_keys, offset, rng)
    q = rng.standard_normal((1, H_Q, D)).astype(np.float16)
    out, lse = _t(np.zeros((1, H_Q, D), np.float16)), _t(np.zeros((1, H_Q), np.float32))
    zero = _t(np.zeros(1, np.int32))
    _compile(attention_decode_sliding_cpu(H_KV, H_Q, D, "float16"))(
        _t(q), _t(pool), _t(np.array([0, len(ids)], np.int32)), _t(ids), _t(info), zero, zero, out, lse,
        0, 1.0, 1e4, SM)
    ref_out, ref_lse = _reference(q, k, v, causal=False)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-3)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=1e-5)


@pytest.mark.parametrize("causal", [1, 0])
def test_sliding_prefill_over_the_cached_window(causal):
    """16 new tokens of a W = 16 layer against a cached window of 16 keys starting mid-page: new token r sees the
    last W - r - 1 cached keys (its other keys are new tokens: the ragged kernel's part), the last one none (zero
    output, lse -5e4, where TVM's own kernel gives NaN)."""
    from mlc_schemes.model.attention_sliding_cpu import attention_prefill_sliding_cpu

    window, n = 16, 16
    rng = np.random.default_rng(11)
    pool, ids, info, k, v = _window(window, 7, rng)
    q = rng.standard_normal((n, H_Q, D)).astype(np.float16)
    out, lse = _t(np.zeros((n, H_Q, D), np.float16)), _t(np.zeros((n, H_Q), np.float32))
    _compile(attention_prefill_sliding_cpu(H_KV, H_Q, D, "float16", window))(
        _t(q), _t(np.array([0, n], np.int32)), _t(pool), _t(np.array([0, len(ids)], np.int32)), _t(ids), _t(info),
        _t(np.zeros(1, np.int32)), _t(np.zeros(n, np.int32)), out, lse, causal, 0, 1.0, 1e4, SM)
    got_out, got_lse = out.numpy(), lse.numpy()
    for r in range(n):
        vis = max(window - r - 1, 0) if causal else window
        if vis == 0:
            assert not got_out[r].any() and (got_lse[r] == -5e4).all()
            continue
        ref_out, ref_lse = _reference(q[r:r + 1], k[window - vis:], v[window - vis:], causal=False)
        np.testing.assert_allclose(got_out[r:r + 1], ref_out, atol=2e-3)
        np.testing.assert_allclose(got_lse[r:r + 1], ref_lse, atol=1e-5)


def test_sliding_patch_wraps_the_cpu_patch_and_is_scoped():
    from tvm.relax.frontend.nn.llm import kv_cache

    from mlc_schemes.model.attention_sliding_cpu import patched_sliding_attention

    original = kv_cache._attention_prefill_cpu
    with ac.patched_cpu_attention(), patched_sliding_attention():
        local = kv_cache._attention_prefill_cpu(H_KV, H_Q, D, "float16", True, {}, sliding_window_size=8)
        full = kv_cache._attention_prefill_cpu(H_KV, H_Q, D, "float16", False, {})
    assert kv_cache._attention_prefill_cpu is original
    # ours run rows in parallel; TVM's serial kernels have no parallel loop
    assert "sliding_window" in local.script() and "T.parallel" in local.script()
    assert "sliding_window" not in full.script() and "T.parallel" in full.script()
