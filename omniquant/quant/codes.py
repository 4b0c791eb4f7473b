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
