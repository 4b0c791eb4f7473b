"""A linear layer that runs with a fake-quantized weight during calibration.

The full-precision weight stays frozen; only the quantizer's parameters learn (the recipe's: LWC logits, rounding
offsets, Block-AP's scale/zero/weight delta, see quant/recipes.py). Before a forward, the block-level LET code may
set `temp_weight` / `temp_bias` (the transformed weight); otherwise the frozen weight is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omniquant.quant.fakequant import GroupQuantizer
from omniquant.quant.lwc import LWCQuantizer
from omniquant.quant.spec import WeightQuantSpec

# Weights of at least this many elements (16 MiB in float32) recompute their fake-quant in the backward pass.
CHECKPOINT_MIN_NUMEL = 1 << 22


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, spec: WeightQuantSpec, lwc: bool = True, act_quantizer: nn.Module | None = None,
                 quantizer: GroupQuantizer | None = None):
        """quantizer: the recipe's weight fake-quantizer (default: LWC, or round-to-nearest with lwc=False)."""
        super().__init__()
        self.linear = linear
        self.linear.requires_grad_(False)
        self.wquant = quantizer if quantizer is not None else LWCQuantizer(tuple(linear.weight.shape), spec, lwc=lwc)
        self.act_quantizer = act_quantizer
        self.temp_weight: torch.Tensor | None = None
        self.temp_bias: torch.Tensor | None = None
        self.quantize_weight = True

    @property
    def weight(self) -> torch.Tensor:
        return self.temp_weight if self.temp_weight is not None else self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.temp_bias if self.temp_bias is not None else self.linear.bias

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.wquant(weight) if self.quantize_weight else weight
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if (torch.is_grad_enabled() and self.weight.numel() >= CHECKPOINT_MIN_NUMEL
                and any(p.requires_grad for p in self.wquant.parameters())):
            # While the recipe trains a large linear, the fake-quant weight and what its backward needs (~3
            # weight-sized tensors) are not kept for the backward pass but recomputed there (activation
            # checkpointing: same values, same gradients), so a block trains in about its own size plus one linear's
            # temporaries (7B: a 0.8 GB float32 block calibrates in < 3 GB instead of 4). Small linears skip the
            # recomputation (a SmolLM2 block trained ~20 % faster without it; ad-hoc, noisy timing).
            return checkpoint(self._linear, x, self.weight, self.bias, use_reentrant=False)
        return self._linear(x, self.weight, self.bias)


def replace_linears(block: nn.Module, names, make) -> dict[str, QuantLinear]:
    """Swap each named nn.Linear of `block` for make(linear); returns {name: new module}."""
    out = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        out[name] = make(getattr(parent, attr))
        setattr(parent, attr, out[name])
    return out


def restore_linears(block: nn.Module, qlinears: dict[str, QuantLinear]) -> None:
    """Put the plain nn.Linear back (after its weight was overwritten with the fused, fake-quant weight).

    An activation quantizer stays with its linear (as a forward pre-hook), so the quantized stream that feeds the
    next block, and the final model, keep quantizing activations.
    """
    from omniquant.quant.act import attach_input_quantizer

    for name, q in qlinears.items():
        if q.act_quantizer is not None:
            attach_input_quantizer(q.linear, q.act_quantizer)
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, q.linear)
