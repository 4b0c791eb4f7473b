"""CPU attention kernels of sliding-window (local) layers for TVM's paged KV cache (`mha_sliding`, llvm target).

TVM 0.27's own CPU kernels for these layers (`_attention_prefill_cpu` / `_attention_decode_cpu` with
sliding_window=True) are serial loops and break when a query row sees none of the cached keys (the last row of a
W-token chunk): its running max is never set and the row comes out NaN; they also read a 1-element scale buffer
at every head_dim index. The kernels here keep TVM's signatures and semantics and reuse the online-softmax row
kernel of `attention_cpu` (`_query`):

    window of sequence b (TVM's length_info [3, B]: last_page_len, window offset, sink length):
        n_b = (pages - 1) * page_size + last_page_len - offset + sink,
        window position p lives in slot p (p < sink) or p - sink + offset of the sequence's window pages
    decode:   the new token (appended before attention) sees the whole window
    prefill:  query row r of the n new tokens sees the last max(W - r - 1, 0) window keys (causal), all otherwise;
              the new tokens among themselves are TVM's ragged kernel's part (so a chunk must not exceed W)

`patched_sliding_attention` swaps them in while a `TIRPagedKVCache` is built, around `attention_cpu`'s patch.
"""

# ruff: noqa: B023  (TVMScript evaluates the key / value lambdas where the macro is expanded, inside the loop)
from __future__ import annotations

import contextlib

from tvm.script import tirx as T

from mlc_schemes.model.attention_cpu import CHUNK, LANES, _query


def _window_len(indptr, length_info, b, page_size: int):
    """Keys in sequence b's window (TVM's `_get_kv_chunk_len` with sliding_window)."""
    npages = indptr[b + 1] - indptr[b]
    return T.if_then_else(npages > 0, (npages - 1) * page_size + length_info[0, b] - length_info[1, b]
                          + length_info[2, b], 0)


def _slot(length_info, b, pos):
    """Window position -> slot in the window's pages (TVM's `_get_seq_offset` with sliding_window)."""
    return T.if_then_else(pos < length_info[2, b], pos, pos - length_info[2, b] + length_info[1, b])


def _kv_at(pages, values, begin, length_info, b, kv: int, head, page_size: int, pos, i):
    """Element i of the key (kv 0) / value (kv 1) at window position pos of sequence b (pages from `begin`)."""
    s = _slot(length_info, b, pos)
    return pages[values[begin + s // page_size], kv, head, s % page_size, i]


def attention_decode_sliding_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16):
    """`batch_decode_paged_kv_cpu_sliding_window`: Q [B, h_q, d] against the window of its paged K/V."""
    group = h_q // h_kv
    query = _query(d, dtype)

    @T.prim_func
    def batch_decode_paged_kv_cpu_sliding_window(
            Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
            page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
            q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
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
        length_info = T.match_buffer(var_length_info, (3, B), "int32", elem_offset=length_off)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        assert rotary_mode == 0, "CPU attention kernels need RoPE applied before the cache (RopeMode NORMAL/NONE)"
        for t in T.parallel(B * h_q):
            b = t // h_q
            h = t % h_q
            begin = indptr[b]
            query(Q, b, h, sm_scale,
                  lambda c, r, i: _kv_at(pages, values, begin, length_info, b, 0, h // group, page_size,
                                         c * CHUNK + r, i),
                  lambda c, r, i: _kv_at(pages, values, begin, length_info, b, 1, h // group, page_size,
                                         c * CHUNK + r, i),
                  _window_len(indptr, length_info, b, page_size), output, lse)

    return batch_decode_paged_kv_cpu_sliding_window


def attention_prefill_sliding_cpu(h_kv: int, h_q: int, d: int, dtype: str, window: int, page_size: int = 16):
    """`batch_prefill_paged_kv_cpu_sliding_window`: q [n, h_q, d] of the new tokens against the cached window."""
    group = h_q // h_kv
    query = _query(d, dtype)

    @T.prim_func
    def batch_prefill_paged_kv_cpu_sliding_window(
            var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
            var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
            var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
            rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
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
        length_info = T.match_buffer(var_length_info, (3, batch_size), "int32", elem_offset=length_off)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "CPU attention kernels need RoPE applied before the cache (RopeMode NORMAL/NONE)"
        for b in range(batch_size):
            for t in T.parallel(h_q * (q_indptr[b + 1] - q_indptr[b])):
                nq = q_indptr[b + 1] - q_indptr[b]
                h = t // nq
                row = t % nq
                begin = page_indptr[b]
                nk = _window_len(page_indptr, length_info, b, page_size)
                # causal: the last max(W - row - 1, 0) keys (TVM's `_causal_or_sliding_cross_mask`)
                lo = T.if_then_else(causal > 0, T.max(nk - T.max(window - row - 1, 0), 0), 0)
                query(q, q_indptr[b] + row, h, sm_scale,
                      lambda c, r, i: _kv_at(pages, values, begin, length_info, b, 0, h // group, page_size,
                                             lo + c * CHUNK + r, i),
                      lambda c, r, i: _kv_at(pages, values, begin, length_info, b, 1, h // group, page_size,
                                             lo + c * CHUNK + r, i),
                      nk - lo, output, lse)

    return batch_prefill_paged_kv_cpu_sliding_window


def _decode_factory(previous):
    def make(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size=16):
        if not sliding_window or d % LANES or page_size != CHUNK:
            return previous(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size)
        return attention_decode_sliding_cpu(h_kv, h_q, d, dtype, page_size)

    return make


def _prefill_factory(previous):
    def make(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size=16, sliding_window_size=1024, **kw):
        if not sliding_window or d % LANES or page_size != CHUNK:
            return previous(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size,
                            sliding_window_size=sliding_window_size, **kw)
        return attention_prefill_sliding_cpu(h_kv, h_q, d, dtype, sliding_window_size, page_size)

    return make


_FACTORIES = {"_attention_decode_cpu": _decode_factory, "_attention_prefill_cpu": _prefill_factory}


@contextlib.contextmanager
def patched_sliding_attention():
    """Within the block, `TIRPagedKVCache(target=llvm)` builds its sliding-window attention with the kernels above
    (wrapping whatever factories are current, e.g. `attention_cpu.patched_cpu_attention`'s); restored on exit."""
    from tvm.relax.frontend.nn.llm import kv_cache

    saved = {name: getattr(kv_cache, name) for name in _FACTORIES}
    try:
        for name, wrap in _FACTORIES.items():
            setattr(kv_cache, name, wrap(saved[name]))
        yield
    finally:
        for name, fn in saved.items():
            setattr(kv_cache, name, fn)
