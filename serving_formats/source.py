"""Read a fake-quant checkpoint + sidecar (docs/formats.md §1) for export: tensors shard by shard, and each
quantized linear's integer grid (codes, scales, zeros) recovered from the sidecar and checked exact.

The serving formats store unsigned codes `q` and zeros `z` in `[0, 2^b - 1]` with `w = (q - z) * s`. An
asymmetric run's codes and zeros are used as they are. A symmetric run (MLC-style: codes in `[0, 2^b - 2]`, zero
fixed at `2^(b-1) - 1`) is shifted by one to the engines' symmetric convention, zero `2^(b-1)`, which is the signed
code `q - 2^(b-1)` that compressed-tensors and GPTQ use for symmetric weights: same `q - z`, same weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# The packer's sidecar names and JSON reader (clear UserError), shared rather than copied.
from mlc_schemes.pack import QUANT_CONFIG, QUANT_PARAMS
from mlc_schemes.pack import _read_json as read_json
from omniquant.errors import UserError
from omniquant.safetensors_io import SafetensorsDir


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear on its integer grid. codes int32 [N, K], zeros int32 [N, G] (unsigned, see the module docstring),
    scales float32 [N, G] (every value exact in float16); `w = (codes - zeros[:, k // gs]) * scales[:, k // gs]`
    computed in float32 and rounded to `dtype`, the checkpoint's dtype of the weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    dtype: torch.dtype


def layer_pattern(name: str) -> str:
    """`model.layers.7.mlp.up_proj` -> `model.layers.*.mlp.up_proj` (to list many layers in one line)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def working_group_sizes(in_features: list[int], current: int) -> list[int]:
    """Powers of two >= 16 and below `current` that divide every in_features, largest first."""
    g = math.gcd(*in_features)
    return [s for s in (2 ** e for e in range(12, 3, -1)) if s < current and g % s == 0]


class FakeQuantCheckpoint:
    """A fake-quant checkpoint directory opened for export (nothing is loaded until asked for).

    `bits`, `group_size` (-1: per-channel), `symmetric`, `linears` (name -> [N, K]) come from `quant_config.json`
    and the weights' shapes; `tensors()` yields every stored tensor in its own dtype, one shard at a time.
    """

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UserError(f"input {self.dir} is not a directory")
        self.hf_config = read_json(self.dir / "config.json", "HF config")
        if not (self.dir / QUANT_CONFIG).is_file() or not (self.dir / QUANT_PARAMS).is_file():
            raise UserError(f"{self.dir} has no quantization sidecar ({QUANT_CONFIG} + {QUANT_PARAMS}): export "
                            "needs the integer grid written by `omniquant calibrate`, not a plain or foreign checkpoint")
        self.qconfig = read_json(self.dir / QUANT_CONFIG, "quantization sidecar")
        try:
            self.bits = int(self.qconfig["wbits"])
            self.group_size = int(self.qconfig["group_size"])
            self.symmetric = bool(self.qconfig["symmetric"])
            names = list(self.qconfig["quantized_linears"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.dir / QUANT_CONFIG} lacks a valid {e} entry") from None
        for key, what in (("abits", "activations"), ("kv_bits", "the KV cache")):
            if int(self.qconfig.get(key, 16)) < 16:
                raise UserError(f"the checkpoint was calibrated with {what} quantized to {self.qconfig[key]} bits; "
                                "the serving formats written here are weight-only (W*A16) and would drop that")
        self.reader = SafetensorsDir(self.dir)  # shards through the index; UserError on missing ones
        self.sidecar = safe_open(self.dir / QUANT_PARAMS, framework="pt")
        expected = {f"{n}.{p}" for n in names for p in ("scales", "zeros")}
        side_names = set(self.sidecar.keys())
        if missing := sorted(expected - side_names):
            raise UserError(f"sidecar {QUANT_PARAMS} lacks {len(missing)} tensors, e.g. {missing[0]}")
        # Where the stored dtype cannot hold the codes (bfloat16, 8-bit asymmetric) the sidecar also has them.
        self.with_codes = {n for n in names if f"{n}.codes" in side_names}
        if extra := sorted(side_names - expected - {f"{n}.codes" for n in self.with_codes}):
            raise UserError(f"sidecar has tensors for linears not listed in {QUANT_CONFIG}, e.g. {extra[0]}")
        self.shapes = {n: self.reader.shape(n) for n in self.reader.names()}
        self.linears: dict[str, list[int]] = {}
        for n in names:
            shape = self.shapes.get(f"{n}.weight")
            if shape is None:
                raise UserError(f"quantized linear {n} has no weight in the checkpoint")
            if len(shape) != 2:
                raise UserError(f"quantized linear {n} has a {len(shape)}-D weight")
            self.linears[n] = shape

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_divisible(self, fmt: str) -> None:
        """UserError naming every linear whose in_features is not a multiple of the group size (no ragged groups
        in the serving formats), with the group sizes that would divide them all."""
        if self.group_size == -1:
            return
        bad = {n: k for n, (_, k) in self.linears.items() if k % self.group_size}
        if not bad:
            return
        patterns: dict[str, list[int]] = {}
        for n, k in bad.items():
            patterns.setdefault(f"{layer_pattern(n)} (in_features {k})", []).append(k)
        listed = "; ".join(f"{p} x{len(v)}" if len(v) > 1 else p for p, v in patterns.items())
        ok = working_group_sizes([k for _, k in self.linears.values()], self.group_size)
        hint = (f"Recalibrate with --group-size {ok[0]}" + "".join(f" (or {s})" for s in ok[1:3]) if ok
                else "Recalibrate with a group size that divides every in_features")
        raise UserError(
            f"{fmt} cannot store a partial last group: {len(bad)} of {len(self.linears)} quantized linears have "
            f"in_features that are not a multiple of group size {self.group_size}: {listed}. {hint}, "
            "or --group-size -1 (per-channel); refusing rather than leaving them in float")

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor as stored) for every tensor, shard by shard (one shard open at a time)."""
        from safetensors import safe_open

        for f, names in self.reader.by_file():
            with safe_open(self.dir / f, framework="pt") as h:
                for name in names:
                    yield name, h.get_tensor(name)

    def grid(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        """The integer grid of quantized linear `name` whose stored weight is `weight` [N, K] (any float dtype).

        Codes are `round(w / s) + z` from the sidecar's scales / zeros; UserError unless they lie in range and
        dequantizing them in float32, then rounding to the checkpoint's dtype, gives back `weight` bit for bit.
        """
        from omniquant.quant.codes import recompute_codes, stored_weight

        scales = self.sidecar.get_tensor(f"{name}.scales").to(torch.float32)
        zeros = self.sidecar.get_tensor(f"{name}.zeros")
        n, k = weight.shape
        gs = self.group_width(k)
        g = -(-k // gs)
        where = f"sidecar inconsistent with the weights of {name}"
        if tuple(scales.shape) != (n, g) or tuple(zeros.shape) != (n, g):
            raise UserError(f"{where}: scales {list(scales.shape)} / zeros {list(zeros.shape)}, expected [{n}, {g}]")
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise UserError(f"{where}: scales must be finite and positive")
        if not torch.equal(scales.half().float(), scales):
            raise UserError(f"{where}: scales are not exactly representable in float16")
        if zeros.is_floating_point() and not torch.equal(zeros, zeros.round()):
            raise UserError(f"{where}: zeros are not integers")
        zeros = zeros.to(torch.int32)
        if self.symmetric:
            fixed = 2 ** (self.bits - 1) - 1
            if (zeros != fixed).any():
                raise UserError(
                    f"{QUANT_CONFIG} says symmetric but {name} has zeros other than {fixed} (e.g. "
                    f"{int(zeros[zeros != fixed][0])}): the sidecar is asymmetric, the config is wrong")
        elif zeros.min() < 0 or zeros.max() > self.qmax:
            raise UserError(f"{where}: zeros outside [0, {self.qmax}] for {self.bits} bits")
        if name in self.with_codes:
            codes = self.sidecar.get_tensor(f"{name}.codes").to(torch.int32)
            if tuple(codes.shape) != (n, k) or codes.max() > self.qmax:
                raise UserError(f"{where}: sidecar codes {list(codes.shape)} do not fit weight [{n}, {k}] or "
                                f"exceed {self.qmax}")
        else:  # out-of-range codes get clamped, which moves a weight by a step: the exactness check catches it
            codes = recompute_codes(weight, scales, zeros, self.bits, self.group_size, self.symmetric)
        # The stored weight is the float32 grid value rounded once to the checkpoint's dtype (docs/formats.md §1).
        recon = stored_weight(codes, scales, zeros, self.group_size, weight.dtype)
        if not torch.equal(recon, weight):
            bad = int((recon != weight).sum())
            raise UserError(f"{where}: {bad} weights are not on the sidecar's {self.bits}-bit grid (the sidecar "
                            "does not belong to these weights)")
        if self.symmetric:  # MLC zero 2^(b-1)-1 -> the engines' 2^(b-1): same q - z
            codes, zeros = codes + 1, zeros + 1
        return QuantizedLinear(codes, scales, zeros, weight.dtype)
