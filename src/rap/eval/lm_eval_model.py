"""rap as an lm-eval model, and rap's eight zero-shot sets as local lm-eval tasks (nothing from a hub).

    python -m rap.eval.lm_eval_model --model rap --model_args model=smollm2-135m,drop=attn.3+ffn.7 \
        --tasks rap_piqa,rap_arc_easy --limit 200

runs lm-eval 0.4's own CLI with the model "rap" registered and `--include_path` pointing at task
configs written from `rap.data`'s folder (`write_task_configs`). lm-eval discovers models only from
its own package (its registry has no plugin entry points), so `lm_eval --model rap` works after
`import rap.eval.lm_eval_model` (e.g. `lm_eval.simple_evaluate(model="rap", ...)` from Python) and from
this module's command line, not from the bare `lm_eval` command.

model_args: model (a rap model name or folder), drop (a block mask: attn.3+ffn.7, `+` since lm-eval
splits model_args at commas | N with profile | mask.json), profile (profile.json for `drop=N`), dtype, device, batch_size (rows per forward).

The tasks mirror lm-eval 0.4.13's own YAMLs (prompts, choices, targets, metrics; WinoGrande and
HellaSwag through lm-eval's own preprocessing functions), with `dataset_path: json` and `data_files`
from the local copies (shared/data/SOURCES.md). PIQA's labels and OpenBookQA's TSV are joined into
JSON lines next to the YAMLs, since lm-eval's json loader reads one file per split.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty: fill it first)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from rap.data import data_file
from rap.errors import RapError

TASK_PREFIX = "rap_"
_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _task(name: str, data_file: Path, **fields) -> dict:
    return {"task": TASK_PREFIX + name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "output_type": "multiple_choice", "metric_list": _MC_METRICS, "metadata": {"version": 1.0}, **fields}


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task_configs(out_dir: str | Path, root: str | Path | None = None) -> Path:
    """Write rap_{piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa,lambada_openai}.yaml
    (and the two joined data files, and the preprocessing shim) into `out_dir`; pass it to lm-eval
    as `--include_path` / `TaskManager(include_path=...)`. Returns `out_dir`."""
    out = Path(out_dir)

    def find(relative: str) -> Path:  # `root` if given, else rap's data search order (rap.data)
        return Path(root) / relative if root is not None else data_file(relative)

    out.mkdir(parents=True, exist_ok=True)
    try:
        piqa = _jsonl(find("piqa/valid.jsonl"))
        labels = [int(x) for x in (find("piqa/valid-labels.lst")).read_text().split()]
        with open(find("openbookqa/test.tsv"), encoding="utf-8", newline="") as f:
            obqa = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError as e:
        raise RapError(f"data file {e.filename} is missing (see shared/data/SOURCES.md)") from None
    if len(piqa) != len(labels):
        raise RapError(f"piqa: {len(piqa)} questions but {len(labels)} labels")
    from rap.eval.zeroshot import parse_obqa_choices

    piqa_file = _write_jsonl(out / "piqa.jsonl", [{**r, "label": y} for r, y in zip(piqa, labels)])
    obqa_file = _write_jsonl(out / "openbookqa.jsonl", [
        {"question_stem": r["Question Stem"], "choices": parse_obqa_choices(r["Choices"]),
         "answer": "ABCD".index(r["Answer Key"].strip())} for r in obqa])
    (out / "rap_lm_eval_shim.py").write_text(
        '"""lm-eval\'s own preprocessing for WinoGrande and HellaSwag (written by rap.eval.lm_eval_model)."""\n'
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
        "from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text"
        "  # noqa: F401\n")
    tasks = {
        "piqa": _task("piqa", piqa_file, doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                      doc_to_choice="{{[sol1, sol2]}}"),
        "hellaswag": _task("hellaswag", find("hellaswag/hellaswag_val.jsonl"),
                           process_docs="!function rap_lm_eval_shim.process_docs", doc_to_text="{{query}}",
                           doc_to_target="{{label}}", doc_to_choice="choices"),
        "winogrande": _task("winogrande", find("winogrande/dev_noqid.jsonl"),
                            doc_to_text="!function rap_lm_eval_shim.doc_to_text",
                            doc_to_target="!function rap_lm_eval_shim.doc_to_target",
                            doc_to_choice="!function rap_lm_eval_shim.doc_to_choice", metric_list=_MC_METRICS[:1]),
        "arc_easy": _task("arc_easy", find("arc/ARC-Easy-Test.olmo.jsonl"),
                          doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{gold}}",
                          doc_to_choice="{{choices}}"),
        "arc_challenge": _task("arc_challenge", find("arc/ARC-Challenge-Test.olmo.jsonl"),
                               doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{gold}}",
                               doc_to_choice="{{choices}}"),
        "boolq": _task("boolq", find("boolq/boolq_validation.jsonl"),
                       doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
                       doc_to_target="{{ 1 if answer else 0 }}", doc_to_choice=["no", "yes"],
                       metric_list=_MC_METRICS[:1]),
        "openbookqa": _task("openbookqa", obqa_file, doc_to_text="question_stem", doc_to_target="answer",
                            doc_to_choice="{{choices}}"),
        "lambada_openai": {**_task("lambada_openai", find("lambada_openai/lambada_test.jsonl"),
                                   doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
                                   doc_to_target="{{' '+text.split(' ')[-1]}}"),
                           "output_type": "loglikelihood",
                           "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                            "higher_is_better": False},
                                           {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name, config in tasks.items():
        (out / f"{TASK_PREFIX}{name}.yaml").write_text(_yaml(config), encoding="utf-8")
    return out


def _yaml(config: dict) -> str:
    """YAML with lm-eval's `!function` tags left unquoted (json.dumps quotes everything else)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("!function "):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@register_model("rap")
class RapLM(TemplateLM):
    """A rap model under a fixed block mask, for lm-eval: log-likelihoods by batched, right-padded
    forward passes of the masked model (`BlockView.masked`); generation through rap's Engine (its
    fast decoder where the family has one) with the same mask."""

    def __init__(self, model: str = "stories260k", drop: str | None = None, profile: str | None = None,
                 dtype: str | None = None, device: str | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, **kwargs):
        super().__init__()
        from rap.serve.engine import Engine
        from rap.core.mask import BlockMask
        from rap.sources import load_view

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI passes --device (default cuda); like its HFLM, use what is there
        self.view, self.tokenizer = load_view(str(model), dtype=dtype, device=device)
        prof = json.loads(Path(profile).read_text()) if profile else None
        drop = str(drop).replace("+", ",") if drop else None  # lm-eval splits model_args at commas
        self.mask = BlockMask.parse(drop, self.view.num_layers, prof) if drop else BlockMask.full(self.view.num_layers)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)
        fixed = self.mask
        self.engine = Engine(self.view, tokenizer=self.tokenizer, budget=2**62, profile=prof,
                             policy=lambda request, budget_bytes: fixed)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.view.shape.max_context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, ctx, cont in requests:
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]  # left-truncate, as lm-eval's HFLM does
            rows.append((full[:-1], len(cont), full[-len(cont):]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="rap loglikelihood"):
            batch = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch)
            # right padding needs no attention mask: a causal model's real tokens never see a later pad
            ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in batch], device=self.view.device)
            with self.view.masked(self.mask), torch.inference_mode():
                logits = self.view.model(input_ids=ids).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for b, i in enumerate(batch):
                inputs, n, target = rows[i]
                span = logp[b, len(inputs) - n:len(inputs)]
                t = torch.tensor(target, device=span.device)
                out[i] = (float(span.gather(-1, t[:, None]).sum()), bool((span.argmax(-1) == t).all()))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            results.append(sum(s for s, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from rap.serve.engine import GenerationRequest

        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="rap generate"):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            (result,) = self.engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=max_new,
                                                                temperature=float(gen_kwargs.get("temperature", 0)),
                                                                stop=tuple(until))])
            if result.error is not None:
                raise result.error
            out.append(result.text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with "rap" registered and rap's local tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    tasks_dir = write_task_configs(Path(tempfile.mkdtemp(prefix="rap-lm-eval-tasks-")))
    if "--include_path" in argv:
        at = argv.index("--include_path") + 1
        argv[at] = f"{argv[at]},{tasks_dir}" if at < len(argv) else str(tasks_dir)
    else:
        argv += ["--include_path", str(tasks_dir)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
