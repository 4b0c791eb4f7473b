"""The CPU vector unit a library is built for, as the kernels see it: float32 lanes per register, register count.

| ISA | when the llvm target has | lanes | registers | int8 dot |
|---|---|---|---|---|
| `avx512` | avx512f (Zen 4, Skylake-SP and later) | 16 | 32 (zmm) | yes (256-bit vpmaddubsw) |
| `avx2` | avx2 + fma (Haswell, Zen 1-3) | 8 | 16 (ymm) | yes |
| `neon` | aarch64 | 4 | 32 | no |
| `sse` | anything else | 4 | 16 | no |

The kernels (`kernels.py`, `attention_cpu.py`) size their vectors and register tiles from it, so that a tile's
accumulators and operands fit the register file (a 16-lane tile on AVX2 is two registers per vector and spills);
LLVM then emits the instructions of the target's `mcpu`. `compile.build_module` sets the ISA of its target with
`use_isa` for the export; kernel factories called outside it (tests, bench/gemv.py) get the host's.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuIsa:
    name: str
    lanes: int  # float32 lanes per vector register
    registers: int  # architectural vector registers
    int8_dot: bool = False  # has 256-bit u8 x s8 -> s16 pair dots (vpmaddubsw) for `gemv_int8`


AVX512 = CpuIsa("avx512", 16, 32, int8_dot=True)
AVX2 = CpuIsa("avx2", 8, 16, int8_dot=True)
NEON = CpuIsa("neon", 4, 32)
SSE = CpuIsa("sse", 4, 16)
BY_NAME = {i.name: i for i in (AVX512, AVX2, NEON, SSE)}


def isa_of_target(target) -> CpuIsa:
    """The ISA of an llvm `tvm.target.Target` (its mtriple and mcpu features)."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        return NEON
    if not triple.startswith(("x86_64", "i686", "i386")):
        return SSE
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return AVX512
    if codegen.llvm_cpu_has_features(["avx2", "fma"], target):
        return AVX2
    return SSE


@functools.cache
def host_isa() -> CpuIsa:
    import tvm

    return isa_of_target(tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))


_CURRENT: contextvars.ContextVar[CpuIsa | None] = contextvars.ContextVar("cpu_isa", default=None)
_INT8_DOT: contextvars.ContextVar[bool] = contextvars.ContextVar("int8_dot", default=False)
# (n, k) of each linear call that took the int8 kernel inside the innermost `use_isa` (what the library really uses)
_INT8_USED: contextvars.ContextVar[list | None] = contextvars.ContextVar("int8_used", default=None)


def current_isa() -> CpuIsa:
    """The ISA set by the innermost `use_isa`, else the host's."""
    return _CURRENT.get() or host_isa()


def current_int8_dot() -> bool:
    """Whether the innermost `use_isa` asked for int8-activation decode GEMVs (`gemv_int8`)."""
    return _INT8_DOT.get()


def record_int8_dot(n: int, k: int) -> None:
    """Called by the kernel factory for each linear [n, k] it sends to `gemv_int8` (see `use_isa`)."""
    used = _INT8_USED.get()
    if used is not None:
        used.append((n, k))


@contextlib.contextmanager
def use_isa(isa: CpuIsa, int8_dot: bool = False):
    """Kernel factories called inside the block build their schedules for `isa`; with `int8_dot` the 4-bit decode
    GEMVs take the int8-activation kernel (`mlc_schemes.model.gemv_int8`) where `isa` has one. Yields the list of
    (n, k) of the linear calls that took it (filled while the block runs)."""
    used: list = []
    token, token8, token_used = _CURRENT.set(isa), _INT8_DOT.set(int8_dot), _INT8_USED.set(used)
    try:
        yield used
    finally:
        _CURRENT.reset(token)
        _INT8_DOT.reset(token8)
        _INT8_USED.reset(token_used)
