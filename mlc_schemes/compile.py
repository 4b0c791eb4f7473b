"""Compile a packed weights dir (docs/formats.md §2) into a model library for llvm / cuda / vulkan / metal / webgpu.

Output: the library file (`.so` for llvm, cuda and vulkan, `.tar` of objects for metal and webgpu) plus a side file
`<library>.json` holding the fingerprint (sha256 of model_config + scheme + parameter names/shapes/dtypes), the
target and the compute dtype; `mlc_schemes.engine` checks the fingerprint against the weights dir at load.
Both files are written to temporary siblings and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from omniquant.errors import UserError

TARGETS = ("llvm", "cuda", "metal", "webgpu", "vulkan")
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
LIB_SUFFIX = {"llvm": ".so", "cuda": ".so", "vulkan": ".so", "metal": ".tar", "webgpu": ".tar"}
CHAT_CONFIG = "mlc-chat-config.json"
TENSOR_CACHE = "tensor-cache.json"
META_SUFFIX = ".json"
CUBIN_SUFFIX = ".cubin"
# Dense tensors may be widened from the stored float16 to the compute dtype at load; packed ones never change.
_PACKED_SUFFIXES = (".q_weight", ".q_scale", ".q_zero")


@dataclass
class PackedModel:
    """What the compiler reads from a packed dir: chat config, scheme (None = unquantized) and tensor records."""

    path: Path
    chat: dict
    scheme: object | None
    quantized: set[str]
    records: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, stored dtype)
    embed_scheme: object | None = None  # scheme of the quantized embedding / lm_head (None: float16)
    quantized_embed: set[str] = frozenset()


def read_packed_model(path: str | Path) -> PackedModel:
    """Parse `mlc-chat-config.json` and `tensor-cache.json` (records only; shards are not read)."""
    path = Path(path)
    for name in (CHAT_CONFIG, TENSOR_CACHE):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a packed weights directory: missing {name}")
    chat = json.loads((path / CHAT_CONFIG).read_text())
    cache = json.loads((path / TENSOR_CACHE).read_text())
    records = {r["name"]: (tuple(r["shape"]), r["dtype"]) for shard in cache["records"] for r in shard["records"]}
    qcfg = chat.get("quantization_config") or {}
    scheme, quantized = None, set()
    if qcfg.get("quantized_linears"):
        from mlc_schemes.schemes import scheme_from_json

        scheme = scheme_from_json(qcfg)
        quantized = set(qcfg["quantized_linears"])
    from mlc_schemes.unpack import embedding_quantization

    emb = embedding_quantization(chat)
    return PackedModel(path, chat, scheme, quantized, records, *((emb[0], set(emb[1])) if emb else ()))


def model_code_hash() -> str:
    """sha256 of the model definition and kernels (mlc_schemes/model/*.py): a cached library built from other code
    is stale even when its weights fingerprint still fits."""
    h = hashlib.sha256()
    for f in sorted((Path(__file__).parent / "model").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def fingerprint(pm: PackedModel) -> str:
    """sha256 over model_config, scheme fields and every parameter's (name, shape, stored dtype)."""
    qcfg = {k: v for k, v in (pm.chat.get("quantization_config") or {}).items() if k != "calibration"}
    blob = json.dumps({"model_config": pm.chat["model_config"], "quantization": pm.chat.get("quantization"),
                       "quantization_config": qcfg, "params": sorted([n, list(s), d] for n, (s, d) in pm.records.items())},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# `--isa` of an llvm library -> LLVM mcpu. x86-64-v3 / -v4 are the psABI levels: v3 = AVX2, FMA, F16C, BMI2
# (Haswell, Zen 1-3), v4 = v3 + AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Zen 4).
CPU_ISAS = {"native": None, "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def host_cpu() -> str:
    """LLVM name of this machine's CPU (e.g. "rocketlake"); decode is ~10x slower without it."""
    import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def cpu_mcpu(isa: str = "native") -> str:
    """LLVM mcpu for `--isa`: "native" -> this machine's CPU, "avx2" / "avx512" -> the x86-64-v3 / -v4 level
    (`CPU_ISAS`), anything else is taken as an LLVM CPU name (e.g. "znver3", "haswell") and checked."""
    import tvm

    if isa in CPU_ISAS:
        return CPU_ISAS[isa] or host_cpu()
    if not tvm.target.codegen.llvm_is_valid_cpu(isa, tvm.target.codegen.llvm_get_system_triple()):
        raise UserError(f"unknown --isa {isa!r}: use native, avx2, avx512 or an LLVM CPU name (e.g. znver3)")
    return isa


def make_target(kind: str, arch: str = "sm_80", isa: str = "native"):
    """A tvm Target for `kind` (dict form; TVM 0.27 rejects option strings); llvm for `cpu_mcpu(isa)`."""
    import tvm

    if kind not in LIB_SUFFIX:
        raise UserError(f"unsupported target {kind!r}; choose one of {', '.join(TARGETS)}")
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu_mcpu(isa)})
    # Device libraries run on other machines: a generic host CPU, never this machine's.
    if kind == "cuda":
        if arch not in CUDA_ARCHS:
            raise UserError(f"unsupported cuda arch {arch!r}; choose one of {', '.join(CUDA_ARCHS)}")
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    if kind == "vulkan":
        from mlc_schemes.tvm_vulkan import VULKAN_TARGET, how_to_get, tvm_has_vulkan

        if not tvm_has_vulkan(codegen=True):
            raise UserError(how_to_get("--target vulkan"))
        return tvm.target.Target(VULKAN_TARGET, host={"kind": "llvm"})
    if kind == "metal":
        return tvm.target.Target({"kind": "metal"}, host={"kind": "llvm", "mtriple": "arm64-apple-macos"})
    return tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})


def model_config(pm: PackedModel):
    """(architecture module, its config) of `pm` (mlc_schemes.model registry by model_type); UserError when the
    architecture or a setting of it has no TVM model."""
    from mlc_schemes.model import get_architecture

    arch = get_architecture(pm.chat["model_config"].get("model_type", pm.chat.get("model_type")), "compile")
    try:
        return arch, arch.Config.from_chat_config(pm.chat)
    except ValueError as e:
        raise UserError(f"compile: {e}") from None


def build_model(pm: PackedModel, target, dtype: str):
    """The `relax.frontend.nn` model of `pm`'s architecture."""
    arch, cfg = model_config(pm)
    backend = "cpu" if target.kind.name == "llvm" else "gpu"
    return arch.Model(cfg, pm.scheme, pm.quantized, dtype, backend, target, embed_scheme=pm.embed_scheme,
                      quantized_embed=pm.quantized_embed)


class BuiltModule(NamedTuple):
    mod: object  # tvm.IRModule
    param_names: list[str]
    param_concat: dict[str, list[str]]
    int8_dot_shapes: list[list[int]]  # distinct [N, K] of the linears that took the int8 decode kernel
    param_interleave: dict[str, int]  # parameter -> rows per block of its row-interleaved layout (CPU packed linears)


def build_module(pm: PackedModel, target, dtype: str, int8_dot: bool = False) -> BuiltModule:
    """Export the relax IRModule of the model; checks its parameters against the packed records. `int8_dot`: llvm
    only, eligible 4-bit decode GEMVs take the int8-activation kernel (`mlc_schemes.model.gemv_int8`).

    Returns a BuiltModule (module, parameter names in call order, param_concat: fused parameter -> the packed tensors
    that the engine concatenates along axis 0 to make it, int8_dot_shapes: the distinct [N, K] of the linears that took the int8 kernel)."""
    from mlc_schemes.model.isa import isa_of_target, use_isa

    # CPU kernels size their vectors and register tiles (and the linears their row interleaving) for the target's
    # ISA (mlc_schemes.model.isa)
    with use_isa(isa_of_target(target), int8_dot) if target.kind.name == "llvm" else contextlib.nullcontext() as int8_used:
        model = build_model(pm, target, dtype)
        mod, named_params, _ext = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    concat = model.param_concat
    # row-interleaved parameters [N/IL, C, IL] (kernels.QuantSpec.interleave) are stored [N, C]; the engine
    # interleaves them at load
    interleave = {name: int(p.shape[2]) for name, p in named_params
                  if name.endswith(_PACKED_SUFFIXES) and len(p.shape) == 3}
    expected = {name: ((int(p.shape[0]) * int(p.shape[2]), int(p.shape[1])) if name in interleave else
                       tuple(int(x) for x in p.shape), p.dtype) for name, p in named_params}
    problems, used = [], set()
    for name, (shape, dt) in expected.items():
        sources = concat.get(name, [name])
        if missing := [s for s in sources if s not in pm.records]:
            problems.append(f"missing {missing[0]}")
            continue
        used.update(sources)
        shapes = [pm.records[s][0] for s in sources]
        rshape = (sum(s[0] for s in shapes), *shapes[0][1:]) if all(s[1:] == shapes[0][1:] for s in shapes) else None
        rdt = pm.records[sources[0]][1]
        if rshape != shape or (rdt != dt and (name.endswith(_PACKED_SUFFIXES) or rdt not in ("float16", "float32"))):
            problems.append(f"{name}: packed {rdt}{list(rshape or shapes)}, model needs {dt}{list(shape)}")
    extra = sorted(set(pm.records) - used)
    if extra:
        problems.append(f"unused tensors {extra[:5]}")
    if problems:
        raise UserError(f"packed weights in {pm.path} do not fit the model: " + "; ".join(problems[:6]))
    return BuiltModule(mod, [name for name, _ in named_params], concat, sorted(map(list, set(int8_used or ()))),
                       interleave)


def _gpu_schedule(mod, target):
    """Legalize, fuse and schedule with dlight. The matmul rule runs under a pre-tensor-core target because dlight
    `gpu.Matmul` segfaults on fp16 matmuls with symbolic M for sm_70+ (see ../shared/notes/tvm-0.27.md)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    safe = tvm.target.Target({"kind": "cuda", "arch": "sm_61"}) if target.kind.name == "cuda" else \
        tvm.target.Target({"kind": "webgpu"})
    with target:
        mod = tvm.transform.Sequential([relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
                                        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())(mod)
    with safe:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    if target.kind.name in ("vulkan", "webgpu"):
        # Symbolic shapes (sequence length) make every index int64, thread ids included. With int64 indices the
        # Vulkan kernels' cross-thread reductions read every thread as thread 0 on lavapipe (RMSNorm summed one
        # element; int32 indices give the numpy result); WGSL has no int64 at all. Index in int32.
        mod = tvm.tirx.transform.ForceNarrowIndexToInt32()(mod)
    return mod


def compile_packed(packed_dir: str | Path, target_kind: str, output: str | Path, *, arch: str = "sm_80",
                   dtype: str | None = None, aot_cubin: bool | None = None, isa: str = "native",
                   int8_dot: bool = False) -> dict:
    """Compile `packed_dir` for `target_kind` into `output`; returns the metadata written beside it.

    isa: llvm only; the CPU the library is built for (`cpu_mcpu`: native, avx2, avx512 or an LLVM CPU name).
    int8_dot: llvm only; 4-bit decode GEMVs on int8-rounded activations (`mlc_schemes.model.gemv_int8`): faster
    on AVX2, not exact (the metadata records it).
    dtype: compute dtype, "float16" (deployment default) or "float32" (exact mode; llvm only is sensible).
    aot_cubin: cuda only; compile the kernels to cubin with nvcc now (default: when nvcc is on PATH) instead of
    shipping CUDA source compiled by NVRTC at load time.
    """
    import shutil

    import tvm

    output = Path(output)
    target = make_target(target_kind, arch, isa)
    dtype = dtype or "float16"
    if dtype not in ("float16", "float32"):
        raise UserError(f"unsupported compute dtype {dtype!r}; choose float16 or float32")
    suffix = LIB_SUFFIX[target_kind]
    if output.suffix != suffix:
        raise UserError(f"a {target_kind} library is written as {suffix}; got output {output}")
    if int8_dot:
        from mlc_schemes.model.isa import isa_of_target

        if target_kind != "llvm" or not isa_of_target(target).int8_dot:
            raise UserError(f"--int8-dot needs an x86 llvm target with AVX2; got {target_kind} {target}")
    pm = packed_dir if isinstance(packed_dir, PackedModel) else read_packed_model(packed_dir)
    t0 = time.time()
    _, cfg = model_config(pm)
    mod, param_names, param_concat, int8_shapes, interleave = build_module(pm, target, dtype, int8_dot)
    if target.kind.name != "llvm":
        mod = _gpu_schedule(mod, target)
    ex = tvm.compile(mod, target)
    cubin = None
    if target_kind == "cuda" and (aot_cubin if aot_cubin is not None else shutil.which("nvcc") is not None):
        cubin = _aot_cubin(ex, arch)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp-{os.getpid()}{suffix}")
    try:
        ex.export_library(str(tmp))
        if tmp.stat().st_size == 0:
            raise UserError(f"compiler wrote an empty library for {target_kind}")
        meta = {
            "fingerprint": fingerprint(pm), "target": target_kind, "target_str": str(target),
            "arch": arch if target_kind == "cuda" else None, "dtype": dtype,
            "cpu_isa": _isa_meta(target) if target_kind == "llvm" else None, "int8_dot": int8_dot,
            "int8_dot_shapes": int8_shapes,
            "model_type": pm.chat.get("model_type"),
            "quantization": pm.chat.get("quantization") if pm.scheme else "none", "param_names": param_names,
            "param_concat": param_concat, "param_interleave": interleave,
            "context_window_size": cfg.context_window_size,
            # at most the sliding window when layers are local (TVM's ragged prefill kernel has no window)
            "prefill_chunk_size": cfg.prefill_chunk_size, "sliding_window": cfg.sliding_window or None,
            "compile_seconds": round(time.time() - t0, 2), "tvm_version": tvm.__version__,
            "cuda_source_sha256": cubin[0] if cubin else None, "model_code_sha256": model_code_hash(),
        }
        meta_tmp = tmp.with_name(tmp.name + META_SUFFIX)
        meta_tmp.write_text(json.dumps(meta, indent=1))
        cubin_tmp = tmp.with_name(tmp.name + CUBIN_SUFFIX)
        if cubin:
            cubin_tmp.write_bytes(cubin[1])
            os.replace(cubin_tmp, cubin_path(output))
        os.replace(tmp, output)
        os.replace(meta_tmp, meta_path(output))
    finally:
        for p in (tmp, tmp.with_name(tmp.name + META_SUFFIX), tmp.with_name(tmp.name + CUBIN_SUFFIX)):
            if p.exists():
                p.unlink()
    return meta


def _isa_meta(target) -> dict:
    from mlc_schemes.model.isa import isa_of_target

    isa = isa_of_target(target)
    return {"mcpu": str(target.attrs["mcpu"]), "isa": isa.name, "lanes": isa.lanes}


def read_library_meta_if_fits(lib: str | Path, pm: PackedModel, int8_dot: bool = False) -> dict | None:
    """The library's metadata when `lib` exists and was compiled for `pm` (same fingerprint) by the current model
    code with the same `int8_dot` choice, else None (callers then recompile)."""
    mp = meta_path(lib)
    if not (Path(lib).is_file() and mp.is_file()):
        return None
    meta = json.loads(mp.read_text())
    fits = meta.get("fingerprint") == fingerprint(pm) and meta.get("model_code_sha256") == model_code_hash() \
        and bool(meta.get("int8_dot")) == int8_dot
    return meta if fits else None


def meta_path(lib: str | Path) -> Path:
    lib = Path(lib)
    return lib.with_name(lib.name + META_SUFFIX)


def cubin_path(lib: str | Path) -> Path:
    lib = Path(lib)
    return lib.with_name(lib.name + CUBIN_SUFFIX)


def cuda_sources(ex) -> list[str]:
    """CUDA C sources of the device modules imported by a compiled executable / loaded library."""
    mod = ex.mod if hasattr(ex, "mod") else ex
    out, stack = [], list(mod.imports)
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source())
        stack.extend(m.imports)
    return out


def _aot_cubin(ex, arch: str) -> tuple[str, bytes] | None:
    """nvcc-compile the library's CUDA source for `arch` now -> (sha256 of the source, cubin bytes).

    TVM 0.27 ships CUDA libraries as source compiled at load through the `tvm_callback_cuda_compile` hook; the
    engine answers that hook with this cubin when the source hash matches, so no NVRTC/nvcc is needed at run time.
    """
    from tvm.support import nvcc

    srcs = cuda_sources(ex)
    if len(srcs) != 1:
        return None
    src = srcs[0]
    with __import__("tvm").target.Target({"kind": "cuda", "arch": arch}):
        binary = nvcc.compile_cuda(src, "cubin", arch=arch, compiler="nvcc")
    return hashlib.sha256(src.encode()).hexdigest(), bytes(binary)

