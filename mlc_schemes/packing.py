"""Bit packing of integer codes into uint32 words, and the exact inverse: the ONE place for the packed layout.

Layout (MLC-LLM's, "NK"): a quantized linear `W[N, K]` has codes `q[N, K]` of `bits` bits. With
`epw = 32 // bits` codes per word, code `k` of row `n` lives in `q_weight[n, k // epw]` at bits
`[(k % epw) * bits, (k % epw + 1) * bits)`, least-significant first. A row whose K is not a multiple of epw is
padded with code 0 (the true K is recorded beside the weights); with int3, the top 2 bits of every word are 0.

Dequantization, in float32 from the float16 scale / zero, group `g = k // group_width`:

    w[n, k] = (float32(q[n, k]) - float32(zero[n, g])) * float32(scale[n, g])

Integer codes and zeros (< 2^8) are exact in float32 and float16, so `q - zero` is exact and the product is a
single rounding: the result is bit-identical to the calibration's float32 fake-quant weight computed the same way.
"""

from __future__ import annotations

import numpy as np

STORAGE_BITS = 32
STORAGE_DTYPE = np.uint32


def elems_per_word(bits: int) -> int:
    """Codes per uint32 word: 32 // bits."""
    return STORAGE_BITS // bits


def _shifts(bits: int) -> np.ndarray:
    return (np.arange(elems_per_word(bits), dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes `[N, K]` (each in `[0, 2^bits - 1]`) into uint32 words `[N, ceil(K / epw)]`."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 2**bits - 1):
        raise ValueError(f"codes out of range [0, {2**bits - 1}] for {bits}-bit packing "
                         f"(min {codes.min()}, max {codes.max()})")
    n, k = codes.shape
    epw = elems_per_word(bits)
    words = -(-k // epw)
    padded = np.zeros((n, words * epw), dtype=np.uint32)  # padding code 0
    padded[:, :k] = codes
    # Fields never overlap, so OR-reduction over the epw shifted codes assembles each word.
    return np.bitwise_or.reduce(padded.reshape(n, words, epw) << _shifts(bits), axis=2).astype(STORAGE_DTYPE)


def unpack_codes(q_weight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint32 `[N, W]` -> int32 codes `[N, k]` (drops the padding)."""
    q_weight = np.asarray(q_weight)
    if q_weight.dtype != STORAGE_DTYPE or q_weight.ndim != 2:
        raise ValueError(f"q_weight must be a 2-D uint32 array, got {q_weight.dtype} {q_weight.shape}")
    n, words = q_weight.shape
    epw = elems_per_word(bits)
    if words != -(-k // epw):
        raise ValueError(f"q_weight has {words} words per row; K={k} at {bits} bits needs {-(-k // epw)}")
    mask = np.uint32(2**bits - 1)
    codes = (q_weight[:, :, None] >> _shifts(bits)) & mask
    return codes.reshape(n, words * epw)[:, :k].astype(np.int32)


def interleave_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """`[N, C]` -> `[N / rows, C, rows]`, element `[b, c, l] = a[b * rows + l, c]`: the CPU kernels' row-interleaved
    layout of q_weight / q_scale / q_zero (`kernels.QuantSpec.interleave`), made at load, never stored."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] % rows:
        raise ValueError(f"cannot interleave a {a.shape} array in blocks of {rows} rows")
    return np.ascontiguousarray(a.reshape(a.shape[0] // rows, rows, a.shape[1]).transpose(0, 2, 1))


def expand_groups(per_group: np.ndarray, k: int, group_width: int) -> np.ndarray:
    """`[N, G]` per-group values -> `[N, k]`, column `k` taking group `k // group_width` (last group partial)."""
    return np.repeat(per_group, group_width, axis=1)[:, :k]


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | float, group_width: int) -> np.ndarray:
    """float32 `[N, K]` = (q - zero) * scale, zero/scale `[N, G]` (any float dtype; computed in float32).

    `zero` may be a scalar (MLC symmetric schemes: max_int).
    """
    k = codes.shape[1]
    s = expand_groups(np.asarray(scale, dtype=np.float32), k, group_width)
    if np.ndim(zero) == 0:
        z = np.float32(zero)
    else:
        z = expand_groups(np.asarray(zero, dtype=np.float32), k, group_width)
    return (codes.astype(np.float32) - z) * s


def codes_from_fakequant(weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group_width: int,
                         qmax: int) -> np.ndarray:
    """Recover the integer codes of a fake-quant weight from the calibration's own scales and zeros.

    weight float32 `[N, K]`, scales float32 `[N, G]`, zeros int `[N, G]`. Codes are `rint(w / s) + z`, computed
    in float64 and *not* clamped; raises ValueError when a code falls outside `[0, qmax]` or when
    `dequantize(codes)` does not reproduce `weight` exactly (the sidecar does not belong to these weights).
    Re-deriving the grid from each group's min/max instead would be lossy when a group misses an end code.
    """
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    g = -(-k // group_width)
    if scales.shape != (n, g) or zeros.shape != (n, g):
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match weight "
                         f"[{n}, {k}] with group size {group_width} (expected [{n}, {g}])")
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError("scales must be finite and positive")
    if np.any(scales.astype(np.float16).astype(np.float32) != scales):
        raise ValueError("scales are not exactly representable in float16")
    if np.any(zeros != np.rint(zeros)) or zeros.min() < 0 or zeros.max() > qmax:
        raise ValueError(f"zeros must be integers in [0, {qmax}]")
    s = expand_groups(scales.astype(np.float64), k, group_width)
    z = expand_groups(zeros.astype(np.float64), k, group_width)
    codes = np.rint(weight.astype(np.float64) / s) + z
    if codes.min() < 0 or codes.max() > qmax:
        bad = int(np.count_nonzero((codes < 0) | (codes > qmax)))
        raise ValueError(f"{bad} codes out of range [0, {qmax}] (min {codes.min():.0f}, max {codes.max():.0f})")
    codes = codes.astype(np.int32)
    recon = dequantize(codes, scales, zeros, group_width)
    if not np.array_equal(recon, weight):
        bad = int(np.count_nonzero(recon != weight))
        worst = float(np.max(np.abs(recon.astype(np.float64) - weight)))
        raise ValueError(f"{bad} weights are not on the sidecar's grid (max |diff| {worst:.3g}): "
                         "the sidecar does not belong to these weights")
    return codes
