"""Where shared data lives: `../shared` beside the checkout, or `$OMNIQUANT_SHARED_DIR`."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("OMNIQUANT_SHARED_DIR", REPO_ROOT.parent / "shared"))


def austen_dir() -> Path:
    return shared_dir() / "data" / "austen"


# The split the shared README suggests: calibration and evaluation never overlap.
CALIB_BOOKS = ("sensesensibility.txt", "northangerabbey.txt")
EVAL_BOOKS = ("prideprejudice.txt", "persuasion.txt")
VAL_BOOKS = ("emma.txt", "mansfieldpark.txt")  # tuning only: read by neither calibration nor evaluation
