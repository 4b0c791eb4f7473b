"""Learnable rounding offsets on top of LWC: the `lwc+round` recipe (AutoRound's SignRound offset V, with
OmniQuant's clipping logits in place of its min/max scales).

Per weight, an offset v (init 0, in quantization steps) moves the rounding threshold:

    q = clamp(round(W / scale + clamp(v, -0.5, 0.5)) + zero, 0, qmax),   scale, zero from LWC (see `lwc`)

|v| <= 0.5 lets each weight round to either neighbouring code and no further. The codes, fp16 scales and integer
zeros are exported exactly as LWC's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from omniquant.quant.lwc import LWCQuantizer
from omniquant.quant.spec import WeightQuantSpec


class RoundingQuantizer(LWCQuantizer):
    """LWC (or plain min/max with `lwc=False`) plus a learnable rounding offset `round_offset` [N, K]."""

    LR_GROUPS: ClassVar[dict[str, str]] = {**LWCQuantizer.LR_GROUPS, "round_offset": "round"}

    def __init__(self, weight_shape: tuple[int, int], spec: WeightQuantSpec, lwc: bool = True):
        super().__init__(weight_shape, spec, lwc=lwc)
        self.round_offset = nn.Parameter(torch.zeros(weight_shape))

    def offset(self) -> torch.Tensor:
        return self.round_offset.clamp(-0.5, 0.5)
