"""Block-AP (EfficientQAT, block-wise training of all parameters): the `blockap` recipe.

Learns, per group, a scale and a zero point (min/max init) and, per weight, the weight itself:

    W' = W + delta * u,                 u = min/max step of W's group (fixed unit: delta is in quantization steps)
    scale = fp16(u * exp(a)),           zero = clamp(round(-min(W_g, 0) / scale + b), 0, qmax)   (asymmetric)
    q = clamp(round(W' / scale) + zero, 0, qmax),   W_q = (q - zero) * scale

a, b, delta start at 0, where the quantizer equals round-to-nearest bit for bit. Scale and zero are parametrised
relative to the group's min/max (log-scale a, zero shift b in codes) so one learning rate fits every layer, and
follow a weight LET transforms; symmetric runs keep zero = 2^(b-1) - 1 and learn a. Rounding of the weights and
the zero point uses straight-through gradients. The export is the common one (`fakequant`): integer codes,
fp16-exact scales, integer zeros; the trained weights live on only through their codes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from omniquant.quant.fakequant import GroupQuantizer, minmax_qparams, round_ste
from omniquant.quant.spec import WeightQuantSpec, to_groups


class BlockAPQuantizer(GroupQuantizer):
    LR_GROUPS: ClassVar[dict[str, str]] = {"log_scale": "scale", "zero_shift": "zero", "weight_delta": "weight"}

    def __init__(self, weight_shape: tuple[int, int], spec: WeightQuantSpec):
        super().__init__(weight_shape, spec)
        n = weight_shape[0]
        self.log_scale = nn.Parameter(torch.zeros(n, self.n_groups))
        self.zero_shift = None if spec.symmetric else nn.Parameter(torch.zeros(n, self.n_groups))
        self.weight_delta = nn.Parameter(torch.zeros(weight_shape))

    def _range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, xmax, xmin = self.stats(w)
        return xmax.detach(), xmin.detach()

    def unit(self, w: torch.Tensor) -> torch.Tensor:
        """The min/max (round-to-nearest) step of each group of w, [N, G], no gradient."""
        xmax, xmin = self._range(w)
        return minmax_qparams(xmax, xmin, self.spec)[0].detach()

    def learns_clipping(self) -> bool:
        return True

    @torch.no_grad()
    def set_clip_ratio(self, ratio: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor) -> None:
        """a = log(ratio); b = (ratio - 1) * zf, zf = -min(W_g, 0) / scale at the new scale, so the zero point is
        round(-ratio * min / scale): the range is [ratio * min, ratio * max], as `clip_init`'s search quantized it."""
        self.log_scale.copy_(torch.log(ratio).to(self.log_scale.dtype))
        if self.zero_shift is not None:
            _, _, zf = minmax_qparams(xmax, xmin, self.spec, torch.exp(self.log_scale).to(xmax.dtype))
            self.zero_shift.copy_(((ratio - 1) * zf).to(self.zero_shift.dtype))

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xmax, xmin = self._range(w)
        scale, _, zf = minmax_qparams(xmax, xmin, self.spec, torch.exp(self.log_scale).to(w.dtype))
        if self.zero_shift is None:
            return scale, zf
        return scale, round_ste(zf + self.zero_shift.to(w.dtype)).clamp(0, self.spec.qmax)

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W + delta * u in groups [N, G, gs]."""
        return self.stats(w)[0] + to_groups(self.weight_delta.to(w.dtype), self.group_size) * self.unit(w)[..., None]
