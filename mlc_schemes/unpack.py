"""Read a packed weights directory back: verified numpy params, dequantized HF state dict, and an HF model.

`unpack_to_hf(dir)` proves the chain without TVM. Its quantized linears hold the exact grid values (q - z) * s
(float32), which the fake-quant checkpoint stores rounded once to its dtype (docs/formats.md §1): with
`dtype="source"` they are rounded the same way and equal the checkpoint's bit for bit. The other tensors went
through float16. It reads the packed directory shard by shard and builds the model on the meta device, so memory is
the model in `dtype` plus one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlc_schemes.chat_config import hf_config_from_model_config
from mlc_schemes.packing import dequantize, unpack_codes
from mlc_schemes.schemes import QuantScheme, scheme_from_json
from mlc_schemes.weights_dir import CHAT_CONFIG, iter_tensor_cache, read_tensor_cache
from omniquant.errors import UserError


def _check_linears(params: dict[str, np.ndarray], scheme: QuantScheme, linears: dict[str, list[int]]) -> None:
    for name, (n, k) in linears.items():
        want = {"q_weight": ("uint32", (n, scheme.num_words(k))), "q_scale": ("float16", (n, scheme.num_groups(k)))}
        if scheme.stores_zero:
            want["q_zero"] = ("float16", (n, scheme.num_groups(k)))
        for suffix, (dtype, shape) in want.items():
            arr = params.get(f"{name}.{suffix}")
            if arr is None:
                raise UserError(f"packed weights lack {name}.{suffix}")
            if str(arr.dtype) != dtype or arr.shape != shape:
                raise UserError(f"{name}.{suffix} is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")


def load_packed(directory: str | Path, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(mlc-chat-config dict, name -> numpy array as stored, read-only) of a packed directory.

    Shard sizes are always checked, md5 sums unless `verify=False`.
    Also checks that every quantized linear named in the config has its q_weight / q_scale (/ q_zero) with the
    dtype and shape the scheme implies.
    """
    directory = Path(directory)
    cfg_path = directory / CHAT_CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{directory} is not a packed weights directory (no {CHAT_CONFIG})")
    chat_config = json.loads(cfg_path.read_text())
    params, _ = read_tensor_cache(directory, verify=verify)
    qc = chat_config.get("quantization_config") or {}
    _check_linears(params, scheme_from_json(qc), qc.get("quantized_linears", {}))
    if (emb := embedding_quantization(chat_config)) is not None:
        _check_linears(params, *emb)
    return chat_config, params


def scheme_of(chat_config: dict) -> QuantScheme:
    """The scheme a packed directory was written with (from its `quantization_config`)."""
    return scheme_from_json(chat_config["quantization_config"])


def embedding_quantization(chat_config: dict) -> tuple[QuantScheme, dict[str, list[int]]] | None:
    """(scheme, name -> [V, H]) of the quantized embedding / lm_head tensors, or None when they are float16."""
    eq = (chat_config.get("quantization_config") or {}).get("embedding_quantization")
    return None if not eq else (scheme_from_json(eq), eq["quantized_tensors"])


def dequantize_linear(params: dict[str, np.ndarray], name: str, k: int, scheme: QuantScheme) -> np.ndarray:
    """float32 weight [N, K] of quantized linear `name` from its packed params."""
    codes = unpack_codes(params[f"{name}.q_weight"], scheme.bits, k)
    zero = params[f"{name}.q_zero"] if scheme.stores_zero else scheme.fixed_zero
    return dequantize(codes, params[f"{name}.q_scale"], zero, scheme.group_width(k))


def dequantized_state_dict(chat_config: dict, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named float32 state dict: quantized linears dequantized, everything else widened from float16."""
    groups = [(scheme_of(chat_config), chat_config["quantization_config"]["quantized_linears"])]
    if (emb := embedding_quantization(chat_config)) is not None:
        groups.append(emb)
    owned = {f"{name}.{s}" for _, names in groups for name in names for s in ("q_weight", "q_scale", "q_zero")}
    state = {name: arr.astype(np.float32) for name, arr in params.items() if name not in owned}
    for scheme, names in groups:
        for name, (_, k) in names.items():
            state[f"{name}.weight"] = dequantize_linear(params, name, k, scheme)
    return state


def iter_hf_tensors(directory: str | Path, verify: bool = True):
    """(mlc-chat-config, iterator of (HF name, float32 numpy array)) of a packed directory, read shard by shard; a
    quantized tensor is dequantized once all its parts (which may straddle shards) were read, after the same
    dtype / shape checks as `load_packed`."""
    directory = Path(directory)
    cfg_path = directory / CHAT_CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{directory} is not a packed weights directory (no {CHAT_CONFIG})")
    chat_config = json.loads(cfg_path.read_text())
    groups = [(scheme_of(chat_config), chat_config["quantization_config"].get("quantized_linears", {}))]
    if (emb := embedding_quantization(chat_config)) is not None:
        groups.append(emb)
    owner = {}  # stored param name -> (scheme, linear name, [N, K])
    for scheme, names in groups:
        parts = ("q_weight", "q_scale") + (("q_zero",) if scheme.stores_zero else ())
        for name, shape in names.items():
            for part in parts:
                owner[f"{name}.{part}"] = (scheme, name, shape, len(parts))

    def tensors():
        pending: dict[str, dict[str, np.ndarray]] = {}
        for shard in iter_tensor_cache(directory, verify):
            for pname, arr in shard.items():
                if pname not in owner:
                    yield pname, arr.astype(np.float32)
                    continue
                scheme, name, (_, k), n_parts = owner[pname]
                got = pending.setdefault(name, {})
                got[pname] = arr.copy()  # the shard's bytes are released after this shard
                if len(got) == n_parts:
                    del pending[name]
                    _check_linears(got, scheme, {name: owner[pname][2]})
                    yield f"{name}.weight", dequantize_linear(got, name, k, scheme)
        if pending:
            name = next(iter(pending))
            raise UserError(f"packed weights lack parts of {name}: have {sorted(pending[name])}")

    return chat_config, tensors()


def unpack_to_hf(directory: str | Path, verify: bool = True, dtype="float32"):
    """A `transformers` causal LM (eval mode) rebuilt from a packed directory.

    dtype: a torch dtype or its name; "source" = the dtype the calibration stored the weights in (quantized linears
    then equal the fake-quant checkpoint's bit for bit); default float32 (exact grid values).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from omniquant.lazy_model import assign_tensor, state_names

    chat_config, tensors = iter_hf_tensors(directory, verify=verify)
    if dtype == "source":
        dtype = (chat_config["quantization_config"].get("calibration") or {}).get("weight_dtype", "float32")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hf = hf_config_from_model_config(chat_config["model_config"])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    wanted = set(state_names(model))
    seen, unexpected = set(), []
    for name, arr in tensors:
        if name not in wanted:
            unexpected.append(name)
            continue
        assign_tensor(model, name, torch.from_numpy(arr).to(dtype))
        seen.add(name)
    model.tie_weights()
    if unexpected or wanted - seen:
        raise UserError(f"packed weights do not fit {config.model_type}: missing {sorted(wanted - seen)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()
