"""`rap report`: every result kind gets a section, unknown files are still listed, plots are drawn."""

import json

import pytest
from typer.testing import CliRunner

from rap.errors import RapError
from rap.report import build_report, kind_of

ENV = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "command": "python -m benchmarks.run --suite gpu",
       "versions": {"torch": "2.11.0"}}



def rendered(tmp_path, name: str, result: dict, kind: str) -> str:
    """The page for one result file `name`, after checking the file is classified as `kind`."""
    path = tmp_path / name
    path.write_text(json.dumps(result))
    assert kind_of(path, result) == kind
    return build_report([path], tmp_path / "REPORT.md").read_text()

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
        "ppl-dense-2026-11-23.json": {**ENV, "rows": [{"model": "smollm2-135m", "mask": "a|b", "ppl": 21.98}]},
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
    for title in ("## Benchmark suite (headline)", "## Quality vs parameter budget", "## Zero-shot accuracy",
                  "## Perplexity", "## Block importance profile", "## Other results (no renderer)",
                  "## Files that could not be read"):
        assert title in text
    assert "| `throughput_ratio_80pct_kv_light` | 1.23 |" in text
    assert "quality section skipped" in text  # a null headline carries its reason
    assert "a\\|b" in text  # cell text cannot break the table
    assert "broken.json" in text
    assert "21.98" in text
    # a file of no known family: its name and top-level keys, never its rows
    assert "[my-experiment.json](my-experiment.json): keys `device`, `date`, `command`, `versions`, `speedup`, " \
           "`rows`" in text
    assert "x\\|y" not in text


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


# ---- the newer result families (issue 15 follow-up) ------------------------------------------------
def task(acc, chance, headline="acc"):
    return {"n": 100, "acc": acc, "chance": chance, "headline": headline}


def levels_result():
    rows = [{"policy": p, "budget_ratio": b, "ppl_ratio": r, "plan": "attn.*=int8," * 40, "counts": {"int8": 60}}
            for p, b, r in [("solver", 0.5, 1.037), ("solver", 0.7, 1.004), ("int8-only", 0.5, None),
                            ("int8-only", 0.7, 1.002), ("drop-only", 0.5, 7.35e9)]]
    return {**ENV, "model": "smollm2-135m", "eval": {"windows": 147, "seq_len": 2048, "dtype": "bfloat16"},
            "request": {"batch": 1, "prompt": 512, "new_tokens": 128}, "memory_model_device": "cpu",
            "dense_need_bytes": 291957376, "dense_ppl": 21.98, "rows": rows,
            "level_profile": {"path": "p.json", "calibration": {"tokens": 65536}},
            "targets": {"50%": {"limit": 1.1, "solver_ppl_ratio": 1.037, "met": True}},
            "frontier": {"0.70": {"policy": "solver", "ppl_ratio": 1.004, "met": False,
                                  "knobs_below": {"int8-only": 1.002}}},
            "best_per_budget": {"0.50": "solver", "0.70": "int8-only"}, "solver_decide_p99_ms": 0.55}


def test_levels_file_gets_a_budget_by_policy_ppl_ratio_table_with_targets_and_frontier(tmp_path):
    (tmp_path / "levels-smollm2-135m-h200-2026-12-02.json").write_text(json.dumps(levels_result()))
    text = build_report([tmp_path], tmp_path / "REPORT.md").read_text()
    assert "## Precision levels: WikiText-2 PPL ratio by budget and policy" in text
    assert "| policy \\ budget | 50% | 70% |" in text
    assert "| solver | **1.037** | 1.004 |" in text  # the best policy at 50% in bold
    assert "| int8-only | — | **1.002** |" in text  # nothing of int8-only fits at 50%
    assert "| drop-only | 7.35e+09 | — |" in text
    assert "50% ≤ 1.1x: `solver` 1.037 met" in text
    assert "70% `solver` 1.004 **missed**: int8-only 1.0020 below" in text
    assert "decide p99: solver 0.55 ms" in text
    assert "attn.*=int8,attn.*=int8" not in text  # the plans stay in the JSON


def test_level_profile_is_one_paragraph_with_its_counts(tmp_path):
    single = {f"{k}.{i}": {"int8": 0.001, "int4g64": 0.01, "drop": 2.0} for i in range(3) for k in ("attn", "ffn")}
    steps = [{"block": "attn.1", "level": "int8", "ppl": 17.5 + i, "total_bytes_freed": 1000 * (i + 1)}
             for i in range(7)]
    profile = {"model": "smollm2-135m", "method": "levels", "num_layers": 3, "levels": ["dtype", "int8", "drop"],
               "calibration": {"source": "wikitext-2/valid.txt", "tokens": 65536, "windows": 32, "seq_len": 2048},
               "dense_ppl": 17.47, "single": single, "steps": steps, "bytes": {"cpu": single},
               "library": {"fractions": [0.2, 0.5, 1.0], "plans": [{"plan": "ffn.*=int8", "nll": 3.0}] * 5},
               "device": "NVIDIA H200", "created": "2026-12-02 01:08:26 UTC", "command": "rap profile ..."}
    text = rendered(tmp_path, "smollm2-135m-levels-h200-2026-12-02.json", profile, kind="level-profile")
    assert "18 single moves over 6 blocks; 7 greedy steps" in text
    assert "5 library plans over 3 budget fractions" in text
    assert "dense PPL 17.47" in text and "65536 tokens" in text
    assert "created: 2026-12-02 01:08:26 UTC" in text
    assert "ffn.*=int8" not in text and "| attn.0" not in text  # no dump of the entries


def test_zeroshot_levels_shows_the_above_chance_task_mean_raw_share_and_boolq_apart(tmp_path):
    dense = {"piqa": task(0.70, 0.5), "arc_easy": task(0.50, 0.25)}
    plan = {"piqa": task(0.65, 0.5), "arc_easy": task(0.45, 0.25)}
    result = {**ENV, "model": "smollm2-135m", "limit": 100, "budget_ratio": 0.5, "policy": "solver",
              "counts": {"int8": 60}, "param_bytes_ratio": 0.44, "dense": dense, "plan_results": plan,
              "boolq": {"dense": task(0.38, 0.5), "plan": task(0.62, 0.5)}}
    text = rendered(tmp_path, "zeroshot-levels-smollm2-135m-2026-12-02.json", result, kind="zeroshot-levels")
    # piqa keeps (0.65-0.5)/(0.70-0.5) = 0.75, arc_easy (0.45-0.25)/(0.50-0.25) = 0.8: task mean 0.775
    assert "| piqa | acc | 0.700 | 0.650 | 0.500 | 0.750 |" in text
    assert "| arc_easy | acc | 0.500 | 0.450 | 0.250 | 0.800 |" in text
    assert "**Above-chance share, mean over 2 tasks: 0.775**" in text
    assert "raw share 0.917" in text  # (0.65+0.45)/(0.70+0.50)
    assert "| boolq (apart) | acc | 0.380 | 0.620 | 0.500 | nan |" in text  # dense below chance: no share
    assert "boolq apart: plan 0.620 vs dense 0.380" in text


def test_needle_file_gets_accuracy_by_press_and_budget(tmp_path):
    result = {**ENV, "eval": "needle, issue 16", "model": "smollm2-135m", "cases_scored": 63,
              "summary": {"full": {"1": 0.603}, "adakv (decoder)": {"0.05": 0.437, "0.2": 0.532}},
              "mean_kv_bytes": {"full": {"1": 113049600.0}, "adakv (decoder)": {"0.05": 9831840.0, "0.2": 26542080.0}},
              "checks": {"lines": ["budget 0.05: Ada-KV 27.5 vs SnapKV 25.5 of 63 cases -> >="]},
              "rows": [{"press": "full", "budget": 1.0, "score": 1.0, "answer": "the long answer text"}] * 50}
    text = rendered(tmp_path, "kv-needle-eval-smollm2-135m-2026-12-02.json", result, kind="kv-needle")
    assert "| press \\ budget | 5% | 20% | 100% |" in text
    assert "| adakv (decoder) | 0.437 · 9.38 MiB | 0.532 · 25.31 MiB | — |" in text
    assert "| full | — | — | 0.603 · 107.81 MiB |" in text
    assert "check: budget 0.05: Ada-KV 27.5 vs SnapKV 25.5" in text
    assert "the long answer text" not in text  # per-case rows stay in the JSON


def test_quality_table_puts_the_above_chance_share_beside_the_raw_headline(tmp_path):
    """The 2026-11-24 headline case of issue 15: the raw share of all tasks beside its above-chance share."""
    def tasks(a, b):
        return {"piqa": task(a, 0.5), "boolq": task(b, 0.5)}

    rows = [{"method": "dense", "budget": 1.0, "tasks": tasks(0.70, 0.40)},
            {"method": "rap-order", "budget": 0.8, "tasks": tasks(0.60, 0.70), "quality_kept": 1.3 / 1.1}]
    data = {**ENV, "kind": "quality", "rows": rows, "quality_kept_80pct": 1.3 / 1.1}
    (tmp_path / "quality-x.json").write_text(json.dumps(data))
    text = build_report([tmp_path], tmp_path / "REPORT.md").read_text()
    # all tasks: mean 0.65 vs dense 0.55, chance 0.5: raw 1.182, above chance (0.15/0.05) 3.000
    assert "Headline `quality_kept_80pct` 1.182 (`rap-order` at 80%) is the **raw** share" in text
    assert "the same row keeps **3.000** of dense" in text
    # BoolQ apart: piqa alone keeps (0.6-0.5)/(0.7-0.5) = 0.5 above chance, raw 0.6/0.7
    assert "above-chance task mean 0.500, share of the means 0.500, raw 0.857" in text
    assert "| mean_headline | kept_above_chance_task_mean | kept_above_chance | kept | boolq_kept |" in text
    assert "| rap-order | — | 0.8 | — | — | 0.6 | 0.7 | 0.600 | 0.500 | 0.500 | 0.857 | 1.750 |" in text


def test_page_has_contents_and_puts_the_newest_file_of_a_family_first(tmp_path):
    for day in ("2026-12-01", "2026-12-02"):
        (tmp_path / f"levels-a-{day}.json").write_text(json.dumps({**levels_result(), "date": f"{day} 01:00 UTC"}))
    (tmp_path / "calibration-text-x.json").write_text(json.dumps(
        {**ENV, "plans_from": "l.json", "plans": {"library": "ffn.*=int8"},
         "ppl_ratio_to_dense": {"test windows 0-7": {"library": 1.0059}}}))
    text = build_report([tmp_path], tmp_path / "REPORT.md").read_text()
    contents = text[text.index("## Contents"):text.index("## Precision levels")]
    assert "- [Precision levels: WikiText-2 PPL ratio by budget and policy](#precision-levels-wikitext-2-ppl-" \
           "ratio-by-budget-and-policy): 2 file(s), newest `levels-a-2026-12-02.json`" in contents
    assert "(#level-plans-on-other-calibration-text)" in contents
    assert text.index("levels-a-2026-12-02.json`]") < text.index("levels-a-2026-12-01.json`]")
    assert "| test windows 0-7 | 1.006 |" in text


def test_known_files_are_sorted_into_their_families():
    from pathlib import Path

    assert kind_of(Path("levels-frontier-smollm2-h200.json"), {"rows": []}) == "levels"
    assert kind_of(Path("kv-leval-eval-x.json"), {"summary": {"full": {"1": 0.1}}}) == "kv-needle"
    assert kind_of(Path("kv-int4-scales-x.json"), {"rows": []}) == "kv"
    assert kind_of(Path("cluster-load-x.json"), {"kind": "cluster_load"}) == "cluster-load"
    assert kind_of(Path("precision-cpu.json"), {"kind": "precision-cpu"}) == "precision"
    assert kind_of(Path("gsi-compare-x.json"), {"rows": []}) == "gsi-study"
    assert kind_of(Path("decide-latency-x.json"), {"rows": {}}) == "decide-latency"
