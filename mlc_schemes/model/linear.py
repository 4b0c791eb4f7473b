"""Linear layers of the deployed model, `relax.frontend.nn` modules with HF parameter names.

`QuantLinear` holds the packed tensors of docs/formats.md §2 (`q_weight` uint32 [N, ceil(K/epw)], `q_scale`
float16 [N, G], `q_zero` float16 [N, G] for asymmetric kinds; on CPU, quantized linears hold them row-interleaved,
`packing.interleave_rows`, made by the engine at load: `param_interleave` in the library metadata); its bit width,
group width and zero handling come from the scheme (`mlc_schemes.schemes`), never from constants. `DenseLinear`
holds a plain `weight` [N, K]. Both call the kernels of `mlc_schemes.model.kernels` (float32 accumulation) and add
an optional bias.
"""

from __future__ import annotations

import dataclasses

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from mlc_schemes.model.isa import current_int8_dot, current_isa
from mlc_schemes.model.kernels import (
    QuantSpec,
    cpu_matmul_nt,
    interleave_for,
    te_dequant,
    te_matmul_nt,
)


def quant_spec_for(scheme, in_features: int) -> QuantSpec:
    """The kernel view of a scheme (`bits`, `group_size`, `fixed_zero`) for a linear with K = in_features."""
    gw = in_features if scheme.group_size == -1 else scheme.group_size
    return QuantSpec(bits=scheme.bits, group_width=gw, fixed_zero=scheme.fixed_zero)


def matmul_nt(x: nn.Tensor, weights: list[nn.Tensor], n: int, quant: QuantSpec | None, out_dtype: str,
              backend: str) -> nn.Tensor:
    """`x[..., K] @ W[N, K]^T -> [..., N]` with the backend's kernel; `weights` as in `kernels.cpu_matmul_nt`."""
    k = x.shape[-1]
    lead = list(x.shape[:-1])
    x2 = op.reshape(x, (-1, k))
    if backend == "cpu":
        func = cpu_matmul_nt(n, k, x2.dtype, out_dtype, quant, w_dtype=weights[0].dtype)
        y = op.tensor_ir_op(func, "matmul_nt", [x2, *weights], out=nn.Tensor.placeholder((x2.shape[0], n), out_dtype))
    else:  # TE compute; dlight schedules it (GEMV rule for decode M = 1, matmul rule for prefill)
        y = op.tensor_expr_op(lambda xx, *ws: te_matmul_nt(xx, ws, n, k, out_dtype, quant), "matmul_nt",
                              [x2, *weights])
    return op.reshape(y, (*lead, n))


class _LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, backend: str):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.backend = dtype, backend
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def _weights(self) -> list[nn.Tensor]:
        raise NotImplementedError

    def _quant(self) -> QuantSpec | None:
        raise NotImplementedError

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """x [..., K] (model dtype) -> [..., N] (model dtype)."""
        y = matmul_nt(x, self._weights(), self.out_features, self._quant(), self.dtype, self.backend)
        return y + self.bias if self.bias is not None else y


class _PackedWeight:
    """Mixin: packed parameters of a [rows, cols] weight, `q_weight` uint32 [rows, ceil(cols/epw)], `q_scale`
    float16 [rows, G] and `q_zero` float16 [rows, G] when the scheme stores zeros."""

    def _init_packed(self, rows: int, cols: int, scheme, interleave: bool = False) -> None:
        """interleave: CPU linears take the row-interleaved layout where `kernels.interleave_for` gives one for
        the ISA being built (`isa.current_isa()`, `current_int8_dot()`): [rows/IL, words, IL], [rows/IL, G, IL],
        made at load."""
        spec = quant_spec_for(scheme, cols)
        il = interleave_for(spec, rows, cols, current_isa(), current_int8_dot()) if interleave else 0
        self.spec = dataclasses.replace(spec, interleave=il)
        wshape, sshape = self.spec.shapes(rows, cols)
        self.q_weight = nn.Parameter(wshape, "uint32")
        self.q_scale = nn.Parameter(sshape, "float16")
        self.q_zero = nn.Parameter(sshape, "float16") if spec.fixed_zero is None else None

    def _weights(self) -> list[nn.Tensor]:
        return [self.q_weight, self.q_scale] + ([self.q_zero] if self.q_zero is not None else [])


class QuantLinear(_PackedWeight, _LinearBase):
    """Packed quantized linear; parameters `q_weight`, `q_scale`, and `q_zero` when the scheme stores zeros."""

    def __init__(self, in_features, out_features, scheme, bias=False, dtype="float16", backend="cpu"):
        super().__init__(in_features, out_features, bias, dtype, backend)
        self._init_packed(out_features, in_features, scheme, interleave=backend == "cpu")

    def _quant(self):
        return self.spec


class QuantEmbedding(_PackedWeight, nn.Module):
    """Token embedding [V, H] stored like a quantized linear (same parameter names under `embed_tokens`); looked-up
    rows are dequantized. `weights()` / `spec` let a tied lm_head run the quantized matmul on the same tensors
    (`interleave`: in the CPU kernels' row-interleaved layout, as `ParamBuilder.embedding` asks for a tied one)."""

    def __init__(self, vocab: int, hidden: int, scheme, dtype: str = "float16", interleave: bool = False):
        self.vocab, self.hidden, self.dtype = vocab, hidden, dtype
        self._init_packed(vocab, hidden, scheme, interleave=interleave)

    def weights(self) -> list[nn.Tensor]:
        return self._weights()

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids int32 [s] -> [s, H] in the model dtype."""
        spec, hidden, dtype = self.spec, self.hidden, self.dtype

        def lookup(ids_te, *ws):
            return te.compute((ids_te.shape[0], hidden),
                              lambda i, j: te_dequant(ws, spec, ids_te[i], j).astype(dtype), name="embed_dequant")

        return op.tensor_expr_op(lookup, "embed_dequant", [ids, *self._weights()])


class DenseLinear(_LinearBase):
    """Unquantized linear; parameter `weight` [N, K] in the model dtype."""

    def __init__(self, in_features, out_features, bias=False, dtype="float16", backend="cpu"):
        super().__init__(in_features, out_features, bias, dtype, backend)
        self.weight = nn.Parameter((out_features, in_features), dtype)

    def _weights(self):
        return [self.weight]

    def _quant(self):
        return None
