"""A GGUF of Llama-2-7B's shapes (or its first --layers blocks) with random quantized weights, for llama.cpp.

    python -m bench.gguf_random --output FILE.gguf --qtype Q4_0|Q4_1 [--layers 32]

Decode speed depends on shapes and formats only, so the blocks' bytes are random (a tiled random block) with a
fixed block scale (and min); the linears are `--qtype`, token_embd / output Q8_0 (as our 8-bit embedding), norms
float32. The vocabulary is a placeholder SentencePiece list (<unk>, <s>, </s>, the 256 byte tokens, then filler
pieces): the benchmark feeds token ids, nothing is tokenized. Written tensor by tensor with the `gguf` package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

H, I, HEADS, KV, VOCAB, CONTEXT = 4096, 11008, 32, 32, 32000, 4096
# ggml block layouts: (weights per block, bytes per block, fp16 header values)
BLOCKS = {"Q4_0": (32, 18, (0.002,)), "Q4_1": (32, 20, (0.002, -0.016)), "Q8_0": (32, 34, (0.0002,))}


def _quantized(rows: int, cols: int, qtype: str, base: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols / 32 * bytes per block]: random payload, fixed fp16 scale (and min) in each block header."""
    per, nbytes, header = BLOCKS[qtype]
    data = np.resize(base, rows * (cols // per) * nbytes).reshape(-1, nbytes)
    data[:, : 2 * len(header)] = np.frombuffer(np.array(header, np.float16).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def write_gguf(path: Path, qtype: str, layers: int = 32, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    d = H // HEADS
    tensors: list[tuple[str, tuple[int, int] | int, str]] = [("token_embd.weight", (VOCAB, H), "Q8_0")]
    for b in range(layers):
        p = f"blk.{b}."
        tensors += [(p + "attn_norm.weight", H, "F32"), (p + "ffn_norm.weight", H, "F32"),
                    (p + "attn_q.weight", (HEADS * d, H), qtype), (p + "attn_k.weight", (KV * d, H), qtype),
                    (p + "attn_v.weight", (KV * d, H), qtype), (p + "attn_output.weight", (H, HEADS * d), qtype),
                    (p + "ffn_gate.weight", (I, H), qtype), (p + "ffn_up.weight", (I, H), qtype),
                    (p + "ffn_down.weight", (H, I), qtype)]
    tensors += [("output_norm.weight", H, "F32"), ("output.weight", (VOCAB, H), "Q8_0")]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random llama2-7b shapes ({layers} layers, {qtype})")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(H)
    w.add_block_count(layers)
    w.add_feed_forward_length(I)
    w.add_rope_dimension_count(d)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁t{k}" for k in range(VOCAB - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, shape, kind in tensors:
        if kind == "F32":
            w.add_tensor_info(name, (shape,), np.dtype(np.float32), shape * 4)
        else:
            rows, cols = shape
            per, nbytes, _ = BLOCKS[kind]
            w.add_tensor_info(name, (rows, cols // per * nbytes), np.dtype(np.uint8), rows * cols // per * nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, kind in tensors:
        w.write_tensor_data(np.ones(shape, np.float32) if kind == "F32" else _quantized(*shape, kind, base))
    w.close()
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--qtype", choices=("Q4_0", "Q4_1"), default="Q4_0")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    tmp = args.output.with_name(args.output.name + ".tmp")
    write_gguf(tmp, args.qtype, args.layers)
    tmp.rename(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
