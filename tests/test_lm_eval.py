"""rap as an lm-eval model, and lm-eval's local-completions against `rap serve`: the same numbers.

lm-eval 0.4.13 runs rap's local task configs (data from rap.data's folder, nothing from a hub)."""

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from rap.serve.engine import Engine  # noqa: E402
from rap.eval.lm_eval_model import write_task_configs  # noqa: E402
from rap.serve.server import ServerThread, create_app  # noqa: E402
from rap.sources import bundled_path  # noqa: E402

LIMIT = 8


GENERATE_TASK = """task: rap_lambada_generate
dataset_path: json
dataset_kwargs: {"data_files": {"test": "%s"}}
test_split: test
output_type: generate_until
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
generation_kwargs: {"until": [".", "\\n"], "max_gen_toks": 12, "do_sample": false, "temperature": 0}
metric_list: [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": true}]
"""


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from rap.data import data_file

    folder = write_task_configs(tmp_path_factory.mktemp("tasks"))
    (folder / "rap_lambada_generate.yaml").write_text(
        GENERATE_TASK % data_file("lambada_openai/lambada_test.jsonl"))
    return TaskManager(include_path=str(folder), include_defaults=False)


def run(task_manager, model, model_args, tasks):
    from lm_eval import simple_evaluate

    torch.set_num_threads(1)
    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=LIMIT, task_manager=task_manager,
                          log_samples=True, bootstrap_iters=0)
    return out


def test_lm_eval_model_rap_by_name_equals_rap_zeroshot_on_a_loaded_view(task_manager, stories):
    """`lm_eval --model rap --model_args model=...,drop=...` (rap loads the model) and rap.eval.harness on
    an already loaded view with the same mask (what `rap zeroshot` and the benchmarks run) agree."""
    from rap.core.mask import BlockMask
    from rap.eval.harness import evaluate

    out = run(task_manager, "rap", "model=stories260k,drop=ffn.3+attn.1", ["rap_piqa", "rap_winogrande", "rap_arc_easy"])
    view, tok = stories
    ours = evaluate(view, tok, ["piqa", "winogrande", "arc_easy"], limit=LIMIT,
                    mask=BlockMask.parse("ffn.3,attn.1", view.num_layers), progress=False)
    for name in ("piqa", "winogrande", "arc_easy"):
        assert out["results"][f"rap_{name}"]["acc,none"] == pytest.approx(ours["tasks"][name]["acc"]), name


def test_local_completions_against_rap_serve_equals_the_rap_model(task_manager, stories):
    view, tok = stories
    engine = Engine(view, tokenizer=tok, budget=1 << 40)
    tasks = ["rap_piqa", "rap_lambada_openai", "rap_lambada_generate"]
    direct = run(task_manager, "rap", "model=stories260k", tasks)
    with ServerThread(create_app(engine, batch_window_s=0.0)) as url:
        served = run(task_manager, "local-completions",
                     f"model=stories260k,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                     f"tokenizer={bundled_path('stories260k')},max_retries=1,tokenized_requests=True", tasks)
    # generation with token-id prompts and stop strings: the same text as the rap model's
    gen = [(a["resps"], b["resps"]) for a, b in zip(served["samples"]["rap_lambada_generate"],
                                                   direct["samples"]["rap_lambada_generate"])]
    assert len(gen) == LIMIT and all(a == b for a, b in gen) and any(a[0][0].strip() for a, _ in gen)
    for task in ("rap_piqa", "rap_lambada_openai"):
        assert served["results"][task]["acc,none"] == direct["results"][task]["acc,none"], task
        for a, b in zip(served["samples"][task], direct["samples"][task]):
            assert a["doc_id"] == b["doc_id"] and len(a["resps"]) == len(b["resps"]) > 0
            for ra, rb in zip(a["resps"], b["resps"]):  # one [(loglik, is_greedy)] per request
                (la, ga), (lb, gb) = ra[0], rb[0]
                assert math.isclose(float(la), float(lb), abs_tol=2e-4) and ga == gb
