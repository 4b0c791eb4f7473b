"""Per-channel activation statistics at every linear input of the decoder blocks (LET initialisation).

For linear input x [L, K] of calibration window w (the full-precision model's activations):

    act_scales[k] = max_w max_t |x_w[t, k]|                         (SmoothQuant "act scales")
    act_shifts[k] = mean_w (max_t x_w[t, k] + min_t x_w[t, k]) / 2   (running mean over windows, OmniQuant "shifts")

Calibration collects them block by block (`BlockStats.observe`) while block i runs on the full-precision stream,
which is the full-precision model's hidden state at block i's input, so no whole-model forward is needed.
`collect` runs a whole model in memory (small models, and the independent reference in tests). Saved as safetensors
`<linear full name>.act_scales` / `.act_shifts` (float32 [K]) with the windows' hash in the metadata, next to the
run, and reused when the same windows come back.
"""

from __future__ import annotations

import contextlib
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


class _Accumulator:
    """Running max |x| and sum of per-window mid-ranges per linear; one forward call = one window."""

    def __init__(self):
        self.scales: dict[str, torch.Tensor] = {}
        self.shift_sum: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def fn(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            amax = x.abs().amax(0)
            self.scales[name] = amax if name not in self.scales else torch.maximum(self.scales[name], amax)
            mid = (x.amax(0) + x.amin(0)) / 2
            self.shift_sum[name] = mid if name not in self.shift_sum else self.shift_sum[name] + mid
        return fn

    def attach(self, block: nn.Module, adapter: Adapter, prefix: str) -> list:
        return [block.get_submodule(lin).register_forward_pre_hook(self.hook(f"{prefix}.{lin}"))
                for lin in adapter.linears]

    def result(self, n_windows: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.scales:
            out[f"{name}.act_scales"] = self.scales[name].cpu()
            out[f"{name}.act_shifts"] = (self.shift_sum[name] / n_windows).cpu()
        return out


@torch.no_grad()
def collect(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"<name>.act_scales": [K], "<name>.act_shifts": [K]} for every quantizable linear, from one forward of the
    whole (materialised) model per window."""
    acc, handles = _Accumulator(), []
    for i, block in enumerate(adapter.blocks(model)):
        handles += acc.attach(block, adapter, f"{adapter.blocks_path}.{i}")
    device = next(model.parameters()).device
    try:
        for ids in tqdm(windows, desc="activation statistics", leave=False):
            model(ids[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc.result(windows.shape[0])


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


def read_stats(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), "pt") as f:
            stats = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return stats, (f.metadata() or {})
    except Exception as e:  # not a safetensors file, truncated, ...
        raise UserError(f"cannot read activation statistics {path}: {e}") from e


class BlockStats:
    """Statistics for the LET init of `model` (which may be on the meta device).

    Read from `path` when it holds statistics of these windows (or of any windows when the user `given` it, e.g.
    from another run on other data); otherwise collected block by block: `observe(block, i)` is the context in
    which block i runs on the full-precision stream, and `save()` writes them to `path` once every block was seen.
    """

    def __init__(self, path: Path, model: nn.Module, adapter: Adapter, windows: torch.Tensor, given: bool = False):
        self.path, self.adapter, self.windows = Path(path), adapter, windows
        self.digest = windows_digest(windows)
        self.stats: dict[str, torch.Tensor] = {}
        self.loaded = False
        if self.path.exists() or given:
            if not self.path.exists():
                raise UserError(f"activation statistics {path} do not exist")
            stats, meta = read_stats(self.path)
            if given or meta.get("windows") == self.digest:
                check_shapes(stats, model, adapter, path)
                self.stats, self.loaded = stats, True
        self.n_blocks = len(adapter.blocks(model))

    def observe(self, block: nn.Module, i: int):
        if self.loaded:
            return contextlib.nullcontext()
        return self._observe(block, i)

    @contextlib.contextmanager
    def _observe(self, block: nn.Module, i: int):
        acc = _Accumulator()
        handles = acc.attach(block, self.adapter, f"{self.adapter.blocks_path}.{i}")
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.stats.update(acc.result(self.windows.shape[0]))

    def block(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{linear name in the block: (act_scales [K], act_shifts [K])}."""
        p = f"{self.adapter.blocks_path}.{i}."
        return {n: (self.stats[f"{p}{n}.act_scales"], self.stats[f"{p}{n}.act_shifts"]) for n in self.adapter.linears}

    def save(self) -> None:
        """Write the collected statistics (all blocks seen) to `path`; nothing to do when they were read from it."""
        if self.loaded or len(self.stats) != 2 * len(self.adapter.linears) * self.n_blocks:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"windows": self.digest, "nsamples": str(self.windows.shape[0]), "seqlen": str(self.windows.shape[1])}
        atomic_write(self.path, lambda p: save_file(self.stats, str(p), meta))
