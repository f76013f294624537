"""`rap report results/*.json -o benchmarks/results/REPORT.md`: one Markdown page from benchmark JSONs.

Every JSON written by benchmarks/ carries the machine, date, versions and command; most carry `rows`
(one dict per measurement) and a few summary keys. Each known kind (by its `kind` key, else by its
file-name prefix) gets a section with the columns that matter for it; any other JSON is still listed
with its summary keys and a generic table. Three plots are drawn next to the page when the inputs hold
the data for them: quality vs budget, throughput vs budget, memory (measured peak) vs budget.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from rap.errors import RapError
from rap.plotting import save_figure

log = logging.getLogger(__name__)

ENV_KEYS = ("device", "date", "command", "versions")
MAX_ROWS = 60  # rows shown per table (the JSON has them all)
MAX_COLS = 12


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    columns: tuple[str, ...] = ()  # preferred row columns, in order (missing ones are skipped)
    render: Optional[Callable[[dict], list[str]]] = None  # extra Markdown before the rows table


def _is_bytes(key: str) -> bool:
    return "bytes" in key and not any(x in key for x in ("per_s", "ratio", "fraction", "equal", "note", "error"))


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and _is_bytes(key):
        from rap.core.memory import format_bytes

        return format_bytes(value)
    if isinstance(value, float):
        if _is_bytes(key) and not math.isnan(value):
            from rap.core.memory import format_bytes

            return format_bytes(int(value))
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if key.endswith(("_ratio", "kept", "acc", "acc_norm", "mean_headline")) and abs(value) <= 10:
            return f"{value:.3f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
        return text if len(text) <= 60 else f"{len(value)} items"
    if isinstance(value, dict):
        return "{…}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: Iterable[str] | None = None) -> list[str]:
    """A Markdown table of `rows` over `columns` (default: scalar keys in first-seen order)."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return []
    if columns:
        cols = [c for c in columns if any(c in r for r in rows)]
    else:
        cols = []
        for r in rows:
            for k, v in r.items():
                if k not in cols and not isinstance(v, dict) and not (isinstance(v, list) and len(v) > 8):
                    cols.append(k)
        cols = cols[:MAX_COLS]
    if not cols:
        return []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({len(rows) - MAX_ROWS} more rows in the JSON)")
    return lines


BULKY_KEYS = {"order", "scores", "steps", "profile", "ppl_after", "shortgpt_block_influence", "tasks", "notes",
              "headline_sources", "dropped"}


def _summary(data: dict, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip) | set(ENV_KEYS) | {"rows", "kind"}
    items = [(k, v) for k, v in data.items() if k not in skip and not isinstance(v, (dict, list))]
    return [f"- `{k}`: {_fmt(v, k)}" for k, v in items]


def _nested(data: dict, depth: int = 0) -> list[str]:
    """Dict and list-of-dict values (other than rows and bulky keys): a line per small dict of scalars,
    a table per list of dicts, one level of sub-sections for a dict of those."""
    lines: list[str] = []
    for key, value in data.items():
        if key in BULKY_KEYS or key in ENV_KEYS or key == "rows":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"**{key}**", ""] + table(value) + [""]
        elif isinstance(value, dict) and value:
            scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
            if scalars:
                lines.append(f"- `{key}`: " + ", ".join(f"{k}={_fmt(v, k)}" for k, v in list(scalars.items())[:16]))
            if depth == 0:
                rest = {k: v for k, v in value.items() if isinstance(v, (dict, list))}
                sub = _nested(rest, depth + 1)
                if sub:
                    lines += [f"- `{key}` (continued):"] + sub
    return lines


# ---- kind-specific sections -------------------------------------------------------------------
def _render_bench(data: dict) -> list[str]:
    lines = ["| headline | value | note |", "|---|---|---|"]
    notes = data.get("notes") or {}
    keys = ("throughput_ratio_80pct_kv_light", "quality_kept_above_chance_80pct", "quality_kept_80pct",
            "kv_heavy_dense_ooms", "kv_heavy_rap_served")
    for key in keys:
        if key in data or key != "quality_kept_above_chance_80pct":  # runs before 2026-12-02 lack it
            lines.append(f"| `{key}` | {_fmt(data.get(key), key)} | {_fmt(notes.get(key, ''))} |")
    extra = [f"- {k}: {_fmt(v)}" for k, v in notes.items() if k not in keys]
    return lines + ([""] + extra if extra else [])


def _render_quality(data: dict) -> list[str]:
    rows = data.get("rows", [])
    if not rows:
        return []
    tasks = list(rows[0].get("tasks", {}))
    lines = [f"Zero-shot: first {data.get('limit_per_task') or 'all'} documents per task; headline metric per task: "
             + ", ".join(f"{t} {data.get('headline_metric', {}).get(t, '?')}" for t in tasks)
             + f". WikiText-2 PPL: {json.dumps(data.get('ppl', {}))}. Budget = {data.get('budget_unit', 'parameter bytes')}.", ""]
    from rap.eval.harness import APART, mean_headline, share_columns

    dense = next((r.get("tasks") for r in rows if r.get("method") == "dense" and r.get("tasks")), None)
    lines[0] += (" Means over every task but " + ", ".join(APART) + " (reported alone); shares of the dense row's "
                 "accuracy recomputed here from the per-task results: above chance first, raw beside it.")
    flat = []
    for r in rows:
        row = {k: r.get(k) for k in ("method", "order", "budget", "param_ratio", "blocks_dropped")}
        got = r.get("tasks") or {}
        for t in tasks:
            res = got.get(t, {})
            row[t] = res.get(res.get("headline", "acc"))
        if got and all("headline" in v and "chance" in v for v in got.values()):
            row["mean_headline"] = mean_headline(got)
            shares = share_columns(got, dense) if dense else {}
        else:  # a row without per-task results: what the file says
            row["mean_headline"], shares = r.get("mean_headline"), {k: r.get(k) for k in (
                "quality_kept_above_chance", "quality_kept")}
        row.update({k: shares.get(k) for k in ("quality_kept_above_chance", "quality_kept")})
        row.update({f"{n}_kept_above_chance": shares.get(f"{n}_kept_above_chance") for n in APART if n in got})
        row["wikitext2_ppl"] = r.get("wikitext2_ppl")
        flat.append(row)
    return lines + table(flat, list(flat[0]))


def _render_zeroshot(data: dict) -> list[str]:
    tasks = data.get("tasks") or {}
    rows = [{"task": t, "n": r.get("n"), "acc": r.get("acc"), "acc_norm": r.get("acc_norm"), "ppl": r.get("ppl"),
             "acc_stderr": (r.get("stderr") or {}).get("acc"), "chance": r.get("chance")} for t, r in tasks.items()]
    return table(rows, ["task", "n", "acc", "acc_norm", "ppl", "acc_stderr", "chance"]) + [
        "", f"mean headline accuracy {_fmt(data.get('mean_headline'))} (chance {_fmt(data.get('mean_chance'))})"]


def _render_profile(data: dict) -> list[str]:
    order = data.get("order") or []
    lines = [f"- method `{data.get('method')}`, {len(order)} blocks ordered, dense calibration PPL "
             f"{_fmt(data.get('dense_ppl'))}, calibration {data.get('calibration', {})}"]
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
    Kind("bench", "Benchmark suite (headline)", ("section", "model", "weights", "method", "budget_ratio", "batch",
                                                 "prompt", "new_tokens", "tokens_per_s", "ratio_vs_dense",
                                                 "peak_bytes", "budget_bytes", "within_budget", "status"),
         _render_bench),
    Kind("quality", "Quality vs parameter budget", (), _render_quality),
    Kind("zeroshot", "Zero-shot accuracy", (), _render_zeroshot),
    Kind("quant", "Quantization peer (torchao weight-only)", ("method", "weights", "param_bytes", "param_ratio",
                                                              "wikitext2_ppl", "piqa", "arc_easy", "mean_headline",
                                                              "tokens_per_s", "status"), _render_quant),
    Kind("ppl-dense", "Dense perplexity", ("model", "mask", "dtype", "seq_len", "ppl", "tokens", "windows", "file")),
    Kind("memory-model", "Memory model: predicted vs measured peak", ("config", "predicted_bytes", "measured_bytes",
                                                                      "rel_error")),
    Kind("gsi", "Block importance profile", (), _render_profile),
    Kind("curve", "Quality vs blocks removed", ("removed", "blocks_removed", "param_ratio", "ppl", "calib_ppl",
                                                "test_ppl")),
    Kind("kv", "KV-cache compression", ()),
    Kind("decode", "Decode throughput", ("impl", "model", "batch", "prompt", "new_tokens", "mask", "dropped_blocks",
                                         "dropped_bytes_fraction", "ms_per_token", "tok_s", "tokens_per_s",
                                         "frac_of_roofline", "prefill_ms", "peak_bytes", "skipped")),
    Kind("policy", "Policy decisions under a budget", ()),
    Kind("engine-trace", "Engine under a changing budget", ("step", "level_ratio", "batch", "decision",
                                                            "predicted_peak_bytes", "measured_peak_bytes",
                                                            "budget_bytes", "tokens_per_s")),
    Kind("server-load", "Server under load", ()),
)}
PREFIXES = sorted([*KINDS, "profile"], key=len, reverse=True)


def kind_of(path: Path, data: dict) -> str | None:
    kind = data.get("kind")
    if isinstance(kind, str) and kind in KINDS:
        return kind
    if "order" in data and "method" in data and "rows" not in data:  # a profile, whatever its file name
        return "gsi"
    name = path.name
    for prefix in PREFIXES:
        if name.startswith(prefix + "-") or name.startswith(prefix + "_") or name == prefix + ".json":
            return "gsi" if prefix == "profile" else prefix
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


def build_report(paths: Iterable[Path], out: Path) -> Path:
    """Write the Markdown page `out` (and its plots beside it); returns `out`."""
    out = Path(out)
    items, bad = load_results(paths)
    if not items and not bad:
        raise RapError("no result files given: pass JSON files or a folder, e.g. rap report benchmarks/results/")
    out.parent.mkdir(parents=True, exist_ok=True)
    items = [(p, d) for p, d in items if p.resolve() != out.resolve()]
    by_kind: dict[str | None, list[tuple[Path, dict]]] = {}
    for p, d in items:
        by_kind.setdefault(kind_of(p, d), []).append((p, d))

    lines = ["# rap benchmark report", "",
             f"Generated by `rap report` from {len(items)} result file(s). Every number below comes from the "
             "JSON file named in its section (machine, date, software and command included there). Rows marked "
             "random weights measure timing and memory only, never quality.", ""]
    stem = out.stem.lower()
    plots = [(f"{stem}-quality.png", "Quality vs budget", _plot_quality, "quality"),
             (f"{stem}-throughput.png", "Throughput vs budget", _plot_throughput, "bench"),
             (f"{stem}-memory.png", "Memory vs budget", _plot_memory, "bench")]
    drawn = []
    for name, title, fn, kind in plots:
        try:
            if fn(by_kind.get(kind, []), out.parent / name):
                drawn.append((name, title))
        except Exception as e:  # a plot must never sink the page
            log.warning("plot %s failed: %s", name, e)
    if drawn:
        lines += ["## Plots", ""] + [f"![{t}]({n})" for n, t in drawn] + [""]

    order = [*KINDS, None]
    for kind in order:
        for p, d in by_kind.get(kind, []):
            spec = KINDS.get(kind) if kind else None
            title = spec.title if spec else "Other result"
            lines += [f"## {title}: `{p.name}`", ""]
            env = [f"{k}: {_fmt(d[k]) if k != 'versions' else json.dumps(d[k])}" for k in ENV_KEYS if k in d]
            if env:
                lines += ["<sub>" + " · ".join(env) + "</sub>", ""]
            if spec and spec.render:
                try:
                    extra = spec.render(d)
                except Exception as e:  # malformed file of a known kind: fall back to the generic view
                    extra = [f"(could not read this file as `{kind}`: {e})"]
                lines += extra + ([""] if extra else [])
            summary = _summary(d, skip=("tasks", "order", "scores", "notes"))
            if summary:
                lines += summary + [""]
            if kind not in ("quality", "zeroshot", "gsi", "bench"):
                nested = _nested(d)
                if nested:
                    lines += nested + [""]
            rows = d.get("rows")
            if isinstance(rows, list) and rows and kind not in ("quality",):
                lines += table(rows, spec.columns if spec and spec.columns else None) + [""]
            lines += [f"Source: [{p.name}]({_relative(p, out.parent)})", ""]
    if bad:
        lines += ["## Files that could not be read", ""] + [f"- `{p}`: {why}" for p, why in bad] + [""]
    out.write_text("\n".join(lines))
    return out
