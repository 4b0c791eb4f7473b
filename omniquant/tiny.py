"""Write a tiny random-init causal LM (Llama, Qwen2, Mistral or OPT) with a real BPE tokenizer.

The sizes are deliberately awkward (hidden 192 and intermediate 320 are multiples of neither 128 nor 10) so the
group-padding and packing rules are exercised. The tokenizer is a byte-level BPE trained offline on Austen text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omniquant.paths import CALIB_BOOKS, austen_dir

ARCHS = ("llama", "qwen2", "mistral", "opt")
VOCAB = 512


def _train_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    book = austen_dir() / CALIB_BOOKS[0]
    text = book.read_text(encoding="utf-8")[:300_000] if book.exists() else _FALLBACK_TEXT * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _config(arch: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=192, word_embed_proj_dim=192, ffn_dim=320, num_hidden_layers=2, num_attention_heads=6,
            do_layer_norm_before=True, enable_bias=True, **common,
        )
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(
        hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, **common,
    )


def _train(model, tokenizer, steps: int, seed: int, seqlen: int = 64, batch: int = 8) -> None:
    """A few AdamW steps of next-token training on the calibration books, so perplexity means something."""
    import torch
    from tqdm import tqdm

    from omniquant.data import load_tokens, sample_windows

    books = ",".join(str(austen_dir() / b) for b in CALIB_BOOKS)
    tokens = load_tokens(tokenizer, books)
    data = sample_windows(tokens, steps * batch, seqlen, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in (bar := tqdm(range(steps), desc="training tiny model", leave=False)):
        loss = model(data[step * batch : (step + 1) * batch], labels=data[step * batch : (step + 1) * batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def make_tiny(path: str | Path, arch: str = "llama", seed: int = 0, train_steps: int = 0) -> Path:
    """Save a tiny `arch` model (float32) + tokenizer to `path`; random init, then `train_steps` of training."""
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer()
    config = _config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights (std 0.08, not 0.02) make the linears, hence their quantization error, matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    if train_steps:
        _train(model, tokenizer, train_steps, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="directory to write the checkpoint to")
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="train this many steps on the Austen calibration books (a real, if weak, language model)")


def run(args: argparse.Namespace) -> int:
    out = make_tiny(args.output, args.arch, args.seed, args.train_steps)
    print(f"wrote tiny {args.arch} model to {out}")
    return 0
