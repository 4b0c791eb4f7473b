"""Decode GEMV (M = 1) on row-interleaved packed weights, lane = row: every packed linear of the CPU library.

Layout (`packing.interleave_rows`, made by the CPU engine at load from MLC's [N, words]): with B rows per block
(`QuantSpec.interleave`, `kernels.interleave_for`: RV vectors of the ISA's L float32 lanes, B = RV * L),
`q_weight[b, w, i]` = word w of row `b * B + i`, `q_scale[b, g, i]` / `q_zero[b, g, i]` likewise. One vector load
then holds word w of L rows, so every lane's code e is the same column `c = w * epw + e` and belongs to the same
group: group boundaries inside a word are static (known from c at compile time), not the 16-word windows of
`kernels._gemv_quant_window` that cost 16 / 12.8 of the codes' work at 3-bit g128. A block is one contiguous
stream (the RV vectors of a word side by side); each word of the next block is prefetched as the same word of
this one is used.

    y[n] = sum_g scale[n, g] * (sum_{c in g} code[n, c] * x[c]  -  zero[n, g] * xs[g]),   xs[g] = sum_{c in g} x[c]

Per code: one AND (`kernels._code_in_place`, the code left in place), one conversion and one FMA per L rows, with
x[c] * 2^-p(e) broadcast from a table made once per call and shared by the RV vectors (RV independent accumulator
chains); scale / zero once per group as vectors; y written L rows at a time (no horizontal sums). The column range
is walked in periods of lcm(epw, group) columns (64 words, 5 groups at 3-bit g128), each group as its shared head
word, a loop over its whole words and its shared tail word (all bounds constant), plus a static tail.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T


def prefetch_next_word(blk: int, nblk: int):
    """TIR macro `(qw, nb, w)`: prefetch word w of row block nb + 1 (the B rows' words, 64-byte line by line). The
    weights stream from memory in the model, where the hardware prefetcher alone left the core waiting: SmolLM2 W3
    gate_up 1.4x the time (kernels._prefetch_rows)."""

    @T.macro
    def prefetch_next(qw, nb, w):
        for q in T.unroll((blk * 4 + 63) // 64):
            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                qw[T.min(nb + 1, nblk - 1), w, T.min(q * 16, blk - 1)]), T.int32(0), T.int32(3), T.int32(1)))

    return prefetch_next


def row_blocks(n: int, k: int, quant, out_dtype: str, tasks: int, lanes: int, group_dot):
    """TIR macro `(tables, qw, s, zero, xs, y)`: the loops of a lane = row decode GEMV. Tasks over blocks of B =
    `quant.interleave` rows; per block the columns in periods of lcm(epw, group) columns, and per group gl of a
    period (its columns counted from word w0, ending at ncols) `group_dot(tables, qw, gacc, nb, w0, gl, ncols)`, which
    sets gacc[r, :] = sum over the group's columns c of code[row, c] * x[c] for the block's RV row vectors; then
    acc += scale * (gacc - zero * xs[g]); y written L rows at a time (no horizontal sums). `tables`: the per-call
    x tables of the caller, passed through."""
    epw, gw, blk = quant.epw, quant.group_width, quant.interleave
    il, rv = lanes, blk // lanes
    period = epw * gw // math.gcd(epw, gw)  # columns after which word and group boundaries line up again
    pw, pg, nper = period // epw, period // gw, k // period
    tcols = k - nper * period
    tg = math.ceil(tcols / gw)
    nblk = n // blk
    per_task = math.ceil(nblk / tasks)
    ntask = math.ceil(nblk / per_task)

    @T.macro
    def span(tables, qw, s, zero, xs, acc, gacc, nb, w0, g0, ngroups, ncols):
        """Columns [w0 * epw, w0 * epw + ncols), which start group g0 on a word boundary, into acc."""
        for gl in T.unroll(ngroups):
            group_dot(tables, qw, gacc, nb, w0, gl, ncols)
            for r in T.unroll(rv):
                for j in T.vectorized(il):
                    acc[r, j] = acc[r, j] + T.Cast("float32", s[nb, g0 + gl, r * il + j]) * (
                        gacc[r, j] - zero(nb, g0 + gl, r * il + j) * xs[g0 + gl])

    @T.macro
    def loops(tables, qw, s, zero, xs, y):
        for t in T.parallel(ntask):
            acc = T.decl_buffer((rv, il), "float32")  # per task, not per block: see kernels._gemv_quant
            gacc = T.decl_buffer((rv, il), "float32")
            for nb0 in range(per_task):
                nb: T.let = t * per_task + nb0
                if nb < nblk:
                    for r in T.unroll(rv):
                        for j in T.vectorized(il):
                            acc[r, j] = T.float32(0)
                    for p in range(nper):
                        span(tables, qw, s, zero, xs, acc, gacc, nb, p * pw, p * pg, pg, period)
                    if tcols > 0:
                        span(tables, qw, s, zero, xs, acc, gacc, nb, nper * pw, nper * pg, tg, tcols)
                    for r in T.unroll(rv):
                        for j in T.vectorized(il):
                            y[0, nb * blk + r * il + j] = T.Cast(out_dtype, acc[r, j])

    return loops


def gemv_interleaved(n: int, k: int, quant, out_dtype: str, tasks: int, lanes: int):
    """TIR macro `(x[1, K], q_weight [N/B, words, B], q_scale [N/B, G, B], zero(b, g, i), y[1, N])`, B =
    `quant.interleave` (a multiple of `lanes` dividing N)."""
    from mlc_schemes.model.kernels import _code_in_place, _group_sums, _in_place_scale

    epw, bits, gw, mask, blk = quant.epw, quant.bits, quant.group_width, quant.mask, quant.interleave
    il, rv = lanes, quant.interleave // lanes
    words, groups = math.ceil(k / epw), math.ceil(k / gw)
    group_sums = _group_sums(k, gw, groups)
    prefetch_next = prefetch_next_word(blk, n // blk)

    @T.macro
    def code_fma(qw, xt, gacc, nb, w, e):
        for r in T.unroll(rv):
            for j in T.vectorized(il):
                gacc[r, j] = gacc[r, j] + _code_in_place(qw[nb, w, r * il + j], e, bits, mask) * xt[w, e]

    @T.macro
    def group_dot(xt, qw, gacc, nb, w0, gl, ncols):
        # group gl = columns [c0, c1): codes c0 % epw.. of a head word shared with the previous group, whole
        # words (a loop), codes ..c1 % epw of a tail word shared with the next (unless the group ends inside
        # its head word: a last group shorter than a word); bounds constant once unrolled
        for r in T.unroll(rv):
            for j in T.vectorized(il):
                gacc[r, j] = T.float32(0)
        if (gl * gw) % epw > 0:
            for e in T.unroll(epw):
                if e >= (gl * gw) % epw and (gl * gw) // epw * epw + e < T.min(gl * gw + gw, ncols):
                    code_fma(qw, xt, gacc, nb, w0 + (gl * gw) // epw, e)
        for w in range((gl * gw + epw - 1) // epw, T.min(gl * gw + gw, ncols) // epw):
            prefetch_next(qw, nb, w0 + w)
            for e in T.unroll(epw):
                code_fma(qw, xt, gacc, nb, w0 + w, e)
        if T.min(gl * gw + gw, ncols) % epw > 0 and T.min(gl * gw + gw, ncols) // epw >= (gl * gw + epw - 1) // epw:
            prefetch_next(qw, nb, w0 + T.min(gl * gw + gw, ncols) // epw)
            for e in T.unroll(epw):
                if e < T.min(gl * gw + gw, ncols) % epw:
                    code_fma(qw, xt, gacc, nb, w0 + T.min(gl * gw + gw, ncols) // epw, e)

    loops = row_blocks(n, k, quant, out_dtype, tasks, lanes, group_dot)

    @T.macro
    def gemv(x, qw, s, zero, y):
        xt = T.decl_buffer((words, epw), "float32")
        xs = T.decl_buffer((groups,), "float32")
        for w, e in T.grid(words, epw):
            xt[w, e] = T.if_then_else(w * epw + e < k, T.Cast("float32", x[0, T.min(w * epw + e, k - 1)]),
                                      T.float32(0)) * _in_place_scale(e, bits)
        group_sums(x, xs)
        loops(xt, qw, s, zero, xs, y)

    return gemv
