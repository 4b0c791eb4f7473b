"""Quantization scheme registry, MLC-LLM style: one small class per scheme kind, one instance per scheme name.

A scheme says how the integer codes of a quantized linear `W[N, K]` (out, in) are stored:

- codes `q` of `bits` bits, `epw = 32 // bits` codes per uint32 word, packed LSB-first along K (layout "NK");
- one float16 scale per (row, group of `group_size` input columns); `group_size = -1` is per-channel (one group);
- asymmetric kinds also store a float16 zero per group: `w = (q - zero) * scale`;
- MLC's symmetric kind (`q4f16_1`, `q3f16_1`) has no stored zero: `w = (q - max_int) * scale`,
  `max_int = 2^(bits-1) - 1`, codes in `[0, 2 * max_int]`.

The names keep MLC-LLM's (`q4f16_1`: int4 group 32, `q3f16_1`: int3 group 40) and the old OmniQuant MLC flow's
(`w3a16g128asym`: int3, group 128, fp16 scale and zero). The token embedding (and an untied lm_head) may be stored
with a second scheme, as MLC's `quantize_embedding` / `quantize_final_fc` do: see `mlc_schemes.pack`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from omniquant.errors import UserError

# Packing rule shared by every scheme (see mlc_schemes.packing): code k of a row lives in word k // epw at bit
# offset (k % epw) * bits; rows are padded with code 0 up to a whole word.
PACKING_ORDER = "lsb-first-along-k"


@dataclass(frozen=True)
class QuantScheme:
    """Fields common to every scheme kind. `group_size = -1` means one group per row (per-channel)."""

    name: str
    bits: int
    group_size: int
    symmetric: bool
    storage_dtype: str = "uint32"
    model_dtype: str = "float16"
    linear_weight_layout: str = "NK"
    packing_order: str = PACKING_ORDER

    kind: ClassVar[str] = "abstract"

    def __post_init__(self) -> None:
        if self.storage_dtype != "uint32":
            raise ValueError(f"{self.name}: only uint32 storage is supported, got {self.storage_dtype}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"{self.name}: bits must be in 1..8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"{self.name}: group_size must be positive or -1 (per-channel), got {self.group_size}")
        if self.linear_weight_layout != "NK":
            raise ValueError(f"{self.name}: only the NK weight layout is supported")

    @property
    def elems_per_word(self) -> int:
        """Codes per uint32 word: 32 // bits (10 for int3, 16 for int2, 8 for int4)."""
        return 32 // self.bits

    @property
    def qmax(self) -> int:
        """Largest code the scheme produces."""
        return 2**self.bits - 1

    @property
    def stores_zero(self) -> bool:
        """True when a `<linear>.q_zero` float16 tensor is written."""
        return True

    @property
    def fixed_zero(self) -> int | None:
        """The zero point every group shares (symmetric kinds), else None."""
        return None

    def group_width(self, k: int) -> int:
        """Columns per group for a linear with `k` input features."""
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        """G = ceil(K / group_size); 1 for per-channel. The last group may be partial (see docs/formats.md)."""
        return math.ceil(k / self.group_width(k))

    def num_words(self, k: int) -> int:
        """uint32 words per row: ceil(K / epw)."""
        return math.ceil(k / self.elems_per_word)

    def nominal_bits_per_weight(self) -> float:
        """The textbook figure: bits + 16 bits per group for the scale (+ 16 for a stored zero) / group_size.

        w3a16g128asym: 3 + 32 / 128 = 3.25. Per-channel: `bits` (the per-row metadata vanishes for large K).
        """
        if self.group_size == -1:
            return float(self.bits)
        return self.bits + self._meta_bits() / self.group_size

    def layout_bits_per_weight(self, k: int | None = None) -> float:
        """What the storage layout really costs: 32 / epw bits per code (3.2 for int3: 10 codes use 30 of 32
        bits) plus the metadata. With `k`, exact for a row of K inputs (word padding and a partial last group
        included); without, the large-K limit."""
        if k is None:
            meta = 0.0 if self.group_size == -1 else self._meta_bits() / self.group_size
            return 32 / self.elems_per_word + meta
        return (32 * self.num_words(k) + self._meta_bits() * self.num_groups(k)) / k

    def _meta_bits(self) -> int:
        return 16 * (2 if self.stores_zero else 1)

    def to_json(self) -> dict:
        """The scheme's fields as stored in `mlc-chat-config.json` under `quantization_config`."""
        d = dataclasses.asdict(self)
        d["kind"] = self.kind
        d["elems_per_word"] = self.elems_per_word
        d["fixed_zero"] = self.fixed_zero
        d["stores_zero"] = self.stores_zero
        return d


@dataclass(frozen=True)
class GroupQuantAsym(QuantScheme):
    """Asymmetric group quantization: fp16 scale + fp16 zero per group, codes in [0, 2^bits - 1]."""

    symmetric: bool = False
    kind: ClassVar[str] = "group-quant-asym"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric or self.group_size == -1:
            raise ValueError(f"{self.name}: GroupQuantAsym needs symmetric=False and a positive group_size")


@dataclass(frozen=True)
class PerChannelAsym(QuantScheme):
    """Asymmetric per-output-channel quantization: one fp16 scale + zero per row (group_size -1)."""

    group_size: int = -1
    symmetric: bool = False
    kind: ClassVar[str] = "per-channel-asym"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric or self.group_size != -1:
            raise ValueError(f"{self.name}: PerChannelAsym needs symmetric=False and group_size=-1")


@dataclass(frozen=True)
class GroupQuantSym(QuantScheme):
    """MLC-LLM's `GroupQuantize` (kind "group-quant"): symmetric, zero fixed at max_int, only the scale stored.

    Dequantization `w = (q - max_int) * scale`, `max_int = 2^(bits-1) - 1`, codes in `[0, 2 * max_int]`.
    MLC requires `group_size % elems_per_word == 0` so that a group fills whole words; kept here.
    """

    symmetric: bool = True
    kind: ClassVar[str] = "group-quant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.symmetric or self.group_size == -1:
            raise ValueError(f"{self.name}: GroupQuantSym needs symmetric=True and a positive group_size")
        if self.group_size % self.elems_per_word:
            raise ValueError(f"{self.name}: MLC needs group_size divisible by {self.elems_per_word} codes/word")

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmax(self) -> int:
        return 2 * self.max_int

    @property
    def stores_zero(self) -> bool:
        return False

    @property
    def fixed_zero(self) -> int:
        return self.max_int


def _registry(*schemes: QuantScheme) -> dict[str, QuantScheme]:
    return {s.name: s for s in schemes}


SCHEMES: dict[str, QuantScheme] = _registry(
    GroupQuantAsym("w2a16g128asym", bits=2, group_size=128),
    GroupQuantAsym("w3a16g128asym", bits=3, group_size=128),
    GroupQuantAsym("w4a16g128asym", bits=4, group_size=128),
    GroupQuantAsym("w2a16g64asym", bits=2, group_size=64),
    GroupQuantAsym("w3a16g64asym", bits=3, group_size=64),
    GroupQuantAsym("w4a16g64asym", bits=4, group_size=64),
    GroupQuantAsym("w4a16g32asym", bits=4, group_size=32),
    GroupQuantAsym("w8a16g128asym", bits=8, group_size=128),  # e.g. for the embedding / lm_head (pack --embedding-scheme)
    GroupQuantAsym("w8a16g32asym", bits=8, group_size=32),
    PerChannelAsym("w4a16asym", bits=4),
    PerChannelAsym("w3a16asym", bits=3),
    GroupQuantSym("q4f16_1", bits=4, group_size=32),
    GroupQuantSym("q3f16_1", bits=3, group_size=40),
)


def get_scheme(name: str) -> QuantScheme:
    """The registered scheme called `name`; UserError listing the registered names otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(f"unknown quantization scheme {name!r}; registered: {', '.join(SCHEMES)}") from None


def scheme_from_json(d: dict) -> QuantScheme:
    """Rebuild a scheme from its `to_json()` form (as read back from `mlc-chat-config.json`)."""
    classes = {cls.kind: cls for cls in (GroupQuantAsym, PerChannelAsym, GroupQuantSym)}
    if d.get("kind") not in classes:
        raise UserError(f"unknown scheme kind {d.get('kind')!r} in quantization_config")
    cls = classes[d["kind"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})
