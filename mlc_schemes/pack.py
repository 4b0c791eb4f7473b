"""Fake-quant checkpoint (docs/formats.md §1) -> packed MLC weights directory (docs/formats.md §2).

Integer codes come from the calibration's sidecar (`quant_params.safetensors`: scales float32 [N, G], zeros int32
[N, G], and `codes` uint8 [N, K] where the stored dtype cannot hold them): recovered from each stored weight
(float16 / bfloat16 / float32) as z + rint(w / s) and checked to reproduce it bit for bit (the stored weight is the
float32 grid value (q - z) * s rounded once to its dtype, docs/formats.md §1) before anything is written.
Non-quantized tensors (norms, embeddings, biases, lm_head) are stored float16 under their HF names. The checkpoint
is read shard by shard, one tensor at a time, and the output is streamed into 32 MB shards: memory follows the
largest tensor, not the model.

Optionally (`embedding_scheme`) the token embedding [V, H] and an untied lm_head [V, H] are round-to-nearest
quantized with a second scheme at pack time, stored like a quantized linear (`model.embed_tokens.q_weight`, ...)
and listed under `quantization_config.embedding_quantization` (MLC's quantize_embedding / quantize_final_fc). OmniQuant
does not calibrate them; the tied embedding is also the lm_head, the largest single weight read per decoded token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from mlc_schemes.chat_config import build_chat_config, copy_tokenizer
from mlc_schemes.packing import pack_codes
from mlc_schemes.schemes import QuantScheme, get_scheme
from mlc_schemes.weights_dir import CHAT_CONFIG, write_tensor_cache
from omniquant.atomic import atomic_dir
from omniquant.errors import UserError

QUANT_CONFIG = "quant_config.json"
QUANT_PARAMS = "quant_params.safetensors"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} missing: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def check_compatible(quant_config: dict, scheme: QuantScheme) -> None:
    """The scheme must store exactly what the calibration produced: same bits, group size and symmetry."""
    got = (quant_config.get("wbits"), quant_config.get("group_size"), bool(quant_config.get("symmetric")))
    want = (scheme.bits, scheme.group_size, scheme.symmetric)
    if got != want:
        raise UserError(
            f"scheme {scheme.name} stores {scheme.bits}-bit, group {scheme.group_size}, "
            f"{'symmetric' if scheme.symmetric else 'asymmetric'} codes but the checkpoint was calibrated with "
            f"wbits={got[0]}, group_size={got[1]}, {'symmetric' if got[2] else 'asymmetric'}"
        )
    for key, what in (("abits", "activations"), ("kv_bits", "the KV cache")):
        if int(quant_config.get(key, 16)) < 16:
            raise UserError(f"scheme {scheme.name} is weight-only (a16, fp16 KV cache) but the checkpoint was "
                            f"calibrated with {what} quantized to {quant_config[key]} bits")


ROWS = 1024  # rows of a weight handled at a time (bounded temporaries for [32000, 8192] embeddings too)


def linear_params(name: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                  scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    """Stored tensors of one quantized linear from its integer codes [N, K] and scales / zeros [N, G]:
    `<name>.q_weight` uint32 [N, ceil(K / epw)], `<name>.q_scale` fp16 and (asymmetric) `<name>.q_zero` fp16."""
    codes = np.asarray(codes)
    n, k = codes.shape
    q_weight = np.empty((n, scheme.num_words(k)), np.uint32)
    for r in range(0, n, ROWS):  # row blocks: pack_codes widens to uint32 and shifts, several copies of its input
        q_weight[r:r + ROWS] = pack_codes(codes[r:r + ROWS], scheme.bits)
    yield from _packed(name, q_weight, scales, zeros, scheme)


def _packed(name: str, q_weight: np.ndarray, scales, zeros, scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{name}.q_weight", q_weight
    yield f"{name}.q_scale", np.asarray(scales).astype(np.float16)
    if scheme.stores_zero:
        yield f"{name}.q_zero", np.asarray(zeros).astype(np.float16)


def _quantized_linear(name: str, stored, scales, zeros, codes, scheme: QuantScheme
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """Packed tensors of one quantized linear from its stored weight (torch, any float dtype) and sidecar entries
    (numpy or torch; `codes` None: recovered from the weight), after checking that they reproduce it exactly."""
    import torch

    from omniquant.quant.codes import recover_codes, stored_weight

    n, k = stored.shape
    gw = scheme.group_width(k)
    scales, zeros = torch.as_tensor(np.asarray(scales)), torch.as_tensor(np.asarray(zeros))
    out = np.empty((n, k), np.uint8)  # codes (< 2^8), row block by row block
    try:
        if scales.shape != (n, -(-k // gw)) or zeros.shape != scales.shape:
            raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match weight "
                             f"{list(stored.shape)} with group size {gw}")
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError("scales must be finite and positive")
        if not torch.equal(scales.half().float(), scales.float()):
            raise ValueError("scales are not exactly representable in float16")
        if (zeros < 0).any() or (zeros > scheme.qmax).any():
            raise ValueError(f"zeros must be integers in [0, {scheme.qmax}]")
        if scheme.fixed_zero is not None and (zeros != scheme.fixed_zero).any():
            raise ValueError(f"symmetric scheme needs every zero = {scheme.fixed_zero}")
        if codes is not None and tuple(codes.shape) != (n, k):
            raise ValueError(f"sidecar codes {tuple(codes.shape)} do not fit weight {list(stored.shape)}")
        for r in range(0, n, ROWS):
            rows = slice(r, r + ROWS)
            if codes is None:
                c = recover_codes(stored[rows], scales[rows], zeros[rows], scheme.bits, gw, scheme.symmetric)
            else:
                c = torch.as_tensor(np.asarray(codes[rows])).to(torch.int32)
                if (c > scheme.qmax).any() or not torch.equal(
                        stored_weight(c, scales[rows], zeros[rows], gw, stored.dtype), stored[rows]):
                    raise ValueError("the sidecar's codes do not reproduce the stored weights")
            out[rows] = c.numpy()
    except ValueError as e:
        raise UserError(f"sidecar inconsistent with the weights of {name}: {e}") from None
    yield from linear_params(name, out, scales.numpy(), zeros.numpy(), scheme)


EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _rtn_linear(name: str, weight, scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    """Round-to-nearest codes of a float weight [N, K] (torch, any float dtype) under `scheme` (the calibration's
    quantizer without LWC: same fp16-exact scales, zero and ragged-group rule), packed."""
    import torch

    from omniquant.heap import release_freed_memory
    from omniquant.quant.lwc import LWCQuantizer
    from omniquant.quant.spec import WeightQuantSpec

    spec = WeightQuantSpec(scheme.bits, scheme.group_size, scheme.symmetric)
    weight = torch.as_tensor(weight)
    n, k = weight.shape
    quant = LWCQuantizer((ROWS, k), spec, lwc=False)
    q_weight = np.empty((n, scheme.num_words(k)), np.uint32)  # filled in place: no list of blocks to concatenate
    scales, zeros = [], []
    for r in range(0, n, ROWS):  # rows are quantized independently: a row block at a time bounds the temporaries
        w_fq, s, z = quant.export(weight[r:r + ROWS].float())
        q_weight[r:r + ROWS] = dict(_quantized_linear(name, w_fq, s, z, None, scheme))[f"{name}.q_weight"]
        scales.append(s)
        zeros.append(z)
        del w_fq
        release_freed_memory()
    yield from _packed(name, q_weight, torch.cat(scales).numpy(), torch.cat(zeros).numpy(), scheme)


def to_float16(name: str, arr) -> np.ndarray:
    """A non-quantized tensor (numpy, or torch of any float dtype) as stored (float16); UserError when finite values
    overflow float16."""
    if not isinstance(arr, np.ndarray):
        arr = arr.float().numpy()
    half = np.asarray(arr).astype(np.float16)
    if np.isfinite(arr).all() and not np.isfinite(half).all():
        raise UserError(f"{name} overflows float16 (max |x| {np.abs(arr).max():.3g})")
    return half


def write_packed_model(output_dir: str | Path, hf_config: dict, scheme: QuantScheme,
                       params: Iterable[tuple[str, np.ndarray]], quantized_linears: dict[str, list[int]],
                       logical_params: Callable[[], int], source_dir: Path | None = None,
                       calibration: dict | None = None, embedding: tuple[QuantScheme, dict] | None = None) -> Path:
    """Write a complete packed directory atomically: tensor cache of `params` (as stored: uint32 / fp16),
    `mlc-chat-config.json`, and the tokenizer files of `source_dir` (if given).

    `quantized_linears`: name -> [N, K]; `logical_params()` (called after `params` is exhausted): parameter count
    of the unquantized model. `embedding`: (scheme, name -> [V, H]) of quantized embedding / lm_head tensors. Used
    by `pack_checkpoint`, and usable for synthetic weights (random-weight benches).
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise UserError(f"output {output_dir} already exists; choose a new path or remove it")
    with atomic_dir(output_dir) as tmp:
        write_tensor_cache(params, tmp, logical_params_fn=logical_params)
        chat = build_chat_config(hf_config, scheme, quantized_linears, source_dir, calibration=calibration,
                                 embedding=embedding)
        (tmp / CHAT_CONFIG).write_text(json.dumps(chat, indent=2) + "\n")
        if source_dir is not None:
            copy_tokenizer(source_dir, tmp, chat["tokenizer_files"])
    return output_dir


def pack_checkpoint(fakequant_dir: str | Path, scheme_name: str, output_dir: str | Path,
                    progress: bool = True, embedding_scheme: str | None = None) -> Path:
    """Pack the fake-quant checkpoint in `fakequant_dir` with scheme `scheme_name` into new dir `output_dir`;
    with `embedding_scheme`, the embedding (and an untied lm_head) are RTN-quantized with that scheme.

    Raises UserError for a missing / inconsistent sidecar, a scheme that does not match the calibration, an
    architecture without a TVM model, or an existing `output_dir`; on any failure nothing is left at `output_dir`.
    Tensors are stored under the names the architecture's model reads (`source_view`: e.g. the text model of a
    multimodal Gemma 3, whose vision tower is not packed).
    """
    from tqdm import tqdm

    from omniquant.heap import release_freed_memory
    from omniquant.safetensors_io import SafetensorsDir

    src, output_dir = Path(fakequant_dir), Path(output_dir)
    scheme = get_scheme(scheme_name)
    embed_scheme = get_scheme(embedding_scheme) if embedding_scheme else None
    if output_dir.exists():
        raise UserError(f"output {output_dir} already exists; choose a new path or remove it")
    source_config = _read_json(src / "config.json", "HF config")
    hf_config, deployed_name = source_view(source_config)
    qconfig = _read_json(src / QUANT_CONFIG, "quantization sidecar")
    if not (src / QUANT_PARAMS).is_file():
        raise UserError(f"quantization sidecar missing: {src / QUANT_PARAMS}")
    check_compatible(qconfig, scheme)

    weights = SafetensorsDir(src)
    sidecar = SafetensorsDir(src, stem=QUANT_PARAMS.removesuffix(".safetensors"))
    linears = list(qconfig.get("quantized_linears") or [])
    side_names = set(sidecar.names())
    expected = {f"{n}.{p}" for n in linears for p in ("scales", "zeros")}
    with_codes = {n for n in linears if f"{n}.codes" in side_names}
    if missing := sorted(expected - side_names):
        raise UserError(f"sidecar lacks {len(missing)} tensors, e.g. {missing[0]}")
    if extra := sorted(side_names - expected - {f"{n}.codes" for n in with_codes}):
        raise UserError(f"sidecar has tensors for linears not listed in {QUANT_CONFIG}, e.g. {extra[0]}")
    # Names are compared as deployed (the architecture's source view: a multimodal model keeps its text model, and
    # the sidecar's module names may differ from the names transformers writes to disk).
    deployed = {n: d for n in weights.names() if (d := deployed_name(n)) is not None}  # on disk -> deployed
    if hf_config.get("tie_word_embeddings"):
        deployed = {n: d for n, d in deployed.items() if d != "lm_head.weight"}  # tied: stored once, as HF does
    on_disk = {d: n for n, d in deployed.items()}
    quantized = {deployed_name(f"{n}.weight"): n for n in linears}  # deployed weight -> sidecar's linear name
    if missing := [n for d, n in quantized.items() if d not in on_disk]:
        raise UserError(f"quantized linear {missing[0]} has no weight in the checkpoint")
    shapes = {d.removesuffix(".weight"): weights.shape(on_disk[d]) for d in quantized}
    if bad := [n for n, shape in shapes.items() if len(shape) != 2]:
        raise UserError(f"quantized linear {bad[0]} has a {len(shapes[bad[0]])}-D weight")
    logical = sum(np.prod(weights.shape(n), dtype=np.int64) for n in deployed)
    embedded = {d.removesuffix(".weight"): weights.shape(n) for n, d in deployed.items() if d in EMBEDDING_TENSORS}
    if embed_scheme is not None and not embedded:
        raise UserError(f"--embedding-scheme {embed_scheme.name}: the checkpoint has no {EMBEDDING_TENSORS[0]}")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        bar = tqdm(total=len(deployed), desc=f"pack {scheme.name}", unit="tensor", disable=not progress)
        for _file, in_file in weights.by_file(deployed):  # shard by shard, one tensor at a time
            for name in in_file:
                dname, t = deployed[name], weights.get(name)
                if dname in quantized:
                    lin = quantized[dname]
                    codes = sidecar.get(f"{lin}.codes") if lin in with_codes else None
                    yield from _quantized_linear(dname.removesuffix(".weight"), t, sidecar.get(f"{lin}.scales"),
                                                 sidecar.get(f"{lin}.zeros"), codes, scheme)
                elif embed_scheme is not None and dname.removesuffix(".weight") in embedded:
                    yield from _rtn_linear(dname.removesuffix(".weight"), t, embed_scheme)
                else:
                    yield dname, to_float16(dname, t)
                del t
                release_freed_memory()  # the row-block temporaries' heap pages (omniquant/heap.py)
                bar.update(1)
        bar.close()

    return write_packed_model(output_dir, hf_config, scheme, tensors(), shapes, lambda: int(logical), src,
                              calibration=qconfig, embedding=(embed_scheme, embedded) if embed_scheme else None)


def source_view(source_config: dict):
    """(deployed HF config, checkpoint tensor name -> deployed name or None) from the architecture's TVM model file
    (mlc_schemes.model); UserError for an architecture without a TVM model."""
    from mlc_schemes.model import get_architecture

    return get_architecture(source_config.get("model_type"), "pack").source_view(source_config)
