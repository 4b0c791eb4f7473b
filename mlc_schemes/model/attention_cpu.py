"""CPU attention kernels for TVM's paged KV cache (`TIRPagedKVCache`, llvm target).

TVM 0.27's own CPU kernels (`_attention_decode_cpu`, `_attention_prefill_cpu`, `_attention_prefill_ragged_cpu`)
are serial scalar loops with libm `exp2` per score: on SmolLM2 they took 4.2 of 12.5 ms per decoded token and a
third of the prefill. The kernels here keep their signatures and results and are meant to be swapped in while the
cache is built (`patched_cpu_attention`):

    s_j = (q . k_j) * sm_scale * log2(e)                  float32, keys j < visible(row)
    out = sum_j 2^(s_j - m) v_j / sum_j 2^(s_j - m)        online over chunks of 16 keys, m = running max
    lse = m + log2(sum_j 2^(s_j - m))                      base 2, as TVM's merge kernel expects

with visible(row) = kv_len - qo_len + row + 1 when causal, kv_len otherwise (TVM's `_causal_mask`). Query heads (x
query rows for prefill) run in parallel; dot products and the value update are float32 vector loops as wide as the
target's registers (`mlc_schemes.model.isa`: 16 lanes on AVX-512, 8 on AVX2), and 2^x is a polynomial
(`exp2_poly`) that vectorises. RoPE must already be applied (`RopeMode.NORMAL`, so the kernels see `rotary_mode` 0);
sliding-window variants are `attention_sliding_cpu`'s. `rope_cpu` replaces the RoPE / q-k-v split kernel (TVM's
evaluates cos and sin once per head).
"""

# ruff: noqa: B023  (TVMScript evaluates the key / value lambdas where the macro is expanded, inside the loop)
from __future__ import annotations

import contextlib

from tvm.script import tirx as T

from mlc_schemes.model.isa import CpuIsa, current_isa
from mlc_schemes.model.kernels import LOG2E, _hsum, exp2_poly

CHUNK = 16  # keys per online-softmax step (= the KV cache page size)
NEG = -3.0e38  # "minus infinity" that stays finite through max / subtraction


def _attend(d: int, lanes: int):
    """TIR macro: one query row of one head against `nvis` keys, online softmax over CHUNK-key steps.

    `qf[d]` holds the query already scaled by sm_scale * log2(e); `k_at(c, r, i)` / `v_at(c, r, i)` read element i
    of key / value `c * CHUNK + r`. Leaves the unnormalised output in `acc[d]`, the running max in `st[0]` and the
    sum of 2^(s - max) in `st[1]` (0 when nvis == 0). Scratch: `sc[1, lanes]`, `p[CHUNK]`. (Scratch declared
    inside a parallel loop must be "global" scope and under 1 KiB: TVM then puts it on the stack, where LLVM keeps
    it in registers; otherwise every iteration calls TVMBackendAllocWorkspace.)
    """
    nd = d // lanes
    hs = _hsum(lanes)

    @T.macro
    def attend(qf, acc, st, sc, p, k_at, v_at, nvis):
        st[0] = T.float32(NEG)
        st[1] = T.float32(0)
        for i in T.vectorized(d):
            acc[i] = T.float32(0)
        for c in range((nvis + CHUNK - 1) // CHUNK):
            for r in range(CHUNK):
                if c * CHUNK + r < nvis:
                    for j in T.vectorized(lanes):
                        sc[0, j] = T.float32(0)
                    for i in T.unroll(nd):
                        for j in T.vectorized(lanes):
                            sc[0, j] = sc[0, j] + qf[i * lanes + j] * T.Cast("float32", k_at(c, r, i * lanes + j))
                    hs(sc, 0)
                    p[r] = sc[0, 0]
                else:
                    p[r] = T.float32(NEG)
            st[2] = st[0]
            for r in range(CHUNK):
                st[2] = T.max(st[2], p[r])
            for r in T.vectorized(CHUNK):
                p[r] = exp2_poly(p[r] - st[2])
            st[3] = exp2_poly(st[0] - st[2])  # rescale of what was accumulated under the old max
            st[0] = st[2]
            st[1] = st[1] * st[3]
            for i in T.vectorized(d):
                acc[i] = acc[i] * st[3]
            for r in range(T.min(CHUNK, nvis - c * CHUNK)):
                st[1] = st[1] + p[r]
                for i in T.vectorized(d):
                    acc[i] = acc[i] + p[r] * T.Cast("float32", v_at(c, r, i))

    return attend


def _paged_len(indptr, last_len, b, page_size: int):
    """Keys of sequence b in the pages: full pages plus the filled part of the last (TVM's length_info)."""
    npages = indptr[b + 1] - indptr[b]
    return T.if_then_else(npages > 0, (npages - 1) * page_size + last_len[b], 0)


def _visible(causal, nk, nq, row):
    """Keys that query `row` of `nq` new tokens sees among `nk`: the new tokens are the last nq keys
    (TVM's `_causal_mask`: col < nk - nq + row + 1), or all of them when not causal."""
    return T.if_then_else(causal > 0, T.max(T.min(nk, nk - nq + row + 1), 0), nk)


def _query(d: int, dtype: str, lanes: int):
    """TIR macro: attention of query row `row`, head `h` of q [rows, heads, d] over `nvis` keys (`_attend`), written
    to out[row, h, :] = acc / l and lse[row, h] = m + log2(l); without keys 0 and -5e4, as TVM's kernels."""
    attend = _attend(d, lanes)

    @T.macro
    def query(q, row, h, sm_scale, k_at, v_at, nvis, out, lse):
        qf = T.decl_buffer((d,), "float32")
        acc = T.decl_buffer((d,), "float32")
        st = T.decl_buffer((4,), "float32")
        sc = T.decl_buffer((1, lanes), "float32")
        p = T.decl_buffer((CHUNK,), "float32")
        for i in T.vectorized(d):
            qf[i] = T.Cast("float32", q[row, h, i]) * sm_scale * T.float32(LOG2E)
        attend(qf, acc, st, sc, p, k_at, v_at, nvis)
        if st[1] > T.float32(0):
            for i in T.vectorized(d):
                out[row, h, i] = T.Cast(dtype, acc[i] / st[1])
            lse[row, h] = st[0] + T.log2(st[1])
        else:
            for i in T.vectorized(d):
                out[row, h, i] = T.Cast(dtype, T.float32(0))
            lse[row, h] = T.float32(-5e4)

    return query


def attention_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16, isa: CpuIsa | None = None):
    """`batch_decode_paged_kv_cpu`: Q [B, h_q, d] (one new token per sequence) against its paged K/V."""
    group = h_q // h_kv
    query = _query(d, dtype, (isa or current_isa()).lanes)

    @T.prim_func
    def batch_decode_paged_kv_cpu(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                                  page_table_values_handle: T.handle, var_length_info: T.handle,
                                  k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                                  output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                                  rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_off = T.int32()
        values_off = T.int32()
        length_off = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_off)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_off)
        last_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_off)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        assert rotary_mode == 0, "CPU attention kernels need RoPE applied before the cache (RopeMode.NORMAL)"
        for t in T.parallel(B * h_q):
            b: T.let = t // h_q
            h: T.let = t % h_q
            begin: T.let = indptr[b]
            query(Q, b, h, sm_scale,
                  lambda c, r, i: pages[values[begin + c], 0, h // group, r, i],
                  lambda c, r, i: pages[values[begin + c], 1, h // group, r, i],
                  _paged_len(indptr, last_len, b, page_size), output, lse)

    return batch_decode_paged_kv_cpu


def attention_prefill_ragged_cpu(h_kv: int, h_q: int, d: int, dtype: str, isa: CpuIsa | None = None):
    """`batch_prefill_ragged_kv`: the new tokens' q [n, h_q, d] against their own k/v [n, h_kv, d] (ragged batch
    given by q_indptr / kv_indptr). (head, row) pairs run in parallel, head outermost so that a static split over
    the cores gets equal causal work."""
    group = h_q // h_kv
    query = _query(d, dtype, (isa or current_isa()).lanes)

    @T.prim_func
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                                sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_off = T.int32()
        kv_indptr_off = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_off)
        rope_off = T.int32()
        # unused (RoPE is applied before the cache), matched because it is what binds batch_size
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=rope_off)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "CPU attention kernels need RoPE applied before the cache (RopeMode.NORMAL)"
        for b in range(batch_size):
            for t in T.parallel(h_q * (q_indptr[b + 1] - q_indptr[b])):
                nq: T.let = q_indptr[b + 1] - q_indptr[b]
                nk: T.let = kv_indptr[b + 1] - kv_indptr[b]
                h: T.let = t // nq
                k0: T.let = kv_indptr[b]
                query(q, q_indptr[b] + t % nq, h, sm_scale,
                      lambda c, r, i: k[k0 + c * CHUNK + r, h // group, i],
                      lambda c, r, i: v[k0 + c * CHUNK + r, h // group, i],
                      _visible(causal, nk, nq, t % nq), output, lse)

    return batch_prefill_ragged_kv


def attention_prefill_paged_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16,
                                isa: CpuIsa | None = None):
    """`batch_prefill_paged_kv_cpu`: q [n, h_q, d] of the new tokens against the K/V already in the pages."""
    group = h_q // h_kv
    query = _query(d, dtype, (isa or current_isa()).lanes)

    @T.prim_func
    def batch_prefill_paged_kv_cpu(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                                   var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                                   var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                                   var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                                   rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_off = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        length_off = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_off)
        values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        last_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_off)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "CPU attention kernels need RoPE applied before the cache (RopeMode.NORMAL)"
        for b in range(batch_size):
            for t in T.parallel(h_q * (q_indptr[b + 1] - q_indptr[b])):
                nq: T.let = q_indptr[b + 1] - q_indptr[b]
                begin: T.let = page_indptr[b]
                h: T.let = t // nq
                query(q, q_indptr[b] + t % nq, h, sm_scale,
                      lambda c, r, i: pages[values[begin + c], 0, h // group, r, i],
                      lambda c, r, i: pages[values[begin + c], 1, h // group, r, i],
                      _visible(causal, _paged_len(page_indptr, last_len, b, page_size), nq, t % nq), output, lse)

    return batch_prefill_paged_kv_cpu


def rope_cpu(theta: float, scale: float, head_dim: int, h_q: int, h_kv: int, dtype: str, rope_scaling: dict,
             rotary_dim: int):
    """`tir_split_rotary` for the CPU: split qkv [s, h_q + 2 h_kv, d] into q, k (rotate-half RoPE on the first
    rotary_dim features when apply_rope) and v. TVM's version evaluates cos/sin for every (token, head, feature);
    here they are computed once per (token, feature) with TVM's own frequency formula (default / llama3 scaling),
    then applied to every head as vector loops; tokens run in parallel."""
    from tvm import tirx
    from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

    fused, half = h_q + 2 * h_kv, rotary_dim // 2
    freq = switch_rope_freq_func(rope_scaling)

    def cos_sin(pos, d, which):
        c, s_, lets = freq(pos * tirx.const(scale, "float32"), d, rotary_dim, theta, "float32")
        e = c if which == 0 else s_
        for var, value in lets.items():
            e = tirx.Let(var, value, e)
        return e

    @T.macro
    def rotate(dst, dh, qkv, sh, s, cs, sn, apply_rope):
        if apply_rope > 0:
            for d in T.vectorized(half):
                dst[s, dh, d] = T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, sh, d])
                                       - sn[d] * T.Cast("float32", qkv[s, sh, d + half]))
            for d in T.vectorized(half):
                dst[s, dh, d + half] = T.Cast(dtype, cs[d + half] * T.Cast("float32", qkv[s, sh, d + half])
                                              + sn[d + half] * T.Cast("float32", qkv[s, sh, d]))
            for d in range(head_dim - rotary_dim):
                dst[s, dh, rotary_dim + d] = qkv[s, sh, rotary_dim + d]
        else:
            for d in T.vectorized(head_dim):
                dst[s, dh, d] = qkv[s, sh, d]

    @T.prim_func
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        pm_off = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=pm_off)
        for s in T.parallel(seq_len):
            cs = T.decl_buffer((rotary_dim,), "float32")
            sn = T.decl_buffer((rotary_dim,), "float32")
            for d in range(rotary_dim):
                cs[d] = cos_sin(position_map[s], d, 0)
                sn[d] = cos_sin(position_map[s], d, 1)
            for h in range(h_q):
                rotate(q, h, qkv, h, s, cs, sn, apply_rope)
            for h in range(h_kv):
                rotate(k, h, qkv, h_q + h, s, cs, sn, apply_rope)
                for d in T.vectorized(head_dim):
                    v[s, h, d] = qkv[s, h_q + h_kv + h, d]

    return fused_rope


# TVM's kernel factories replaced while a TIRPagedKVCache is built, with the arguments kv_cache.py calls them with.
def _decode_factory(original):
    def make(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size=16):
        if sliding_window or d % current_isa().lanes or page_size != CHUNK:
            return original(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size)
        return attention_decode_cpu(h_kv, h_q, d, dtype, page_size)

    return make


def _prefill_factory(original):
    def make(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size=16, **kw):
        if sliding_window or d % current_isa().lanes or page_size != CHUNK:
            return original(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size, **kw)
        return attention_prefill_paged_cpu(h_kv, h_q, d, dtype, page_size)

    return make


def _ragged_factory(original):
    def make(h_kv, h_q, d_qk, d_v, dtype, rope_scaling):
        if d_qk != d_v or d_qk % current_isa().lanes:
            return original(h_kv, h_q, d_qk, d_v, dtype, rope_scaling)
        return attention_prefill_ragged_cpu(h_kv, h_q, d_qk, dtype)

    return make


def _rope_factory(original):
    def make(theta, scale, head_dim, h_q, h_kv, dtype, rope_scaling, rotary_dim=None):
        rotary_dim = rotary_dim or head_dim
        if rope_scaling.get("rope_type", "default") not in ("default", "llama3") or rotary_dim % 2:
            return original(theta, scale, head_dim, h_q, h_kv, dtype, rope_scaling, rotary_dim)
        return rope_cpu(theta, scale, head_dim, h_q, h_kv, dtype, rope_scaling, rotary_dim)

    return make


_FACTORIES = {"_attention_decode_cpu": _decode_factory, "_attention_prefill_cpu": _prefill_factory,
              "_attention_prefill_ragged_cpu": _ragged_factory, "llama_rope_with_position_map": _rope_factory}


@contextlib.contextmanager
def patched_cpu_attention():
    """Within the block, `TIRPagedKVCache(target=llvm)` builds its attention with the kernels above.

    kv_cache.py looks its kernel factories up as module globals when the cache is constructed, and TVM offers no
    parameter to pass others; the originals are restored on exit (and still serve the sliding-window variants).
    """
    from tvm.relax.frontend.nn.llm import kv_cache

    saved = {name: getattr(kv_cache, name) for name in _FACTORIES}
    try:
        for name, wrap in _FACTORIES.items():
            setattr(kv_cache, name, wrap(saved[name]))
        yield
    finally:
        for name, fn in saved.items():
            setattr(kv_cache, name, fn)
