"""Text -> token ids, and random calibration windows.

A source is a local text file, a folder of .txt files (sorted, joined by blank lines), several of those separated
by commas, or a named dataset (`wikitext2`, `c4`, `ptb`) loaded through `datasets` (needs the dataset in the local
HF cache: nothing is downloaded when HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from omniquant.errors import UserError

# name -> (split for calibration, split for evaluation, loader)
NAMED = {
    "wikitext2": ("train", "test", lambda split: _hf("wikitext", "wikitext-2-raw-v1", split, "text", "\n\n")),
    "ptb": ("train", "test", lambda split: _hf("ptb_text_only", "penn_treebank", split, "sentence", " ")),
    "c4": ("train", "validation", lambda split: _hf(
        "allenai/c4", None, split, "text", " ",
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"},
    )),
}


def _hf(path, name, split, column, sep, **kw) -> str:
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"named dataset needs the `datasets` package ({e}); or pass a local text file") from e
    try:
        ds = datasets.load_dataset(path, name, split=split, **kw)
    except Exception as e:  # offline, not cached, ...
        raise UserError(f"could not load dataset {path!r} split {split!r}: {e}") from e
    return sep.join(ds[column])


def read_text(source: str | Path, split: str = "calib") -> str:
    """Raw text of `source` (see module doc). `split` picks calib/eval split for named datasets."""
    source = str(source)
    if source in NAMED:
        calib_split, eval_split, loader = NAMED[source]
        return loader(calib_split if split == "calib" else eval_split)
    parts = []
    for item in source.split(","):
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("*.txt"))
            if not files:
                raise UserError(f"no .txt files in folder {p}")
            parts += [f.read_text(encoding="utf-8") for f in files]
        elif p.is_file():
            parts.append(p.read_text(encoding="utf-8"))
        else:
            raise UserError(f"text source {item!r} is neither a file, a folder nor one of {', '.join(NAMED)}")
    return "\n\n".join(parts)


def load_tokens(tokenizer, source: str | Path, split: str = "calib") -> torch.Tensor:
    """LongTensor [T] of the whole source tokenized at once (no special tokens between documents)."""
    text = read_text(source, split)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise UserError(f"text source {source} is empty")
    return ids


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None
                   ) -> torch.Tensor:
    """LongTensor [nsamples, seqlen] of random windows (start uniform in [0, T - seqlen]), seeded. With `bos`
    (models that expect BOS first, omniquant.ppl.window_bos) each window is bos + seqlen - 1 text tokens."""
    if tokens.numel() < seqlen + 1:
        raise UserError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of seqlen {seqlen} (+1); "
            "use more text or a smaller --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    out = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    if bos is not None:
        out = torch.cat([torch.full((nsamples, 1), bos, dtype=out.dtype), out[:, : seqlen - 1]], dim=1)
    return out


def split_windows(windows: torch.Tensor, pieces: int, bos: int | None = None) -> torch.Tensor:
    """LongTensor [n * pieces, L / pieces]: each window [n, L] cut into `pieces` consecutive pieces (window 0's
    first). With `bos` every piece starts with it, as the windows do: a later piece's first text token gives way."""
    n, length = windows.shape
    if length % pieces:
        raise UserError(f"--window-split {pieces} does not divide --seqlen {length}")
    out = windows.reshape(n * pieces, length // pieces).clone()
    if bos is not None:
        out[:, 0] = bos
    return out
