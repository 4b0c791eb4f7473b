"""Runtime for a compiled model library: load lib + packed weights, prefill / decode on a paged KV cache, sample.

    eng = Engine(model_dir, lib_path)            # checks the library's fingerprint against the weights dir
    logits = eng.prefill(ids)                    # float32 [V], last position; KV cache holds the prompt
    logits = eng.decode(token)                   # one step
    text, stats = eng.generate("prompt", max_new_tokens=64)

Greedy decoding when temperature == 0, else temperature + top-p (nucleus) sampling with a seeded numpy RNG.
`tvm_perplexity` scores text through the compiled model with the windowing (and BOS rule) of
`omniquant.ppl.perplexity`. Weights go from the shards straight into device tensors (`mlc_schemes.device_params`:
on CPU, zero-copy views of the memory-mapped shards where aligned). Processes that only run libraries call
`import_tvm_runtime()` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniquant.errors import UserError

PAGE_SIZE = 16


@dataclass
class Stats:
    """Token counts and seconds of the last prefill / decode calls (reset by `Engine.reset_stats`)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_seconds": round(self.prefill_seconds, 4),
            "prefill_tok_per_s": round(self.prefill_tokens / self.prefill_seconds, 2) if self.prefill_seconds else None,
            "decode_tokens": self.decode_tokens, "decode_seconds": round(self.decode_seconds, 4),
            "decode_tok_per_s": round(self.decode_tokens / self.decode_seconds, 2) if self.decode_seconds else None,
            **self.extra,
        }


def _proc_status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM of /proc/self/status (ru_maxrss, the fallback, keeps
    the parent's peak across exec on Linux, so a process started by a large one would report the parent's size)."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set size in MiB (VmRSS; 0 where /proc is missing)."""
    return _proc_status_mib("VmRSS") or 0.0


def import_tvm_runtime() -> None:
    """Import tvm for running compiled libraries only (no-op when tvm is already imported):

    - TVM's runtime library without the compiler (`TVM_USE_RUNTIME_LIB=1`, read once at import): ~110 MiB less
      resident memory; compiling in this process is then impossible;
    - without torch: tvm_ffi imports torch at import time only to fix a symbol-loading order seen on Windows
      (its comment), ~190 MiB resident here. torch stays importable afterwards (e.g. by a tokenizer).
    """
    if "tvm" in sys.modules:
        return
    env = os.environ.get("TVM_USE_RUNTIME_LIB")
    block_torch = "torch" not in sys.modules
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    if block_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tvm_ffi catches
    try:
        import tvm  # noqa: F401
    finally:
        if block_torch:
            del sys.modules["torch"]
        if env is None:
            del os.environ["TVM_USE_RUNTIME_LIB"]
        else:
            os.environ["TVM_USE_RUNTIME_LIB"] = env


def read_library_meta(lib_path: str | Path) -> dict:
    from mlc_schemes.compile import meta_path

    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise UserError(f"model library {lib_path} does not exist")
    mp = meta_path(lib_path)
    if not mp.is_file():
        raise UserError(f"{mp} is missing: it holds the library's fingerprint; recompile with `omniquant compile`")
    return json.loads(mp.read_text())


def _load_cuda_runtime() -> str | None:
    """TVM's CUDA runtime lives in a separate library that a runtime-only TVM (TVM_USE_RUNTIME_LIB=1) does not
    load; load it here. Returns why it could not be loaded (e.g. libcudart missing), or None."""
    import ctypes

    import tvm

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        return None
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return str(e)
    return None


def _check_cpu_runs(meta: dict) -> None:
    """A library built for an instruction set this CPU lacks would die of SIGILL: refuse it with a message."""
    need = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "avx2": {"avx2", "fma", "f16c"}}.get(
        (meta.get("cpu_isa") or {}).get("isa"), set())
    if not need or meta["target"] != "llvm":
        return
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                missing = need - set(line.split(":", 1)[1].split())
                if missing:
                    raise UserError(f"this library was built for {meta['cpu_isa']['isa']} (mcpu "
                                    f"{meta['cpu_isa']['mcpu']}); this CPU lacks {', '.join(sorted(missing))}: "
                                    "compile it with --isa native (or avx2) to run here")
                return


def parse_device(spec: str | None, target: str) -> tuple[str, int]:
    """`--device` text ('cpu', 'cuda:1', 'vulkan', 'vulkan:0'; None = the library's own kind, index 0) ->
    (kind, index). The kind must be the one the library was compiled for."""
    want = "cpu" if target == "llvm" else target
    if not spec:
        return want, 0
    kind, _, idx = spec.lower().partition(":")
    kind = {"llvm": "cpu"}.get(kind, kind)
    if not (idx or "0").isdigit():
        raise UserError(f"--device {spec}: expected KIND or KIND:INDEX, e.g. vulkan:0")
    if kind != want:
        raise UserError(f"--device {spec}: this library was compiled for {target}; it runs on {want} devices only")
    return kind, int(idx or 0)


def _present(dev) -> bool:
    """dev.exist, False where the runtime raises instead of answering (no libcuda; no Vulkan loader or ICD)."""
    try:
        return bool(dev.exist)
    except Exception:  # noqa: BLE001
        return False


def _device_for(meta: dict, spec: str | None = None):
    import tvm

    kind, idx = parse_device(spec, meta["target"])
    if kind == "cpu":
        return tvm.cpu(idx)
    if kind == "cuda":
        why = _load_cuda_runtime()
        if not _present(dev := tvm.cuda(idx)):
            raise UserError(f"this library was compiled for cuda, but no CUDA GPU {idx} (or CUDA driver) is available "
                            "here" + (f" ({why})" if why else "") + "; compile with --target llvm to run on the CPU")
        return dev
    if kind == "vulkan":
        from mlc_schemes.tvm_vulkan import how_to_get, tvm_has_vulkan

        if not tvm_has_vulkan(codegen=False):
            raise UserError(how_to_get("running a vulkan library"))
        if not _present(dev := tvm.vulkan(idx)):
            raise UserError(f"this library was compiled for vulkan, but Vulkan device {idx} is not available here "
                            "(no GPU driver; on a machine without a GPU, Mesa's lavapipe is a Vulkan device on the "
                            "CPU: apt install mesa-vulkan-drivers; `vulkaninfo --summary` lists the devices)")
        return dev
    raise UserError(f"a {meta['target']} library cannot be run by this engine (it is built for another machine); "
                    "the engine runs llvm, cuda and vulkan libraries")


def _install_cubin_hook(lib_path: Path, meta: dict) -> None:
    """Answer TVM's load-time `tvm_callback_cuda_compile` with the AOT cubin from `omniquant compile` when its
    source hash matches; otherwise fall back to TVM's own NVRTC/nvcc compile."""
    import hashlib

    import tvm_ffi
    from tvm.support import nvcc

    from mlc_schemes.compile import cubin_path

    cpath = cubin_path(lib_path)
    cubin = cpath.read_bytes() if cpath.is_file() and meta.get("cuda_source_sha256") else None

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _hook(code, *_):
        if cubin is not None and hashlib.sha256(code.encode()).hexdigest() == meta["cuda_source_sha256"]:
            return bytearray(cubin)
        return nvcc.tvm_callback_cuda_compile(code)


class Engine:
    """A loaded model: VM, parameters on the device, tokenizer, one sequence in a paged KV cache.

    params: numpy arrays by packed name (random weights made in memory) instead of the dir's shards.
    zero_copy: on CPU, map aligned single-record parameters instead of copying them (`device_params`).
    """

    def __init__(self, model_dir: str | Path, lib_path: str | Path, *, verify: bool = True,
                 params: dict[str, np.ndarray] | None = None, zero_copy: bool = True,
                 device: str | None = None):
        rss_start = rss_mib()
        # runtime-only imports: they work with TVM_USE_RUNTIME_LIB=1
        import tvm
        from tvm.runtime.vm import VirtualMachine

        from mlc_schemes.compile import PackedModel, fingerprint, read_packed_model
        from mlc_schemes.device_params import place_params

        pm = model_dir if isinstance(model_dir, PackedModel) else read_packed_model(model_dir)
        self.model_dir, self.lib_path = Path(pm.path), Path(lib_path)
        self.meta = read_library_meta(lib_path)
        if fingerprint(pm) != self.meta["fingerprint"]:
            raise UserError(f"library {lib_path} was compiled for another model or scheme than the weights in "
                            f"{model_dir} (fingerprint mismatch: library {self.meta['fingerprint'][:12]}, "
                            f"weights {fingerprint(pm)[:12]}); recompile it for these weights")
        self.chat = pm.chat
        self.dtype = self.meta["dtype"]
        _check_cpu_runs(self.meta)
        self.device = _device_for(self.meta, device)
        if self.meta["target"] == "cuda":
            _install_cubin_hook(self.lib_path, self.meta)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.device)
        rss_runtime = rss_mib()
        if params is None:
            from mlc_schemes.weights_dir import tensor_records, verify_shards

            params, _, shards = tensor_records(pm.path)
            if verify:
                verify_shards(pm.path, shards)
        placed = place_params(self.meta["param_names"], self.meta.get("param_concat") or {}, params, self.device,
                              self.dtype, zero_copy=zero_copy, interleave=self.meta.get("param_interleave"))
        self.params = placed.tensors
        del params
        self.memory = {"rss_at_start_mib": rss_start, "runtime_mib": rss_runtime,
                       "weights_mib": placed.total_bytes / 2**20, "weights_mapped_mib": placed.mapped_bytes / 2**20,
                       "weights_copied_mib": placed.copied_bytes / 2**20, "rss_after_weights_mib": rss_mib()}
        self.context = int(self.meta.get("context_window_size") or self.chat.get("context_window_size") or 2048)
        self.prefill_chunk = int(self.meta.get("prefill_chunk_size") or self.context)
        self.vocab = int(self.chat["model_config"]["vocab_size"])
        eos = self.chat.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._tokenizer = None
        self._f_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._f_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._f_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self.stats = Stats()
        self.kv = None
        self.seq_len = 0
        self.tokens: list[int] = []  # the ids whose K/V the cache holds, in order
        self.reset()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    # --- KV cache ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the conversation: a fresh KV cache with one empty sequence (id 0)."""
        from tvm.runtime import ShapeTuple

        self.kv = None  # the old cache's pages are freed before the new one is allocated
        self.kv = self.vm["create_paged_kv_cache"](ShapeTuple([1]), ShapeTuple([self.context]),
                                                   ShapeTuple([self.prefill_chunk]), ShapeTuple([PAGE_SIZE]),
                                                   ShapeTuple([0]))
        self._f_add(self.kv, 0)
        self.seq_len = 0
        self.tokens = []

    def rollback(self, n: int) -> None:
        """Drop the last `n` tokens from the sequence (their K/V pages are freed): a chat turn that re-renders the
        conversation continues from the longest prefix the cache already holds."""
        import tvm

        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot roll back {n} of {self.seq_len} tokens")
        if n:
            tvm.get_global_func("vm.builtin.kv_state_popn")(self.kv, 0, n)
            self.seq_len -= n
            del self.tokens[len(self.tokens) - n:]

    def _forward(self, fn: str, ids: np.ndarray):
        import tvm
        from tvm.runtime import ShapeTuple

        n = int(ids.shape[0])
        if self.seq_len + n > self.context:
            raise UserError(f"sequence of {self.seq_len + n} tokens exceeds the context window of {self.context}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise UserError(f"token ids must lie in [0, {self.vocab})")
        emb = self.vm["embed"](tvm.runtime.tensor(ids.astype(np.int32), self.device), self.params)
        emb = emb._create_view((1, n, int(emb.shape[-1])))  # [n, H] -> [1, n, H], no copy
        self._f_begin(self.kv, ShapeTuple([0]), ShapeTuple([n]))
        logits, self.kv = self.vm[fn](emb, self.kv, self.params)
        self._f_end(self.kv)
        self.seq_len += n
        self.tokens.extend(int(t) for t in ids)
        return logits

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append prompt tokens `ids` [n] to the sequence; float32 logits [V] of the last one ([n, V] if all)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise UserError("empty prompt")
        t0 = time.perf_counter()
        outs = []
        for start in range(0, ids.size, self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            out = self._forward("prefill_logits" if all_logits else "prefill", chunk).numpy()
            outs.append(out[0])
        self._sync()
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_tokens += int(ids.size)
        return np.concatenate(outs, 0) if all_logits else outs[-1][-1]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; float32 logits [V] for the next."""
        t0 = time.perf_counter()
        out = self._forward("decode", np.array([token], dtype=np.int64)).numpy()[0, -1]
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_tokens += 1
        return out

    def _sync(self) -> None:
        self.device.sync()

    # --- generation -------------------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, stop_on_eos: bool = True, on_token=None) -> list[int]:
        """Prefill `prompt_ids` then decode up to `max_new_tokens` tokens; returns the new ids."""
        prompt_ids = list(prompt_ids)
        if self.seq_len + len(prompt_ids) + max_new_tokens > self.context:
            raise UserError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens does not fit the "
                            f"context window of {self.context} (already used: {self.seq_len})")
        rng = np.random.default_rng(seed)
        logits = self.prefill(prompt_ids)
        out: list[int] = []
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if stop_on_eos and tok in self.eos_ids:
                break
            if i + 1 < max_new_tokens:
                logits = self.decode(tok)
        return out

    def generate(self, prompt: str, max_new_tokens: int = 128, **kw) -> tuple[str, dict]:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        new = self.generate_ids(ids, max_new_tokens, **kw)
        return self.tokenizer.decode(new, skip_special_tokens=True), self.stats.as_dict()

    def reset_stats(self) -> None:
        self.stats = Stats()

    def kv_cache_mib(self, tokens: int | None = None) -> float:
        """Bytes of K and V for `tokens` positions (default: the whole context window, as reserved), all layers,
        in whole pages of PAGE_SIZE tokens."""
        mc = self.chat["model_config"]
        heads = mc.get("num_key_value_heads") or mc["num_attention_heads"]
        head_dim = mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]
        pages = -(-(self.context if tokens is None else tokens) // PAGE_SIZE)
        per_page = 2 * heads * PAGE_SIZE * head_dim * np.dtype(self.dtype).itemsize
        return mc["num_hidden_layers"] * pages * per_page / 2**20

    def memory_report(self) -> dict:
        """Peak process RSS (CPU) and where it goes; on CUDA also the device memory in use; on Vulkan the device's
        total memory and, where the driver tells (VK_EXT_memory_budget), the memory in use. On lavapipe device memory
        is host memory, so the RSS includes the weights and the KV cache.

        rss_split_mib (CPU): runtime = resident after the interpreter, TVM's runtime and the library were loaded,
        before any weight; weights = the parameter tensors (mapped ones are page-cache pages, resident once read);
        kv_cache = K/V of the tokens now in the cache; activations = the rest of the peak (VM workspace, logits,
        temporaries)."""
        rep = {"peak_rss_mib": round(peak_rss_mib(), 1)}
        if self.meta["target"] == "llvm":
            m = self.memory
            kv = self.kv_cache_mib(self.seq_len)
            split = {"runtime": m["runtime_mib"], "weights": m["weights_mib"], "kv_cache": kv,
                     "activations": max(0.0, rep["peak_rss_mib"] - m["runtime_mib"] - m["weights_mib"] - kv)}
            rep["rss_split_mib"] = {k: round(v, 1) for k, v in split.items()}
            rep["weights_mapped_mib"] = round(m["weights_mapped_mib"], 1)
            rep["kv_cache_reserved_mib"] = round(self.kv_cache_mib(), 1)
        if self.meta["target"] == "cuda":
            try:
                from cuda.bindings import runtime as cudart

                _, free, total = cudart.cudaMemGetInfo()
                rep["cuda_used_mib"] = round((total - free) / 2**20, 1)  # device-wide, read after the run
            except Exception:  # noqa: BLE001 - cuda-bindings absent: report RSS only
                rep["cuda_used_mib"] = None
        if self.meta["target"] == "vulkan":
            total, avail = self.device.total_global_memory, self.device.available_global_memory
            rep["vulkan_device"] = self.device.device_name
            rep["vulkan_total_mib"] = round(total / 2**20, 1) if total else None
            rep["vulkan_used_mib"] = round((total - avail) / 2**20, 1) if total and avail is not None else None
        return rep


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or temperature + nucleus sampling over float32 logits [V]."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


def tvm_perplexity(model_dir, lib_path, tokens, seqlen: int, max_windows: int | None = None,
                   device: str | None = None, steps: str = "prefill") -> float:
    """Perplexity through the compiled model; same windows and NLL as `omniquant.ppl.perplexity`.

    steps: "prefill" scores each window in one prefill (M = seqlen kernels); "decode" feeds it one token at a time
    (the M = 1 kernels a chat runs, e.g. the int8-dot GEMVs of `compile --int8-dot`), seqlen times slower."""
    if steps not in ("prefill", "decode"):
        raise UserError(f"steps must be prefill or decode, not {steps!r}")
    import torch

    from omniquant.ppl import from_nlls, window_bos, window_nlls

    eng = Engine(model_dir, lib_path, device=device)
    if seqlen > eng.context:
        raise UserError(f"seqlen {seqlen} exceeds the model's context window {eng.context}")
    mc = eng.chat["model_config"]
    bos = window_bos(mc.get("model_type"), eng.chat.get("bos_token_id", mc.get("bos_token_id")))

    def logits_fn(ids):
        eng.reset()
        if steps == "prefill":
            return torch.from_numpy(eng.prefill(ids[0].numpy(), all_logits=True))[None]
        row = ids[0].tolist()
        out = [eng.prefill(row[:1])] + [eng.decode(t) for t in row[1:]]
        return torch.from_numpy(np.stack(out))[None]

    return from_nlls(window_nlls(logits_fn, torch.as_tensor(tokens), seqlen, max_windows, desc="ppl (tvm)",
                                 bos=bos))
