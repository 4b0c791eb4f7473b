"""Activation fake-quantization: per-token dynamic asymmetric (OmniQuant / SmoothQuant "per-token" setting).

For x [..., K], each token (row over the last dim) gets its own range, recomputed on every call:

    scale = max((max_k x - min_k x) / (2^b - 1), 1e-5),  zero = round(-min_k x / scale)
    x_q   = (clamp(round(x / scale) + zero, 0, 2^b - 1) - zero) * scale

Rounding uses a straight-through estimator, so gradients reach the LET scales/shifts that produced x.

An optional per-channel `offset` d [K] (the LET shift, carried here so that the exported weights need no extra bias)
turns this into  Q(x - d) + d:  in full precision it is the identity, so a plain transformers model without the
quantizer computes exactly the same function; with the quantizer it equals the reference LET form (quantize the
shifted activation, add W·d back through the bias).
"""

from __future__ import annotations

import torch
from torch import nn

from omniquant.quant.fakequant import round_ste

ACT_SCALE_MIN = 1e-5


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (last dim) dynamic asymmetric fake-quantization at `bits`; same shape/dtype as x."""
    qmax = 2 ** bits - 1
    xmax = x.amax(-1, keepdim=True)
    xmin = x.amin(-1, keepdim=True)
    scale = ((xmax - xmin) / qmax).clamp(min=ACT_SCALE_MIN)
    zero = round_ste(-xmin / scale)
    q = (round_ste(x / scale) + zero).clamp(0, qmax)
    return (q - zero) * scale


class ActQuantizer(nn.Module):
    """Per-token dynamic asymmetric quantizer of a linear's input (or of q/k/v heads); no parameters.

    `offset` (float tensor [K] or None) is a plain attribute, not a buffer: it is never written into the HF
    state dict (it lives in the sidecar `act_params.safetensors`), and during calibration it may carry gradients.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.offset: torch.Tensor | None = None
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bits >= 16:
            return x
        if self.offset is None:
            return fake_quant_per_token(x, self.bits)
        d = self.offset.to(x.device, x.dtype)
        return fake_quant_per_token(x - d, self.bits) + d

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-token dynamic asymmetric, offset={'yes' if self.offset is not None else 'no'}"


INPUT_QUANT_ATTR = "act_quantizer"


def _input_hook(module: nn.Module, args):
    q = getattr(module, INPUT_QUANT_ATTR, None)
    if q is None:
        return None
    return (q(args[0]), *args[1:])


def attach_input_quantizer(linear: nn.Module, quantizer: ActQuantizer) -> None:
    """Quantize `linear`'s input with `quantizer` from now on (a forward pre-hook; the module keeps its type)."""
    if getattr(linear, "_omniquant_input_hook", None) is None:
        linear._omniquant_input_hook = linear.register_forward_pre_hook(_input_hook)
    setattr(linear, INPUT_QUANT_ATTR, quantizer)
