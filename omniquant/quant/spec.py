"""Weight quantization settings and the group layout (including the padding rule for a ragged last group)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SUPPORTED_WBITS = (2, 3, 4, 6, 8)

# Written into quant_config.json; docs/formats.md explains it.
PADDING_RULE = (
    "edge: when in_features is not a multiple of group_size the last group holds the remaining columns only; for "
    "its min/max it is padded with copies of its last real column (statistics unchanged) and the padding is dropped"
)


@dataclass(frozen=True)
class WeightQuantSpec:
    """bits in {2,3,4,6,8}; group_size > 0 groups along the input dim, -1 means one group per output row."""

    bits: int
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_WBITS:
            raise ValueError(f"wbits must be one of {SUPPORTED_WBITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group size must be a positive integer or -1 (per-channel), got {self.group_size}")

    @property
    def qmax(self) -> int:
        """Largest integer code. Symmetric follows MLC: codes in [0, 2*max_int] around zero = max_int."""
        return 2 ** self.bits - 2 if self.symmetric else 2 ** self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> tuple[int, int]:
        """(group size, number of groups G) for a weight with `in_features` columns."""
        gs = in_features if self.group_size == -1 else self.group_size
        return gs, math.ceil(in_features / gs)

    def name(self, abits: int = 16) -> str:
        g = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}a{abits}{g}{'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, gs], edge-padding the last group with copies of column K-1 (see PADDING_RULE)."""
    n, k = w.shape
    g = math.ceil(k / group_size)
    pad = g * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, g, group_size)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """[N, G, gs] -> [N, K], dropping padded columns."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]
