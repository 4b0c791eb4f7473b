"""Learnable Weight Clipping (LWC), OmniQuant §3.2.

Per group g of a weight W [N, K] (grouped along K, see `spec.to_groups`):

    xmax = sigmoid(gamma_g) * max(W_g),  xmin = sigmoid(beta_g) * min(W_g)      (gamma, beta init 4.0)
    asymmetric: scale = (max(xmax,0) - min(xmin,0)) / (2^b - 1),  zero = round(-min(xmin,0) / scale)
    symmetric : scale = max(|xmax|, |xmin|) / (2^(b-1) - 1),      zero = 2^(b-1) - 1   (MLC convention)
    q = clamp(round(W / scale) + zero, 0, qmax),  W_q = (q - zero) * scale

Rounding uses a straight-through estimator. The range always contains 0 (so zero lies in [0, qmax] and a constant
group is represented exactly); scales are rounded to float16 in the forward pass too, so the weights exported for
deployment (fp16 scales) equal the trained fake-quant weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from omniquant.quant.spec import WeightQuantSpec, from_groups, to_groups

SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept in x's dtype) with identity gradient."""
    return (x.to(torch.float16).to(x.dtype) - x).detach() + x


class LWCQuantizer(nn.Module):
    """Fake-quantizer for one linear's weight [N, K]; `lwc=False` gives plain round-to-nearest (no parameters)."""

    def __init__(self, weight_shape: tuple[int, int], spec: WeightQuantSpec, lwc: bool = True, init: float = 4.0):
        super().__init__()
        self.spec = spec
        self.in_features = weight_shape[1]
        self.group_size, n_groups = spec.groups(self.in_features)
        if lwc:
            self.upbound_factor = nn.Parameter(torch.full((weight_shape[0], n_groups), init))
            self.lowbound_factor = nn.Parameter(torch.full((weight_shape[0], n_groups), init))
        else:
            self.upbound_factor = self.lowbound_factor = None

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (scale [N, G], zero [N, G]) for weight w; both carry gradients to the LWC logits."""
        wg = to_groups(w, self.group_size)
        xmax, xmin = wg.amax(-1), wg.amin(-1)
        if self.upbound_factor is not None:
            xmax = torch.sigmoid(self.upbound_factor).to(w.dtype) * xmax
            xmin = torch.sigmoid(self.lowbound_factor).to(w.dtype) * xmin
        spec = self.spec
        if spec.symmetric:
            absmax = torch.maximum(xmax.abs(), xmin.abs())
            scale = fp16_ste((absmax / spec.sym_zero).clamp(SCALE_MIN, SCALE_MAX))
            zero = torch.full_like(scale, spec.sym_zero)
        else:
            xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
            scale = fp16_ste(((xmax - xmin) / spec.qmax).clamp(SCALE_MIN, SCALE_MAX))
            zero = round_ste(-xmin / scale).clamp(0, spec.qmax)
        return scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, same shape and dtype as w."""
        scale, zero = self.qparams(w)
        wg = to_groups(w, self.group_size)
        q = (round_ste(wg / scale[..., None]) + zero[..., None]).clamp(0, self.spec.qmax)
        return from_groups((q - zero[..., None]) * scale[..., None], self.in_features)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fake-quant weight float32 [N,K], scales float32 [N,G] (fp16-exact), zeros int32 [N,G])."""
        w = w.float()
        scale, zero = self.qparams(w)
        return self.forward(w), scale.float(), zero.round().to(torch.int32)
