"""Learnable norm gains: the block's pre-linear norms take a per-channel gain g = exp(a) while it is calibrated.

Block-AP trains every weight of the block, the norms' included (EfficientQAT); here a norm N whose output feeds
quantized linears (an LET `norm` site: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) is trained as

    N'(x) = N(x) * exp(a),    a [H] float32, init 0 (the block is unchanged at the start),

through a forward hook, so one relative learning rate fits every norm (weights of SmolLM2's norms span 0.01 .. 5).
Baking folds it into the stored weight exactly as LET folds its divisor: w -> (w + c) * exp(a) - c (c: the
adapter's norm offset, Gemma's 1 + w), and a LayerNorm bias b -> b * exp(a). LET's own hooks divide the same
output by s, which commutes, so the two combine. The deployed model gains no op and the linears' quantized weights
do not change: the gain only moves the float norm weights the quantized linears read.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from omniquant.models.base import Adapter

NORM_GAIN_ATTR = "omq_norm_gains"


class NormGain(nn.Module):
    """The gain of one norm: log_gain a [H] (float32), output multiplied by exp(a)."""

    LR_GROUPS: ClassVar[dict[str, str]] = {"log_gain": "norm"}

    def __init__(self, hidden: int):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(hidden))

    def hook(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        return out * torch.exp(self.log_gain).to(out.dtype)


class NormGains(nn.Module):
    """The gains of a block's LET norm sites (`Adapter.let_sites` of kind `norm`), attached as NORM_GAIN_ATTR so
    the block loop saves, restores and optimises them with the quantizers (learning-rate group `norm`)."""

    def __init__(self, block: nn.Module, adapter: Adapter):
        super().__init__()
        self.names = [s.prev for s in adapter.let_sites if s.kind == "norm"]
        self.gains = nn.ModuleList(NormGain(block.get_submodule(n).weight.shape[0]) for n in self.names)
        self._offset = adapter.norm_offset
        self._hooks = [block.get_submodule(n).register_forward_hook(g.hook) for n, g in zip(self.names, self.gains)]

    @torch.no_grad()
    def bake(self, block: nn.Module) -> None:
        """Fold every gain into its norm's weight (and bias) and remove the hooks: the block computes the same."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        c = self._offset
        for name, g in zip(self.names, self.gains):
            norm = block.get_submodule(name)
            gain = torch.exp(g.log_gain.detach()).to(norm.weight.dtype)
            norm.weight.copy_((norm.weight + c) * gain - c)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(gain.to(norm.bias.dtype))


def attach_norm_gains(block: nn.Module, adapter: Adapter) -> NormGains | None:
    """Attach NormGains to `block` (on the block's device); None when the adapter names no norm site."""
    if not any(s.kind == "norm" for s in adapter.let_sites):
        return None
    gains = NormGains(block, adapter)
    setattr(block, NORM_GAIN_ATTR, gains)
    return gains


def bake_norm_gains(block: nn.Module) -> None:
    """Bake and detach the block's NormGains, if it has any."""
    gains = getattr(block, NORM_GAIN_ATTR, None)
    if gains is not None:
        gains.bake(block)
        delattr(block, NORM_GAIN_ATTR)
