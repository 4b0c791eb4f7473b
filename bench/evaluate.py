"""Score every method's weights with the same perplexity code on the same held-out windows.

The base model is loaded once; for each method its dequantized linears (``weights.safetensors``) are copied in,
``omniquant.ppl.perplexity`` runs on the eval windows, and the original weights are put back. Weight-activation
settings (``act_bits`` < 16) also quantize the input of every decoder linear with the same quantizer for every
method: ``omniquant.quant.act.ActQuantizer`` (per-token dynamic asymmetric; with a method's offsets d, Q(x-d)+d).
"""

from __future__ import annotations

from pathlib import Path

import torch

from omniquant.ppl import perplexity


class Evaluator:
    """Holds the float base model [fp32] and the eval tokens [n_eval * seqlen]."""

    def __init__(self, model_dir: Path, eval_tokens: torch.Tensor, seqlen: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.model_dir = Path(model_dir).resolve()
        self.tokens, self.seqlen = eval_tokens, seqlen
        self._params = dict(self.model.named_parameters())

    def perplexity(self) -> float:
        return perplexity(self.model, self.tokens, self.seqlen)

    @torch.no_grad()
    def window_loss(self, ids: torch.Tensor) -> float:
        logits = self.model(ids[None], use_cache=False).logits[0].float()
        return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]))

    @torch.no_grad()
    def perplexity_with(self, weights_file: Path, act_bits: int = 16, linears: list[str] | None = None,
                        offsets_file: Path | None = None) -> float:
        """Perplexity with the tensors of ``weights_file`` ({param name: tensor}) swapped in, then restored; with
        ``act_bits`` < 16 the inputs of ``linears`` are fake-quantized per token (offsets from ``offsets_file``)."""
        from safetensors.torch import load_file

        from omniquant.quant.act import ActQuantizer, attach_input_quantizer

        new = load_file(str(weights_file))
        offsets = load_file(str(offsets_file)) if offsets_file is not None and offsets_file.exists() else {}
        modules = dict(self.model.named_modules())
        quantizers = []
        for name in (linears or []) if act_bits < 16 else []:
            q = ActQuantizer(act_bits)
            q.offset = offsets.get(name)
            attach_input_quantizer(modules[name], q)
            quantizers.append(q)
        unknown = sorted(set(new) - set(self._params))
        if unknown:
            raise ValueError(f"{weights_file}: tensors not in the model: {unknown[:3]}")
        saved = {}
        try:
            for name, t in new.items():
                p = self._params[name]
                if p.shape != t.shape:
                    raise ValueError(f"{weights_file}: {name} has shape {tuple(t.shape)}, model {tuple(p.shape)}")
                saved[name] = p.detach().clone()
                p.copy_(t.to(p.dtype))
            return self.perplexity()
        finally:
            for name, t in saved.items():
                self._params[name].copy_(t)
            for q in quantizers:
                q.enabled = False  # the hook stays, disabled: the next weight-activation run attaches new ones
