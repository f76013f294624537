"""Press x budget tables and plots shared by the `rap kv ...` commands and benchmarks/kv.py."""

from __future__ import annotations

import json
from pathlib import Path

from rap import provenance


def budget_label(budget: str | float) -> str:
    return f"{float(budget):.0%}"


def table_text(summary: dict[str, dict[str, float]], value_fmt: str = "{:.3f}", title: str = "") -> str:
    """Plain-text table: one row per press, one column per budget."""
    budgets = sorted({b for d in summary.values() for b in d}, key=float)
    header = ["press"] + [budget_label(b) for b in budgets]
    rows = [[press] + [value_fmt.format(d[b]) if b in d else "-" for b in budgets] for press, d in summary.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ([title] if title else []) + ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot_summary(summary: dict[str, dict[str, float]], path: Path, ylabel: str, title: str,
                 reference: str | None = "full") -> Path:
    """Metric vs KV budget, one line per press; the full-cache value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for press, d in summary.items():
        if press == reference:
            for value in d.values():
                ax.axhline(value, color="black", linestyle="--", linewidth=1, label="full cache")
            continue
        xs = sorted(d, key=float)
        ax.plot([float(x) * 100 for x in xs], [d[x] for x in xs], marker="o", label=press)
    ax.set_xlabel("KV budget (% of prompt tokens kept)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log")
    ticks = sorted({float(b) * 100 for d in summary.values() for b in d if float(b) < 1})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    from rap.plotting import save_figure

    return save_figure(fig, ax, path, legend_size=8)


def write_result(out_dir: Path, stem: str, payload: dict, summary: dict, ylabel: str, title: str) -> tuple[Path, Path]:
    """`<stem>.json` (environment + payload) and `<stem>.png` in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps({**provenance.environment(), **payload}, indent=2, default=str))
    plot_summary(summary, png_path, ylabel, title)
    return json_path, png_path
