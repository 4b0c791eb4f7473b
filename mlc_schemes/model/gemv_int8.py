"""Opt-in decode GEMV for 4-bit weights on int8 activations (x86 AVX2 integer dot products), as llama.cpp does.

`y[0, n] = sum_k W[n, k] * x[0, k]` with `W[n, k] = (code[n, k] - zero[n, g]) * scale[n, g]` (4-bit codes packed
LSB-first in uint32 words, docs/formats.md §2), computed as

    d[c]     = max_{k in c} |x[k]| / 127                      per chunk c of 64 columns (float32)
    xq[k]    = rint(x[k] / d[c])  in [-127, 127]              (int8)
    y[n]     = sum_g scale[n, g] * (sum_{c in g} d[c] * sum_{k in c} code[n, k] * xq[k]  -  zero[n, g] * xz[g])
    xz[g]    = sum_{c in g} d[c] * sum_{k in c} xq[k]

The inner sums are exact integers: per 32 bytes of packed row (64 codes) the low and high nibbles are masked out
(codes of even and odd columns), `vpmaddubsw` multiplies them (unsigned) with the matching int8 x values and adds
pairs to int16 (|.| <= 2 * 15 * 127, no saturation), the two halves are added and `vpmaddwd` against ones sums to
8 int32 lanes, converted once per chunk. That is about 10 vector instructions per 64 weights where the float32
kernel (`kernels._gemv_quant`) spends 24 (mask, convert, FMA per 8 weights), which is what bounds it on AVX2.

The cost is precision: x is rounded to 8 bits per 64 values, an error of at most d[c] / 2 per element, so
`|y - y_exact| <= sum_c d[c] / 2 * sum_{k in c} |W[n, k]|` (plus float rounding). Prefill (M > 1) is unchanged, so
decode and prefill logits differ slightly; bench.decode reports the perplexity through decode steps.

Used when asked (`omniquant compile --int8-dot`) for linears with 4-bit codes, groups of a multiple of 64 columns
and K a multiple of 64 (a partial last group is fine: SmolLM2's K = 576 at g128); others keep the float32 kernel.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from mlc_schemes.model.isa import CpuIsa

CHUNK = 64  # columns per activation scale: 32 packed bytes, one 256-bit load per row
# One row per step and no software prefetch: each thread then reads one sequential stream, which the hardware
# prefetcher follows best. At 7B shapes on Zen 3 (2 threads, weights beyond L3) this streamed 19-22 GB/s against
# 10-17 GB/s for 4 interleaved rows with prefetch 8 blocks ahead (the float32 kernel's layout, which needs the
# shared x loads because it is compute-bound; this one is not).


def eligible(k: int, quant, isa: CpuIsa) -> bool:
    """Whether `gemv_int8` serves a linear of K = k with `quant` (a `kernels.QuantSpec`) on `isa`."""
    gw = quant.group_width
    return isa.int8_dot and quant.bits == 4 and gw % CHUNK == 0 and k % CHUNK == 0


def gemv_int8(n: int, k: int, quant, out_dtype: str, tasks: int):
    """TIR macro `(x[1, K], q_weight, q_scale, zero(n, g), y[1, N])` for M = 1 (see the module docstring).

    Rows are split over at most `tasks` parallel tasks, one row per step."""
    gw = quant.group_width
    groups, nch, cpg = math.ceil(k / gw), k // CHUNK, gw // CHUNK
    gfull, ctail = k // gw, k // CHUNK - (k // gw) * (gw // CHUNK)  # whole groups; chunks of a partial last group
    per_task = math.ceil(n / tasks)
    ntask = math.ceil(n / per_task)

    def madd_u8s8(codes, xv):  # u8 x s8 pairs -> s16 [16]
        return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", codes, xv)

    def group_dot(chunks: int):
        """TIR macro `(qw, s, zero, xq, d, xz, acc, gacc, zt, row, g)`: group g (`chunks` chunks) of one row into
        acc (scaled) and zt[0] (zero term)."""

        @T.macro
        def dot(qw, s, zero, xq, d, xz, acc, gacc, zt, row, g):
            gacc[T.ramp(0, 1, 8)] = T.Broadcast(T.float32(0), 8)
            for cc in T.unroll(chunks):
                wv: T.let = qw[row, T.ramp((g * cpg + cc) * 8, 1, 8)]
                lo: T.let = T.reinterpret("int8x32", wv & T.Broadcast(T.uint32(0x0F0F0F0F), 8))
                hi: T.let = T.reinterpret("int8x32", T.shift_right(wv, T.Broadcast(T.uint32(4), 8))
                                          & T.Broadcast(T.uint32(0x0F0F0F0F), 8))
                pairs: T.let = (madd_u8s8(lo, xq[g * cpg + cc, 0, T.ramp(0, 1, 32)])
                                + madd_u8s8(hi, xq[g * cpg + cc, 1, T.ramp(0, 1, 32)]))
                dots: T.let = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs,
                                                      T.Broadcast(T.int16(1), 16))
                gacc[T.ramp(0, 1, 8)] = gacc[T.ramp(0, 1, 8)] + T.Cast("float32x8", dots) \
                    * T.Broadcast(d[g * cpg + cc], 8)
            sc: T.let = T.Cast("float32", s[row, g])
            zt[0] = zt[0] + sc * zero(row, g) * xz[g]
            acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + T.Broadcast(sc, 8) * gacc[T.ramp(0, 1, 8)]

        return dot

    full, tail = group_dot(cpg), group_dot(max(ctail, 1))

    @T.macro
    def gemv(x, qw, s, zero, y):
        xq = T.decl_buffer((nch, 2, 32), "int8")  # [chunk, even/odd column, j]: column c*64 + 2j + h
        d = T.decl_buffer((nch,), "float32")
        xz = T.decl_buffer((groups,), "float32")
        amax = T.decl_buffer((1,), "float32")
        qsum = T.decl_buffer((1,), "int32")
        for c in range(nch):
            amax[0] = T.float32(0)
            for i in range(CHUNK):
                amax[0] = T.max(amax[0], T.fabs(T.Cast("float32", x[0, c * CHUNK + i])))
            d[c] = amax[0] / T.float32(127)
            inv: T.let = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for h, j in T.grid(2, 32):
                xq[c, h, j] = T.Cast("int8", T.max(T.min(
                    T.round(T.Cast("float32", x[0, c * CHUNK + 2 * j + h]) * inv), T.float32(127)), T.float32(-127)))
            qsum[0] = 0
            for h, j in T.grid(2, 32):
                qsum[0] = qsum[0] + T.Cast("int32", xq[c, h, j])
            if c % cpg == 0:
                xz[c // cpg] = T.float32(0)
            xz[c // cpg] = xz[c // cpg] + d[c] * T.Cast("float32", qsum[0])
        for t in T.parallel(ntask):
            acc = T.decl_buffer((8,), "float32")  # per task, not per row: see kernels._gemv_quant
            gacc = T.decl_buffer((8,), "float32")
            zt = T.decl_buffer((1,), "float32")
            for r0 in range(per_task):
                row: T.let = t * per_task + r0
                if row < n:
                    zt[0] = T.float32(0)
                    acc[T.ramp(0, 1, 8)] = T.Broadcast(T.float32(0), 8)
                    for g in range(gfull):
                        full(qw, s, zero, xq, d, xz, acc, gacc, zt, row, g)
                    if ctail > 0:
                        tail(qw, s, zero, xq, d, xz, acc, gacc, zt, row, gfull)
                    y[0, row] = T.Cast(out_dtype, ((acc[0] + acc[4]) + (acc[2] + acc[6]))
                                       + ((acc[1] + acc[5]) + (acc[3] + acc[7])) - zt[0])

    return gemv
