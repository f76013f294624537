"""Markdown pieces for `rap report` (rap.report): cell formatting, tables, and one compact renderer per
newer result family (issue 15 follow-up) — precision levels (PPL ratio by budget × policy), level
profiles, zero-shot of a level plan, KV needle / L-Eval accuracy by press × budget, and a few small ones.

Each renderer takes one result JSON (a dict) and returns Markdown lines; none dumps a big array: the
JSON file linked under each section holds everything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_ROWS = 10  # rows shown per table (the JSON has them all)
MAX_COLS = 10
MAX_TEXT = 160  # longer strings are cut (scripts, plans, long notes)


def _is_bytes(key: str) -> bool:
    return "bytes" in key and not any(x in key for x in ("per_s", "ratio", "fraction", "equal", "note", "error"))


def fmt(value: Any, key: str = "") -> str:
    """One table cell / summary value: bytes as MiB/GiB, ratios and accuracies to 3 decimals, lists and
    long strings shortened, `|` escaped so no cell breaks its table."""
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
        if key.endswith(("_ratio", "kept", "acc", "acc_norm", "mean_headline", "chance", "share",
                                                 "task_mean")) and abs(value) <= 10:
            return f"{value:.3f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v, key) if isinstance(v, float) else str(v) for v in value)
        return fmt(text) if len(text) <= 60 else f"{len(value)} items"
    if isinstance(value, dict):
        return "{…}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"… ({len(text)} chars)"


def table(rows: list[dict], columns: Iterable[str] | None = None, max_rows: int = MAX_ROWS) -> list[str]:
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
    for r in rows[:max_rows]:
        lines.append("| " + " | ".join(fmt(r.get(c), c) for c in cols) + " |")
    if len(rows) > max_rows:
        lines.append(f"\n({len(rows) - max_rows} more rows in the JSON)")
    return lines


def grid(cells: dict[str, dict[str, str]], corner: str, columns: Iterable[str] | None = None) -> list[str]:
    """A Markdown table from {row label: {column label: cell text}}; missing cells read —."""
    if not cells:
        return []
    cols = list(columns) if columns is not None else list(dict.fromkeys(c for row in cells.values() for c in row))
    lines = ["| " + " | ".join([corner, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for label, row in cells.items():
        lines.append("| " + " | ".join([fmt(label), *(row.get(c, "—") for c in cols)]) + " |")
    return lines


def _budget_key(b: Any) -> float:
    try:
        return float(str(b).rstrip("%")) / (100 if str(b).endswith("%") else 1)
    except ValueError:
        return math.inf


def _pct(b: Any) -> str:
    return f"{_budget_key(b):.0%}" if math.isfinite(_budget_key(b)) else str(b)


# ---- precision levels: benchmarks/levels.py -----------------------------------------------------
def render_levels(d: dict) -> list[str]:
    """levels-*.json: WikiText-2 PPL ratio to dense by budget (columns) and policy (rows), the best
    policy per budget in bold, then the targets, the frontier verdicts and the RL agent's distance."""
    ev, req, prof = d.get("eval") or {}, d.get("request") or {}, d.get("level_profile") or {}
    cal = prof.get("calibration") or {}
    lines = [f"Model `{d.get('model')}`; WikiText-2 {ev.get('windows')} windows × {ev.get('seq_len')} tokens "
             f"({ev.get('dtype')}), dense PPL {fmt(d.get('dense_ppl'))}; request batch {req.get('batch')} × "
             f"prompt {req.get('prompt')} + {req.get('new_tokens')} new; budget = fraction of the dense need "
             f"{fmt(d.get('dense_need_bytes'), 'dense_need_bytes')} (memory model on `{d.get('memory_model_device')}`"
             f"); level profile `{prof.get('path')}` ({cal.get('tokens')} calibration tokens)"
             + (f"; default policy `{d['default_policy']}`" if d.get("default_policy") else "") + ".", ""]
    rows = [r for r in d.get("rows") or [] if isinstance(r, dict) and "policy" in r]
    budgets = sorted({r.get("budget_ratio") for r in rows if r.get("budget_ratio") is not None})
    best = {_budget_key(k): v for k, v in (d.get("best_per_budget") or {}).items()}
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        b, ratio = r.get("budget_ratio"), r.get("ppl_ratio")
        text = "—" if ratio is None else f"{ratio:.3f}" if ratio < 100 else f"{ratio:.3g}"
        if ratio is not None and best.get(b) == r["policy"]:
            text = f"**{text}**"
        cells.setdefault(r["policy"], {})[_pct(b)] = text
    if cells:
        lines += ["PPL ratio to dense (— = no plan of this policy fits; **bold** = best at that budget):", ""]
        lines += grid(cells, "policy \\ budget", [_pct(b) for b in budgets]) + [""]
    targets = d.get("targets") or {}
    if targets:
        lines.append("- targets (issue 15): " + "; ".join(
            f"{k} ≤ {fmt(v.get('limit'))}x: `{v.get('policy', 'solver')}` "
            f"{fmt(v.get('ppl_ratio', v.get('solver_ppl_ratio')), 'ppl_ratio')} " + ("met" if v.get("met") else "**missed**")
            for k, v in targets.items()))
    frontier = d.get("frontier") or {}
    if frontier:
        lines.append("- frontier (at or below every single-knob curve): " + "; ".join(
            f"{_pct(k)} `{v.get('policy')}` {fmt(v.get('ppl_ratio'), 'ppl_ratio')} "
            + ("met" if v.get("met") else "**missed**" + (": " + ", ".join(
                f"{n} {x:.4f}" for n, x in v["knobs_below"].items()) + " below" if v.get("knobs_below") else
                " (no plan fits)" if v.get("ppl_ratio") is None else ""))
            for k, v in sorted(frontier.items(), key=lambda kv: _budget_key(kv[0]))))
    rl = d.get("rl_ppl_over") or ({"solver": d["rl_ppl_over_solver"]} if d.get("rl_ppl_over_solver") else {})
    for ref, by_budget in rl.items():
        if by_budget:
            lines.append(f"- RL agent's PPL over `{ref}`: " + ", ".join(
                f"{_pct(b)} {x:.3f}" for b, x in sorted(by_budget.items(), key=lambda kv: _budget_key(kv[0]))))
    p99 = d.get("decide_p99_ms") or ({"solver": d["solver_decide_p99_ms"]} if "solver_decide_p99_ms" in d else {})
    if p99:
        lines.append("- decide p99: " + ", ".join(f"{k} {v:.3g} ms" for k, v in p99.items()))
    if d.get("reused_from"):
        lines.append("- plans measured before, reused from: " + ", ".join(f"`{p}`" for p in d["reused_from"]))
    errors = {r.get("error") for r in rows if r.get("error") and r.get("error") != "no plan of this knob fits"}
    lines += [f"- error: {fmt(e)}" for e in sorted(errors)]
    return lines


def is_level_profile(d: dict) -> bool:
    return d.get("method") == "levels" and isinstance(d.get("single"), dict)


def render_level_profile(d: dict) -> list[str]:
    """A level profile (rap profile --method levels): one paragraph, never its hundreds of entries."""
    cal, single, steps = d.get("calibration") or {}, d.get("single") or {}, d.get("steps") or []
    lib = d.get("library") or {}
    moves = sum(len(v) for v in single.values() if isinstance(v, dict))
    last = steps[-1] if steps and isinstance(steps[-1], dict) else {}
    text = (f"Level profile of `{d.get('model')}` ({d.get('num_layers')} layers, levels "
            f"{', '.join(d.get('levels') or [])}): calibration {cal.get('tokens')} tokens of `{cal.get('source')}` "
            f"({cal.get('windows')} × {cal.get('seq_len')}, seed {cal.get('seed')}); dense PPL "
            f"{fmt(d.get('dense_ppl'))} (NLL {fmt(d.get('dense_nll'))}); {moves} single moves over {len(single)} "
            f"blocks; {len(steps)} greedy steps"
            + (f" (the last at PPL {fmt(last.get('ppl'))}, {fmt(last.get('total_bytes_freed'), 'total_bytes_freed')} "
               "freed)" if last else "")
            + (f"; {len(lib.get('plans') or [])} library plans over {len(lib.get('fractions') or [])} budget fractions"
               f" (selection on {(lib.get('selection') or {}).get('tokens')} held-apart tokens)" if lib else "")
            + f"; bytes from `{d.get('bytes_device')}`; {fmt(d.get('block_forwards'))} block forwards in "
            f"{fmt(d.get('seconds'))} s; complete: {fmt(d.get('complete'))}.")
    return [text]


# ---- zero-shot of one level plan: benchmarks/zeroshot_levels.py ---------------------------------
def render_zeroshot_levels(d: dict) -> list[str]:
    """Per task: dense, plan and chance accuracy (headline metric) and the plan's above-chance share;
    then the task mean of those shares (issue 15's figure), the share of the means and the raw share,
    BoolQ apart. The shares come from rap.eval.harness.kept_fraction on the file's per-task results."""
    from rap.eval.harness import APART, kept_fraction

    dense, plan = dict(d.get("dense") or {}), dict(d.get("plan_results") or {})
    for n, both in (d.get("boolq") and {"boolq": d["boolq"]} or {}).items():
        dense.setdefault(n, both.get("dense"))
        plan.setdefault(n, both.get("plan"))
    kept = kept_fraction({"tasks": plan}, {"tasks": dense})
    lines = [(f"Plan `{d.get('policy')}` at {_pct(d.get('budget_ratio'))} of the dense need ({fmt(d.get('param_bytes_ratio'))} "
             f"of dense parameter bytes; levels {', '.join(f'{k} {v}' for k, v in (d.get('counts') or {}).items())}); "
             f"{d.get('limit')} documents per task; scoring: {fmt(d.get('scoring'))}."), ""]
    cells = {}
    for n in [*kept["tasks"], *kept["apart"]]:
        t, p = dense[n], plan[n]
        share = kept["kept_above_chance_per_task"].get(n, kept["apart"].get(n, {}).get("kept_above_chance"))
        cells[n + (" (apart)" if n in APART else "")] = {
            "metric": t["headline"], "dense": fmt(t[t["headline"]], "acc"), "plan": fmt(p[p["headline"]], "acc"),
            "chance": fmt(t["chance"], "chance"), "above-chance share": fmt(share, "share")}
    lines += grid(cells, "task") + [""]
    finite = [n for n, x in kept["kept_above_chance_per_task"].items() if math.isfinite(x)]
    lines.append(f"**Above-chance share, mean over {len(finite)} tasks: "
                 f"{fmt(kept['kept_above_chance_task_mean'], 'share')}** (tasks where dense is not above chance left "
                 f"out); share of the means {fmt(kept['kept_above_chance'], 'share')}; raw share "
                 f"{fmt(kept['kept'], 'share')} (plan {fmt(kept['mean'], 'acc')} / dense {fmt(kept['dense_mean'], 'acc')}"
                 f", chance {fmt(kept['chance'], 'chance')}); "
                 + ("; ".join(f"{n} apart: plan {fmt(a['acc'], 'acc')} vs dense {fmt(a['dense'], 'acc')}, raw share "
                              f"{fmt(a['kept'], 'share')}" for n, a in kept["apart"].items()) or "no BoolQ") + ".")
    return lines


# ---- KV: needle / L-Eval accuracy by press and budget --------------------------------------------
def is_press_summary(d: dict) -> bool:
    s = d.get("summary")
    return isinstance(s, dict) and bool(s) and all(isinstance(v, dict) for v in s.values())


def render_needle(d: dict) -> list[str]:
    """kv-needle*, kv-leval*: accuracy per press (rows) and KV budget (columns), with the mean KV bytes
    kept when the file has them; the file's own checks; L-Eval's per-task means at the smallest budget."""
    summary, kv_bytes = d.get("summary") or {}, d.get("mean_kv_bytes") or {}
    settings = d.get("settings") or {}
    lengths, depths = d.get("lengths", settings.get("lengths")), d.get("depths", settings.get("depths"))
    parts = ", ".join(f"{k} ({(v or {}).get('device', '?')})" for k, v in (d.get("parts") or {}).items())
    lines = [f"{d.get('eval', 'needle')} on `{d.get('model')}`" + (f", scorer {d['scorer']}" if d.get("scorer") else "")
             + (f", lengths {fmt(lengths)}" if lengths else "") + (f", {len(depths)} depths" if depths else "")
             + (f", {d['cases_scored']} cases scored" if d.get("cases_scored") else "")
             + (f"; parts: {parts}" if parts else "") + ".", ""]
    budgets = sorted({b for v in summary.values() for b in v}, key=_budget_key)
    cells = {press: {_pct(b): fmt(acc, "acc") + (f" · {fmt(kv_bytes[press][b], 'kv_bytes')}"
                                                  if b in kv_bytes.get(press, {}) else "")
                     for b, acc in by_budget.items()} for press, by_budget in summary.items()}
    lines += [f"{d.get('metric', 'accuracy')} by KV budget (share of the prompt's cache kept)"
              + (" · mean KV bytes" if kv_bytes else "") + ":", ""]
    lines += grid(cells, "press \\ budget", [_pct(b) for b in budgets]) + [""]
    checks = d.get("checks") or {}
    lines += [f"- check: {fmt(x)}" for x in checks.get("lines") or []]
    per_task = d.get("per_task") or {}
    if per_task:
        lines += ["", "Per task, at the smallest budget of each press:", ""]
        lines += grid({task: {press: fmt(by_budget[min(by_budget, key=_budget_key)], "acc")
                              for press, by_budget in presses.items() if by_budget}
                       for task, presses in per_task.items()}, "task")
    return lines


# ---- small families ----------------------------------------------------------------------------------
def render_calibration_text(d: dict) -> list[str]:
    """calibration-text-*: each plan's PPL ratio to dense on each text slice."""
    by_text = d.get("ppl_ratio_to_dense") or {}
    lines = [f"Plans from `{d.get('plans_from')}`: " + ", ".join(f"`{k}`" for k in d.get("plans") or {}) + ".", ""]
    return lines + grid({t: {p: fmt(x, "ppl_ratio") for p, x in v.items()} for t, v in by_text.items()},
                        "text \\ plan (PPL ratio to dense)")


def render_named_rows(d: dict) -> list[str]:
    """A `rows` dict of {name: {metric: value}} (decide-latency-*): one table row per name."""
    rows = d.get("rows") or {}
    return grid({k: {m: fmt(x, m) for m, x in v.items()} for k, v in rows.items() if isinstance(v, dict)}, "case")


def render_kv_penalty(d: dict) -> list[str]:
    """kv-penalty-*: continuation NLL rise by prompt length (rows) and KV keep ratio (columns), per path."""
    lines = []
    for path in ("decoder", "hf_path"):
        part = d.get(path) or {}
        if not part.get("table"):
            continue
        lines += [f"**{path}**: {fmt(part.get('method'))}", ""]
        lines += grid({str(p): {f"{r:g}": fmt(x) for r, x in zip(part.get("ratios") or [], row)}
                       for p, row in zip(part.get("prompt_lens") or [], part["table"])},
                      "prompt \\ KV ratio (NLL rise)") + [""]
    return lines
