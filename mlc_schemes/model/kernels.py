"""Matmul kernels for the model's linears: `y[M, N] = x[M, K] @ W[N, K]^T`, float32 accumulation.

Two weight sources share one kernel shape:

- quantized: `W[n, k] = (code[n, k] - zero[n, k // gs]) * scale[n, k // gs]` from uint32 words packed LSB-first
  along K (`epw = 32 // bits` codes per word, docs/formats.md §2); `zero` is a float16 tensor (asymmetric kinds)
  or the scheme's fixed zero (MLC symmetric kinds);
- dense: `W` float16/float32 as stored.

CPU (llvm): hand-written TIR, two paths chosen at run time on M:

- M = 1 (decode), the GEMV that dominates a decode step. The CPU library takes packed linears with their rows
  interleaved at load (`QuantSpec.interleave`, `interleave_for`): `gemv_interleaved` (lane = row; 2-bit codes on
  AVX-512 take `gemv_lookup`, five packed bits per table-lookup permute). On MLC's layout
  (an N no block divides, or the opt-in int8-activation `gemv_int8.gemv_int8` for 4-bit) `_gemv_quant` (lane =
  word; `_gemv_quant_window` for groups starting mid-word). All work on raw packed words (one contiguous vector
  load of words, each code isolated by a single AND with its in-word mask and converted, x pre-scaled once per
  call), apply scale / zero once per group and keep independent accumulators; `_cpu_dense` M = 1 converts x to
  float32 once and shares each x vector over ROWS rows. Rows are split over the cores in at most TASKS tasks.
- M > 1 (prefill): blocks of weight rows (parallel over the cores) are decoded once into float32 buffers, then
  meet tiles of input rows in register tiles (the decode is amortised over M): `gemm_interleaved` on interleaved
  rows (outer product, vector = rows), `_gemm` on MLC's layout and dense weights (vector along K).

Vector width and register tiles follow the target's ISA (`mlc_schemes.model.isa`: 16 float32 lanes and 32
registers on AVX-512, 8 and 16 on AVX2), passed as `isa` or taken from `isa.current_isa()`.

Weights are read once, in packed form, and never materialised in memory. Generic schedules were avoided on
purpose: dlight `cpu.GEMV` made a 2-layer model compile in minutes.

GPU: the same formula as a TE compute (dequantize inlined into the reduction, float32 accumulator), scheduled by
dlight's GEMV / matmul rules in `mlc_schemes.compile`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tvm import te, tirx
from tvm.script import tirx as T

from mlc_schemes.model import gemv_int8, gemv_lookup
from mlc_schemes.model.gemm_interleaved import gemm_interleaved
from mlc_schemes.model.gemv_interleaved import gemv_interleaved
from mlc_schemes.model.isa import CpuIsa, current_int8_dot, current_isa, record_int8_dot


@dataclass(frozen=True)
class QuantSpec:
    """What a kernel needs to know about a quantized weight: bits, group width (columns), fixed zero or None."""

    bits: int
    group_width: int
    fixed_zero: int | None  # None -> a float16 zero tensor is passed
    # 0: MLC's layout, q_weight [N, words], q_scale / q_zero [N, G]; B > 0: rows interleaved in blocks of B
    # (`packing.interleave_rows`: [N/B, words, B], [N/B, G, B]) for `gemv_interleaved` / `gemm_interleaved` (CPU)
    interleave: int = 0

    @property
    def epw(self) -> int:
        return 32 // self.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    def shapes(self, n: int, k: int) -> tuple[tuple, tuple]:
        """(q_weight, q_scale / q_zero) shapes of an [n, k] weight in this layout."""
        words, groups, b = math.ceil(k / self.epw), math.ceil(k / self.group_width), self.interleave
        return ((n // b, words, b), (n // b, groups, b)) if b else ((n, words), (n, groups))


# Row vectors per interleaved block, preferred first: 6 accumulator chains + 6 group sums fit AVX2's 16 registers.
# Per call on SmolLM2's 3-bit g128 shapes, 1 thread (bench/README.md, "3-bit GEMV on row-interleaved weights"):
# on AVX2 6 took 0.77-0.90x the time of 4 and 0.86-0.95x that of 8; on AVX-512 4, 6 and 8 were within noise.
INTERLEAVE_VECTORS = (6, 4, 2, 1)


def interleave_for(quant: QuantSpec, n: int, k: int, isa: CpuIsa, int8_dot: bool = False) -> int:
    """Rows per interleaved block for a CPU linear [N = n, K = k] with `quant`: RV * lanes for the first RV of
    INTERLEAVE_VECTORS whose block divides N; 0 (MLC's layout) for an N no block divides, or for a linear that
    `int8_dot` sends to `gemv_int8` (which reads MLC's layout)."""
    if int8_dot and gemv_int8.eligible(k, quant, isa):
        return 0
    return next((rv * isa.lanes for rv in INTERLEAVE_VECTORS if n % (rv * isa.lanes) == 0), 0)


ROWS = 4  # output rows per parallel task in the M = 1 kernels: x vectors are loaded once for 4 rows, and 4
#            independent accumulator chains hide the FMA latency
TASKS = 64  # parallel tasks per M = 1 kernel (split statically over the threads); each runs a range of row blocks


PREFETCH_BLOCKS = 8  # M = 1: row blocks ahead whose weights are software-prefetched (see `_prefetch_rows`)


def _prefetch_rows(n: int, row_elems: int, elem_bytes: int = 4):
    """TIR macro `(w, nb)`: prefetch rows of weight block nb + PREFETCH_BLOCKS (ROWS rows of `row_elems` elements),
    one instruction per 64-byte line. With the hardware prefetcher alone the core stalled on cold lines, then
    computed, without overlap: an 8-bit lm_head streamed at 14 GB/s, 23 GB/s with this (8 blocks ahead)."""
    R, per_line = ROWS, 64 // elem_bytes
    lines = math.ceil(row_elems / per_line)

    @T.macro
    def prefetch(qw, nb):
        for r in T.unroll(R):
            for ln in T.unroll(lines):
                T.evaluate(T.call_llvm_intrin(
                    "void", "llvm.prefetch.p0",
                    T.address_of(qw[T.min((nb + PREFETCH_BLOCKS) * R + r, n - 1), T.min(ln * per_line, row_elems - 1)]),
                    T.int32(0), T.int32(3), T.int32(1)))

    return prefetch


def _pow2_lanes(count: int, cap: int) -> int:
    """Largest power of two <= cap dividing `count` (vector width of a loop of `count` iterations)."""
    lanes = 1
    while lanes < cap and count % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def _group_sums(k: int, gw: int, groups: int):
    """TIR macro `(x[1, K], xs[G])`: xs[g] = float32 sum of x over group g (what the zero point multiplies in the
    M = 1 kernels' `scale * (sum code * x - zero * xs)`)."""

    @T.macro
    def sums(x, xs):
        for g in range(groups):
            xs[g] = T.float32(0)
            for kk in range(T.min(gw, k - g * gw)):
                xs[g] = xs[g] + T.Cast("float32", x[0, g * gw + kk])

    return sums


GEMM_MC = 128  # input rows per chunk: the float32 copy of a chunk of x stays in L2 while every weight block passes


def gemm_tile(isa: CpuIsa) -> tuple[int, int]:
    """M > 1 register tile (weight rows RN, input rows RM): RN * RM vector accumulators, the RN weight vectors of a
    step and one input vector at a time stay within the register file, with enough independent accumulator
    chains to cover the FMA latency. 16 registers (AVX2, SSE): 3 x 4 = 12 + 3 + 1 (llvm-mca, Zen 3 model: 1.4 FMAs
    per cycle against 1.0 for 4 x 2: fewer loads per FMA, more chains). 32 registers (AVX-512): 4 x 2, measured on
    Zen 4, whose one 512-bit FMA per cycle it already keeps busy (4 x 4 modelled no faster there)."""
    return (4, 2) if isa.registers >= 32 else (3, 4)


def _x_chunk(mc: int, length: int, load_x):
    """TIR macro `(x, xf, c0, m_len)`: xf[i, l] = load_x(x, c0 * mc + i, l), float32, for the rows of input chunk c0
    (the M > 1 GEMMs convert x once per chunk of `mc` rows, not once per weight block)."""

    @T.macro
    def chunk(x, xf, c0, m_len):
        for i in T.parallel(T.min(mc, m_len - c0 * mc)):
            for l in range(length):
                xf[i, l] = load_x(x, c0 * mc + i, l)

    return chunk


def _gemm(n: int, length: int, out_dtype: str, load_x, decode_row, isa: CpuIsa):
    """TIR macro `(x, y, m_len, w0, w1, w2)` for M > 1: `y[m, nn] = sum_l xf[m, l] * buf_nn[l]`, l < length.

    The weight is consumed in blocks of GEMM_RN rows (parallel over the cores): `decode_row(buf, r, nn, w0, w1, w2)`
    writes row nn as float32 into buf[r, :] once per block and chunk, in the same layout in which
    `load_x(x, m, l)` reads x (natural, or permuted so that the decode vectorises; padding columns read 0). Then
    GEMM_RM input rows at a time meet the GEMM_RN decoded rows with GEMM_RM * GEMM_RN vector accumulators, so each
    loaded vector feeds several FMAs (`gemm_tile`). x is converted to float32 once per GEMM_MC-row chunk.
    """
    (RN, RM), vl, MC = gemm_tile(isa), isa.lanes, GEMM_MC
    lfull = length // vl * vl
    nblk = math.ceil(n / RN)
    hs = _hsum(vl)
    x_chunk = _x_chunk(MC, length, load_x)

    @T.macro
    def gemm(x, y, m_len, w0, w1, w2):
        for mc in range((m_len + MC - 1) // MC):
            xf = T.decl_buffer((MC, length), "float32")
            x_chunk(x, xf, mc, m_len)
            for nb in T.parallel(nblk):
                buf = T.decl_buffer((RN, length), "float32")
                acc = T.decl_buffer((RM * RN, vl), "float32")  # < 1 KiB: on the stack, kept in registers
                for r in T.unroll(RN):
                    decode_row(buf, r, T.min(nb * RN + r, n - 1), w0, w1, w2)
                for mb in range((T.min(MC, m_len - mc * MC) + RM - 1) // RM):
                    for a in T.unroll(RM * RN):
                        for j in T.vectorized(vl):
                            acc[a, j] = T.float32(0)
                    # rows past the chunk read its last row (results dropped below)
                    for lb in range(lfull // vl):
                        for i in T.unroll(RM):
                            for r in T.unroll(RN):
                                for j in T.vectorized(vl):
                                    acc[i * RN + r, j] = acc[i * RN + r, j] + xf[
                                        T.min(mb * RM + i, T.min(MC, m_len - mc * MC) - 1), lb * vl + j
                                    ] * buf[r, lb * vl + j]
                    for i in T.unroll(RM):
                        for r in T.unroll(RN):
                            hs(acc, i * RN + r)
                            for lt in range(length - lfull):
                                acc[i * RN + r, 0] = acc[i * RN + r, 0] + xf[
                                    T.min(mb * RM + i, T.min(MC, m_len - mc * MC) - 1), lfull + lt
                                ] * buf[r, lfull + lt]
                            if mb * RM + i < T.min(MC, m_len - mc * MC) and nb * RN + r < n:
                                y[mc * MC + mb * RM + i, nb * RN + r] = T.Cast(out_dtype, acc[i * RN + r, 0])

    return gemm


def cpu_matmul_nt(n: int, k: int, x_dtype: str, out_dtype: str, quant: QuantSpec | None, w_dtype: str = "float16",
                  isa: CpuIsa | None = None, int8_dot: bool | None = None):
    """TIR PrimFunc `(x[M, K], <weight args>, y[M, N])`, M symbolic; `y = x @ W^T` accumulated in float32.

    Weight args: quantized -> q_weight uint32 [N, ceil(K/epw)], q_scale float16 [N, G] (+ q_zero float16 [N, G]),
    or [N/B, ., B] each with `quant.interleave` = B; dense -> weight `w_dtype` [N, K]. M = 1 (decode) takes a
    GEMV path (`gemv_interleaved`, `_gemv_quant`, `_gemv_quant_window`, the M = 1 branch of `_cpu_dense`), M > 1
    a blocked GEMM (`gemm_interleaved`, `_gemm`: weights decoded once to float32 per block).
    Vectors and tiles are sized for `isa` (default: `isa.current_isa()`). `int8_dot` (default:
    `isa.current_int8_dot()`) sends eligible 4-bit decode GEMVs to `gemv_int8` (int8 activations, not exact).
    """
    isa = isa or current_isa()
    int8_dot = current_int8_dot() if int8_dot is None else int8_dot
    int8_dot = bool(int8_dot and quant is not None and gemv_int8.eligible(k, quant, isa))
    if int8_dot:
        record_int8_dot(n, k)
    return _cpu_matmul_nt(n, k, x_dtype, out_dtype, quant, w_dtype, isa, int8_dot)


@functools.cache  # one TVMScript parse per distinct shape, not per layer (compile time)
def _cpu_matmul_nt(n, k, x_dtype, out_dtype, quant, w_dtype, isa: CpuIsa, int8_dot: bool = False):
    if quant is None:
        return _cpu_dense(n, k, x_dtype, out_dtype, w_dtype, isa)
    epw, bits, gw = quant.epw, quant.bits, quant.group_width
    words = math.ceil(k / epw)
    groups = math.ceil(k / gw)
    row = words * epw  # decoded row length (padding codes decoded too, never read by the dot)
    mask, il = quant.mask, quant.interleave

    # On MLC's layout the plain GEMV needs groups made of whole words (4-bit g32/g128, 3-bit g40, 2-bit g64 ...);
    # other groups (3-bit g128) take the windowed variant, which reads a few words twice.
    if int8_dot:
        gemv = gemv_int8.gemv_int8(n, k, quant, out_dtype, TASKS)
    elif il and gemv_lookup.serves(quant, isa):
        gemv = gemv_lookup.gemv_lookup(n, k, quant, out_dtype, TASKS, isa.lanes)
    elif il:
        gemv = gemv_interleaved(n, k, quant, out_dtype, TASKS, isa.lanes)
    elif gw % epw == 0:
        gemv = _gemv_quant(n, k, quant, x_dtype, out_dtype, isa)
    else:
        gemv = _gemv_quant_window(n, k, quant, out_dtype, isa)  # None when K is smaller than one window
    fast = gemv is not None

    if gw % epw == 0 and not il:  # permuted layout: vector decode, l = e * words + w holds code e of word w
        wpg = gw // epw
        gfull, wlast = k // gw, words - (k // gw) * wpg
        vw, vt = _pow2_lanes(wpg, isa.lanes), _pow2_lanes(wlast, isa.lanes) if wlast else 1

        def load_x(x, m, l):
            col = (l % words) * epw + l // words
            return T.if_then_else(col < k, T.Cast("float32", x[m, T.min(col, k - 1)]), T.float32(0))

        def code(qw, nn, w, e):  # through int32: the value is < 2^31, and a signed conversion is one instruction
            return T.Cast("float32", T.Cast("int32", T.shift_right(qw[nn, w], T.uint32(e * bits)) & T.uint32(mask)))

        @T.macro
        def decode_row(buf, r, nn, qw, s, zero):
            for g in range(gfull):
                for e in T.unroll(epw):
                    for wb in range(wpg // vw):
                        for j in T.vectorized(vw):
                            buf[r, e * words + g * wpg + wb * vw + j] = (
                                code(qw, nn, g * wpg + wb * vw + j, e) - zero(nn, g)) * T.Cast("float32", s[nn, g])
            for e in T.unroll(epw):
                for wb in range(wlast // vt):
                    for j in T.vectorized(vt):
                        buf[r, e * words + gfull * wpg + wb * vt + j] = (
                            code(qw, nn, gfull * wpg + wb * vt + j, e) - zero(nn, groups - 1)
                        ) * T.Cast("float32", s[nn, groups - 1])
    elif not il:  # natural column order, scalar decode (groups starting mid-word in MLC's layout: N no block divides)
        def load_x(x, m, l):
            return T.if_then_else(l < k, T.Cast("float32", x[m, T.min(l, k - 1)]), T.float32(0))

        @T.macro
        def decode_row(buf, r, nn, qw, s, zero):
            for w in range(words):
                for e in T.unroll(epw):
                    g: T.let = T.min((w * epw + e) // gw, groups - 1)
                    buf[r, w * epw + e] = (T.Cast("float32", T.Cast("int32", T.shift_right(
                        qw[nn, w], T.uint32(e * bits)) & T.uint32(mask))) - zero(nn, g)) * T.Cast("float32", s[nn, g])

    gemm = (gemm_interleaved(n, k, quant, out_dtype, isa, GEMM_MC) if il
            else _gemm(n, row, out_dtype, load_x, decode_row, isa))
    wshape, sshape = quant.shapes(n, k)

    if quant.fixed_zero is None:

        def zero_of(z):  # zero(row, g) on MLC's layout, zero(block, g, lane) on the interleaved one
            return (lambda b, g, lane: T.Cast("float32", z[b, g, lane])) if il else (
                lambda nn, g: T.Cast("float32", z[nn, g]))

        @T.prim_func(private=True)
        def qmm_asym(x_h: T.handle, qw: T.Buffer(wshape, "uint32"), s: T.Buffer(sshape, "float16"),
                     z: T.Buffer(sshape, "float16"), y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8})
            m_len = T.int64()
            x = T.match_buffer(x_h, (m_len, k), x_dtype)
            y = T.match_buffer(y_h, (m_len, n), out_dtype)
            if fast and m_len == 1:
                gemv(x, qw, s, zero_of(z), y)
            else:
                gemm(x, y, m_len, qw, s, zero_of(z))

        return qmm_asym

    zc = float(quant.fixed_zero)

    @T.prim_func(private=True)
    def qmm_sym(x_h: T.handle, qw: T.Buffer(wshape, "uint32"), s: T.Buffer(sshape, "float16"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m_len = T.int64()
        x = T.match_buffer(x_h, (m_len, k), x_dtype)
        y = T.match_buffer(y_h, (m_len, n), out_dtype)
        if fast and m_len == 1:
            gemv(x, qw, s, lambda *_: T.float32(zc), y)
        else:
            gemm(x, y, m_len, qw, s, lambda *_: T.float32(zc))

    return qmm_sym


def _field_shift(e, bits: int):
    """Right shift that puts code e of a word below bit 31 before it is masked: max(0, bits*(e+1) - 31) (1 for
    the top code of 4- and 8-bit words, else 0)."""
    return T.max(bits * e + bits - 31, 0)


def _code_in_place(word, e, bits: int, mask: int):
    """Code e of a packed uint32 word as float32, left where it lies: `code * 2^(bits*e - _field_shift(e))`, one
    shift (top code only), one AND and one conversion. The masked field stays below 2^31, so it converts as a
    signed int32, exactly and in one instruction (AVX2 has no unsigned conversion; LLVM emulates it in five)."""
    sh = _field_shift(e, bits)
    return T.Cast("float32", T.Cast("int32", T.shift_right(word, T.Cast("uint32", sh))
                                    & T.shift_left(T.uint32(mask), T.Cast("uint32", bits * e - sh))))


def _in_place_scale(e, bits: int):
    """2^-(bits*e - _field_shift(e)) as float32 (exact, from the exponent bits): undoes `_code_in_place`'s
    position factor when folded into x."""
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", 127 - bits * e + _field_shift(e, bits)), 23))


def _gemv_quant(n: int, k: int, quant: QuantSpec, x_dtype: str, out_dtype: str, isa: CpuIsa):
    """TIR macro `(x[1, K], q_weight, q_scale, zero(n, g), y[1, N])` for M = 1; needs group_width % epw == 0.

    Per row n and group g (words `[g*wpg, (g+1)*wpg)`, wpg = group_width / epw):

        y[n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[k]  -  zero[n, g] * xsum[g])

    so the inner loop is mask / convert / FMA on raw codes, and scale / zero are applied once per group.
    Once per call, x is converted to float32 and transposed to `xt[e, w] = x[w*epw + e] * 2^-p(e)` (0 past K):
    lane j of a vector then holds word w0 + j of the row (one contiguous load of packed words) and its e-th code,
    taken in place (`_code_in_place`: `word & (mask << bits*e)` = code * 2^p(e), p(e) = bits*e but one less for
    a code that reaches bit 31; exact in float32, <= bits significant bits), multiplies a contiguous
    `xt[e, w0:w0+lanes]`: no gathers, no per-element fp16 conversion, and the power-of-two factors cancel exactly.
    `xsum[g]` = float32 sum of x over group g. ROWS rows per step, vectors of up to `isa.lanes` words.
    """
    epw, bits, gw, mask = quant.epw, quant.bits, quant.group_width, quant.mask
    words = math.ceil(k / epw)
    groups = math.ceil(k / gw)
    wpg = gw // epw
    gfull = k // gw  # groups with wpg words; a partial last group has the remaining `wlast` words
    wlast = words - gfull * wpg
    vw = _pow2_lanes(wpg, isa.lanes)
    vt = _pow2_lanes(wlast, isa.lanes) if wlast else 1
    R = ROWS
    nblk = math.ceil(n / R)
    per_task = math.ceil(nblk / TASKS)
    ntask = math.ceil(nblk / per_task)
    hs_w, hs_t = _hsum(vw), _hsum(vt)
    prefetch = _prefetch_rows(n, words)
    group_sums = _group_sums(k, gw, groups)

    @T.macro
    def gemv(x, qw, s, zero, y):
        xt = T.decl_buffer((epw, words), "float32")
        xs = T.decl_buffer((groups,), "float32")
        for e, w in T.grid(epw, words):
            # pairs with the in-place code below (exact power-of-two scaling)
            xt[e, w] = T.if_then_else(w * epw + e < k, T.Cast("float32", x[0, T.min(w * epw + e, k - 1)]),
                                      T.float32(0)) * _in_place_scale(e, bits)
        group_sums(x, xs)
        for t in T.parallel(ntask):
            # Per-task (not per-block) scratch: TVM allocates buffers declared in a parallel body through
            # TVMBackendAllocWorkspace on every iteration, which cost as much as the math for small K.
            acc = T.decl_buffer((R, vw), "float32")
            gacc = T.decl_buffer((R, vw), "float32")
            tacc = T.decl_buffer((R, vt), "float32")
            zt = T.decl_buffer((R,), "float32")
            for nb0 in range(per_task):
                nb: T.let = t * per_task + nb0
                if nb < nblk:
                    prefetch(qw, nb)
                    for r in T.unroll(R):
                        zt[r] = T.float32(0)
                        for j in T.vectorized(vw):
                            acc[r, j] = T.float32(0)
                    # Reads clamp rows past N to row N - 1 (last block only); those results are never written.
                    for g in range(gfull):
                        for r in T.unroll(R):
                            for j in T.vectorized(vw):
                                gacc[r, j] = T.float32(0)
                        for wb in range(wpg // vw):
                            for e in T.unroll(epw):
                                for r in T.unroll(R):
                                    for j in T.vectorized(vw):
                                        gacc[r, j] = gacc[r, j] + _code_in_place(
                                            qw[T.min(nb * R + r, n - 1), g * wpg + wb * vw + j], e, bits, mask
                                        ) * xt[e, g * wpg + wb * vw + j]
                        for r in T.unroll(R):
                            sc: T.let = T.Cast("float32", s[T.min(nb * R + r, n - 1), g])
                            zt[r] = zt[r] + sc * zero(T.min(nb * R + r, n - 1), g) * xs[g]
                            for j in T.vectorized(vw):
                                acc[r, j] = acc[r, j] + sc * gacc[r, j]
                    for r in T.unroll(R):
                        for j in T.vectorized(vt):
                            tacc[r, j] = T.float32(0)
                    for wb in range(wlast // vt):
                        for e in T.unroll(epw):
                            for r in T.unroll(R):
                                for j in T.vectorized(vt):
                                    tacc[r, j] = tacc[r, j] + _code_in_place(
                                        qw[T.min(nb * R + r, n - 1), gfull * wpg + wb * vt + j], e, bits, mask
                                    ) * xt[e, gfull * wpg + wb * vt + j]
                    for r in T.unroll(R):
                        if nb * R + r < n:
                            hs_w(acc, r)
                            hs_t(tacc, r)
                            if wlast > 0:
                                sc: T.let = T.Cast("float32", s[nb * R + r, groups - 1])
                                zt[r] = zt[r] + sc * zero(nb * R + r, groups - 1) * xs[groups - 1]
                                acc[r, 0] = acc[r, 0] + sc * tacc[r, 0]
                            y[0, nb * R + r] = T.Cast(out_dtype, acc[r, 0] - zt[r])

    return gemv


def _gemv_quant_window(n: int, k: int, quant: QuantSpec, out_dtype: str, isa: CpuIsa):
    """`_gemv_quant` for groups that start mid-word (3-bit g128: 12.8 words per group); None if K is too small.

    Same formula. Group g reads a fixed window of `win` words from `w0(g) = min(g*gw // epw, words - win)` (a
    contiguous vector load, as in `_gemv_quant`), and its x table `xt[g, e, j]` holds
    `x[(w0(g)+j)*epw + e] * 2^-p(e)` only where that column belongs to group g, 0 elsewhere: codes of the
    neighbouring groups in the shared boundary words are multiplied by 0. Costs win / (gw/epw) of the aligned
    kernel's work (16 / 12.8 for 3-bit g128).
    """
    epw, bits, gw, mask = quant.epw, quant.bits, quant.group_width, quant.mask
    words = math.ceil(k / epw)
    groups = math.ceil(k / gw)
    span = max(math.ceil(min((g + 1) * gw, k) / epw) - g * gw // epw for g in range(groups))
    vw = min(isa.lanes, 1 << (span - 1).bit_length())
    nch = math.ceil(span / vw)
    win = nch * vw
    if words < win:
        return None
    R = ROWS
    nblk = math.ceil(n / R)
    per_task = math.ceil(nblk / TASKS)
    ntask = math.ceil(nblk / per_task)
    hs_w = _hsum(vw)
    prefetch = _prefetch_rows(n, words)
    group_sums = _group_sums(k, gw, groups)

    @T.macro
    def gemv(x, qw, s, zero, y):
        xt = T.decl_buffer((groups, epw, win), "float32")
        xs = T.decl_buffer((groups,), "float32")
        for g, e, j in T.grid(groups, epw, win):
            xt[g, e, j] = T.if_then_else(
                T.min(g * gw // epw, words - win) * epw + j * epw + e >= g * gw
                and T.min(g * gw // epw, words - win) * epw + j * epw + e < T.min(g * gw + gw, k),
                T.Cast("float32", x[0, T.min(T.min(g * gw // epw, words - win) * epw + j * epw + e, k - 1)]),
                T.float32(0)) * _in_place_scale(e, bits)
        group_sums(x, xs)
        for t in T.parallel(ntask):
            acc = T.decl_buffer((R, vw), "float32")  # per task: see _gemv_quant
            gacc = T.decl_buffer((R, vw), "float32")
            zt = T.decl_buffer((R,), "float32")
            for nb0 in range(per_task):
                nb: T.let = t * per_task + nb0
                if nb < nblk:
                    prefetch(qw, nb)
                    for r in T.unroll(R):
                        zt[r] = T.float32(0)
                        for j in T.vectorized(vw):
                            acc[r, j] = T.float32(0)
                    for g in range(groups):
                        for r in T.unroll(R):
                            for j in T.vectorized(vw):
                                gacc[r, j] = T.float32(0)
                        for c in range(nch):
                            for e in T.unroll(epw):
                                for r in T.unroll(R):
                                    for j in T.vectorized(vw):
                                        gacc[r, j] = gacc[r, j] + _code_in_place(
                                            qw[T.min(nb * R + r, n - 1), T.min(g * gw // epw, words - win) + c * vw + j],
                                            e, bits, mask) * xt[g, e, c * vw + j]
                        for r in T.unroll(R):
                            sc: T.let = T.Cast("float32", s[T.min(nb * R + r, n - 1), g])
                            zt[r] = zt[r] + sc * zero(T.min(nb * R + r, n - 1), g) * xs[g]
                            for j in T.vectorized(vw):
                                acc[r, j] = acc[r, j] + sc * gacc[r, j]
                    for r in T.unroll(R):
                        if nb * R + r < n:
                            hs_w(acc, r)
                            y[0, nb * R + r] = T.Cast(out_dtype, acc[r, 0] - zt[r])

    return gemv


LOG2E = math.log2(math.e)
# 2^f = sum_k (f ln 2)^k / k! on f in [-0.5, 0.5]: degree 7 leaves a relative error below 1e-8.
_EXP2_COEF = [math.log(2) ** k / math.factorial(k) for k in range(8)]


def exp2_poly(x):
    """float32 2^x as a TIR expression that vectorises (no libm call): 2^round(x) from the exponent bits times a
    polynomial of the remainder. x is clamped to [-126, 127], so very negative inputs give 2^-126, not 0."""
    x = tirx.max(tirx.min(x, tirx.const(127.0, "float32")), tirx.const(-126.0, "float32"))
    k = tirx.floor(x + tirx.const(0.5, "float32"))
    f = x - k
    p = tirx.const(_EXP2_COEF[-1], "float32")
    for c in reversed(_EXP2_COEF[:-1]):
        p = p * f + tirx.const(c, "float32")
    bits = tirx.shift_left(tirx.Cast("int32", k) + 127, 23)
    return p * tirx.reinterpret("float32", bits)


@functools.cache
def _hsum(lanes: int):
    """TIR macro `(buf, r)`: buf[r, 0] = sum(buf[r, :lanes]) by halving vector adds (a shuffle tree, not a serial
    scalar chain). Built recursively in Python so every loop extent is a constant."""
    if lanes == 1:

        @T.macro
        def nop(buf, r):
            T.evaluate(0)

        return nop
    half = lanes // 2
    rest = _hsum(half)

    @T.macro
    def step(buf, r):
        for j in T.vectorized(half):
            buf[r, j] = buf[r, j] + buf[r, j + half]
        rest(buf, r)

    return step


def _cpu_dense(n, k, x_dtype, out_dtype, w_dtype, isa: CpuIsa):
    """Dense `W` [N, K]. M = 1: x converted to float32 once, ROWS rows per task sharing each x vector, float32 FMAs
    of `isa.lanes` lanes with one weight conversion per element; M > 1: `_gemm` on rows converted to float32."""
    vl = isa.lanes
    kfull = k // vl * vl  # vectorised part of the dot; the k % vl tail is scalar
    R = ROWS
    nblk = math.ceil(n / R)
    per_task = math.ceil(nblk / TASKS)
    ntask = math.ceil(nblk / per_task)
    hs = _hsum(vl)

    def load_x(x, m, l):
        return T.Cast("float32", x[m, l])

    @T.macro
    def decode_row(buf, r, nn, wt, _w1, _w2):
        for lb in range(k // vl):
            for j in T.vectorized(vl):
                buf[r, lb * vl + j] = T.Cast("float32", wt[nn, lb * vl + j])
        for lt in range(k - k // vl * vl):
            buf[r, k // vl * vl + lt] = T.Cast("float32", wt[nn, k // vl * vl + lt])

    gemm = _gemm(n, k, out_dtype, load_x, decode_row, isa)
    prefetch = _prefetch_rows(n, k, 4 if w_dtype == "float32" else 2)

    @T.prim_func(private=True)
    def mm_dense(x_h: T.handle, wt: T.Buffer((n, k), w_dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m_len = T.int64()
        x = T.match_buffer(x_h, (m_len, k), x_dtype)
        y = T.match_buffer(y_h, (m_len, n), out_dtype)
        if m_len == 1:
            xf = T.decl_buffer((k,), "float32")
            for kk in range(k):
                xf[kk] = T.Cast("float32", x[0, kk])
            for t in T.parallel(ntask):
                acc = T.decl_buffer((R, vl), "float32")  # per task: see _gemv_quant
                for nb0 in range(per_task):
                    nb: T.let = t * per_task + nb0
                    if nb < nblk:
                        prefetch(wt, nb)
                        for r in T.unroll(R):
                            for lane in T.vectorized(vl):
                                acc[r, lane] = T.float32(0)
                        for kb in range(kfull // vl):
                            for r in T.unroll(R):
                                for lane in T.vectorized(vl):
                                    acc[r, lane] = acc[r, lane] + xf[kb * vl + lane] * T.Cast(
                                        "float32", wt[T.min(nb * R + r, n - 1), kb * vl + lane])
                        for r in T.unroll(R):
                            if nb * R + r < n:
                                hs(acc, r)
                                for kt in range(k - kfull):
                                    acc[r, 0] = acc[r, 0] + xf[kfull + kt] * T.Cast("float32",
                                                                                   wt[nb * R + r, kfull + kt])
                                y[0, nb * R + r] = T.Cast(out_dtype, acc[r, 0])
        else:
            gemm(x, y, m_len, wt, wt, wt)

    return mm_dense


def te_dequant(weights, quant: QuantSpec, row, col):
    """TE expression: float32 element (row, col) of a packed weight (`weights` = q_weight, q_scale[, q_zero], in
    MLC's or the row-interleaved layout); `(code - zero) * scale` with the code taken from its word, LSB first."""
    qw, s = weights[0], weights[1]
    epw, bits, gw, il = quant.epw, quant.bits, quant.group_width, quant.interleave

    def at(t, c):  # element (row, c) of [N, C], or of its interleaved [N/il, C, il]
        return t[row // il, c, row % il] if il else t[row, c]

    code = (at(qw, col // epw) >> tirx.Cast("uint32", (col % epw) * bits)) & tirx.const(quant.mask, "uint32")
    zero = at(weights[2], col // gw).astype("float32") if quant.fixed_zero is None else \
        tirx.const(float(quant.fixed_zero), "float32")
    return (code.astype("float32") - zero) * at(s, col // gw).astype("float32")


def te_matmul_nt(x, weights, n: int, k: int, out_dtype: str, quant: QuantSpec | None):
    """TE version for GPU targets: `x[M, K]` te tensor, `weights` the te weight tensors; float32 reduction.

    The dequantize is inlined into the reduction so dlight sees one GEMV (M = 1) or matmul (M > 1) kernel.
    """
    m_len = x.shape[0]
    r = te.reduce_axis((0, k), name="k")
    if quant is None:
        (wt,) = weights

        def w_at(nn, kk):
            return wt[nn, kk].astype("float32")
    else:
        def w_at(nn, kk):
            return te_dequant(weights, quant, nn, kk)

    acc = te.compute((m_len, n), lambda mm, nn: te.sum(x[mm, r].astype("float32") * w_at(nn, r), axis=r),
                     name="matmul_acc")
    if out_dtype == "float32":
        return acc
    return te.compute((m_len, n), lambda mm, nn: acc[mm, nn].astype(out_dtype), name="matmul_cast")
