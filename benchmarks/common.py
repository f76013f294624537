"""What every benchmark records: the machine, the software, the date and the exact command."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rap.provenance import environment  # noqa: F401  (re-exported: every benchmark stamps its JSON)


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps({**environment(), **payload}, indent=2, default=str))
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
