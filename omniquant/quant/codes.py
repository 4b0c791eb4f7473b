"""Integer codes <-> weights from a run's sidecar (scales, zeros). Used by the exporter's self-check and the packer.

    w[n, k] = (q[n, k] - zeros[n, k // gs]) * scales[n, k // gs]      computed in float32
"""

from __future__ import annotations

import numpy as np
import torch


def _expand(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def recompute_codes(weight, scales, zeros, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """codes int32 [N, K] = clamp(round(w / s) + z, 0, qmax); group_size -1 means per-channel."""
    w, s, z = _as_tensor(weight).float(), _as_tensor(scales).float(), _as_tensor(zeros).float()
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    qmax = 2 ** bits - 2 if symmetric else 2 ** bits - 1
    q = torch.round(w / _expand(s, gs, k)) + _expand(z, gs, k)
    return q.clamp(0, qmax).to(torch.int32)


def dequantize(codes, scales, zeros, group_size: int) -> torch.Tensor:
    """float32 [N, K] from codes [N, K], scales [N, G], zeros [N, G]."""
    q, s, z = _as_tensor(codes), _as_tensor(scales).float(), _as_tensor(zeros).float()
    k = q.shape[1]
    gs = k if group_size == -1 else group_size
    return (q.float() - _expand(z, gs, k)) * _expand(s, gs, k)


# Stored fake-quant weights (docs/formats.md §1): a checkpoint in dtype D stores  w_D = round_D((q - z) * s),  the
# exact float32 grid value rounded once to D. Round-to-nearest recovery  q = z + rint(w_D / s)  is exact when the
# rounding error |w_D - (q - z)s| <= |q - z| * 2^-p  (p = 11 for float16, 8 for bfloat16: half an ulp, relative)
# stays below s / 2, i.e. |q - z| < 2^(p - 1). float16 subnormal results err by at most 2^-25 < s * 2^-8 (s >= 1e-5).
# tests/test_stored_dtype.py checks these limits exhaustively over every float16 scale in [1e-5, 1e4].
MAX_RECOVERABLE_DISTANCE = {torch.float32: 2**24, torch.float16: 2**10 - 1, torch.bfloat16: 2**7 - 1}


def max_code_distance(bits: int, symmetric: bool) -> int:
    """Largest |q - z|: asymmetric codes and zeros both lie in [0, 2^b - 1]; symmetric zero is 2^(b-1) - 1."""
    return 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1


def codes_recoverable(dtype: torch.dtype, bits: int, symmetric: bool) -> bool:
    """True when every code of a `bits`-bit weight stored in `dtype` is recovered by round-to-nearest
    (float32 and float16 always; bfloat16 up to 7 bits and 8-bit symmetric, not 8-bit asymmetric)."""
    return max_code_distance(bits, symmetric) <= MAX_RECOVERABLE_DISTANCE[dtype]


def stored_weight(codes, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """What a checkpoint in `dtype` stores for these codes: dequantize in float32 (exact), round once to dtype."""
    return dequantize(codes, scales, zeros, group_size).to(dtype)


def recover_codes(stored: torch.Tensor, scales, zeros, bits: int, group_size: int, symmetric: bool,
                  rows: int = 1024) -> torch.Tensor:
    """int32 codes [N, K] = z + rint(w / s) of a stored weight (float16 / bfloat16 / float32), computed in float64
    `rows` rows at a time; ValueError when a code falls outside [0, qmax] or when the codes do not reproduce
    `stored` exactly (`stored_weight(codes) != stored`: the sidecar does not belong to these weights, or the dtype
    cannot hold these codes, see `codes_recoverable`)."""
    s_all, z_all = _as_tensor(scales), _as_tensor(zeros)
    n, k = stored.shape
    gs = k if group_size == -1 else group_size
    qmax = 2**bits - 2 if symmetric else 2**bits - 1
    out = torch.empty((n, k), dtype=torch.int32)
    for r in range(0, n, rows):
        w, s, z = stored[r:r + rows], s_all[r:r + rows], z_all[r:r + rows]
        q = torch.round(w.double() / _expand(s.double(), gs, k)) + _expand(z.double(), gs, k)
        if q.numel() and (q.min() < 0 or q.max() > qmax):
            raise ValueError(f"codes out of range [0, {qmax}] (min {q.min():.0f}, max {q.max():.0f})")
        q = q.to(torch.int32)
        back = stored_weight(q, s, z, group_size, stored.dtype)
        if not torch.equal(back, w):
            bad = int((back != w).sum())
            raise ValueError(f"{bad} weights are not {stored.dtype} roundings of the sidecar's grid "
                             "(the sidecar does not belong to these weights)")
        out[r:r + rows] = q
    return out
