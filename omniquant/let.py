"""Learnable Equivalent Transformation (LET, OmniQuant §3.3): every site, its initialisation, application and fusion.

Notation per block: a producer P feeds consumer linears W_j (weight [N_j, K], bias b_j). LET learns a per-channel
scale s [K] (> 0) and, in weight-activation runs, a shift δ [K]:

    norm site (norm -> q,k,v ; norm -> gate,up / fc1):   norm weight γ -> γ / s,  norm bias β -> β / s,
                                                          W_j -> W_j · diag(s)
    v -> o site (v_proj -> attention -> o_proj):          W_v -> diag(1/s) · W_v,  b_v -> b_v / s,
                                                          W_o -> W_o · diag(rep(s))
    q/k scaling:                                          W_q -> diag(1/rep(t)) · W_q,  W_k -> diag(t) · W_k  (biases too)
    q/k scaling, per-head q/k norms (Qwen3, Gemma 3):     γ_qnorm -> γ_qnorm / t,  γ_knorm -> γ_knorm · t,  t [d]

Norms whose weight acts as (w + c) (Gemma: c = 1, `Adapter.norm_offset`) fold a divisor s as w -> (w + c)/s - c.

Each is exact in full precision: the consumer sees x/s and multiplies by s again. `rep` repeats a KV-head vector
for the query heads of its group (GQA: query head h reads KV head h // (n_heads / n_kv_heads), HF `repeat_kv`), so
the v -> o scale lives on the n_kv·d channels of v and is repeated onto the n_heads·d input columns of o. Attention
weights act per head on the token axis, so diag(1/s) on v commutes with them.

Shift. The reference computes the consumer input (x - δ)/s, quantizes it, and adds W·δ back through the bias;
with RMSNorm that needs a norm bias (which HF Llama lacks) and with Llama's bias-free v/o it needs new biases. Here
the shift is carried by the consumer's activation quantizer instead, as an offset d = δ/s:  x_q = Q(x/s - d) + d.
That is the same quantized computation (W'·(Q(x/s - d) + d) = W'·Q((x - δ)/s) + W·δ), and in full precision it is
the identity, so the fake-quant checkpoint keeps the plain architecture (no new biases, plain transformers loads an
exactly equivalent model) and the offsets go to the sidecar `act_params.safetensors` (see docs/formats.md).

q/k scaling under RoPE. RoPE rotates channel i of a head together with channel i + d/2 (HF `rotate_half`), so
R(q/t)·R(k·t) = q·k holds only when t_i = t_{i+d/2}: with `rope` we learn d/2 values per KV head and duplicate them.
Without RoPE (OPT) every channel is free. Where q and k pass a per-head RMSNorm before RoPE, a scale on the rows
of q_proj / k_proj would not survive the norm (RMSNorm(q/t) != RMSNorm(q)/t); the norms' weights, shared by all
heads, take it instead, so t has d/2 values duplicated onto the rotary pairs and is the same for every head.

Initialisation (SmoothQuant): s = max|X|^α / max|W|^(1-α) per channel (max|W| over all consumers' rows; for v -> o
both are reduced over each query group onto the KV channel), t = 1, δ = act shift (LayerNorm models) or 0
(RMSNorm models, as in the reference). Scales are clamped to ≥ 1e-5 with a straight-through gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from omniquant.models.base import Adapter

SCALE_FLOOR = 1e-5


def clamp_ste(s: torch.Tensor, floor: float = SCALE_FLOOR) -> torch.Tensor:
    """max(s, floor) in the forward pass, identity gradient (a scale stuck at the floor can still move)."""
    return s + (s.clamp(min=floor) - s).detach()


def smooth_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant init act_max^α / w_max^(1-α), both [K] ≥ 0; float32 [K] ≥ 1e-5."""
    s = act_max.float().clamp(min=SCALE_FLOOR).pow(alpha) / w_max.float().clamp(min=SCALE_FLOOR).pow(1 - alpha)
    return s.clamp(min=SCALE_FLOOR)


class AttnShape:
    """Head layout: n_heads query heads, n_kv KV heads, head_dim d (n_heads % n_kv == 0)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int):
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads is not a multiple of {n_kv} KV heads")
        self.n_heads, self.n_kv, self.d = n_heads, n_kv, head_dim
        self.n_rep = n_heads // n_kv

    @classmethod
    def from_config(cls, config) -> AttnShape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(n_heads, n_kv, d)

    def repeat_kv(self, v: torch.Tensor) -> torch.Tensor:
        """[n_kv·d] -> [n_heads·d]: KV head j's values for query heads j·n_rep .. (j+1)·n_rep - 1."""
        return v.reshape(self.n_kv, self.d).repeat_interleave(self.n_rep, dim=0).reshape(-1)

    def reduce_group_max(self, x: torch.Tensor) -> torch.Tensor:
        """[n_heads·d] -> [n_kv·d]: max over the query heads that share a KV head."""
        return x.reshape(self.n_kv, self.n_rep, self.d).amax(1).reshape(-1)


class BlockLET(nn.Module):
    """LET parameters of one decoder block and the code that applies (during calibration) and fuses them.

    block: the decoder block whose linears were replaced by QuantLinears `qlinears` (name -> module).
    stats: {"<linear rel name>": (act_scales [K], act_shifts [K])} of this block (from act_stats) or None (init 1/0).
    use_shift: learn shifts (weight-activation runs only; with abits 16 a shift changes nothing).
    """

    def __init__(self, block: nn.Module, qlinears: dict, adapter: Adapter, attn: AttnShape, alpha: float,
                 stats: dict | None, use_shift: bool):
        super().__init__()
        # plain dicts/lists: not registered as submodules, so the block's parameter names stay unique
        self._refs = {"block": block}
        self._q, self._hooks = qlinears, []
        self._attn, self._rope, self._norm_offset = attn, adapter.rope, adapter.norm_offset
        self._sites = [s for s in adapter.let_sites if all(n in qlinears for n in s.linears)]
        self._qk = adapter.qk if adapter.qk and all(n in qlinears for n in adapter.qk) else None
        self._qk_norms = adapter.qk_norms
        for site in self._sites:
            lins = [qlinears[n].linear for n in site.linears]
            if site.kind == "norm":
                w_max = torch.cat([l.weight.detach() for l in lins]).abs().amax(0)
                act = stats[site.linears[0]] if stats else None
                scale = smooth_scale(act[0], w_max, alpha) if act else torch.ones_like(w_max)
                norm = block.get_submodule(site.prev)
                layer_norm_like = getattr(norm, "bias", None) is not None
                shift = act[1].float().clone() if (act and layer_norm_like) else torch.zeros_like(scale)
            elif site.kind == "v_o":
                w_max = attn.reduce_group_max(lins[0].weight.detach().abs().amax(0))
                act = stats[site.linears[0]] if stats else None
                a_max = attn.reduce_group_max(act[0]) if act else None
                scale = smooth_scale(a_max, w_max, alpha) if act else torch.ones_like(w_max)
                prev_bias = qlinears[site.prev].linear.bias is not None  # OPT-style v_proj with bias
                shift = act[1].float().clone() if (act and prev_bias) else torch.zeros(lins[0].in_features)
            else:
                raise ValueError(f"unknown LET site kind {site.kind!r}")
            self.register_parameter(f"{site.name}_scale", nn.Parameter(scale.float()))
            if use_shift:
                self.register_parameter(f"{site.name}_shift", nn.Parameter(shift.float()))
        if self._qk is not None:
            k_out = qlinears[self._qk[1]].linear.out_features
            n = k_out // 2 if self._rope else k_out
            self.qk_scale = nn.Parameter(torch.ones(n))
        elif self._qk_norms is not None:
            self.qk_scale = nn.Parameter(torch.ones(attn.d // 2 if self._rope else attn.d))

    # ---- shared math -------------------------------------------------------------------------------------------
    def _qk_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_q [n_heads·d], t_k [n_kv·d]): k rows × t_k, q rows ÷ t_q; pairs (i, i+d/2) tied under RoPE.
        With q/k norms: (t [d], t [d]), one vector for every head."""
        t = clamp_ste(self.qk_scale)
        if self._rope:
            half = t.reshape(-1, self._attn.d // 2)
            t = torch.cat([half, half], dim=1).reshape(-1)
        return (t, t) if self._qk_norms is not None else (self._attn.repeat_kv(t), t)

    def _transforms(self):
        """{linear: (column scale [K] | None, row scale [N] | None, input offset [K] | None)}, norm divisors."""
        col, row, offset, norm_div = {}, {}, {}, {}
        dt = next(iter(self._q.values())).linear.weight.dtype  # compute in the weights' precision (float64 tests)
        for site in self._sites:
            s = clamp_ste(getattr(self, f"{site.name}_scale")).to(dt)
            shift = getattr(self, f"{site.name}_shift", None)
            shift = shift.to(dt) if shift is not None else None
            if site.kind == "norm":
                norm_div[site.prev] = s
                for n in site.linears:
                    col[n] = s
                    if shift is not None:
                        offset[n] = shift / s
            else:  # v_o
                row[site.prev] = 1.0 / s
                s_o = self._attn.repeat_kv(s)
                for n in site.linears:
                    col[n] = s_o
                    if shift is not None:
                        offset[n] = shift / s_o
        if self._qk is not None:
            t_q, t_k = (t.to(dt) for t in self._qk_vectors())
            qn, kn = self._qk
            row[qn] = row[qn] / t_q if qn in row else 1.0 / t_q
            row[kn] = row[kn] * t_k if kn in row else t_k
        elif self._qk_norms is not None:
            t, _ = (t.to(dt) for t in self._qk_vectors())
            norm_div[self._qk_norms[0]] = t
            norm_div[self._qk_norms[1]] = 1.0 / t
        return col, row, offset, norm_div

    def _set(self, detach: bool) -> dict:
        col, row, offset, norm_div = self._transforms()
        for name, q in self._q.items():
            w, b = q.linear.weight, q.linear.bias
            c, r = col.get(name), row.get(name)
            if c is None and r is None:
                q.temp_weight = q.temp_bias = None
            else:
                w = w * c[None, :].to(w.dtype) if c is not None else w
                w = w * r[:, None].to(w.dtype) if r is not None else w
                q.temp_weight = w.detach() if detach else w
                if b is not None and r is not None:
                    b = b * r.to(b.dtype)
                    q.temp_bias = b.detach() if detach else b
                else:
                    q.temp_bias = None
            if name in offset and q.act_quantizer is not None:
                d = offset[name]
                q.act_quantizer.offset = d.detach().clone() if detach else d
        return norm_div

    # ---- the two calls the block loop makes ---------------------------------------------------------------------
    def apply_temporary(self) -> None:
        """Set temp weights/biases/offsets from the current parameters; norms divide their output by s (hooks)."""
        norm_div = self._set(detach=False)
        if not self._hooks:
            for prev in norm_div:
                norm = self._refs["block"].get_submodule(prev)
                self._hooks.append(norm.register_forward_hook(self._make_norm_hook(prev)))
        self._norm_div = norm_div

    def _make_norm_hook(self, prev: str):
        def hook(_m, _args, out):
            return out / self._norm_div[prev].to(out.dtype)
        return hook

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold for good: norms get γ/s (β/s; (w + c)/s - c with a norm offset c), QuantLinears' temp weights/biases
        hold the transformed ones."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        norm_div = self._set(detach=True)
        c = self._norm_offset
        for prev, s in norm_div.items():
            norm = self._refs["block"].get_submodule(prev)
            w = norm.weight.data
            w.copy_((w + c) / s.to(w.dtype) - c if c else w / s.to(w.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.data.div_(s.to(norm.bias.dtype))


def make_block_let(block, qlinears, adapter: Adapter, model_config, alpha: float, block_stats, use_shift: bool):
    """BlockLET for `block`, or None when the adapter declares no LET sites."""
    if not adapter.let_sites:
        return None
    return BlockLET(block, qlinears, adapter, AttnShape.from_config(model_config), alpha, block_stats, use_shift)
