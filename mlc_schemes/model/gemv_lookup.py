"""Decode GEMV (M = 1) for 2-bit codes on AVX-512 by table lookup: five packed bits per vector permute.

Same layout and result as `gemv_interleaved` (lane = row; `q_weight[b, w, i]` = word w of row `b * B + i`), but
instead of isolating, converting and multiplying each code, every 5-bit chunk j of a word (bits [5j, 5j + 5), 7 per
word) indexes a table of 32 float32 values made once per call and shared by all rows:

    tab[w, j, i] = sum_{bit t of chunk j}  bit_(t - 5j)(i) * 2^(t - bits * e(t)) * x[w * epw + e(t)],   i < 32

(e(t): the code bit t belongs to; bits of columns past K, padding bits and bits of another group than the chunk's
first bit weigh 0). `vpermi2ps` (a 32-entry table in two registers; it reads only the low 5 bits of each index
lane) then gives 16 rows' contributions of a chunk in one instruction: per chunk one shift, one permute, one add,
i.e. 7 x 3 instructions per 16 codes against 16 x 3 (AND, convert, FMA) in `gemv_interleaved`. Groups that start
mid-chunk (e.g. g40) look that chunk up twice: with its first bit's group in `tab`, with the next group's bits in
`utab[g]`. Per group g:

    y[n] += scale[n, g] * (sum_{chunks c of g} tab[c][bits of row n in c]  -  zero[n, g] * xs[g])

Per call the tables take 4 x 7 x 32 floats per word column (K = 576: 36 words, 32 KiB) and 5 FMAs of 32 lanes per chunk
to build. The permute is the bottleneck (one per cycle or less on Zen 5), which is why only 2 bits gain: per call,
1 thread, AMD EPYC znver5 (bench/README.md, "2-bit GEMV by table lookup"), 2-bit 1.3-1.5x faster than
`gemv_interleaved`; 3-bit (8 lookups of 4-bit chunks per 10 codes, or 6 of 5-bit) and 4-bit were at parity or slower,
and AVX2's 8-entry `vpermps` (3-bit chunks) gained nothing.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

CHUNK_BITS = 5  # index bits of AVX-512's two-register permute (vpermi2ps: 32 float32 entries)
PERMUTE = "llvm.x86.avx512.vpermi2var.ps.512"  # (table[0:16], index, table[16:32]) -> float32 x 16


def serves(quant, isa) -> bool:
    """Whether `gemv_lookup` takes the interleaved decode GEMV of `quant` (a `kernels.QuantSpec`) scheduled for
    `isa` (an `isa.CpuIsa`): 2-bit codes on AVX-512 (module docstring: 3- and 4-bit were not faster), when the
    target being built for has AVX-512 too (`isa.current_isa()`: an AVX-512 schedule may be built for an AVX2 target
    in tests and `bench.gemv --schedule`, where LLVM splits the vectors but has no such permute)."""
    from mlc_schemes.model.isa import current_isa

    return isa.name == "avx512" and current_isa().name == "avx512" and quant.bits == 2


def gemv_lookup(n: int, k: int, quant, out_dtype: str, tasks: int, lanes: int):
    """TIR macro `(x[1, K], q_weight [N/B, words, B], q_scale [N/B, G, B], zero(b, g, i), y[1, N])`, B =
    `quant.interleave` (a multiple of `lanes` = 16 dividing N)."""
    from mlc_schemes.model.gemv_interleaved import prefetch_next_word, row_blocks
    from mlc_schemes.model.kernels import _group_sums

    epw, bits, gw, blk = quant.epw, quant.bits, quant.group_width, quant.interleave
    il, rv = lanes, blk // lanes
    cw, te = CHUNK_BITS, 1 << CHUNK_BITS  # chunk bits, table entries (two vectors)
    used = epw * bits  # bits of a word that hold codes
    nch = math.ceil(used / cw)  # chunks looked up per word
    words, groups = math.ceil(k / epw), math.ceil(k / gw)
    prefetch_next = prefetch_next_word(blk, n // blk)
    group_sums = _group_sums(k, gw, groups)

    def first_chunk(c):  # (global chunk index, straddles) of column c's first bit
        return (c // epw) * nch + (c % epw) * bits // cw, (c % epw) * bits % cw

    def last_chunk(c):  # global chunk index of column c's last bit
        return (c // epw) * nch + ((c % epw) * bits + bits - 1) // cw

    def coef(x, w, t):  # weight of bit t (static) of word w in the table of chunk t // cw: x[col] * 2^(bit in code)
        col = w * epw + t // bits
        return T.if_then_else(col < k, T.Cast("float32", x[0, T.min(col, k - 1)]), T.float32(0)) * T.Cast(
            "float32", T.shift_left(1, t % bits))

    @T.macro
    def build_tables(x, tab, utab):
        for w in range(words):
            for j in T.unroll(nch):
                for i in T.vectorized(te):
                    tab[w, j, i] = T.float32(0)
                for b in T.unroll(cw):
                    # bit t of the word, kept when it is a code bit of the chunk's first bit's group
                    if j * cw + b < used and (w * epw + (j * cw + b) // bits) // gw == (
                            w * epw + (j * cw) // bits) // gw:
                        for i in T.vectorized(te):
                            tab[w, j, i] = tab[w, j, i] + T.Cast("float32", T.shift_right(i, b) & 1) * coef(
                                x, w, j * cw + b)
        for g in range(groups):
            for i in T.vectorized(te):
                utab[g, i] = T.float32(0)
            # group g's first chunk, when it starts mid-chunk: its bits of group g (tab holds the previous group's)
            if (g * gw % epw) * bits % cw > 0:
                for b in T.unroll(cw):
                    if ((g * gw % epw) * bits // cw) * cw + b < used and (
                            (g * gw % epw) * bits // cw * cw + b) // bits >= g * gw % epw:
                        for i in T.vectorized(te):
                            utab[g, i] = utab[g, i] + T.Cast("float32", T.shift_right(i, b) & 1) * coef(
                                x, g * gw // epw, ((g * gw % epw) * bits // cw) * cw + b)

    @T.macro
    def lookup(qw, t0, t1, gacc, nb, w, j):
        """gacc[r] += table (t0 ++ t1) at chunk j of word w of each row, for the block's RV row vectors."""
        for r in T.unroll(rv):
            gacc[r, T.ramp(0, 1, il)] = gacc[r, T.ramp(0, 1, il)] + T.call_llvm_pure_intrin(
                f"float32x{il}", PERMUTE, t0, T.reinterpret(f"int32x{il}", T.shift_right(
                    qw[nb, w, T.ramp(r * il, 1, il)], T.Broadcast(T.uint32(j * cw), il))), t1)

    @T.macro
    def lookup_tab(qw, tab, gacc, nb, w, j):
        lookup(qw, tab[w, j, T.ramp(0, 1, il)], tab[w, j, T.ramp(il, 1, il)], gacc, nb, w, j)

    @T.macro
    def chunk_range(qw, tab, gacc, nb, w0, a, z):
        """Chunks [a, z] (counted from word w0, nch per word) from tab: a head word from chunk a % nch, whole
        words, a tail word up to chunk z % nch; bounds constant once the group loop is unrolled."""
        if a % nch > 0:
            for j in T.unroll(nch):
                if j >= a % nch and a // nch * nch + j <= z:
                    lookup_tab(qw, tab, gacc, nb, w0 + a // nch, j)
        for w in range((a + nch - 1) // nch, (z + 1) // nch):
            prefetch_next(qw, nb, w0 + w)
            for j in T.unroll(nch):
                lookup_tab(qw, tab, gacc, nb, w0 + w, j)
        if (z + 1) % nch > 0 and (z + 1) // nch >= (a + nch - 1) // nch:
            prefetch_next(qw, nb, w0 + (z + 1) // nch)
            for j in T.unroll(nch):
                if j < (z + 1) % nch:
                    lookup_tab(qw, tab, gacc, nb, w0 + (z + 1) // nch, j)

    @T.macro
    def group_dot(tables, qw, gacc, nb, w0, gl, ncols):
        for r in T.unroll(rv):
            gacc[r, T.ramp(0, 1, il)] = T.Broadcast(T.float32(0), il)
        # tables = (tab, utab); w0 starts a period, so on a group boundary: its group is w0 * epw // gw
        if first_chunk(gl * gw)[1] > 0:  # the group's first chunk is shared with the previous group
            lookup(qw, tables[1][w0 * epw // gw + gl, T.ramp(0, 1, il)],
                   tables[1][w0 * epw // gw + gl, T.ramp(il, 1, il)], gacc, nb,
                   w0 + first_chunk(gl * gw)[0] // nch, first_chunk(gl * gw)[0] % nch)
        chunk_range(qw, tables[0], gacc, nb, w0, first_chunk(gl * gw)[0] + T.Cast("int32", first_chunk(gl * gw)[1] > 0),
                    last_chunk(T.min(gl * gw + gw, ncols) - 1))

    loops = row_blocks(n, k, quant, out_dtype, tasks, lanes, group_dot)

    @T.macro
    def gemv(x, qw, s, zero, y):
        tab = T.decl_buffer((words, nch, te), "float32")
        utab = T.decl_buffer((groups, te), "float32")
        xs = T.decl_buffer((groups,), "float32")
        build_tables(x, tab, utab)
        group_sums(x, xs)
        loops((tab, utab), qw, s, zero, xs, y)

    return gemv
