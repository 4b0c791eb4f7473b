"""The shared token windows of a benchmark run: every method calibrates on the same windows and every result is
scored on the same held-out windows.

    calib: LongTensor [n_calib, calib_seqlen]  random windows (seeded) of sensesensibility + northangerabbey
    eval:  LongTensor [n_eval * eval_seqlen]   the first n_eval non-overlapping windows of prideprejudice + persuasion
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from omniquant.data import load_tokens, sample_windows
from omniquant.errors import UserError
from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir


def book_source(books) -> str:
    return ",".join(str(austen_dir() / b) for b in books)


def prepare_windows(tokenizer, out: Path, *, n_calib: int, calib_seqlen: int, n_eval: int, eval_seqlen: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Tokenize, cut and save the windows to ``out`` (safetensors, atomic); returns {"calib", "eval"}."""
    from safetensors.torch import save_file

    calib = sample_windows(load_tokens(tokenizer, book_source(CALIB_BOOKS)), n_calib, calib_seqlen, seed)
    eval_tokens = load_tokens(tokenizer, book_source(EVAL_BOOKS), split="eval")
    need = n_eval * eval_seqlen
    if eval_tokens.numel() < need:
        raise UserError(f"evaluation text has {eval_tokens.numel()} tokens, fewer than {n_eval} x {eval_seqlen}")
    tensors = {"calib": calib.contiguous(), "eval": eval_tokens[:need].contiguous()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"settings": json.dumps({
        "calib_books": CALIB_BOOKS, "eval_books": EVAL_BOOKS, "n_calib": n_calib, "calib_seqlen": calib_seqlen,
        "n_eval": n_eval, "eval_seqlen": eval_seqlen, "seed": seed})})
    os.replace(tmp, out)
    return tensors
