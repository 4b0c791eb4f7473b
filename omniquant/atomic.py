"""Write-then-rename helpers: a failed or killed run never leaves a half-written file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while writing")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Delete the temporary siblings `atomic_dir` left for `target` in processes that were killed (SIGKILL skips
    the cleanup): a killed multi-GB export must not fill the disk run after run. Live processes' are kept."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = p.name[len(target.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
