"""Load an HF or fake-quant checkpoint for evaluation; weight-activation runs get their activation quantizers back."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_quantized(path: str | Path, dtype=torch.float32):
    """transformers model from `path`; if its quant_config.json says abits/kv_bits < 16, re-attach act quantizers."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    qc = path / "quant_config.json"
    if qc.exists():
        cfg = json.loads(qc.read_text())
        if cfg.get("abits", 16) < 16 or cfg.get("kv_bits", 16) < 16:
            from omniquant.weight_act import attach_act_quantizers

            attach_act_quantizers(model, cfg, path)
    return model
