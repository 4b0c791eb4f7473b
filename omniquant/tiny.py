"""Write a tiny random-init causal LM (Llama, Qwen2, Mistral, OPT, Qwen3, Gemma 3) with a real BPE tokenizer.

The sizes are deliberately awkward (hidden 192 and intermediate 320 are multiples of neither 128 nor 10) so the
group-padding and packing rules are exercised. The tokenizer is a byte-level BPE trained offline on Austen text.
Qwen3 and Gemma 3 models carry what distinguishes them at a size that shows it: a sliding window of 16 tokens
(some layers local, some global), head_dim independent of hidden / heads, tied embeddings, norm weights away from
their init (Gemma's (1 + w)); Gemma's tokenizer puts BOS first and has a Gemma-style chat template. `gemma3` is the
multimodal Gemma3ForConditionalGeneration with the same text model and a one-layer vision tower.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omniquant.paths import CALIB_BOOKS, austen_dir

ARCHS = ("llama", "qwen2", "mistral", "opt", "qwen3", "gemma3_text", "gemma3")
VOCAB = 512
SLIDING_WINDOW = 16  # tokens seen by a local (sliding-window) layer, including the current one
# Gemma's turn markup (the template is the shape of Gemma 3's: BOS once, <start_of_turn>role ... <end_of_turn>)
GEMMA_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _train_tokenizer(vocab_size: int = VOCAB, gemma: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    book = austen_dir() / CALIB_BOOKS[0]
    text = book.read_text(encoding="utf-8")[:300_000] if book.exists() else _FALLBACK_TEXT * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"] + (GEMMA_TURN_TOKENS if gemma else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    if not gemma:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # Gemma: the tokenizer adds BOS (add_bos_token), a turn ends with <end_of_turn>
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<end_of_turn>", pad_token="<pad>",
                                  add_bos_token=True)
    out.chat_template = GEMMA_CHAT_TEMPLATE
    return out


def _config(arch: str, vocab_size: int):
    import transformers as tf

    common = {"vocab_size": vocab_size, "max_position_embeddings": 1024,
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch == "qwen3":  # layer 0 global, layer 1 local (Qwen's max_window_layers rule)
        return tf.Qwen3Config(
            hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            head_dim=48, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1,
            **common,
        )
    if arch in ("gemma3_text", "gemma3"):
        text = tf.Gemma3TextConfig(
            hidden_size=192, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, query_pre_attn_scalar=24, rms_norm_eps=1e-6, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}},
            final_logit_softcapping=30.0 if arch == "gemma3_text" else None, tie_word_embeddings=True,
            **{**common, "eos_token_id": 4},  # <end_of_turn>: special tokens are <s> </s> <pad> + GEMMA_TURN_TOKENS
        )
        if arch == "gemma3_text":
            return text
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=vocab_size + 1, boi_token_index=vocab_size + 2,
                               eoi_token_index=vocab_size + 3)
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=192, word_embed_proj_dim=192, ffn_dim=320, num_hidden_layers=2, num_attention_heads=6,
            do_layer_norm_before=True, enable_bias=True, **common,
        )
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    extra = {"sliding_window": SLIDING_WINDOW} if arch == "mistral" else {}  # Mistral: every layer local
    return cls(
        hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, **common, **extra,
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
    tokenizer = _train_tokenizer(gemma=arch.startswith("gemma"))
    config = _config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights (std 0.08, not 0.02) make the linears, hence their quantization error, matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif arch in ("qwen3", "gemma3_text", "gemma3") and name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)  # norm weights away from their init (Gemma scales by 1 + w)
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
