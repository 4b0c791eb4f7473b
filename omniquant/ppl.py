"""Perplexity with non-overlapping windows (GPTQ / OmniQuant convention), the same for every engine.

    ppl = exp( sum_w nll_w * seqlen / (W * seqlen) ),  nll_w = mean next-token NLL inside window w

BOS rule (`window_bos`): an architecture that expects BOS first in every sequence (Gemma; `Adapter.bos_first`)
gets windows of BOS + (seqlen - 1) text tokens, so every text token is predicted (the first from BOS alone); the
others get plain text windows (the paper convention: no special tokens). Calibration windows follow the same rule.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from omniquant.errors import UserError


def window_bos(model_type: str | None, bos_token_id: int | None) -> int | None:
    """The token every window starts with for `model_type`, or None (see module doc)."""
    from omniquant.models.base import bos_first

    if not bos_first(model_type):
        return None
    if bos_token_id is None:
        raise UserError(f"{model_type} expects BOS first in every sequence, but its config has no bos_token_id")
    return int(bos_token_id)


def config_window_bos(config) -> int | None:
    """`window_bos` of an HF config (a multimodal one keeps the BOS id in its text config)."""
    bos = getattr(config, "bos_token_id", None)
    if bos is None and hasattr(config, "get_text_config"):
        bos = getattr(config.get_text_config(), "bos_token_id", None)
    return window_bos(config.model_type, bos)


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None
            ) -> torch.Tensor:
    """[W, seqlen] non-overlapping windows from the start of tokens; W = T // seqlen (capped at max_windows).
    With `bos`: each window is bos + the next seqlen - 1 tokens (W = T // (seqlen - 1))."""
    step = seqlen - 1 if bos is not None else seqlen
    n = tokens.numel() // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {step}")
    out = tokens[: n * step].reshape(n, step)
    return out if bos is None else torch.cat([torch.full((n, 1), bos, dtype=out.dtype), out], dim=1)


@torch.no_grad()
def window_nlls(logits_fn, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, desc="ppl",
                bos: int | None = None) -> list[float]:
    """Mean NLL per window; logits_fn(ids [1, L]) -> logits [1, L, V] (any engine); `bos` as in `windows`."""
    out = []
    for ids in tqdm(windows(tokens, seqlen, max_windows, bos), desc=desc, leave=False):
        logits = logits_fn(ids[None]).float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].to(logits.device), reduction="mean")
        out.append(float(nll))
    return out


def from_nlls(nlls: list[float]) -> float:
    """exp of the mean window NLL (every window has the same length)."""
    return math.exp(sum(nlls) / len(nlls))


def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> float:
    """Perplexity of an HF causal LM on `tokens` [T] with windows of `seqlen` (BOS first where the architecture
    expects it: `config_window_bos`)."""
    device = next(model.parameters()).device
    nlls = window_nlls(lambda ids: model(ids.to(device), use_cache=False).logits, tokens, seqlen, max_windows,
                       bos=config_window_bos(model.config))
    return from_nlls(nlls)
