"""Capture the inputs of decoder block 0 and the keyword arguments the model passes to each block; replay the
model's tail (final norm) on recorded outputs of its last block (`final_hidden`)."""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


class _StandIn(nn.Module):
    """Takes a decoder block's place in the model's ModuleList; unknown attributes are read from the wrapped block,
    which the model's loop may consult (e.g. Gemma 3's `attention_type`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_wrapped", block)  # not a submodule: its parameters stay out of this module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


class _Catcher(_StandIn):
    """Stands in for decoder block `index`: records its kwargs (first window only) and returns its input unchanged,
    so the model's own forward computes every block's kwargs (per-layer masks and RoPE tables, e.g. Gemma 3's
    sliding/global layers) without running a block."""

    def __init__(self, block: nn.Module, index: int, last: int, hidden, kwargs: list):
        super().__init__(block)
        self.index, self.last, self._hidden, self._kwargs = index, last, hidden, kwargs

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("capture: decoder blocks are expected to take everything but hidden_states by keyword")
        if self.index == 0:
            self._hidden(hidden_states.detach().float())
        if self._kwargs[self.index] is None:
            self._kwargs[self.index] = {k: v for k, v in kwargs.items()
                                        if k not in ("past_key_values", "past_key_value", "use_cache")}
        if self.index == self.last or self._kwargs[self.last] is not None:
            raise _Stop  # kwargs of every block are known: later windows only need block 0's input
        return hidden_states


def _to_float32(_module, _args, output):
    return output.float()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, into=None
                         ) -> tuple[torch.Tensor, list[dict]]:
    """Run the model's embedding part on each window [n, L]; returns (hidden states [n, L, H] fp32, per-block kwargs).

    kwargs[i] holds what the model passes to block i besides hidden_states (position embeddings, causal or
    sliding-window mask, ...). All windows share one length, so the kwargs captured on the first window are valid for
    every window with batch size 1. Blocks that get the same tensors share them (no copies). Runs where the model's
    input embedding is; the blocks themselves never run (they may be on the meta device). The embedding's output is
    widened to float32 before the model uses it, so a float16 / bfloat16 model computes its RoPE tables and masks
    exactly as the float32 one would. With `into` (a stream [n, L, H], see omniquant.streams) window j's hidden
    states are written to into[j:j+1] and `into` is returned (the caller moves tensors to the calibration device).
    """
    rows: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> None:
        if into is None:
            rows.append(h.cpu())
        else:
            into[len(rows):len(rows) + 1] = h
            rows.append(None)

    kwargs: list[dict | None] = [None] * len(blocks)
    originals = list(blocks)
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(_to_float32)
    for i, b in enumerate(originals):
        blocks[i] = _Catcher(b, i, len(blocks) - 1, keep, kwargs)
    try:
        for ids in windows:
            try:
                model(ids[None].to(embed.weight.device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
        for i, b in enumerate(originals):
            blocks[i] = b
    return (torch.cat(rows) if into is None else into), kwargs


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Replay(_StandIn):
    """Stands in for a decoder block while `final_hidden` runs the model: returns its input, or `recorded` where it
    is set (the last block: its recorded output for the running window)."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self.recorded = None

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.recorded is None else self.recorded.to(hidden_states)


@torch.no_grad()
def final_hidden(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, last_out) -> torch.Tensor:
    """The model's last hidden state (after its final norm and whatever else its base model applies after the
    blocks) float32 [n, L, H] on the CPU, when its last decoder block outputs last_out[j : j + 1] ([n, L, H], e.g.
    the block loop's fp stream) on window j of windows [n, L]. The model's own forward runs with every block
    replaced by a stand-in, so only the embedding and the tail are computed: the mirror of `capture_block_inputs`,
    and what `model.base_model(windows).last_hidden_state` gives when last_out are the float blocks' outputs."""
    originals, rows = list(blocks), []
    device = model.get_input_embeddings().weight.device
    for i, b in enumerate(originals):
        blocks[i] = _Replay(b)
    last = blocks[len(originals) - 1]
    try:
        for j in range(windows.shape[0]):
            last.recorded = last_out[j : j + 1]
            rows.append(model.base_model(windows[j : j + 1].to(device), use_cache=False).last_hidden_state.float().cpu())
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return torch.cat(rows)
