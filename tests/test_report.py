"""`rap report`: every result kind gets a section, unknown files are still listed, plots are drawn."""

import json

import pytest
from typer.testing import CliRunner

from rap.errors import RapError
from rap.report import build_report, kind_of

ENV = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "command": "python -m benchmarks.run --suite gpu",
       "versions": {"torch": "2.11.0"}}


def quality_rows():
    rows = []
    for method, budget, ratio, acc in [("dense", 1.0, 1.0, 0.5), ("rap-order", 0.8, 0.79, 0.45),
                                       ("rap-order", 0.6, 0.58, 0.4), ("shortgpt", 0.8, 0.77, 0.38)]:
        rows.append({"method": method, "order": method, "budget": budget, "param_ratio": ratio, "blocks_dropped": 3,
                     "mean_headline": acc, "quality_kept": acc / 0.5, "quality_kept_above_chance": 0.7,
                     "wikitext2_ppl": 20 / ratio, "tasks": {"piqa": {"n": 10, "acc": acc, "acc_norm": acc,
                                                                     "headline": "acc_norm", "chance": 0.5}}})
    return rows


def write_results(folder):
    files = {
        "bench-2026-11-23.json": {**ENV, "kind": "bench", "throughput_ratio_80pct_kv_light": 1.23,
                                  "quality_kept_80pct": None, "kv_heavy_dense_ooms": True, "kv_heavy_rap_served": True,
                                  "notes": {"quality_kept_80pct": "quality section skipped"},
                                  "rows": [{"section": "throughput", "model": "llama-2-7b", "method": m,
                                            "budget_ratio": r, "tokens_per_s": t, "budget_bytes": 10 * 2**30,
                                            "peak_bytes": int(r * 9 * 2**30), "batch": 1, "prompt": 512}
                                           for m, r, t in [("dense (rap decoder)", 1.0, 100.0), ("rap", 0.8, 123.0),
                                                           ("rap", 0.6, 160.0)]]},
        "quality-2026-11-23.json": {**ENV, "kind": "quality", "model": "smollm2-135m", "limit_per_task": 10,
                                    "headline_metric": {"piqa": "acc_norm"}, "rows": quality_rows()},
        "zeroshot-2026-11-23.json": {**ENV, "kind": "zeroshot", "mean_headline": 0.5, "mean_chance": 0.3,
                                     "tasks": {"piqa": {"n": 10, "acc": 0.6, "acc_norm": 0.55, "chance": 0.5,
                                                        "stderr": {"acc": 0.1}, "headline": "acc_norm"}}},
        "ppl-dense-2026-11-23.json": {**ENV, "rows": [{"model": "smollm2-135m", "mask": "dense", "ppl": 21.98}]},
        "gsi-smollm2.json": {"model": "smollm2-135m", "method": "gsi", "order": ["ffn.3", "attn.7"],
                             "ppl_after": [20.1, 20.5], "dense_ppl": 19.9},
        "my-experiment.json": {**ENV, "speedup": 2.5, "rows": [{"a": 1, "b": 2.5, "c": "x|y"}]},
        "broken.json": "this is not json {",
    }
    for name, data in files.items():
        (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return files


def test_report_has_a_section_per_kind_and_lists_unknown_and_unreadable_files(tmp_path):
    write_results(tmp_path)
    out = build_report([tmp_path], tmp_path / "REPORT.md")
    text = out.read_text()
    for title in ("Benchmark suite (headline)", "Quality vs parameter budget", "Zero-shot accuracy",
                  "Dense perplexity", "Block importance profile", "Other result: `my-experiment.json`",
                  "Files that could not be read"):
        assert title in text
    assert "| `throughput_ratio_80pct_kv_light` | 1.23 |" in text
    assert "quality section skipped" in text  # a null headline carries its reason
    assert "x\\|y" in text  # cell text cannot break the table
    assert "broken.json" in text
    assert "21.98" in text


def test_report_draws_quality_throughput_and_memory_plots_beside_the_page(tmp_path):
    write_results(tmp_path)
    out = build_report(sorted(tmp_path.glob("*.json")), tmp_path / "out" / "REPORT.md")
    for name in ("report-quality.png", "report-throughput.png", "report-memory.png"):
        assert (out.parent / name).stat().st_size > 1000
        assert f"]({name})" in out.read_text()
    assert "](../quality-2026-11-23.json)" in out.read_text()  # sources linked relative to the page


def test_files_are_recognised_by_kind_key_then_name():
    from pathlib import Path

    assert kind_of(Path("x.json"), {"kind": "zeroshot"}) == "zeroshot"
    assert kind_of(Path("memory-model-2026-11-23.json"), {}) == "memory-model"
    assert kind_of(Path("quality-profile-oneshot.json"), {"order": [], "method": "oneshot-ppl"}) == "gsi"
    assert kind_of(Path("engine-trace-1.json"), {"rows": []}) == "engine-trace"
    assert kind_of(Path("notes.json"), {"rows": []}) is None


def test_cli_writes_the_page_and_rejects_an_empty_call(tmp_path):
    from rap.cli import app

    write_results(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "quality-2026-11-23.json"),
                                      str(tmp_path / "bench-2026-11-23.json"), "-o", str(tmp_path / "R.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "R.md").is_file() and (tmp_path / "r-quality.png").is_file()
    with pytest.raises(RapError):
        build_report([], tmp_path / "empty.md")
