"""Learnable Weight Clipping (LWC), OmniQuant §3.2: the `lwc` recipe (and the clipping part of `lwc+round`).

Per group g of a weight W [N, K] (grouped along K, see `spec.to_groups`):

    xmax = sigmoid(gamma_g) * max(W_g),  xmin = sigmoid(beta_g) * min(W_g)      (gamma, beta init 4.0)
    asymmetric: scale = (max(xmax,0) - min(xmin,0)) / (2^b - 1),  zero = round(-min(xmin,0) / scale)
    symmetric : scale = max(|xmax|, |xmin|) / (2^(b-1) - 1),      zero = 2^(b-1) - 1   (MLC convention)
    q = clamp(round(W / scale) + zero, 0, qmax),  W_q = (q - zero) * scale

Rounding uses a straight-through estimator. The range always contains 0 (so zero lies in [0, qmax] and a constant
group is represented exactly); scales are rounded to float16 in the forward pass too, so the weights exported for
deployment (fp16 scales) equal the trained fake-quant weights bit for bit (see `fakequant`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from omniquant.quant.fakequant import GroupQuantizer, minmax_qparams
from omniquant.quant.spec import WeightQuantSpec

LWC_INIT = 4.0  # the paper's logit init: sigmoid(4) = 0.982 of the group's min / max


class LWCQuantizer(GroupQuantizer):
    """Fake-quantizer for one linear's weight [N, K]; `lwc=False` gives plain round-to-nearest (no parameters)."""

    LR_GROUPS: ClassVar[dict[str, str]] = {"upbound_factor": "lwc", "lowbound_factor": "lwc"}

    def __init__(self, weight_shape: tuple[int, int], spec: WeightQuantSpec, lwc: bool = True, init: float = LWC_INIT):
        super().__init__(weight_shape, spec)
        if lwc:
            self.upbound_factor = nn.Parameter(torch.full((weight_shape[0], self.n_groups), init))
            self.lowbound_factor = nn.Parameter(torch.full((weight_shape[0], self.n_groups), init))
        else:
            self.upbound_factor = self.lowbound_factor = None

    def learns_clipping(self) -> bool:
        return self.upbound_factor is not None

    @torch.no_grad()
    def set_clip_ratio(self, ratio: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor) -> None:
        """gamma = beta = logit(ratio), at most the init 4.0 (sigmoid saturates: larger logits barely learn)."""
        logit = torch.logit(ratio.double()).clamp(max=LWC_INIT).to(self.upbound_factor.dtype)
        self.upbound_factor.copy_(logit)
        self.lowbound_factor.copy_(logit)

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (scale [N, G], zero [N, G]) for weight w; both carry gradients to the LWC logits."""
        _, xmax, xmin = self.stats(w)
        if self.upbound_factor is not None:
            xmax = torch.sigmoid(self.upbound_factor).to(w.dtype) * xmax
            xmin = torch.sigmoid(self.lowbound_factor).to(w.dtype) * xmin
        scale, zero, _ = minmax_qparams(xmax, xmin, self.spec)
        return scale, zero
