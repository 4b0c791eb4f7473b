"""What every weight recipe shares: straight-through estimators and the group fake-quantizer they all export through.

Per group g of a weight W [N, K] (grouped along K, see `spec.to_groups`), a recipe supplies scale s_g (float16-exact)
and integer zero z_g (and, optionally, a per-weight rounding offset v in [-0.5, 0.5]):

    q = clamp(round(W / s + v) + z, 0, qmax),   W_q = (q - z) * s

so every recipe exports the same integer codes + fp16 scales + zeros, and `dequantize(codes) == W_q` bit for bit
(|q - z| <= 255 and an fp16 scale multiply exactly in float32).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from omniquant.quant.spec import WeightQuantSpec, from_groups, to_groups

SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept in x's dtype) with identity gradient."""
    return (x.to(torch.float16).to(x.dtype) - x).detach() + x


def minmax_qparams(xmax: torch.Tensor, xmin: torch.Tensor, spec: WeightQuantSpec, scale_mult=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group range [xmin, xmax] -> (scale [N, G] fp16-exact, zero [N, G] integer-valued, zero before rounding).

    asymmetric: scale = (max(xmax,0) - min(xmin,0)) / qmax * mult,  zero = -min(xmin,0) / scale
    symmetric : scale = max(|xmax|, |xmin|) / (2^(b-1) - 1) * mult, zero = 2^(b-1) - 1   (MLC convention)
    The range always contains 0, so zero lies in [0, qmax] and a constant group is exact.
    """
    if spec.symmetric:
        s = torch.maximum(xmax.abs(), xmin.abs()) / spec.sym_zero
    else:
        xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
        s = (xmax - xmin) / spec.qmax
    if scale_mult is not None:
        s = s * scale_mult
    scale = fp16_ste(s.clamp(SCALE_MIN, SCALE_MAX))
    if spec.symmetric:
        zf = torch.full_like(scale, spec.sym_zero)
        return scale, zf, zf
    zf = -xmin / scale
    return scale, round_ste(zf).clamp(0, spec.qmax), zf


class GroupFakeQuant(torch.autograd.Function):
    """W_q = (clamp(round(W / s + v) + z, 0, qmax) - z) * s on groups, with the straight-through gradients of that
    formula written out (one pass each way instead of autograd's ~20 weight-sized temporaries; same values):

        inside (0 <= round(W/s + v) + z <= qmax):  dW_q/dW = 1,  dW_q/dv = s,  dW_q/ds = round(.) - W/s,  dW_q/dz = 0
        clamped:                                    dW_q/dW = 0,  dW_q/dv = 0,  dW_q/ds = q - z,           dW_q/dz = -s

    wg [N, G, gs], scale and zero [N, G], v [N, G, gs] or None; scale/zero gradients are summed over each group.
    The forward saves the inside mask as 0/1 in wg's dtype and dW_q/ds itself (d - x * mask): float x bool products
    are ~30x slower than float x float ones on CPU (type promotion), and the backward then needs no select.
    """

    @staticmethod
    def values(wg, scale, zero, v, qmax: int) -> torch.Tensor:
        """The forward's values with no gradient state: one weight-sized temporary instead of the forward's five
        (exporting a 7B up_proj through `forward` held ~1 GB of them); the same operations in the same order, so the
        same bits."""
        s, z = scale[..., None], zero[..., None]
        q = wg / s
        if v is not None:
            q.add_(v)
        return q.round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s)

    @staticmethod
    def forward(ctx, wg, scale, zero, v, qmax: int):
        s, z = scale[..., None], zero[..., None]
        x = wg / s
        q = (x.round() if v is None else (x + v).round_()).add_(z)
        d = q.clamp(0, qmax)
        inside = torch.eq(d, q).to(wg.dtype)
        d.sub_(z)
        ctx.save_for_backward(inside, torch.addcmul(d, x, inside, value=-1), scale)
        return d.mul_(s)

    @staticmethod
    def backward(ctx, g):
        inside, ds, scale = ctx.saved_tensors
        need_w, need_s, need_z, need_v = ctx.needs_input_grad[:4]
        gw = g * inside if (need_w or need_v or need_z) else None
        gs = (g * ds).sum(-1) if need_s else None
        gz = (g - gw).sum(-1) * -scale if need_z else None
        gv = gw * scale[..., None] if need_v else None
        return (gw if need_w else None), gs, gz, gv, None


class GroupQuantizer(nn.Module):
    """Base of the weight recipes' fake-quantizers for one linear's weight [N, K].

    A subclass implements `qparams(w) -> (scale [N, G], zero [N, G])` and may override `grouped(w)` (the weight that
    is rounded, in groups [N, G, gs], e.g. w + a learned delta) and `offset()` (the rounding offset v [N, K] in
    quantization steps, or None). `LR_GROUPS` maps each of its parameter names to a learning-rate group of
    `omniquant.quant.recipes.LR_GROUPS`.
    """

    LR_GROUPS: ClassVar[dict[str, str]] = {}

    def __init__(self, weight_shape: tuple[int, int], spec: WeightQuantSpec):
        super().__init__()
        self.spec = spec
        self.in_features = weight_shape[1]
        self.group_size, self.n_groups = spec.groups(self.in_features)
        self._stats_of = None  # (weight, its version, (groups, max, min)): see `stats`

    def stats(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w in groups [N, G, gs] (edge-padded), group max [N, G], group min [N, G]).

        Cached for a weight that needs no gradient (the frozen weight: every training step quantizes the same
        tensor); the cache holds the tensor itself and its version counter, so an in-place change (LET fusion,
        the export's copy) or another tensor recomputes it."""
        c = self._stats_of
        if c is not None and c[0] is w and c[1] == w._version:
            return c[2]
        wg = to_groups(w, self.group_size)
        out = (wg, wg.amax(-1), wg.amin(-1))
        self._stats_of = None if w.requires_grad else (w, w._version, out)
        return out

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        return self.stats(w)[0]

    def offset(self) -> torch.Tensor | None:
        return None

    def learns_clipping(self) -> bool:
        """Whether the group ranges are learned (then `set_clip_ratio` sets where they start, `quant/clip_init`)."""
        return False

    def set_clip_ratio(self, ratio: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor) -> None:
        """Start the learned range of each group at [ratio * xmin, ratio * xmax] (all [N, G]; the weight's group
        max / min, ratio in (0, 1])."""
        raise NotImplementedError(f"{type(self).__name__} learns no clipping")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, same shape and dtype as w."""
        scale, zero = self.qparams(w)
        wg = self.grouped(w)
        v = self.offset()
        if v is not None:
            v = to_groups(v, self.group_size).to(wg.dtype)
        fq = GroupFakeQuant.apply if torch.is_grad_enabled() else GroupFakeQuant.values
        return from_groups(fq(wg, scale, zero, v, self.spec.qmax), self.in_features)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fake-quant weight float32 [N,K], scales float32 [N,G] (fp16-exact), zeros int32 [N,G])."""
        w = w.float()
        scale, zero = self.qparams(w)
        return self.forward(w), scale.float(), zero.round().to(torch.int32)
