"""Capture the inputs of decoder block 0 (hidden states + the keyword arguments the model passes to every block)."""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model's embedding part on each window [n, L]; returns (hidden states [n, L, H] fp32, block kwargs).

    Runs where the model's parameters are (the caller moves blocks and tensors to the calibration device).
    All windows share one length, so the kwargs captured for the first (position embeddings, causal mask, ...) are
    valid for every window with batch size 1.
    """
    hidden, kwargs_seen = [], {}

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        hidden.append(hs.detach().float().cpu())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in windows:
            try:
                model(ids[None].to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in kwargs_seen.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return torch.cat(hidden), kwargs


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out
