"""Where a recipe's clipping starts (`--clip-init`): an error search weighted by the linear's inputs (`act`), by
nothing (`mse`), or plain min/max (`minmax`); `auto` (default) takes the recipe's own (`recipes.Recipe.clip_init`:
`act` for blockap, `minmax` for the LWC ones).

Per group g of a weight W [N, K] and shrink ratio r in GRID (1.0, 0.975, ..., 0.5):

    Q_r(W_g) = round-to-nearest of W_g on the range [r * min(W_g), r * max(W_g)]   (`minmax_qparams`: fp16 scale,
               integer zero, the range always holding 0)
    r_g      = argmin_r  sum_{k in g} h_k (Q_r(W_g)[k] - W_g[k])^2                 (real columns only; ties keep
               the larger r, so a group that clipping cannot help keeps its full range)

with h_k = 1 (`mse`) or h_k = E[x_k^2], the mean square of input column k over the block's calibration inputs
(`act`: the diagonal of the layer's Hessian, the weighting GPTQ and AWQ's clip search use; from the first
STAT_WINDOWS windows of the quantized stream, `input_second_moments`). Without calibration data (`--epochs 0`)
`act` falls back to `mse` (`recipes.resolve_clip_init`).

Each recipe then starts at r_g (`set_clip_ratio`): LWC logits logit(r_g), capped at its own init 4.0 (sigmoid
0.982); Block-AP log-scale log r_g and a zero shift that keeps the range at [r_g min, r_g max]. A short training
budget moves the clipping only a little from its start (LWC logits by about lr per step, Block-AP scales by
~0.01 per step), and at 2-3 bits the weight-error optimum lies far from min/max (ratios 0.6-0.9 are common), so
starting there is what lets 32 steps spend their movement on the block output instead. `minmax` keeps the papers'
starts (LWC 0.982 everywhere, Block-AP round-to-nearest).

Whole-model validation perplexity at the quick budget (bench/README.md, "Tuning") chose the recipes' defaults:
Block-AP gains from `mse` and more from `act` (W2g128 192 -> 114 -> 81, W3g128 55.2 -> 51.5 -> 48.6, with its
scale rate of recipes.py) while LWC loses with `mse` (240 -> 313, 62.9 -> 67.5): a logit started at logit(0.7)
sits where the sigmoid is ~12x steeper than at LWC's 4.0, so LWC's rate then moves the clip ratio far more per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omniquant.quant.fakequant import minmax_qparams
from omniquant.quant.spec import WeightQuantSpec, to_groups

CLIP_INITS = ("auto", "act", "mse", "minmax")
STAT_WINDOWS = 4  # calibration windows whose linear inputs give E[x^2] for `act` (4 x 512 tokens on the quick bench)
GRID = tuple(1 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
SEARCH_CHUNK = 1 << 22  # weights per row chunk of the search


@torch.no_grad()
def mse_clip_ratio(wg: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor, spec: WeightQuantSpec,
                   in_features: int, col_weight: torch.Tensor | None = None, grid=GRID) -> torch.Tensor:
    """Per-group ratio r_g of the module docstring. wg: [N, G, gs] (edge-padded groups, `spec.to_groups`); xmax,
    xmin: [N, G] group max / min; col_weight: h [K] (None: 1); returns float32 [N, G] with values from `grid`."""
    n, g, gs = wg.shape
    real = (torch.arange(g * gs, device=wg.device) < in_features).to(wg.dtype)
    if col_weight is not None:
        real[:in_features] *= col_weight.to(wg.dtype)
    real = real.reshape(g, gs)
    best = torch.ones((n, g), dtype=torch.float32, device=wg.device)
    # rows in chunks: each ratio's temporaries stay ~16 MB, not several weight-sized copies (7B: 180 MB each)
    rows = max(1, SEARCH_CHUNK // (g * gs))
    for r0 in range(0, n, rows):
        w_c, hi, lo = wg[r0 : r0 + rows], xmax[r0 : r0 + rows], xmin[r0 : r0 + rows]
        best_err = torch.full(hi.shape, float("inf"), dtype=wg.dtype, device=wg.device)
        for r in grid:
            scale, zero, _ = minmax_qparams(hi * r, lo * r, spec)
            s, z = scale[..., None], zero[..., None]
            wq = (torch.clamp(torch.round(w_c / s) + z, 0, spec.qmax) - z) * s
            err = ((wq - w_c) ** 2 * real).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + rows] = torch.where(better, r, best[r0 : r0 + rows])
    return best


@torch.no_grad()
def init_clipping(quantizer, weight: torch.Tensor, kind: str, col_weight: torch.Tensor | None = None) -> None:
    """Start `quantizer` (a recipe's GroupQuantizer for `weight` [N, K]) at the `kind` clipping (`act`, `mse` or
    `minmax`; `auto` is resolved by the caller, `recipes.resolve_clip_init`); `act` needs col_weight [K]."""
    if kind not in CLIP_INITS[1:]:
        raise ValueError(f"clip init must be one of {CLIP_INITS[1:]}, got {kind!r}")
    if kind == "minmax" or not quantizer.learns_clipping():
        return
    if (kind == "act") != (col_weight is not None):
        raise ValueError("clip init 'act' needs the input second moments (col_weight), 'mse' takes none")
    w = weight.detach().float()
    wg = to_groups(w, quantizer.group_size)  # not `quantizer.stats`: its cache would keep this copy alive
    xmax, xmin = wg.amax(-1), wg.amin(-1)
    ratio = mse_clip_ratio(wg, xmax, xmin, quantizer.spec, quantizer.in_features, col_weight)
    quantizer.set_clip_ratio(ratio, xmax, xmin)


@torch.no_grad()
def input_second_moments(linears: dict[str, nn.Module], forward: Callable[[], object]) -> dict[str, torch.Tensor]:
    """{name: E[x^2] per input column, float32 [K]} of each module's input while `forward()` runs (pre-hooks;
    float64 sums over every token)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}
