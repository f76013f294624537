"""Zero-shot accuracy through lm-eval-harness 0.4: rap's eight local task configs, scored by rap's
registered lm-eval model (`rap.eval.lm_eval_model.RapLM`). Nothing comes from a hub.

    from rap.eval.harness import evaluate
    result = evaluate(view, tok, "piqa,arc_easy", limit=200, mask=mask)   # or a bare HF model, no mask

lm-eval does the prompts, choices, tokenization (`TemplateLM._encode_pair`), the metrics (acc,
acc_norm = log-likelihood over the choice's length in characters, LAMBADA's greedy acc and perplexity)
and the aggregation; rap adds what its tables need on top: the chance accuracy of each task (a uniform
guess over each document's choices), each metric's standard error (sample std / sqrt(n), computed from
lm-eval's per-document samples), the headline metric of each task, and the share of the dense model's
accuracy a pruned model keeps (`kept_fraction`). The result's shape is the one rap's JSON files
and `rap report` have always used.

This replaced rap's own scorer (`rap.eval.zeroshot`, deleted 2026-12-02): before it went, the two gave the
same accuracy to the document on 20 documents of every task (stories260k) and of PIQA, ARC-Easy, WinoGrande
and LAMBADA (SmolLM2-135M), dense and with blocks dropped (benchmarks/results/harness-agreement-2026-12-02.json).
The one thing it did that this does not: it packed every choice of a shared context into one row under a
custom attention mask, so the context ran once per document; lm-eval hands the model one request per choice
and RapLM scores them as right-padded rows, as lm-eval's HFLM does (1.0-2.3x slower on CPU in that run).
`tests/test_harness.py` checks the scores against one unpadded forward per request.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from rap.errors import RapError, RequestError

log = logging.getLogger(__name__)

# lm-eval is imported where it runs (rap.eval.lm_eval_model): the tables' share math below needs none
TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "lambada_openai")
TASK_PREFIX = "rap_"  # rap_<task>: the local lm-eval task names
METRICS = {"piqa": ("acc", "acc_norm"), "hellaswag": ("acc", "acc_norm"), "winogrande": ("acc",),
           "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"), "boolq": ("acc",),
           "openbookqa": ("acc", "acc_norm"), "lambada_openai": ("acc", "ppl")}
# The headline metric follows the LLM-Pruner / RAP tables: acc for BoolQ, WinoGrande, ARC-e, LAMBADA;
# acc_norm for HellaSwag, ARC-c, OpenBookQA. PIQA is quoted both ways in the literature; we take acc_norm
# (lm-eval's leaderboard convention) and report both.
HEADLINE = {"piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
            "arc_challenge": "acc_norm", "boolq": "acc", "openbookqa": "acc_norm", "lambada_openai": "acc"}
APART = ("boolq",)  # reported beside the means, not in them (issue 15: a yes/no majority-class task)


def parse_tasks(spec: str | Iterable[str] | None) -> list[str]:
    """'all' / None -> every task; 'piqa,arc_easy' -> those, checked."""
    if spec is None:
        return list(TASKS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise RequestError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or 'all'")
    return names


def task_manager(tasks: Sequence[str], root: str | Path | None = None):
    """An lm-eval TaskManager that knows rap_<task> for each of `tasks` (and no hub task)."""
    from lm_eval.tasks import TaskManager

    from rap.eval.lm_eval_model import write_task_configs

    folder = write_task_configs(Path(tempfile.mkdtemp(prefix="rap-lm-eval-tasks-")), root, tasks)
    return TaskManager(include_path=str(folder), include_defaults=False)


def task_docs(name: str, limit: int | None = None, root: str | Path | None = None) -> list[dict]:
    """The first `limit` documents of a task as lm-eval builds them: {"text", "choices", "gold"}
    (LAMBADA: choices = [the target]). For checking data files and prompts."""
    (name,) = parse_tasks([name])
    task = task_manager([name], root).load([TASK_PREFIX + name])["tasks"][TASK_PREFIX + name]
    docs = list(task.eval_docs)[:limit]
    out = []
    for d in docs:
        if task.OUTPUT_TYPE == "multiple_choice":
            out.append({"text": task.doc_to_text(d), "choices": list(task.doc_to_choice(d)),
                        "gold": task.doc_to_target(d)})
        else:
            out.append({"text": task.doc_to_text(d), "choices": [task.doc_to_target(d)], "gold": 0})
    return out


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate(model, tokenizer, tasks: str | Iterable[str] | None = None, *, limit: int | None = None,
             batch_size: int = 16, mask=None, progress: bool = True, root: str | Path | None = None) -> dict:
    """Zero-shot accuracy on `tasks` (default: all eight) by lm-eval. `model` is a BlockView (then `mask`
    picks the blocks that run) or any HF causal LM. Returns a JSON-ready dict: per task n, each metric,
    stderr, chance and headline; the means over the tasks but BoolQ (`mean_headline`, `mean_acc`,
    `mean_chance`), BoolQ's headline under `apart`, and `mean_headline_all` over every task."""
    from lm_eval import simple_evaluate

    from rap.core.model import BlockView
    from rap.eval.lm_eval_model import RapLM

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise RequestError(f"--limit must be at least 1, got {limit}")
    loaded = {"view": model} if isinstance(model, BlockView) else {"hf_model": model}
    lm = RapLM(**loaded, tokenizer=tokenizer, mask=mask, batch_size=batch_size, progress=progress)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    out = simple_evaluate(model=lm, tasks=[TASK_PREFIX + n for n in names], limit=limit,
                          task_manager=task_manager(names, root), log_samples=True, bootstrap_iters=0,
                          verbosity="WARNING" if not progress else None)
    results = {}
    for name in names:
        key = TASK_PREFIX + name
        samples = out["samples"][key]
        if not samples:
            raise RapError(f"{name}: no documents scored")
        got = out["results"][key]
        metrics = {m: float(got["perplexity,none" if m == "ppl" else f"{m},none"]) for m in METRICS[name]}
        stderr = {m: _stderr([float(s[m]) for s in samples]) for m in METRICS[name] if m != "ppl"}
        chance = 0.0 if name == "lambada_openai" else sum(1 / len(s["arguments"]) for s in samples) / len(samples)
        results[name] = {"n": len(samples), **metrics, "stderr": stderr, "chance": chance,
                         "headline": HEADLINE[name]}
        log.info("%s: %s", name, results[name])
    return summarize(results, limit)


def summarize(results: dict[str, dict], limit: int | None, apart: Sequence[str] = APART) -> dict:
    """The means over the tasks but `apart` (BoolQ), which is reported alone; `mean_headline_all`
    keeps every task (the mean rap's results before 2026-12-02 called `mean_headline`)."""
    inside = [r for n, r in results.items() if n not in apart] or list(results.values())
    return {"limit": limit, "harness": harness_version(), "tasks": results,
            "mean_headline": mean_headline(results, apart), "mean_acc": sum(r["acc"] for r in inside) / len(inside),
            "mean_chance": sum(r["chance"] for r in inside) / len(inside),
            "mean_over": [n for n in results if n not in apart] or list(results),
            "apart": {n: results[n][results[n]["headline"]] for n in results if n in apart},
            "mean_headline_all": mean_headline(results, ())}


def mean_headline(tasks: dict[str, dict], apart: Sequence[str] = APART) -> float:
    """The mean headline accuracy over `tasks` but `apart` (all of them if nothing else is left)."""
    inside = [r for n, r in tasks.items() if n not in apart] or list(tasks.values())
    return sum(r[r["headline"]] for r in inside) / len(inside)


def harness_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm_eval')}"


def kept_fraction(result: dict, dense: dict, apart: Sequence[str] = APART) -> dict:
    """How much of the dense model's accuracy a pruned model keeps, over the tasks both scored but `apart`.

    `kept_above_chance` = (mean - chance) / (dense mean - chance), the share that does not credit random
    guessing (the one to quote); `kept` = mean / dense mean (the RAP paper's "% of dense accuracy"), beside
    it. The tasks in `apart` (BoolQ) are left out of both means and reported alone under `apart`.
    """
    shared = [n for n in dense["tasks"] if n in result["tasks"]]
    names = [n for n in shared if n not in apart]
    if not names:
        raise RapError("the two results share no task (outside " + ", ".join(apart) + ")")

    def head(res: dict, n: str) -> float:
        return res["tasks"][n][res["tasks"][n]["headline"]]

    def shares(ours: float, base: float, chance: float) -> dict:
        return {"kept": ours / base if base else float("nan"),
                "kept_above_chance": (ours - chance) / (base - chance) if base > chance else float("nan")}

    ours = sum(head(result, n) for n in names) / len(names)
    base = sum(head(dense, n) for n in names) / len(names)
    chance = sum(dense["tasks"][n]["chance"] for n in names) / len(names)
    # issue 15's reading: the above-chance share of each task, averaged over the tasks where dense is above
    # chance (a task where dense guesses has no share to keep: nan, left out and listed)
    per_task = {n: shares(head(result, n), head(dense, n), dense["tasks"][n]["chance"])["kept_above_chance"]
                for n in names}
    finite = [v for v in per_task.values() if math.isfinite(v)]
    out = {"tasks": names, "mean": ours, "dense_mean": base, "chance": chance, **shares(ours, base, chance),
           "kept_above_chance_per_task": per_task,
           "kept_above_chance_task_mean": sum(finite) / len(finite) if finite else float("nan"),
           "apart": {}}
    for n in shared:
        if n in apart:
            a, b, c = head(result, n), head(dense, n), dense["tasks"][n]["chance"]
            out["apart"][n] = {"acc": a, "dense": b, "chance": c, **shares(a, b, c)}
    return out


def share_columns(tasks: dict, dense_tasks: dict | None, apart: Sequence[str] = APART) -> dict:
    """A quality table's share columns for one row (`tasks` as `evaluate` returns them): the above-chance
    share of dense accuracy first, the raw share beside it, each task in `apart` (BoolQ) alone."""
    if dense_tasks is None:
        return {}
    kept = kept_fraction({"tasks": tasks}, {"tasks": dense_tasks}, apart)
    out = {"quality_kept_above_chance": kept["kept_above_chance"], "quality_kept": kept["kept"]}
    for n, a in kept["apart"].items():
        out.update({n: a["acc"], f"{n}_kept_above_chance": a["kept_above_chance"], f"{n}_kept": a["kept"]})
    return out
