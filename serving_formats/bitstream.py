"""Dense LSB-first bit streams in int32 words: the packing that compressed-tensors (>= 0.18) and GPTQ share.

Along the packed axis, element `i` occupies bits `[i*b, (i+1)*b)` of the stream and bit `j` of the stream is bit
`j % 32` of word `j // 32`; a field may straddle two words (3, 5, 6, 7 bits: 32 elements fill exactly `b` words).
For 1, 2, 4 and 8 bits this is the plain `32 // b` fields per word. The stream is padded with zeros to whole words:
`ceil(L * b / 32)` words for `L` elements.
"""

from __future__ import annotations

import numpy as np
import torch

ROWS_PER_CHUNK = 1024  # bounds the uint64 work arrays to ~8 bytes x 1024 x L at a time


def _pack_rows(a: np.ndarray, bits: int) -> np.ndarray:
    """uint64 [R, L] -> uint32 [R, ceil(L*bits/32)], each row one stream."""
    rows, length = a.shape
    blocks = -(-length // 32)
    padded = np.zeros((rows, blocks * 32), dtype=np.uint64)
    padded[:, :length] = a
    padded = padded.reshape(rows, blocks, 32)
    # Each block of 32 fields is bits * 32 bits long: word w of the block holds stream bits [32w, 32w + 32).
    words = np.zeros((rows, blocks, bits), dtype=np.uint64)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[:, :, word] |= padded[:, :, i] << np.uint64(offset)
        if offset + bits > 32:  # the high part spills into the next word
            words[:, :, word + 1] |= padded[:, :, i] >> np.uint64(32 - offset)
    words &= np.uint64(0xFFFFFFFF)
    return words.reshape(rows, blocks * bits)[:, : -(-length * bits // 32)].astype(np.uint32)


def pack_stream(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned integers `values` (each in `[0, 2^bits - 1]`), 2-D, packed along `dim` -> int32 words.

    dim 1: [R, L] -> [R, ceil(L*b/32)]; dim 0: [L, C] -> [ceil(L*b/32), C]. The int32 holds the word's bit pattern.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if values.numel() and (values.min() < 0 or values.max() >= 2 ** bits):
        raise ValueError(f"values out of [0, {2 ** bits - 1}] for {bits}-bit packing")
    a = values.numpy()
    if dim == 0:
        a = a.T
    out = np.empty((a.shape[0], -(-a.shape[1] * bits // 32)), dtype=np.uint32)
    for r in range(0, a.shape[0], ROWS_PER_CHUNK):
        out[r:r + ROWS_PER_CHUNK] = _pack_rows(a[r:r + ROWS_PER_CHUNK].astype(np.uint64), bits)
    out = out.view(np.int32)
    return torch.from_numpy(np.ascontiguousarray(out.T if dim == 0 else out))
