"""The Vulkan-enabled TVM: where `make tvm-vulkan` puts it, and handing a command over to it.

The PyPI apache-tvm is built without Vulkan (no SPIR-V codegen, no Vulkan runtime). `tools/build_tvm_vulkan.sh`
builds TVM from source with USE_VULKAN=ON into a cache, with a venv of its own that sees this machine's packages but
imports that TVM first, and links `<cache>/python` to the venv's interpreter. A command that needs Vulkan
(`compile --target vulkan`, `chat`/`ppl` with a Vulkan library or `--device vulkan...`) started from another
interpreter re-executes itself there (`os.execv`), so users run the same `omniquant ...` command lines for every
target. `OMNIQUANT_TVM_VULKAN_PYTHON` names another interpreter; `TVM_VULKAN_CACHE` another cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ENV_PYTHON = "OMNIQUANT_TVM_VULKAN_PYTHON"
_HANDED_OVER = "OMNIQUANT_HANDED_TO_VULKAN_TVM"  # set in the child: never hand over twice

# What a Vulkan 1.1+ desktop GPU offers and MLC-LLM's vulkan target also assumes; lavapipe has all of it. No int64:
# the kernels index in int32 (`compile._gpu_schedule`).
VULKAN_TARGET = {"kind": "vulkan", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768,
                 "thread_warp_size": 1, "supports_float16": True, "supports_int8": True, "supports_int16": True,
                 "supports_8bit_buffer": True, "supports_16bit_buffer": True,
                 "supports_storage_buffer_storage_class": True}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("TVM_VULKAN_CACHE") or Path(base) / "omniquant-mlc" / "tvm-vulkan")


def vulkan_python() -> Path | None:
    """The interpreter of the Vulkan TVM's venv, or None when it has not been built. Returned as the venv's own
    bin/python: Python finds its venv (pyvenv.cfg) beside the path it was started by, so started through the
    cache's link it would run without the venv, i.e. with the PyPI TVM."""
    p = Path(os.environ.get(ENV_PYTHON) or cache_dir() / "python")
    if not p.exists():
        return None
    venv = _venv_of(p)
    return venv / "bin" / "python" if venv else p


def how_to_get(what: str) -> str:
    return (f"{what}: this TVM has no Vulkan support (the PyPI apache-tvm wheel is built with USE_VULKAN=OFF). "
            "Build one with `make tvm-vulkan` (once; hours on 2 cores; TVM_SOURCE=<tarball> for a local source), "
            f"then run the same command again: omniquant hands Vulkan work to it ({cache_dir()}/python, or "
            f"${ENV_PYTHON})")


def tvm_has_vulkan(codegen: bool = True) -> bool:
    """Whether the imported TVM can compile for Vulkan (`codegen`) or run Vulkan libraries (runtime)."""
    import tvm

    name = "target.build.vulkan" if codegen else "device_api.vulkan"
    return tvm.get_global_func(name, allow_missing=True) is not None


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def wants_vulkan(argv: list[str]) -> bool:
    """Does this command line compile for or run on Vulkan? Reads the library's side file (a small JSON) when a
    --lib is given; never imports TVM."""
    if (_flag(argv, "--target") or "").lower() == "vulkan" or (_flag(argv, "--device") or "").startswith("vulkan"):
        return True
    lib = _flag(argv, "--lib")
    if lib and Path(lib + ".json").is_file():
        try:
            return json.loads(Path(lib + ".json").read_text()).get("target") == "vulkan"
        except (OSError, ValueError):
            return False
    return False


def _venv_of(py: Path) -> Path | None:
    """The venv holding interpreter `py`: follow links one at a time (a venv's bin/python is itself a link to the
    base interpreter, so a full resolve() would leave the venv) until bin/../pyvenv.cfg exists."""
    for _ in range(8):
        if (py.parent.parent / "pyvenv.cfg").is_file():
            return py.parent.parent.resolve()
        if not py.is_symlink():
            return None
        py = py.parent / os.readlink(py)
    return None


def hand_over(argv: list[str]) -> None:
    """Re-execute `omniquant argv` in the Vulkan TVM's interpreter when the command needs Vulkan and this
    interpreter is not that one. Returns (doing nothing) when there is nothing to hand over to: the stage then
    fails with `how_to_get`'s message if this TVM lacks Vulkan."""
    if os.environ.get(_HANDED_OVER) or not wants_vulkan(argv):
        return
    py = vulkan_python()
    if py is None:
        return
    if Path(sys.prefix).resolve() == _venv_of(py):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_HANDED_OVER] = "1"
    os.execv(str(py), [str(py), "-m", "omniquant", *argv])
