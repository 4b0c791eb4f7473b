"""Matmul kernels for the model's linears: `y[M, N] = x[M, K] @ W[N, K]^T`, float32 accumulation.

Two weight sources share one kernel shape:

- quantized: `W[n, k] = (code[n, k] - zero[n, k // gs]) * scale[n, k // gs]` from uint32 words packed LSB-first
  along K (`epw = 32 // bits` codes per word, docs/formats.md §2); `zero` is a float16 tensor (asymmetric kinds)
  or the scheme's fixed zero (MLC symmetric kinds);
- dense: `W` float16/float32 as stored.

CPU (llvm): a hand-written TIR kernel. Each output row n (parallel over the cores) is decoded once into a float32
row buffer, then dotted with every input row m with a 16-lane vector accumulator. The decode is amortised over M
in prefill and is the whole cost in decode (M = 1), i.e. this is the fused dequantize-GEMV: weights are read once,
in packed form, and never materialised in memory. Generic schedules were avoided on purpose: dlight `cpu.GEMV`
made a 2-layer model compile in minutes.

GPU: the same formula as a TE compute (dequantize inlined into the reduction, float32 accumulator), scheduled by
dlight's GEMV / matmul rules in `mlc_schemes.compile`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tvm import te, tirx
from tvm.script import tirx as T

VECTOR_LANES = 16  # AVX-512 float32 lanes; LLVM splits it on narrower machines


@dataclass(frozen=True)
class QuantSpec:
    """What a kernel needs to know about a quantized weight: bits, group width (columns), fixed zero or None."""

    bits: int
    group_width: int
    fixed_zero: int | None  # None -> a float16 zero tensor is passed

    @property
    def epw(self) -> int:
        return 32 // self.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


@functools.lru_cache(maxsize=None)  # one TVMScript parse per distinct shape, not per layer (compile time)
def cpu_matmul_nt(n: int, k: int, x_dtype: str, out_dtype: str, quant: QuantSpec | None, w_dtype: str = "float16"):
    """TIR PrimFunc `(x[M, K], <weight args>, y[M, N])`, M symbolic.

    Weight args: quantized -> q_weight uint32 [N, ceil(K/epw)], q_scale float16 [N, G] (+ q_zero float16 [N, G]);
    dense -> weight `w_dtype` [N, K].
    """
    vl = VECTOR_LANES
    kfull = k // vl * vl  # vectorised part of the dot; the k % vl tail is scalar
    if quant is None:
        return _cpu_dense(n, k, kfull, vl, x_dtype, out_dtype, w_dtype)
    epw, bits, gw = quant.epw, quant.bits, quant.group_width
    words = math.ceil(k / epw)
    groups = math.ceil(k / gw)
    row = words * epw  # decoded row length (padding codes decoded too, never read by the dot)
    mask = quant.mask

    def deq(qw, s, zero, nn, w, e):
        g = T.min((w * epw + e) // gw, groups - 1)
        code = T.Cast("float32", T.shift_right(qw[nn, w], T.uint32(e * bits)) & T.uint32(mask))
        return (code - zero(nn, g)) * T.Cast("float32", s[nn, g])

    if quant.fixed_zero is None:

        @T.prim_func(private=True)
        def qmm_asym(x_h: T.handle, qw: T.Buffer((n, words), "uint32"), s: T.Buffer((n, groups), "float16"),
                     z: T.Buffer((n, groups), "float16"), y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8})
            m_len = T.int64()
            x = T.match_buffer(x_h, (m_len, k), x_dtype)
            y = T.match_buffer(y_h, (m_len, n), out_dtype)
            for nn in T.parallel(n):
                buf = T.decl_buffer((row,), "float32", scope="local")
                acc = T.decl_buffer((vl,), "float32", scope="local")
                tot = T.decl_buffer((1,), "float32", scope="local")
                for w in range(words):
                    for e in T.unroll(epw):
                        buf[w * epw + e] = deq(qw, s, lambda a, b: T.Cast("float32", z[a, b]), nn, w, e)
                for m in range(m_len):
                    for lane in T.vectorized(vl):
                        acc[lane] = T.float32(0)
                    for kb in range(kfull // vl):
                        for lane in T.vectorized(vl):
                            acc[lane] = acc[lane] + T.Cast("float32", x[m, kb * vl + lane]) * buf[kb * vl + lane]
                    tot[0] = T.float32(0)
                    for kt in range(k - kfull):
                        tot[0] = tot[0] + T.Cast("float32", x[m, kfull + kt]) * buf[kfull + kt]
                    for lane in range(vl):
                        tot[0] = tot[0] + acc[lane]
                    y[m, nn] = T.Cast(out_dtype, tot[0])

        return qmm_asym

    zc = float(quant.fixed_zero)

    @T.prim_func(private=True)
    def qmm_sym(x_h: T.handle, qw: T.Buffer((n, words), "uint32"), s: T.Buffer((n, groups), "float16"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m_len = T.int64()
        x = T.match_buffer(x_h, (m_len, k), x_dtype)
        y = T.match_buffer(y_h, (m_len, n), out_dtype)
        for nn in T.parallel(n):
            buf = T.decl_buffer((row,), "float32", scope="local")
            acc = T.decl_buffer((vl,), "float32", scope="local")
            tot = T.decl_buffer((1,), "float32", scope="local")
            for w in range(words):
                for e in T.unroll(epw):
                    buf[w * epw + e] = deq(qw, s, lambda a, b: T.float32(zc), nn, w, e)
            for m in range(m_len):
                for lane in T.vectorized(vl):
                    acc[lane] = T.float32(0)
                for kb in range(kfull // vl):
                    for lane in T.vectorized(vl):
                        acc[lane] = acc[lane] + T.Cast("float32", x[m, kb * vl + lane]) * buf[kb * vl + lane]
                tot[0] = T.float32(0)
                for kt in range(k - kfull):
                    tot[0] = tot[0] + T.Cast("float32", x[m, kfull + kt]) * buf[kfull + kt]
                for lane in range(vl):
                    tot[0] = tot[0] + acc[lane]
                y[m, nn] = T.Cast(out_dtype, tot[0])

    return qmm_sym


def _cpu_dense(n, k, kfull, vl, x_dtype, out_dtype, w_dtype):
    @T.prim_func(private=True)
    def mm_dense(x_h: T.handle, wt: T.Buffer((n, k), w_dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m_len = T.int64()
        x = T.match_buffer(x_h, (m_len, k), x_dtype)
        y = T.match_buffer(y_h, (m_len, n), out_dtype)
        for nn in T.parallel(n):
            acc = T.decl_buffer((vl,), "float32", scope="local")
            tot = T.decl_buffer((1,), "float32", scope="local")
            for m in range(m_len):
                for lane in T.vectorized(vl):
                    acc[lane] = T.float32(0)
                for kb in range(kfull // vl):
                    for lane in T.vectorized(vl):
                        acc[lane] = acc[lane] + T.Cast("float32", x[m, kb * vl + lane]) * T.Cast(
                            "float32", wt[nn, kb * vl + lane])
                tot[0] = T.float32(0)
                for kt in range(k - kfull):
                    tot[0] = tot[0] + T.Cast("float32", x[m, kfull + kt]) * T.Cast("float32", wt[nn, kfull + kt])
                for lane in range(vl):
                    tot[0] = tot[0] + acc[lane]
                y[m, nn] = T.Cast(out_dtype, tot[0])

    return mm_dense


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
        qw, s = weights[0], weights[1]
        z = weights[2] if quant.fixed_zero is None else None
        epw, bits, gw = quant.epw, quant.bits, quant.group_width

        def w_at(nn, kk):
            code = (qw[nn, kk // epw] >> tirx.Cast("uint32", (kk % epw) * bits)) & tirx.const(quant.mask, "uint32")
            zero = z[nn, kk // gw].astype("float32") if z is not None else tirx.const(float(quant.fixed_zero), "float32")
            return (code.astype("float32") - zero) * s[nn, kk // gw].astype("float32")

    acc = te.compute((m_len, n), lambda mm, nn: te.sum(x[mm, r].astype("float32") * w_at(nn, r), axis=r),
                     name="matmul_acc")
    if out_dtype == "float32":
        return acc
    return te.compute((m_len, n), lambda mm, nn: acc[mm, nn].astype(out_dtype), name="matmul_cast")

