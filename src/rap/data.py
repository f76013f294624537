"""Locating the evaluation and calibration sets (../shared/data beside a checkout, or $RAP_DATA).

Data are never bundled into the package (L-Eval is GPL-3.0) and never fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RapError

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"  # held-out perplexity
WIKITEXT2_VALID = "wikitext-2/valid.txt"  # calibration (no overlap with test)


def data_root() -> Path:
    """$RAP_DATA, else the first `shared/data` found beside the working directory or this checkout."""
    if "RAP_DATA" in os.environ:
        return Path(os.environ["RAP_DATA"])
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise RapError("cannot find the data folder: set RAP_DATA to the folder holding wikitext-2-raw/ etc.")


def data_file(relative: str) -> Path:
    path = data_root() / relative
    if not path.exists():
        raise RapError(f"data file {path} does not exist")
    return path


def read_text(path_or_relative: str | Path) -> str:
    """A user's file if it exists, else a path relative to the data root."""
    path = Path(path_or_relative)
    if not path.is_file():
        path = data_file(str(path_or_relative))
    return path.read_text(encoding="utf-8", errors="replace")
