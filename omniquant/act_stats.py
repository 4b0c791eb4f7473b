"""Per-channel activation statistics at every linear input of the decoder blocks (LET initialisation).

One pass of the full-precision model over the calibration windows [n, L]; for linear input x [L, K] of window w:

    act_scales[k] = max_w max_t |x_w[t, k]|                         (SmoothQuant "act scales")
    act_shifts[k] = mean_w (max_t x_w[t, k] + min_t x_w[t, k]) / 2   (running mean over windows, OmniQuant "shifts")

Saved as safetensors `<linear full name>.act_scales` / `.act_shifts` (float32 [K]) with the windows' hash in the
metadata, next to the run, and reused when the same windows come back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from omniquant.atomic import atomic_write
from omniquant.errors import UserError
from omniquant.models.base import Adapter


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


@torch.no_grad()
def collect(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"<name>.act_scales": [K], "<name>.act_shifts": [K]} for every quantizable linear of every block."""
    scales: dict[str, torch.Tensor] = {}
    shift_sum: dict[str, torch.Tensor] = {}
    handles = []
    prefix = adapter.blocks_path

    def make_hook(name):
        def hook(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            amax = x.abs().amax(0)
            scales[name] = amax if name not in scales else torch.maximum(scales[name], amax)
            mid = (x.amax(0) + x.amin(0)) / 2
            shift_sum[name] = mid if name not in shift_sum else shift_sum[name] + mid
        return hook

    for i, block in enumerate(adapter.blocks(model)):
        for lin in adapter.linears:
            handles.append(block.get_submodule(lin).register_forward_pre_hook(make_hook(f"{prefix}.{i}.{lin}")))
    device = next(model.parameters()).device
    try:
        for ids in tqdm(windows, desc="activation statistics", leave=False):
            model(ids[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = windows.shape[0]
    out = {}
    for name in scales:
        out[f"{name}.act_scales"] = scales[name].cpu()
        out[f"{name}.act_shifts"] = (shift_sum[name] / n).cpu()
    return out


def check_shapes(stats: dict[str, torch.Tensor], model: nn.Module, adapter: Adapter, path) -> None:
    """UserError when `stats` does not describe this model (missing linear or wrong channel count)."""
    for i, block in enumerate(adapter.blocks(model)):
        for lin in adapter.linears:
            name = f"{adapter.blocks_path}.{i}.{lin}"
            k = block.get_submodule(lin).in_features
            for kind in ("act_scales", "act_shifts"):
                t = stats.get(f"{name}.{kind}")
                if t is None:
                    raise UserError(f"activation statistics {path} have no entry for {name} (made for a different model?)")
                if tuple(t.shape) != (k,):
                    raise UserError(
                        f"activation statistics {path} do not match this model: {name}.{kind} has shape "
                        f"{tuple(t.shape)}, the linear has {k} input channels (made for a different model?)"
                    )


def load_or_collect(path: Path, model: nn.Module, adapter: Adapter, windows: torch.Tensor,
                    given: bool = False) -> dict[str, torch.Tensor]:
    """Reuse `path` if it holds statistics of these windows (any windows if the user `given` it, e.g. from another
    run on other data); otherwise collect them and save them there. Shapes are checked against the model."""
    path = Path(path)
    digest = windows_digest(windows)
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                stats = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # not a safetensors file, truncated, ...
            raise UserError(f"cannot read activation statistics {path}: {e}") from e
        if given or meta.get("windows") == digest:
            check_shapes(stats, model, adapter, path)
            return stats
    stats = collect(model, adapter, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(stats, str(p), {"windows": digest, "nsamples": str(windows.shape[0]),
                                                           "seqlen": str(windows.shape[1])}))
    return stats
