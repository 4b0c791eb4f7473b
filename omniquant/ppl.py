"""Perplexity with non-overlapping windows (GPTQ / OmniQuant convention).

    ppl = exp( sum_w nll_w * seqlen / (W * seqlen) ),  nll_w = mean next-token NLL inside window w
"""

from __future__ import annotations


import math

import torch
from tqdm import tqdm


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[W, seqlen] non-overlapping windows from the start of tokens; W = T // seqlen (capped at max_windows)."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def window_nlls(logits_fn, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, desc="ppl") -> list[float]:
    """Mean NLL per window; logits_fn(ids [1, L]) -> logits [1, L, V] (any engine)."""
    out = []
    for ids in tqdm(windows(tokens, seqlen, max_windows), desc=desc, leave=False):
        logits = logits_fn(ids[None]).float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].to(logits.device), reduction="mean")
        out.append(float(nll))
    return out


def from_nlls(nlls: list[float]) -> float:
    """exp of the mean window NLL (every window has the same length)."""
    return math.exp(sum(nlls) / len(nlls))


def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> float:
    """Perplexity of an HF causal LM on `tokens` [T] with windows of `seqlen`."""
    device = next(model.parameters()).device
    nlls = window_nlls(lambda ids: model(ids.to(device), use_cache=False).logits, tokens, seqlen, max_windows)
    return from_nlls(nlls)
