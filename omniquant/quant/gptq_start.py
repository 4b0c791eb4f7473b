"""Where Block-AP's trainable weights start (`--weight-start gptq`): GPTQ's error-compensated values.

Block-AP (quant/blockap.py) trains W' = W + delta * u from delta = 0, i.e. from round-to-nearest of W on the
scales its clipping starts at. GPTQ (Frantar et al., 2023) quantizes the columns of W one at a time and moves the
not-yet-quantized columns to compensate each column's rounding error through the layer's input Gram matrix
H = E[x x^T] (x: the linear's input over the block's calibration tokens). Per column c, in order:

    W'[:, c] = the current (compensated) column;   e = (W'[:, c] - Q(W'[:, c])) / U[c, c]
    W'[:, c+1:] -= e U[c, c+1:],                    U = upper Cholesky factor of (H + lambda I)^-1

with Q round-to-nearest on the quantizer's fixed group scale / zero and lambda = DAMP * mean(diag H). The start is
delta = (W' - W) / u: the quantizer then rounds W' exactly to GPTQ's codes, and the block's training continues
from there (the frozen W and the min/max unit u stay those of the float weight). Columns whose input is always 0
(diag H = 0) keep their weights and pass no error on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omniquant.quant.spec import to_groups

WEIGHT_STARTS = ("rtn", "gptq")
DAMP = 0.01  # GPTQ's default dampening, relative to the mean diagonal of H
COLUMN_BLOCK = 128  # columns updated lazily together (GPTQ's "lazy batch"); any size gives the same result


@torch.no_grad()
def input_grams(linears: dict[str, nn.Module], forward: Callable[[], object]) -> dict[str, torch.Tensor]:
    """{name: E[x x^T], float64 [K, K]} of each module's input over every token while `forward()` runs. Modules
    fed the same tensor (q/k/v, gate/up) share one matrix."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # the previous call's input tensor (held, so identity is not an address reused) and module

    def hook(name):
        def accumulate(_module, args):
            x = args[0]
            if x is last[0]:  # fed the same tensor as the module just before it (q/k/v, gate/up)
                alias.setdefault(name, last[1])
                return
            last[0], last[1] = x, alias.get(name, name)
            x = x.detach().reshape(-1, x.shape[-1]).float()
            with torch.autocast(x.device.type, enabled=False):  # the block may run under bf16 autocast
                gram = (x.T @ x).double()  # float32 within a call, float64 across calls
            sums[name] = sums.get(name, 0) + gram
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
        last.clear()
    grams = {n: sums[n] / counts[n] for n in sums}
    return {n: grams[alias.get(n, n)] for n in linears if alias.get(n, n) in grams}


@torch.no_grad()
def gptq_columns(weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int, qmax: int, damp: float = DAMP) -> torch.Tensor:
    """The module docstring's W' (float32 [N, K]): the value each column of `weight` [N, K] has when GPTQ rounds it.

    gram: H [K, K]; scale, zero: [N, G] (fp16-exact scale, integer zero) of group g = column // group_size."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diag = torch.arange(k, device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    # a dead column's row and column of U are 0 off the diagonal: it is never moved and passes nothing on
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    out = torch.empty_like(w)
    s, z = scale.float(), zero.float()
    for c0 in range(0, k, COLUMN_BLOCK):
        c1 = min(c0 + COLUMN_BLOCK, k)
        wb, err = w[:, c0:c1].clone(), torch.zeros(n, c1 - c0, device=w.device)
        for i in range(c1 - c0):
            g = (c0 + i) // group_size
            col = wb[:, i]
            out[:, c0 + i] = col
            q = (torch.clamp(torch.round(col / s[:, g]) + z[:, g], 0, qmax) - z[:, g]) * s[:, g]
            e = (col - q) / u[c0 + i, c0 + i]
            wb[:, i:] -= e[:, None] * u[c0 + i, c0 + i : c1][None, :]
            err[:, i] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]
    return out


@torch.no_grad()
def start_at_gptq(qlinears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
    """Set each QuantLinear's BlockAPQuantizer weight_delta so that it rounds the weight to GPTQ's codes on its
    current scales and zeros (call after the clipping start). Linears sharing a Gram matrix (q/k/v, gate/up) are
    compensated as one stacked weight: GPTQ treats rows independently, so this only saves work."""
    by_gram: dict[int, list[str]] = {}
    for name in qlinears:
        by_gram.setdefault(id(grams[name]), []).append(name)
    for names in by_gram.values():
        quants = [qlinears[n].wquant for n in names]
        ws = [qlinears[n].weight for n in names]  # float32, frozen (the quantizers' stats cache keys on it)
        params = [q.qparams(w) for q, w in zip(quants, ws, strict=True)]
        target = gptq_columns(torch.cat(ws), grams[names[0]], torch.cat([p[0] for p in params]),
                              torch.cat([p[1] for p in params]), quants[0].group_size, quants[0].spec.qmax)
        for q, w, t in zip(quants, ws, target.split([w.shape[0] for w in ws]), strict=True):
            delta = to_groups(t - w, q.group_size) / q.unit(w)[..., None]
            q.weight_delta.copy_(delta.reshape(w.shape[0], -1)[:, : w.shape[1]].to(q.weight_delta.dtype))
