"""lm-eval through `rap serve` equals lm-eval with rap as the model: same docs, same accuracy.

    python -m benchmarks.lm_eval_serve                          # stories260k, rap_piqa + a generate task, 200 docs
    python -m benchmarks.lm_eval_serve --model smollm2-135m --limit 200

Starts `rap serve MODEL --budget 1TiB` (dense: a second process on loopback), runs lm-eval 0.4.13's `local-completions`
client against it (default tokenized_requests=True: token-id prompts, echo + logprobs for the
log-likelihood task, stop strings for the generate task) and `--model rap` in this process on the
same local tasks and docs, and prints per task: accuracy both ways, docs that differ, the largest
per-request log-likelihood difference. Writes $OUT/lm-eval-serve-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.common import print_table, write_json
from benchmarks.server_load import free_port, start_server

GENERATE_TASK = """task: rap_lambada_generate
dataset_path: json
dataset_kwargs: {"data_files": {"test": "%s"}}
test_split: test
output_type: generate_until
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
generation_kwargs: {"until": [".", "\\\\n"], "max_gen_toks": 12, "do_sample": false, "temperature": 0}
metric_list: [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": true}]
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260k")
    p.add_argument("--tasks", default="rap_piqa,rap_lambada_generate")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rap.data import data_file
    from rap.eval.lm_eval_model import write_task_configs
    from rap.sources import load_view

    torch.set_num_threads(args.threads)
    folder = write_task_configs(Path(tempfile.mkdtemp(prefix="rap-tasks-")))
    (folder / "rap_lambada_generate.yaml").write_text(GENERATE_TASK % data_file("lambada_openai/lambada_test.jsonl"))
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = args.tasks.split(",")
    _, tok = load_view(args.model)
    tokenizer_path = tok.name_or_path

    port = free_port()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    server = start_server(args.model, port, None, args.threads, out / "lm-eval-serve-server.log", extra=())
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        served = simple_evaluate(model="local-completions", tasks=tasks, limit=args.limit, task_manager=tm,
                                 log_samples=True, bootstrap_iters=0,
                                 model_args=f"model={args.model},base_url={url}/v1/completions,"
                                            f"tokenizer_backend=huggingface,tokenizer={tokenizer_path},max_retries=1")
        served_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    t0 = time.perf_counter()
    direct = simple_evaluate(model="rap", model_args=f"model={args.model}", tasks=tasks, limit=args.limit,
                             task_manager=tm, log_samples=True, bootstrap_iters=0)
    direct_s = time.perf_counter() - t0

    rows = []
    for task in tasks:
        metric = "acc,none" if "acc,none" in direct["results"][task] else "exact_match,none"
        a_samples, b_samples = served["samples"][task], direct["samples"][task]
        differ = sum(1 for a, b in zip(a_samples, b_samples) if a["filtered_resps"] != b["filtered_resps"]
                     and not _close(a["filtered_resps"], b["filtered_resps"]))
        worst = max((abs(float(ra[0][0]) - float(rb[0][0])) for a, b in zip(a_samples, b_samples)
                     for ra, rb in zip(a["resps"], b["resps"]) if isinstance(ra[0], (list, tuple))), default=None)
        rows.append({"task": task, "docs": len(a_samples), "metric": metric.split(",")[0],
                     "via_rap_serve": served["results"][task][metric], "rap_model": direct["results"][task][metric],
                     "docs_differing": differ, "max_loglik_diff": worst})
    print_table(rows, ["task", "docs", "metric", "via_rap_serve", "rap_model", "docs_differing", "max_loglik_diff"])
    write_json(f"lm-eval-serve-{datetime.date.today().isoformat()}.json", {
        "command": " ".join(["python -m benchmarks.lm_eval_serve", *sys.argv[1:]]), "model": args.model,
        "limit": args.limit, "rows": rows, "served_seconds": served_s, "direct_seconds": direct_s,
        "lm_eval_version": __import__("lm_eval").__version__})


def _close(a, b) -> bool:
    """Per-request log-likelihood pairs equal to 1e-4 and the same greedy flag (generations: exactly)."""
    try:
        return all(math.isclose(float(x[0]), float(y[0]), abs_tol=1e-4) and x[1] == y[1] for x, y in zip(a, b))
    except (TypeError, IndexError, ValueError):
        return False


if __name__ == "__main__":
    main()
