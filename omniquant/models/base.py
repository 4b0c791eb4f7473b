"""What the calibration loop needs to know about an architecture, and the registry of adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from omniquant.errors import UserError


@dataclass(frozen=True)
class LetSite:
    """A Learnable Equivalent Transformation site: a channel-wise scale/shift between a producer and consumers.

    `prev` is a norm (LayerNorm / RMSNorm) or a linear whose output feeds `linears`; `kind` in {"norm", "v_o"}.
    """

    name: str
    kind: str
    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    """Names (relative to a decoder block) of the parts OmniQuant touches.

    `blocks_path` is the dotted path of the ModuleList of decoder blocks in the *CausalLM* model.
    `norm_offset`: a norm with stored weight w scales its output by (w + norm_offset) (Gemma: 1, others: 0), which
    LET fusion must respect. `qk`: (q_proj, k_proj) whose rows take the q/k scale; `qk_norms`: (q_norm, k_norm)
    per-head norms applied to q and k before RoPE (Qwen3, Gemma 3), whose weights take it instead (see omniquant/let.py).
    `bos_first`: the model expects BOS at the start of every sequence (Gemma), so perplexity and calibration
    windows start with it (omniquant.ppl.window_bos).
    """

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: tuple[str, ...]
    let_sites: tuple[LetSite, ...] = field(default=())
    qk: tuple[str, str] | None = None  # (q_proj, k_proj) for q/k scaling; None where not an exact equivalence
    rope: bool = False
    norm_offset: float = 0.0
    qk_norms: tuple[str, str] | None = None
    bos_first: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.linears}


_ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS.append(adapter)
    return adapter


def _load_all():
    from omniquant.models import gemma3, llama, opt, qwen3  # noqa: F401  (registration side effect)


def supported_model_types() -> list[str]:
    _load_all()
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def bos_first(model_type: str | None) -> bool:
    """True when the architecture expects BOS at the start of every sequence (its adapter says so)."""
    _load_all()
    return any(a.bos_first for a in _ADAPTERS if model_type in a.model_types)


def get_adapter(model_type: str) -> Adapter:
    """Adapter for an HF `config.model_type`; UserError listing the supported ones otherwise."""
    _load_all()
    for a in _ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UserError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )
