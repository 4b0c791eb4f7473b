"""Fake-quant checkpoint (docs/formats.md §1) -> packed MLC weights directory (docs/formats.md §2).

Integer codes come from the calibration's sidecar (`quant_params.safetensors`: scales float32 [N, G], zeros int32
[N, G]) and are checked to reproduce the fake-quant weights bit for bit before anything is written. Non-quantized
tensors (norms, embeddings, biases, lm_head) are stored float16 under their HF names.

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
from mlc_schemes.packing import codes_from_fakequant, pack_codes
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


class _SafetensorsDir:
    """Lazy access to the tensors of a `save_pretrained` directory (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"no model.safetensors in {directory}")
        self._handles = [safe_open(directory / f, framework="pt") for f in files]
        self.where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> list[int]:
        return list(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 numpy (bf16 / fp16 checkpoints are widened exactly)."""
        import torch

        t = self.where[name].get_tensor(name)
        return t.to(torch.float32).numpy() if t.is_floating_point() else t.numpy()


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


def linear_params(name: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                  scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    """Stored tensors of one quantized linear from its integer codes [N, K] and scales / zeros [N, G]:
    `<name>.q_weight` uint32 [N, ceil(K / epw)], `<name>.q_scale` fp16 and (asymmetric) `<name>.q_zero` fp16."""
    yield f"{name}.q_weight", pack_codes(codes, scheme.bits)
    yield f"{name}.q_scale", np.asarray(scales).astype(np.float16)
    if scheme.stores_zero:
        yield f"{name}.q_zero", np.asarray(zeros).astype(np.float16)


def _fakequant_linear(name: str, weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                      scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    """Codes of a fake-quant weight from its sidecar grid (checked exact), then packed."""
    k = weight.shape[1]
    try:
        codes = codes_from_fakequant(weight, scales, zeros, scheme.bits, scheme.group_width(k), scheme.qmax)
        if scheme.fixed_zero is not None and np.any(zeros != scheme.fixed_zero):
            raise ValueError(f"symmetric scheme needs every zero = {scheme.fixed_zero}")
    except ValueError as e:
        raise UserError(f"sidecar inconsistent with the weights of {name}: {e}") from None
    yield from linear_params(name, codes, scales, zeros, scheme)


EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _rtn_linear(name: str, weight: np.ndarray, scheme: QuantScheme) -> Iterator[tuple[str, np.ndarray]]:
    """Round-to-nearest codes of a float weight [N, K] under `scheme` (the calibration's quantizer without LWC:
    same fp16-exact scales, zero and ragged-group rule), packed."""
    import torch

    from omniquant.quant.lwc import LWCQuantizer
    from omniquant.quant.spec import WeightQuantSpec

    spec = WeightQuantSpec(scheme.bits, scheme.group_size, scheme.symmetric)
    w_fq, scales, zeros = LWCQuantizer(weight.shape, spec, lwc=False).export(torch.from_numpy(weight))
    yield from _fakequant_linear(name, w_fq.numpy(), scales.numpy(), zeros.numpy(), scheme)


def to_float16(name: str, arr: np.ndarray) -> np.ndarray:
    """A non-quantized tensor as stored (float16); UserError when finite values overflow float16."""
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
    from safetensors import safe_open
    from tqdm import tqdm

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

    weights = _SafetensorsDir(src)
    sidecar = safe_open(src / QUANT_PARAMS, framework="np")
    linears = list(qconfig.get("quantized_linears") or [])
    side_names = set(sidecar.keys())
    expected = {f"{n}.{p}" for n in linears for p in ("scales", "zeros")}
    if missing := sorted(expected - side_names):
        raise UserError(f"sidecar lacks {len(missing)} tensors, e.g. {missing[0]}")
    if extra := sorted(side_names - expected):
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
        for name, dname in tqdm(deployed.items(), desc=f"pack {scheme.name}", unit="tensor", disable=not progress):
            arr = weights.get(name)
            if dname in quantized:
                lin = quantized[dname]
                yield from _fakequant_linear(dname.removesuffix(".weight"), arr, sidecar.get_tensor(f"{lin}.scales"),
                                             sidecar.get_tensor(f"{lin}.zeros"), scheme)
            elif embed_scheme is not None and dname.removesuffix(".weight") in embedded:
                yield from _rtn_linear(dname.removesuffix(".weight"), arr, embed_scheme)
            else:
                yield dname, to_float16(dname, arr)

    return write_packed_model(output_dir, hf_config, scheme, tensors(), shapes, lambda: int(logical), src,
                              calibration=qconfig, embedding=(embed_scheme, embedded) if embed_scheme else None)


def source_view(source_config: dict):
    """(deployed HF config, checkpoint tensor name -> deployed name or None) from the architecture's TVM model file
    (mlc_schemes.model); UserError for an architecture without a TVM model."""
    from mlc_schemes.model import get_architecture

    return get_architecture(source_config.get("model_type"), "pack").source_view(source_config)
