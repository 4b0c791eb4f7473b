"""Integer codes <-> weights from a run's sidecar (scales, zeros). Used by the exporter's self-check and the packer.

    w[n, k] = (q[n, k] - zeros[n, k // gs]) * scales[n, k // gs]      computed in float32

Every function works on blocks of ROWS rows with the per-group values broadcast over each group (no [N, K] copies
of the scales / zeros), so a [11008, 4096] weight costs a few MB of temporaries, not several copies of itself.
"""

from __future__ import annotations

import numpy as np
import torch

from omniquant.quant.spec import from_groups, to_groups

ROWS = 1024


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def _gs(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def _rowwise(out: torch.Tensor, k: int, gs: int, fn, *tensors) -> torch.Tensor:
    """out[r] = from_groups(fn(*(to_groups(x[r]) for [N, K] inputs, x[r][..., None] for [N, G] inputs))) per row
    block (a ragged last group is edge-padded and the padding dropped, spec.PADDING_RULE)."""
    for r in range(0, out.shape[0], ROWS):
        args = [to_groups(t[r:r + ROWS], gs) if t.shape[1] == k else t[r:r + ROWS, :, None] for t in tensors]
        out[r:r + ROWS] = from_groups(fn(*args), k)
    return out


def recompute_codes(weight, scales, zeros, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """codes int32 [N, K] = clamp(round(w / s) + z, 0, qmax) of a float32 weight; group_size -1 means per-channel."""
    w, s, z = _as_tensor(weight).float(), _as_tensor(scales).float(), _as_tensor(zeros).float()
    qmax = 2 ** bits - 2 if symmetric else 2 ** bits - 1
    k = w.shape[1]
    return _rowwise(torch.empty(w.shape, dtype=torch.int32), k, _gs(group_size, k),
                    lambda w_, s_, z_: (torch.round(w_ / s_) + z_).clamp(0, qmax), w, s, z)


def dequantize(codes, scales, zeros, group_size: int) -> torch.Tensor:
    """float32 [N, K] from codes [N, K], scales [N, G], zeros [N, G]."""
    q, s, z = _as_tensor(codes), _as_tensor(scales).float(), _as_tensor(zeros).float()
    k = q.shape[1]
    return _rowwise(torch.empty(q.shape, dtype=torch.float32), k, _gs(group_size, k),
                    lambda q_, s_, z_: (q_.float() - z_) * s_, q, s, z)


# Stored fake-quant weights (docs/formats.md §1): a checkpoint in dtype D stores  w_D = round_D((q - z) * s),  the
# exact float32 grid value rounded once to D. Round-to-nearest recovery  q = z + rint(w_D / s)  is exact when the
# rounding error |w_D - (q - z)s| <= |q - z| * 2^-p  (p = 11 for float16, 8 for bfloat16: half an ulp, relative)
# stays below s / 2, i.e. |q - z| < 2^(p - 1). float16 subnormal results err by at most 2^-25 < s * 2^-8 (s >= 1e-5).
# The division is done in float32 (relative error 2^-24, < 1e-4 code for |q - z| <= 255).
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
    q, s, z = _as_tensor(codes), _as_tensor(scales).float(), _as_tensor(zeros).float()
    k = q.shape[1]
    return _rowwise(torch.empty(q.shape, dtype=dtype), k, _gs(group_size, k),
                    lambda q_, s_, z_: ((q_.float() - z_) * s_).to(dtype), q, s, z)


def recover_codes(stored: torch.Tensor, scales, zeros, bits: int, group_size: int, symmetric: bool,
                  verify: bool = True) -> torch.Tensor:
    """int32 codes [N, K] = z + rint(w / s) of a stored weight (float16 / bfloat16 / float32). ValueError when a
    code falls outside [0, qmax] or (`verify`) when the codes do not reproduce `stored` exactly
    (`stored_weight(codes) != stored`: the sidecar does not belong to these weights, or the dtype cannot hold these
    codes, see `codes_recoverable`)."""
    s, z = _as_tensor(scales).float(), _as_tensor(zeros).float()
    qmax = 2**bits - 2 if symmetric else 2**bits - 1
    k = stored.shape[1]
    q = _rowwise(torch.empty(stored.shape, dtype=torch.int32), k, _gs(group_size, k),
                 lambda w_, s_, z_: torch.round(w_.float() / s_) + z_, stored, s, z)
    if q.numel() and (q.min() < 0 or q.max() > qmax):
        raise ValueError(f"codes out of range [0, {qmax}] (min {q.min()}, max {q.max()})")
    if verify:
        back = stored_weight(q, s, z, group_size, stored.dtype)
        if not torch.equal(back, stored):
            bad = int((back != stored).sum())
            raise ValueError(f"{bad} weights are not {str(stored.dtype).removeprefix('torch.')} roundings of the "
                             "sidecar's grid (the sidecar does not belong to these weights)")
    return q
