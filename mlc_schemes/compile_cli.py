"""Compile a packed weights dir into a TVM model library: `.so` (llvm, cuda, vulkan) or `.tar` of objects (metal, webgpu).

llvm targets this machine's CPU (its `mcpu`), or another x86 level with `--isa avx2` / `--isa avx512` (a library
for a machine that is not this one, e.g. an AVX2 build to ship to older CPUs); cuda builds for `--cuda-arch` (sm_80 default, sm_90 for Hopper) and
embeds nvcc-compiled cubins when nvcc is on PATH (else CUDA source compiled by NVRTC at load); metal writes
arm64-macOS objects for a Mac to link; webgpu writes WGSL; vulkan embeds SPIR-V for any Vulkan 1.1+ device with
float16 and 16-bit storage (needs the Vulkan TVM from `make tvm-vulkan`, which omniquant then uses by itself). A `<library>.json` beside the library holds the
fingerprint the runtime checks against the weights dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniquant.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packed weights dir (output of `omniquant pack`)")
    p.add_argument("--target", default="llvm", help="llvm (this CPU), cuda, vulkan, metal or webgpu")
    p.add_argument("--output", required=True,
                   help="library path: .so for llvm/cuda/vulkan, .tar for metal/webgpu (a .json sidecar is written beside)")
    p.add_argument("--isa", default="native",
                   help="llvm only: native (this CPU, default), avx2 (x86-64-v3: AVX2+FMA+F16C), avx512 (x86-64-v4), "
                        "or an LLVM CPU name such as znver3 or haswell")
    p.add_argument("--int8-dot", action="store_true",
                   help="llvm on x86 only: 4-bit decode GEMVs round the activation vector to int8 per 64 values and "
                        "use integer dot products, as llama.cpp's Q4 kernels do (about 2x faster GEMV on AVX2; "
                        "results change slightly: see README, 'int8 dot')")
    p.add_argument("--cuda-arch", default="sm_80", help="cuda only: sm_80 (A100, default), sm_86, sm_89, sm_90 (H100)")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None,
                   help="compute dtype: float16 (deployment default) or float32 (exact mode, matches torch fp32)")
    p.add_argument("--no-aot", action="store_true", help="cuda only: ship CUDA source (NVRTC at load), skip nvcc")


def run(args: argparse.Namespace) -> int:
    from mlc_schemes.compile import LIB_SUFFIX, TARGETS, compile_packed

    target = args.target.lower()
    if target not in TARGETS:
        raise UserError(f"unsupported target {args.target!r}; choose one of {', '.join(TARGETS)}")
    if not Path(args.model).is_dir():
        raise UserError(f"packed weights dir {args.model} does not exist")
    out = Path(args.output)
    if target in LIB_SUFFIX and out.suffix == "":
        out = out.with_suffix(LIB_SUFFIX[target])
    meta = compile_packed(args.model, target, out, arch=args.cuda_arch, dtype=args.dtype,
                          aot_cubin=False if args.no_aot else None, isa=args.isa,
                          int8_dot=args.int8_dot)
    size = out.stat().st_size / 2**20
    if meta["int8_dot"] and not meta["int8_dot_shapes"]:
        print("note: --int8-dot found no eligible linear (it needs 4-bit codes and groups and in_features that are "
              "multiples of 64): every decode GEMV is the exact one", file=sys.stderr)
    int8 = f", int8 dot on linears of {len(meta['int8_dot_shapes'])} shapes" if meta["int8_dot"] else ""
    print(f"wrote {out} ({size:.1f} MiB, {meta['target']}, {meta['dtype']}, {meta['quantization']}{int8}) "
          f"in {meta['compile_seconds']:.1f} s")
    return 0
