"""Prefill GEMM (M > 1) on row-interleaved packed weights (the layout of `gemv_interleaved`), vector = L rows.

`q_weight[b, w, i]` = word w of row `b * B + i` (`packing.interleave_rows`), so one vector load holds word w of L
rows and its code e is the same column `c = w * epw + e` in every lane. Per block of B rows (parallel over blocks)
and chunk of KC columns the codes are decoded once to float32 in that lane order,

    wt[c, i] = (code[b * B + i, c] - zero[b * B + i, g(c)]) * scale[b * B + i, g(c)]      (one vector per L rows)

and every tile of RM input rows meets it in BLAS's outer-product form,

    acc[m, rows] += x[m, c] * wt[c, rows]      x[m, c] broadcast, RNV row vectors, RM * RNV vector accumulators

so the decode needs no gathers or per-row shuffles (the MLC-layout GEMM decodes along a row instead, which works
only where groups hold whole words) and the sums need no horizontal reduction. Partial sums of a block over its
chunks stay in a float32 [MC, B] buffer; x is converted to float32 once per GEMM_MC-row chunk.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

# float32 bytes of one decoded chunk: stays in L2 (1 MiB on Zen 4/5, 512 KiB on Zen 3) while all input rows pass
CHUNK_BYTES = 96 * 1024


def outer_tile(rv: int, isa) -> tuple[int, int]:
    """(RNV row vectors, RM input rows) of the register tile for blocks of `rv` vectors: RNV the largest of 3, 2, 1
    dividing rv, RM so that RM * RNV accumulators + RNV weight vectors + one broadcast fit the register file
    (AVX2 3 x 4: 12 + 3 + 1 = 16, as `kernels.gemm_tile`), at most 8 input rows."""
    rnv = next(v for v in (3, 2, 1) if rv % v == 0)
    return rnv, min(8, (isa.registers - rnv - 1) // rnv)


def gemm_interleaved(n: int, k: int, quant, out_dtype: str, isa, mc: int):
    """TIR macro `(x[M, K], y[M, N], m_len, q_weight [N/B, words, B], q_scale [N/B, G, B], zero(b, g, i))`, B =
    `quant.interleave`, input rows in chunks of `mc`."""
    from mlc_schemes.model.kernels import _x_chunk

    epw, bits, gw, mask, blk = quant.epw, quant.bits, quant.group_width, quant.mask, quant.interleave
    vl = isa.lanes
    rv = blk // vl
    rnv, rm = outer_tile(rv, isa)
    words, groups = math.ceil(k / epw), math.ceil(k / gw)
    length = words * epw  # decoded columns (padding codes meet x = 0)
    kw = max(1, CHUNK_BYTES // (blk * 4 * epw))  # words per chunk
    kc, nkc = kw * epw, math.ceil(words / kw)
    nblk = n // blk
    x_chunk = _x_chunk(mc, length, lambda x, m, l: T.if_then_else(
        l < k, T.Cast("float32", x[m, T.min(l, k - 1)]), T.float32(0)))

    @T.macro
    def decode(qw, s, zero, wt, nb, ch):
        for wl in range(T.min(kw, words - ch * kw)):
            for e in T.unroll(epw):
                g: T.let = T.min(((ch * kw + wl) * epw + e) // gw, groups - 1)
                for r in T.unroll(rv):
                    for j in T.vectorized(vl):
                        wt[wl * epw + e, r * vl + j] = (T.Cast("float32", T.Cast("int32", T.shift_right(
                            qw[nb, ch * kw + wl, r * vl + j], T.uint32(e * bits)) & T.uint32(mask)))
                            - zero(nb, g, r * vl + j)) * T.Cast("float32", s[nb, g, r * vl + j])

    @T.macro
    def gemm(x, y, m_len, qw, s, zero):
        for c0 in range((m_len + mc - 1) // mc):
            xf = T.decl_buffer((mc, length), "float32")
            x_chunk(x, xf, c0, m_len)
            for nb in T.parallel(nblk):
                rows: T.let = T.min(mc, m_len - c0 * mc)
                wt = T.decl_buffer((kc, blk), "float32")
                ya = T.decl_buffer((mc + rm, blk), "float32")  # rows past the chunk: dropped at the end
                acc = T.decl_buffer((rm * rnv, vl), "float32")  # < 1 KiB: kept in registers
                for ch in range(nkc):
                    decode(qw, s, zero, wt, nb, ch)
                    for mb in range((rows + rm - 1) // rm):
                        for vb in range(rv // rnv):
                            for i in T.unroll(rm):
                                for r in T.unroll(rnv):
                                    for j in T.vectorized(vl):
                                        acc[i * rnv + r, j] = T.if_then_else(
                                            ch > 0, ya[mb * rm + i, (vb * rnv + r) * vl + j], T.float32(0))
                            for c in range(T.min(kc, length - ch * kc)):
                                for i in T.unroll(rm):
                                    for r in T.unroll(rnv):
                                        for j in T.vectorized(vl):
                                            acc[i * rnv + r, j] = acc[i * rnv + r, j] + xf[
                                                T.min(mb * rm + i, rows - 1), ch * kc + c
                                            ] * wt[c, (vb * rnv + r) * vl + j]
                            for i in T.unroll(rm):
                                for r in T.unroll(rnv):
                                    for j in T.vectorized(vl):
                                        ya[mb * rm + i, (vb * rnv + r) * vl + j] = acc[i * rnv + r, j]
                for i in range(rows):
                    for jb in range(rv):
                        for j in T.vectorized(vl):
                            y[c0 * mc + i, nb * blk + jb * vl + j] = T.Cast(out_dtype, ya[i, jb * vl + j])

    return gemm
