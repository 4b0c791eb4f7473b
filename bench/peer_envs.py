"""Per-peer virtual environments under ``build/bench/venvs/<peer>``.

Peers pin mutually incompatible transformers versions, so each gets its own venv. Every install passes a constraint
file holding ``torch==2.13.0``: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.

    python -m bench.peer_envs [PEER ...]     # create / repair the venvs (idempotent; a marker file records success)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

VENV_ROOT = Path("build/bench/venvs")
TORCH_PIN = "torch==2.13.0"

# peer -> pip requirements (exact pins: the versions the benchmark was measured with).
PEER_REQUIREMENTS: dict[str, list[str]] = {
    "llmcompressor": ["llmcompressor==0.14.0.1"],
    "autoround": ["auto-round==0.16.1"],
    "gptqmodel": ["gptqmodel==7.6.0"],
    # hqq is called on raw weight tensors (no transformers integration), so only its core is needed.
    "hqq": ["hqq==0.2.8.post1"],
}

# Extra environment for the install (gptqmodel would try to compile CUDA kernels otherwise).
PEER_INSTALL_ENV: dict[str, dict[str, str]] = {
    "gptqmodel": {"BUILD_CUDA_EXT": "0", "GPTQMODEL_FORCE_BUILD": "0", "CUDA_VISIBLE_DEVICES": ""},
}

# Tools people would use that cannot run here, with the reason (listed in the report, not run).
NOT_RUNNABLE_ON_CPU: dict[str, str] = {
    "auto-gptq 0.7.1": "CUDA-only kernels; does not run on CPU",
    "autoawq 0.2.9": "CUDA-only kernels; does not run on CPU (AWQ is measured through llm-compressor instead)",
}


def venv_python(peer: str, root: Path = VENV_ROOT) -> Path:
    return root / peer / "bin" / "python"


def _marker(peer: str, root: Path) -> Path:
    return root / peer / ".bench-installed"


def is_ready(peer: str, root: Path = VENV_ROOT) -> bool:
    """True when the venv exists and its install finished with the current requirement pins."""
    m = _marker(peer, root)
    return m.exists() and m.read_text().strip() == " ".join(PEER_REQUIREMENTS[peer])


def ensure_venv(peer: str, root: Path = VENV_ROOT, log=sys.stderr) -> Path:
    """Create ``root/peer`` and install the peer's pinned requirements; returns the venv's python.

    Raises ``RuntimeError`` with the tail of the pip log when the install fails.
    """
    if peer not in PEER_REQUIREMENTS:
        raise KeyError(f"unknown peer {peer!r}; known: {', '.join(PEER_REQUIREMENTS)}")
    py = venv_python(peer, root)
    if is_ready(peer, root):
        return py
    root.mkdir(parents=True, exist_ok=True)
    venv_dir = root / peer
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    constraint = root / "constraints.txt"
    constraint.write_text(TORCH_PIN + "\n")
    env = dict(os.environ, **PEER_INSTALL_ENV.get(peer, {}))
    logfile = root / f"{peer}.install.log"
    cmd = [str(py), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraint.resolve()),
           TORCH_PIN, *PEER_REQUIREMENTS[peer]]
    print(f"[peer_envs] installing {peer}: {' '.join(cmd[3:])} (log: {logfile})", file=log, flush=True)
    t0 = time.time()
    with open(logfile, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"pip install for {peer} failed (rc={rc}); see {logfile}:\n{tail}")
    _marker(peer, root).write_text(" ".join(PEER_REQUIREMENTS[peer]) + "\n")
    print(f"[peer_envs] {peer} ready in {time.time() - t0:.0f} s", file=log, flush=True)
    return py


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", nargs="*", default=list(PEER_REQUIREMENTS), help="peers to install (default: all)")
    ap.add_argument("--root", type=Path, default=VENV_ROOT)
    args = ap.parse_args(argv)
    failed = []
    for peer in args.peers:
        try:
            ensure_venv(peer, args.root)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"[peer_envs] {peer}: {e}", file=sys.stderr)
            failed.append(peer)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
