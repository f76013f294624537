"""`rap report results/*.json -o benchmarks/results/REPORT.md`: one Markdown page from benchmark JSONs.

Every JSON written by benchmarks/ carries the machine, date, versions and command; most carry `rows`
(one dict per measurement) and a few summary keys. Each known family (by its `kind` key, its content,
else its file-name prefix: KINDS) gets a section, newest file first, under a table of contents: the
newer families (precision levels, level profiles, zero-shot of a plan, KV needle / L-Eval) through the
compact renderers of rap.report_renderers, the older ones through the columns that matter for them plus
a short view of their summary values and small nested tables. A file of no known family is listed by
name and top-level keys only. Zero-shot shares of dense accuracy are recomputed by
rap.eval.harness.kept_fraction: above chance first, raw beside it, BoolQ apart. Three plots are drawn
next to the page when the inputs hold the data for them: quality, throughput and memory vs budget.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rap.errors import RapError
from rap.plotting import save_figure
from rap.report_renderers import fmt as _fmt
from rap.report_renderers import (
    is_level_profile,
    is_press_summary,
    render_calibration_text,
    render_kv_penalty,
    render_level_profile,
    render_levels,
    render_named_rows,
    render_needle,
    render_zeroshot_levels,
    table,
)

log = logging.getLogger(__name__)

ENV_KEYS = ("device", "date", "command", "versions")


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    columns: tuple[str, ...] = ()  # preferred row columns, in order (missing ones are skipped)
    render: Callable[[dict], list[str]] | None = None  # extra Markdown before the rows table
    prefixes: tuple[str, ...] = ()  # file-name prefixes besides `name`
    full: bool = False  # the renderer shows what matters: no nested dump, no rows table after it
    rows_table: bool = True  # False where a nested per-level table already sums the per-step rows up


BULKY_KEYS = {"order", "scores", "steps", "profile", "ppl_after", "shortgpt_block_influence", "tasks", "notes",
              "headline_sources", "dropped", "script_text", "plans"}
MAX_SUMMARY = 12  # scalar values listed per file
NESTED_ROWS = 5  # rows of a table found inside a dict (the top-level rows get MAX_ROWS)


def _summary(data: dict, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip) | set(ENV_KEYS) | {"rows", "kind", "created", "script_text"}
    items = [(k, v) for k, v in data.items() if k not in skip and not isinstance(v, (dict, list))]
    lines = [f"- `{k}`: {_fmt(v, k)}" for k, v in items[:MAX_SUMMARY]]
    return lines + ([f"- (+{len(items) - MAX_SUMMARY} more values in the JSON: "
                     + ", ".join(f"`{k}`" for k, _ in items[MAX_SUMMARY:]) + ")"] if len(items) > MAX_SUMMARY else [])


def _nested(data: dict, depth: int = 0, top: dict | None = None) -> list[str]:
    """Dict and list-of-dict values (other than rows and bulky keys): a line per small dict of scalars,
    a short table per list of dicts, one level of sub-sections for a dict of those (a sub-value equal
    to a top-level one is not shown twice)."""
    lines: list[str] = []
    top = data if top is None else top
    for key, value in data.items():
        if key in BULKY_KEYS or key in ENV_KEYS or key == "rows" or (depth and top.get(key) == value):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"**{key}**", ""] + table(value, max_rows=NESTED_ROWS) + [""]
        elif isinstance(value, dict) and value:
            scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
            if scalars:
                lines.append(f"- `{key}`: " + ", ".join(f"{k}={_fmt(v, k)}" for k, v in list(scalars.items())[:10])
                             + (f" (+{len(scalars) - 10} more)" if len(scalars) > 10 else ""))
            if depth == 0:
                rest = {k: v for k, v in value.items() if isinstance(v, (dict, list))}
                sub = _nested(rest, depth + 1, top)
                if sub:
                    lines += [f"- `{key}` (continued):"] + sub
    return lines


# ---- kind-specific sections -------------------------------------------------------------------
BENCH_HEADLINES = ("throughput_ratio_80pct_kv_light", "quality_kept_above_chance_80pct", "quality_kept_80pct",
                   "kv_heavy_dense_ooms", "kv_heavy_rap_served")


def _render_bench(data: dict) -> list[str]:
    lines = ["| headline | value | note |", "|---|---|---|"]
    notes = data.get("notes") or {}
    keys = BENCH_HEADLINES
    for key in keys:
        if key in data or key != "quality_kept_above_chance_80pct":  # runs before 2026-12-02 lack it
            label = f"`{key}`" + (" (raw share)" if key == "quality_kept_80pct" else "")
            lines.append(f"| {label} | {_fmt(data.get(key), key)} | {_fmt(notes.get(key, ''))} |")
    if data.get("quality_kept_80pct") is not None and "quality_kept_above_chance_80pct" not in data:
        lines.append("| above-chance share at 80% | not in this file | its quality rows carry no chance level: "
                     "the quality-*.json of the same run has it (Quality section) |")
    extra = [f"- {k}: {_fmt(v)}" for k, v in notes.items() if k not in keys]
    return lines + ([""] + extra if extra else [])


def _headline_80pct(data: dict, rows: list[dict], dense: dict) -> list[str]:
    """The file's `quality_kept_80pct` (a raw share over every task, BoolQ included, as runs before
    2026-12-02 computed it) beside the above-chance share of the same row and tasks."""
    from rap.eval.harness import kept_fraction

    value = data.get("quality_kept_80pct")
    if value is None:
        return []
    at80 = [r for r in rows if r.get("method") != "dense" and r.get("tasks") and r.get("budget") == 0.8]
    row = min(at80, key=lambda r: abs((r.get("quality_kept") or 0) - value), default=None)
    if row is None:
        return [(f"Headline `quality_kept_80pct` {_fmt(value, 'kept')}: raw share (no per-task results to put the "
                "above-chance share beside it).")]
    every = kept_fraction({"tasks": row["tasks"]}, {"tasks": dense}, apart=())
    apart = kept_fraction({"tasks": row["tasks"]}, {"tasks": dense})
    return [(f"Headline `quality_kept_80pct` {_fmt(value, 'kept')} (`{row.get('method')}` at 80%) is the **raw** share "
            f"over all {len(every['tasks'])} tasks, BoolQ included: {_fmt(every['mean'], 'acc')} / dense "
            f"{_fmt(every['dense_mean'], 'acc')}. Above chance ({_fmt(every['chance'], 'chance')}) the same row keeps "
            f"**{_fmt(every['kept_above_chance'], 'kept')}** of dense; with BoolQ apart: above-chance task mean "
            f"{_fmt(apart['kept_above_chance_task_mean'], 'kept')}, share of the means "
            f"{_fmt(apart['kept_above_chance'], 'kept')}, raw {_fmt(apart['kept'], 'kept')}."), ""]


def _render_quality(data: dict) -> list[str]:
    """Zero-shot quality rows: per-task headline accuracy, then the shares of dense recomputed here by
    rap.eval.harness.kept_fraction (BoolQ apart): the above-chance share averaged over the tasks (issue
    15's figure), the above-chance share of the means, and the raw share beside them."""
    rows = data.get("rows", [])
    if not rows:
        return []
    tasks = list(rows[0].get("tasks", {}))
    lines = [f"Zero-shot: first {data.get('limit_per_task') or 'all'} documents per task; headline metric per task: "
             + ", ".join(f"{t} {data.get('headline_metric', {}).get(t, '?')}" for t in tasks)
             + f". WikiText-2 PPL: {json.dumps(data.get('ppl', {}))}. Budget = {data.get('budget_unit', 'parameter bytes')}.", ""]
    from rap.eval.harness import APART, kept_fraction, mean_headline

    dense = next((r.get("tasks") for r in rows if r.get("method") == "dense" and r.get("tasks")), None)
    lines[0] += (" Means over every task but " + ", ".join(APART) + " (reported alone); shares of the dense row's "
                 "accuracy recomputed here from the per-task results: above chance (task mean, then of the means) "
                 "first, raw beside it.")
    flat = []
    for r in rows:
        row = {k: r.get(k) for k in ("method", "order", "budget", "param_ratio", "blocks_dropped")}
        got = r.get("tasks") or {}
        for t in tasks:
            res = got.get(t, {})
            row[t] = res.get(res.get("headline", "acc"))
        shares: dict = {}
        if got and all("headline" in v and "chance" in v for v in got.values()):
            row["mean_headline"] = mean_headline(got)
            if dense:
                kept = kept_fraction({"tasks": got}, {"tasks": dense})
                shares = {"kept_above_chance_task_mean": kept["kept_above_chance_task_mean"],
                          "kept_above_chance": kept["kept_above_chance"], "kept": kept["kept"],
                          **{f"{n}_kept": a["kept"] for n, a in kept["apart"].items()}}
        else:  # a row without per-task results: what the file says
            row["mean_headline"] = r.get("mean_headline")
            shares = {"kept_above_chance": r.get("quality_kept_above_chance"), "kept": r.get("quality_kept")}
        row.update({k: shares.get(k) for k in ("kept_above_chance_task_mean", "kept_above_chance", "kept")})
        row.update({f"{n}_kept": shares.get(f"{n}_kept") for n in APART if n in got})
        row["wikitext2_ppl"] = r.get("wikitext2_ppl")
        flat.append(row)
    head = _headline_80pct(data, rows, dense) if dense else []
    return lines + head + table(flat, list(flat[0]))


def _render_zeroshot(data: dict) -> list[str]:
    tasks = data.get("tasks") or {}
    rows = [{"task": t, "n": r.get("n"), "acc": r.get("acc"), "acc_norm": r.get("acc_norm"), "ppl": r.get("ppl"),
             "acc_stderr": (r.get("stderr") or {}).get("acc"), "chance": r.get("chance")} for t, r in tasks.items()]
    return table(rows, ["task", "n", "acc", "acc_norm", "ppl", "acc_stderr", "chance"]) + [
        "", f"mean headline accuracy {_fmt(data.get('mean_headline'))} (chance {_fmt(data.get('mean_chance'))})"]


def _render_profile(data: dict) -> list[str]:
    order = data.get("order") or []
    lines = [(f"- method `{data.get('method')}`, {len(order)} blocks ordered, dense calibration PPL "
             f"{_fmt(data.get('dense_ppl'))}, calibration {json.dumps(data.get('calibration', {}))[:300]}")]
    if order:
        ppl = data.get("ppl_after") or []
        lines.append("- first removals: " + ", ".join(
            f"{b}" + (f" ({ppl[i]:.3g})" if i < len(ppl) and isinstance(ppl[i], (int, float)) else "")
            for i, b in enumerate(order[:16])))
    return lines


def _render_quant(data: dict) -> list[str]:
    lines = []
    for k in ("torchao", "torchao_status"):
        if k in data:
            lines.append(f"- {k}: {_fmt(data[k])}")
    return lines


KINDS: dict[str, Kind] = {k.name: k for k in (
    # newest families first (issue 15/16: precision levels, KV evaluations)
    Kind("levels", "Precision levels: WikiText-2 PPL ratio by budget and policy", (), render_levels, full=True),
    Kind("zeroshot-levels", "Zero-shot of a level plan (above-chance share)", (), render_zeroshot_levels, full=True),
    Kind("level-profile", "Level profiles (block × level NLL costs)", (), render_level_profile, full=True),
    Kind("calibration-text", "Level plans on other calibration text", (), render_calibration_text, full=True),
    Kind("level-agent", "Level RL agent (MaskablePPO) vs the solver"),
    Kind("decide-latency", "decide latency", (), render_named_rows),
    Kind("precision", "Precision levels: decode speed and quality per level",
         ("model", "impl", "rung", "level", "batch", "tok_s", "ms_per_token", "frac_of_roofline", "param_bytes",
          "param_ratio", "ppl", "ppl_ratio", "decode_tok_s", "decode_speed_ratio_cpu", "status")),
    Kind("int8-kernels", "int8 / int4 kernels per linear", ("linear", "N", "K", "M", "kernel", "us", "weight_GBps",
                                                            "speedup_vs_bf16", "max_rel_err")),
    Kind("kv-needle", "KV cache: needle / L-Eval accuracy by press and budget", (), render_needle,
         ("kv-leval",), full=True),
    Kind("kv-penalty", "KV cache: NLL penalty by keep ratio", (), render_kv_penalty, full=True),
    Kind("kv", "KV-cache compression", ("kv", "window", "pool", "kernel", "group", "budget", "needle_retention",
                                        "nll_per_token", "seconds")),
    Kind("bench", "Benchmark suite (headline)", ("section", "model", "weights", "method", "budget_ratio", "batch",
                                                 "prompt", "new_tokens", "tokens_per_s", "ratio_vs_dense",
                                                 "peak_bytes", "budget_bytes", "within_budget", "status"),
         _render_bench),
    Kind("quality", "Quality vs parameter budget", (), _render_quality, full=True),
    Kind("width-peer", "Width-pruning peer (quality vs parameter budget)", (), _render_quality, full=True),
    Kind("zeroshot", "Zero-shot accuracy", (), _render_zeroshot),
    Kind("harness-agreement", "Zero-shot harness agreement (old scorer vs lm-eval)",
         ("model", "drop", "task", "n", "old_acc", "new_acc", "old_acc_norm", "new_acc_norm", "old_ppl", "new_ppl")),
    Kind("lm-eval-serve", "lm-eval through rap serve"),
    Kind("quant", "Quantization peer (torchao weight-only)", ("method", "weights", "param_bytes", "param_ratio",
                                                              "wikitext2_ppl", "piqa", "arc_easy", "mean_headline",
                                                              "tokens_per_s", "status"), _render_quant),
    Kind("ppl", "Perplexity", ("model", "mask", "dtype", "seq_len", "ppl", "tokens", "windows", "file"),
         prefixes=("ppl-dense",)),
    Kind("memory-model", "Memory model: predicted vs measured peak", ("config", "predicted_bytes", "measured_bytes",
                                                                      "rel_error")),
    Kind("memdiag", "Memory diagnostics"),
    Kind("gsi", "Block importance profile", (), _render_profile, ("profile",)),
    Kind("gsi-study", "Block importance (GSI) studies"),
    Kind("curve", "Quality vs blocks removed", ("removed", "blocks_removed", "param_ratio", "ppl", "calib_ppl",
                                                "test_ppl"), prefixes=("gsi-curve",)),
    Kind("decode", "Decode throughput", ("impl", "step", "model", "batch", "prompt", "new_tokens", "mask",
                                         "dropped_blocks", "dropped_bytes_fraction", "ms_per_token", "tok_s",
                                         "tokens_per_s", "frac_of_roofline", "new_over_old", "prefill_ms",
                                         "peak_bytes", "skipped")),
    Kind("policy", "Policy decisions under a budget", ()),
    Kind("engine-trace", "Engine under a changing budget", ("step", "level_ratio", "batch", "decision",
                                                            "predicted_peak_bytes", "measured_peak_bytes",
                                                            "budget_bytes", "tokens_per_s"), rows_table=False),
    Kind("demo", "rap demo traces", ("step", "level_ratio", "budget_bytes", "decision", "resident_bytes", "batch",
                                     "tokens_per_s", "quality_ppl"), rows_table=False),
    Kind("server-load", "Server under load", ()),
    Kind("serve-fairness", "Server fairness (small requests beside a big one)"),
    Kind("cluster-load", "Ray Serve cluster under load"),
)}
PREFIXES = sorted(((p, k.name) for k in KINDS.values() for p in (k.name, *k.prefixes)), key=lambda pk: -len(pk[0]))


def kind_of(path: Path, data: dict) -> str | None:
    kind = data.get("kind")
    if isinstance(kind, str) and kind.replace("_", "-") in KINDS:
        return kind.replace("_", "-")
    if is_level_profile(data):  # a level profile, whatever its file name
        return "level-profile"
    if "order" in data and "method" in data and "rows" not in data:  # a block profile, whatever its file name
        return "gsi"
    if "plan_results" in data and "dense" in data:
        return "zeroshot-levels"
    name = path.name
    for prefix, found in PREFIXES:
        if name.startswith((prefix + "-", prefix + "_")) or name == prefix + ".json":
            if found == "kv" and is_press_summary(data):
                return "kv-needle"
            return "gsi-study" if prefix == "gsi" else found
    return None


# ---- plots --------------------------------------------------------------------------------------
def _plot_quality(items: list[tuple[Path, dict]], path: Path) -> bool:
    series = []
    for p, d in items:
        for method in sorted({r.get("method") for r in d.get("rows", []) if r.get("method") not in (None, "dense")}):
            pts = sorted((r["param_ratio"], r["mean_headline"]) for r in d["rows"]
                         if r.get("method") in (method, "dense") and r.get("param_ratio") is not None
                         and r.get("mean_headline") is not None)
            if len(pts) >= 2:
                series.append((f"{method} ({p.stem})", pts))
    if not series:
        return False
    return _line_plot(series, path, "resident parameters, % of dense", "mean zero-shot accuracy",
                      "Quality vs parameter budget", x_percent=True)


def _bench_rows(items, section: str) -> list[dict]:
    return [r for _, d in items for r in d.get("rows", []) if r.get("section") == section]


def _plot_throughput(items: list[tuple[Path, dict]], path: Path) -> bool:
    groups: dict[str, list] = {}
    for r in _bench_rows(items, "throughput"):
        if r.get("budget_ratio") is None or not r.get("tokens_per_s"):
            continue
        label = f"{r.get('model')} {r.get('method')} b={r.get('batch')} p={r.get('prompt')}"
        groups.setdefault(label, []).append((r["budget_ratio"], r["tokens_per_s"]))
    series = [(k, sorted(v)) for k, v in groups.items() if len(v) >= 2]
    if not series:
        return False
    return _line_plot(series[:20], path, "memory budget, % of dense need", "decode tokens/s",
                      "Throughput vs budget", x_percent=True, logy=True)


def _plot_memory(items: list[tuple[Path, dict]], path: Path) -> bool:
    pts = [(r["budget_bytes"], r["peak_bytes"], r.get("method")) for r in _bench_rows(items, "throughput")
           + _bench_rows(items, "kv-heavy") if r.get("budget_bytes") and r.get("peak_bytes")]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2 ** 30
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in sorted({m for _, _, m in pts}, key=str):
        xs = [b / gib for b, _, m in pts if m == method]
        ys = [p / gib for _, p, m in pts if m == method]
        ax.scatter(xs, ys, label=str(method), s=18)
    top = max(max(b, p) for b, p, _ in pts) / gib * 1.05
    ax.plot([0, top], [0, top], "k:", lw=0.8, label="peak = budget")
    ax.set_xlabel("budget (GiB)")
    ax.set_ylabel("measured peak (GiB)")
    ax.set_title("Memory vs budget (points must lie under the line)", fontsize=9)
    save_figure(fig, ax, path)
    return True


def _line_plot(series, path: Path, xlabel: str, ylabel: str, title: str, x_percent: bool = False,
               logy: bool = False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: no two series share one on a page
    for i, (label, pts) in enumerate(series):
        ax.plot([x * 100 if x_percent else x for x, _ in pts], [y for _, y in pts], "o-", label=label, ms=4,
                color=colors[i % len(colors)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    ax.invert_xaxis()
    save_figure(fig, ax, path)
    return True


# ---- the page -------------------------------------------------------------------------------------
def load_results(paths: Iterable[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """Readable JSON objects, and (path, reason) for the rest. Folders contribute their *.json."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.glob("*.json")))
        else:
            files.append(p)
    good, bad = [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except FileNotFoundError:
            bad.append((f, "no such file"))
            continue
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((f, f"not JSON: {e}"))
            continue
        if not isinstance(data, dict):
            bad.append((f, "not a JSON object"))
            continue
        good.append((f, data))
    return good, bad


def _relative(target: Path, base: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), base.resolve())


def _anchor(title: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def _when(path: Path, data: dict) -> str:
    """A sortable date for newest-first order: the file's own date, else one in its name."""
    import re

    for key in ("date", "created"):
        if isinstance(data.get(key), str) and re.match(r"\d{4}-\d\d-\d\d", data[key]):
            return data[key][:16].replace("T", " ")
    found = re.search(r"\d{4}-\d\d-\d\d", path.name)
    return found.group(0) if found else ""


def _env_line(data: dict) -> list[str]:
    """Device · date · command · torch and transformers versions; the JSON has the rest."""
    def value(k: str) -> str:
        if k == "versions" and isinstance(data[k], dict):
            return ", ".join(f"{n} {data[k][n]}" for n in ("torch", "transformers") if data[k].get(n))
        text = str(data[k]).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 200 else text[:200] + "…"

    keys = ENV_KEYS if "date" in data else ("device", "created", "command", "versions")  # profiles say created
    env = [f"{k}: {value(k)}" for k in keys if data.get(k) is not None]
    return ["<sub>" + " · ".join(env) + "</sub>", ""] if env else []


def _section(kind: str, p: Path, d: dict, out: Path) -> list[str]:
    spec = KINDS[kind]
    lines = [f"### [`{p.name}`]({_relative(p, out.parent)})", ""] + _env_line(d)
    if spec.render:
        try:
            extra = spec.render(d)
        except Exception as e:  # noqa: BLE001 -- a malformed file of a known kind falls back to the generic view
            extra = [f"(could not read this file as `{kind}`: {type(e).__name__}: {e})"]
            spec = Kind(spec.name, spec.title, spec.columns)
        lines += extra + ([""] if extra else [])
    shown = BENCH_HEADLINES if kind == "bench" else ()  # the headline table has them, labelled
    summary = [] if spec.full else _summary(d, skip=("tasks", "order", "scores", "notes", *shown))
    if summary:
        lines += summary + [""]
    if not spec.full and kind not in ("zeroshot", "gsi", "bench"):
        nested = _nested(d)
        if nested:
            lines += nested + [""]
    rows = d.get("rows")
    if not spec.full and spec.rows_table and isinstance(rows, list) and rows:
        lines += table(rows, spec.columns or None) + [""]
    return lines


def build_report(paths: Iterable[Path], out: Path) -> Path:
    """Write the Markdown page `out` (and its plots beside it); returns `out`. One section per result
    family (in KINDS order), newest file first inside it; a table of contents on top; files of no known
    family are listed by name and top-level keys only."""
    out = Path(out)
    items, bad = load_results(paths)
    if not items and not bad:
        raise RapError("no result files given: pass JSON files or a folder, e.g. rap report benchmarks/results/")
    out.parent.mkdir(parents=True, exist_ok=True)
    items = [(p, d) for p, d in items if p.resolve() != out.resolve()]
    by_kind: dict[str | None, list[tuple[Path, dict]]] = {}
    for p, d in sorted(items, key=lambda pd: (_when(*pd), pd[0].name), reverse=True):
        by_kind.setdefault(kind_of(p, d), []).append((p, d))

    lines = ["# rap benchmark report", "",
             (f"Generated by `rap report` from {len(items)} result file(s). Every number below comes from the "
             "JSON file named in its section (machine, date, software and command included there). Rows marked "
             "random weights measure timing and memory only, never quality. Zero-shot shares of dense accuracy: "
             "the above-chance share (acc − chance) / (dense − chance) first, averaged over the tasks, the raw "
             "share beside it, BoolQ apart (issue 15)."), ""]
    stem = out.stem.lower()
    plots = [(f"{stem}-quality.png", "Quality vs budget", _plot_quality, "quality"),
             (f"{stem}-throughput.png", "Throughput vs budget", _plot_throughput, "bench"),
             (f"{stem}-memory.png", "Memory vs budget", _plot_memory, "bench")]
    drawn = []
    for name, title, fn, kind in plots:
        try:
            if fn(by_kind.get(kind, []), out.parent / name):
                drawn.append((name, title))
        except Exception as e:  # noqa: BLE001 -- a plot must never sink the page
            log.warning("plot %s failed: %s", name, e)

    families = [(KINDS[k].title, k) for k in KINDS if by_kind.get(k)]
    unknown = by_kind.get(None, [])
    toc = [f"- [{title}](#{_anchor(title)}): {len(by_kind[k])} file(s), newest `{by_kind[k][0][0].name}`"
           for title, k in families]
    if drawn:
        toc.insert(0, "- [Plots](#plots)")
    if unknown:
        toc.append(f"- [Other results (no renderer)](#{_anchor('Other results (no renderer)')}): {len(unknown)} file(s)")
    if bad:
        toc.append(f"- [Files that could not be read](#{_anchor('Files that could not be read')}): {len(bad)}")
    lines += ["## Contents", ""] + toc + [""]
    if drawn:
        lines += ["## Plots", ""] + [f"![{t}]({n})" for n, t in drawn] + [""]
    for title, kind in families:
        lines += [f"## {title}", ""]
        for p, d in by_kind[kind]:
            lines += _section(kind, p, d, out)
    if unknown:
        lines += ["## Other results (no renderer)", ""] + [
            f"- [{p.name}]({_relative(p, out.parent)}): keys " + ", ".join(f"`{k}`" for k in list(d)[:20])
            + (f" (+{len(d) - 20} more)" if len(d) > 20 else "") for p, d in unknown] + [""]
    if bad:
        lines += ["## Files that could not be read", ""] + [f"- `{p}`: {why}" for p, why in bad] + [""]
    out.write_text("\n".join(lines))
    return out
