"""Bytes on disk and effective bits per weight of a packed weights directory.

    linear bits/weight = 8 * (bytes of q_weight + q_scale + q_zero of the quantized linears) / (sum of N * K)
    overall bits/param = 8 * (bytes of all stored tensors) / (parameter count of the unquantized model)

Two yardsticks: the nominal `bits + 32 / group_size` (3.25 for w3g128asym) and the layout's own cost for these
exact shapes (int3 packs 10 codes per 32-bit word, 3.2 bits/code; a partial last group still stores a full
scale + zero). Measured bytes must equal the layout figure; the nominal ratio shows the layout's overhead.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlc_schemes.unpack import embedding_quantization, scheme_of
from mlc_schemes.weights_dir import CHAT_CONFIG, shard_files, tensor_records


def size_report(directory: str | Path) -> dict:
    """Sizes measured from the stored tensors' records (the shards themselves are not read: a 7B's would be
    3.5 GB of memory) and the files on disk, plus the scheme's theory for comparison."""
    directory = Path(directory)
    chat_config = json.loads((directory / CHAT_CONFIG).read_text())
    records, meta, _ = tensor_records(directory)
    scheme = scheme_of(chat_config)
    linears = chat_config["quantization_config"]["quantized_linears"]
    lin_weights = sum(n * k for n, k in linears.values())
    lin_bytes = sum(records[f"{name}.{s}"].nbytes for name in linears for s in ("q_weight", "q_scale", "q_zero")
                    if f"{name}.{s}" in records)
    nominal_bytes = lin_weights * scheme.nominal_bits_per_weight() / 8
    layout_bytes = sum(n * k * scheme.layout_bits_per_weight(k) / 8 for n, k in linears.values())
    shards = shard_files(directory)
    files = [p for p in directory.iterdir() if p.is_file()]
    emb = embedding_quantization(chat_config)
    return {
        "scheme": scheme.name,
        "embedding_scheme": emb[0].name if emb else None,
        "shards": len(shards),
        "shard_bytes": sum(p.stat().st_size for p in shards),
        "dir_bytes": sum(p.stat().st_size for p in files),
        "param_bytes": meta["ParamBytes"],
        "bits_per_param": meta["BitsPerParam"],
        "linear_weights": lin_weights,
        "linear_bytes": lin_bytes,
        "linear_bits_per_weight": 8 * lin_bytes / max(lin_weights, 1),
        "nominal_bits_per_weight": scheme.nominal_bits_per_weight(),
        "linear_vs_nominal": lin_bytes / nominal_bytes if nominal_bytes else float("nan"),
        "layout_bits_per_weight": 8 * layout_bytes / max(lin_weights, 1),
        "linear_vs_layout": lin_bytes / layout_bytes if layout_bytes else float("nan"),
    }
