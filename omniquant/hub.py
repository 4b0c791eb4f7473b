"""`--model NAME` -> a local Hugging Face checkpoint directory.

NAME is, in this order:
  1. a local directory holding config.json;
  2. a locally prepared model (`smollm2`: omniquant.real_model.KNOWN_MODELS, built on first use);
  3. a short preset (PRESETS: `llama2-7b` -> `meta-llama/Llama-2-7b-hf`, ...);
  4. a Hugging Face hub id `org/name` (at `revision`: branch, tag or commit).

Hub models come from the local hub cache first (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, read
when called, not when huggingface_hub was imported); when the cached snapshot is missing or incomplete and
HF_HUB_OFFLINE is not set, only the files a causal LM needs are downloaded into that cache (config, tokenizer,
generation config, the safetensors shards + index; the PyTorch .bin files only when the repo has no safetensors).
Gated repos use the token huggingface_hub finds (HF_TOKEN, or `hf auth login`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import sys
from pathlib import Path

from omniquant.errors import UserError

# preset -> hub repo id. Architectures the calibration adapters handle (llama / mistral / qwen2 / opt).
PRESETS: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-6.7b": "facebook/opt-6.7b",
    "opt-13b": "facebook/opt-13b",
}

# Top-level repo files a causal LM needs besides its weights.
_NEEDED = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
           "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken", "chat_template*")
# Weight files the transformers loader reads, in preference order (a repo's other *.safetensors, e.g. Mistral's
# consolidated.safetensors, and .bin/.pth/.gguf/onnx copies are not fetched).
_WEIGHTS = (("model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin"))
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use if imported now (env read at call time)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        d = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    else:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                  "huggingface")
        d = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(d)))


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE
    return now or bool(constants.HF_HUB_OFFLINE)


def missing_files(snapshot: Path) -> list[str]:
    """What a local checkpoint dir lacks to load as a causal LM ([] = complete). Broken cache symlinks count as missing."""
    snapshot = Path(snapshot)
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    for index, single, _ in _WEIGHTS:
        if (snapshot / index).is_file():
            shards = sorted(set(json.loads((snapshot / index).read_text())["weight_map"].values()))
            missing += [s for s in shards if not (snapshot / s).is_file()]
            break
        if (snapshot / single).is_file():
            break
    else:
        missing.append("model weights (model.safetensors or a sharded model.safetensors.index.json)")
    if not any((snapshot / t).is_file() for t in _TOKENIZER):
        missing.append(f"tokenizer ({' / '.join(_TOKENIZER)})")
    return missing


def select_files(repo_files: list[str]) -> list[str]:
    """The repo files to download: top-level config/tokenizer files and the preferred weight format's files."""
    top = [f for f in repo_files if "/" not in f]

    def matching(patterns) -> list[str]:
        return [f for f in top if any(fnmatch.fnmatch(f, p) for p in patterns)]

    weights = next((w for w in (matching(p) for p in _WEIGHTS) if w), [])
    return sorted(set(matching(_NEEDED)) | set(weights))


def describe(repo_id: str, revision: str | None, preset: str | None) -> str:
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    return where + (f" (preset {preset})" if preset else "")


def _offline_note() -> str:
    return "HF_HUB_OFFLINE=1 is set" if offline() else "HF_HUB_OFFLINE is not set"


def _token_note() -> str:
    from huggingface_hub import get_token

    return ("a token is set but has no access: accept the license on the model page with that account"
            if get_token() else "no token is set: accept the license on the model page, then export HF_TOKEN=hf_... "
                                "(or run `hf auth login`)")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot dir of `repo_id` at `revision` (branch/tag via refs/, or a commit), or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    cfg = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir(), revision=revision)
    return Path(cfg).parent if isinstance(cfg, str) else None


def hub_snapshot(repo_id: str, revision: str | None = None, preset: str | None = None) -> Path:
    """Local snapshot dir of hub model `repo_id`: from the cache, else downloaded (unless offline). UserError when
    neither works, naming the repo, the offline setting and the fix."""
    what, cache = describe(repo_id, revision, preset), cache_dir()
    local = cached_snapshot(repo_id, revision)
    if local is not None and not missing_files(local):
        return local
    if offline():
        lacking = (f"the cached snapshot {local} lacks {', '.join(missing_files(local))}" if local else
                   f"it is not in the local Hugging Face cache {cache}")
        raise UserError(
            f"model {what}: {lacking}, and HF_HUB_OFFLINE=1 is set so nothing is downloaded. Fix: unset "
            f"HF_HUB_OFFLINE to download it, or download it where there is network (`hf download {repo_id}`) and "
            "point HF_HOME or HF_HUB_CACHE at that cache, or pass a local checkpoint directory as --model")
    path = _download(repo_id, revision, what, cache)
    if missing_files(path):
        raise UserError(f"model {what}: the downloaded snapshot {path} lacks {', '.join(missing_files(path))}")
    return path


def _download(repo_id: str, revision: str | None, what: str, cache: Path) -> Path:
    """Download the files select_files() picks into the hub cache (progress bars from huggingface_hub)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = (f"model {what}: the Hugging Face hub could not be reached ({{}}); HF_HUB_OFFLINE is not set. "
                   "Check the network, or set HF_HUB_OFFLINE=1 and use a cached model or a local directory")
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        wanted = select_files(files)
        if not any(f.endswith((".safetensors", ".bin")) for f in wanted):
            raise UserError(f"model {what} has no transformers weights (model*.safetensors or pytorch_model*.bin); "
                            f"its files: {', '.join(files[:20])}")
        print(f"downloading {what} into {cache}: {', '.join(wanted)}", file=sys.stderr)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=wanted))
    except GatedRepoError as e:
        raise UserError(f"model {what} is gated and {_token_note()} ({_offline_note()})") from e
    except RevisionNotFoundError as e:
        raise UserError(f"model {what}: revision {revision!r} does not exist on the hub ({_offline_note()})") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"model {what} not found on the Hugging Face hub (or it is private and the token has no "
                        f"access); check the spelling, or pass a local directory ({_offline_note()})") from e
    except HfHubHTTPError as e:
        raise UserError(f"model {what}: the hub answered {e} ({_offline_note()})") from e
    except (LocalEntryNotFoundError, ConnectionError) as e:
        raise UserError(unreachable.format(f"{type(e).__name__}: {e}")) from e
    except OSError as e:  # disk full, permissions: the cache keeps only completed files (.incomplete otherwise)
        raise UserError(f"model {what}: writing into the hub cache {cache} failed: {e}") from e
    except Exception as e:  # the HTTP client's own network errors (httpx / requests, by huggingface_hub version)
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise
        raise UserError(unreachable.format(f"{type(e).__name__}: {e}")) from e


def _known_local() -> dict:
    try:
        from omniquant.real_model import KNOWN_MODELS
    except ImportError:
        return {}
    return KNOWN_MODELS


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """`--model` -> local checkpoint dir: a directory, a locally prepared name, a preset or a hub id (module doc)."""
    name = str(model)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"model directory {p} has no config.json (not a Hugging Face checkpoint)")
        if revision:
            raise UserError(f"--revision {revision} applies to hub models, not to the local directory {p}")
        return p
    local = _known_local()
    if name in local:
        if revision:
            raise UserError(f"--revision applies to hub models, not to the locally prepared model {name}")
        return Path(local[name]())
    if name in PRESETS:
        return hub_snapshot(PRESETS[name], revision, preset=name)
    if _HUB_ID.match(name) and not p.exists():
        try:
            return hub_snapshot(name, revision)
        except UserError as e:
            raise UserError(f"{e} (no local directory {name} exists either)") from e
    names = [*local, *PRESETS]
    if "/" in name or os.sep in name or name.startswith((".", "~")) or p.exists():
        what = "is not a directory" if p.exists() else "does not exist"
        raise UserError(f"model directory {name} {what} (nor is it a preset or a hub id org/name)")
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"model {name!r} is neither a directory, a preset, nor a Hugging Face hub id (org/name).{hint} "
                    f"Presets: {', '.join(names)}")


def add_model_arguments(p, what: str) -> None:
    """`--model` (dir, preset or hub id) and `--revision` on an argparse parser."""
    p.add_argument("--model", required=True, help=what + "; or a preset (llama2-7b, llama3.1-8b, mistral-7b, "
                   "qwen2.5-7b, ... see README), or a Hugging Face hub id org/name (local cache first, HF_HUB_OFFLINE honoured)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of a hub --model (default: main)")
