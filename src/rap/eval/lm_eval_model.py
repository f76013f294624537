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
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty: fill it first)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from rap.data import set_root
from rap.errors import RapError
from rap.eval.harness import TASK_PREFIX
from rap.eval.harness import TASKS as TASK_NAMES

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


_OBQA_CHOICE = re.compile(r"\(([A-D])\)\s*")


def parse_obqa_choices(text: str) -> list[str]:
    """'(A) a marsh (B) a tundra (C) ...' -> ['a marsh', 'a tundra', ...] (OpenBookQA's TSV choices)."""
    parts = _OBQA_CHOICE.split(text.strip())
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]  # split gives ['', 'A', 'a marsh ', 'B', ...]
    if letters != ["A", "B", "C", "D"][:len(letters)] or len(letters) < 2:
        raise RapError(f"openbookqa: cannot parse choices {text!r}")
    return texts


DATASET_OF_TASK = {"arc_easy": "arc", "arc_challenge": "arc"}  # rap.data.DATASETS name, where it differs


def write_task_configs(out_dir: str | Path, root: str | Path | None = None,
                       tasks: Sequence[str] = TASK_NAMES) -> Path:
    """Write rap_<task>.yaml for each of `tasks` (default all eight: piqa, hellaswag, winogrande, arc_easy,
    arc_challenge, boolq, openbookqa, lambada_openai), the joined data files PIQA and OpenBookQA need,
    and the preprocessing shim, into `out_dir`; pass it to lm-eval as `--include_path` /
    `TaskManager(include_path=...)`. Data come from `root`, else from the first rap data folder holding
    the task's whole set (`rap.data.set_root`: a missing set is one line saying how to get it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def find(name: str, relative: str) -> Path:
        base = Path(root) if root is not None else set_root(DATASET_OF_TASK.get(name, name))
        path = base / relative
        if not path.is_file():
            raise RapError(f"data file {path} is missing (`rap data` says how to get each set)")
        return path

    (out / "rap_lm_eval_shim.py").write_text(
        '"""lm-eval\'s own preprocessing for WinoGrande and HellaSwag (written by rap.eval.lm_eval_model)."""\n'
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
        "from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text"
        "  # noqa: F401\n")

    def piqa() -> dict:
        rows = _jsonl(find("piqa", "piqa/valid.jsonl"))
        labels = [int(x) for x in find("piqa", "piqa/valid-labels.lst").read_text().split()]
        if len(rows) != len(labels):
            raise RapError(f"piqa: {len(rows)} questions but {len(labels)} labels")
        data = _write_jsonl(out / "piqa.jsonl", [{**r, "label": y} for r, y in zip(rows, labels)])
        return _task("piqa", data, doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                     doc_to_choice="{{[sol1, sol2]}}")

    def openbookqa() -> dict:
        with open(find("openbookqa", "openbookqa/test.tsv"), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        data = _write_jsonl(out / "openbookqa.jsonl", [
            {"question_stem": r["Question Stem"], "choices": parse_obqa_choices(r["Choices"]),
             "answer": "ABCD".index(r["Answer Key"].strip())} for r in rows])
        return _task("openbookqa", data, doc_to_text="question_stem", doc_to_target="answer",
                     doc_to_choice="{{choices}}")

    def arc(name: str, file: str) -> dict:
        return _task(name, find(name, f"arc/{file}"), doc_to_text="Question: {{question}}\nAnswer:",
                     doc_to_target="{{gold}}", doc_to_choice="{{choices}}")

    builders = {
        "piqa": piqa,
        "hellaswag": lambda: _task("hellaswag", find("hellaswag", "hellaswag/hellaswag_val.jsonl"),
                                   process_docs="!function rap_lm_eval_shim.process_docs", doc_to_text="{{query}}",
                                   doc_to_target="{{label}}", doc_to_choice="choices"),
        "winogrande": lambda: _task("winogrande", find("winogrande", "winogrande/dev_noqid.jsonl"),
                                    doc_to_text="!function rap_lm_eval_shim.doc_to_text",
                                    doc_to_target="!function rap_lm_eval_shim.doc_to_target",
                                    doc_to_choice="!function rap_lm_eval_shim.doc_to_choice",
                                    metric_list=_MC_METRICS[:1]),
        "arc_easy": lambda: arc("arc_easy", "ARC-Easy-Test.olmo.jsonl"),
        "arc_challenge": lambda: arc("arc_challenge", "ARC-Challenge-Test.olmo.jsonl"),
        "boolq": lambda: _task("boolq", find("boolq", "boolq/boolq_validation.jsonl"),
                               doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
                               doc_to_target="{{ 1 if answer else 0 }}", doc_to_choice=["no", "yes"],
                               metric_list=_MC_METRICS[:1]),
        "openbookqa": openbookqa,
        "lambada_openai": lambda: {**_task("lambada_openai", find("lambada_openai", "lambada_openai/lambada_test.jsonl"),
                                           doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
                                           doc_to_target="{{' '+text.split(' ')[-1]}}"),
                                   "output_type": "loglikelihood",
                                   "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                                    "higher_is_better": False},
                                                   {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name in tasks:
        if name not in builders:
            raise RapError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
        (out / f"{TASK_PREFIX}{name}.yaml").write_text(_yaml(builders[name]()), encoding="utf-8")
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
    forward passes of the masked model (`BlockView.masked`; only the logits of continuation positions
    are computed); generation through rap's Engine (its fast decoder where the family has one) with the
    same mask.

    From lm-eval's CLI: `model` is a rap model name or folder. From Python, pass a loaded model instead:
    `view` (a BlockView, with `mask`) or a bare HF causal LM (`hf_model`, e.g. a torchao-quantized or
    width-pruned one; no mask, no generation), and its `tokenizer`. A BOS token starts every context
    where the model needs one (Gemma: `rap.eval.perplexity.needs_bos`), as lm-eval's HFLM does."""

    def __init__(self, model: str = "stories260k", drop: str | None = None, profile: str | None = None,
                 dtype: str | None = None, device: str | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, *, view=None, hf_model=None, tokenizer=None, mask=None,
                 progress: bool = True, **kwargs):
        super().__init__()
        from rap.core.mask import BlockMask
        from rap.eval.perplexity import needs_bos
        from rap.sources import load_view

        self.profile = json.loads(Path(profile).read_text()) if profile else None
        if view is None and hf_model is None:
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's CLI passes --device (default cuda); like its HFLM, use what is there
            view, tokenizer = load_view(str(model), dtype=dtype, device=device)
        if tokenizer is None:
            raise RapError("RapLM: a loaded model needs its tokenizer")
        self.view, self.tokenizer = view, tokenizer
        if view is not None:
            drop = str(drop).replace("+", ",") if drop else None  # lm-eval splits model_args at commas
            self.mask = mask if mask is not None else (
                BlockMask.parse(drop, view.num_layers, self.profile) if drop else BlockMask.full(view.num_layers))
            self.lm, config = view.model, view.config
        else:
            if mask is not None:
                raise RapError("a block mask needs a BlockView (rap.sources.load_view), not a bare model")
            self.mask, self.lm = None, hf_model
            config = hf_model.config.get_text_config(decoder=True) if hasattr(hf_model.config, "get_text_config") \
                else hf_model.config
        self.add_bos = needs_bos(tokenizer, getattr(config, "model_type", ""))
        self._max_length = (view.shape.max_context if view is not None
                            else int(getattr(config, "max_position_embeddings", 2048)))
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None
        self.progress = progress

    @property
    def engine(self):
        """rap's Engine under the fixed mask, built at the first generate request."""
        if self._engine is None:
            from rap.serve.engine import Engine

            if self.view is None:
                raise RapError("generation needs a BlockView (rap.sources.load_view), not a bare model")
            fixed = self.mask
            self._engine = Engine(self.view, tokenizer=self.tokenizer, budget=2**62, profile=self.profile,
                                  policy=lambda request, budget_bytes: fixed)
        return self._engine

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is conditioned on
        return self.tokenizer.bos_token_id if self.add_bos and self.tokenizer.bos_token_id is not None \
            else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)
        if add_special_tokens is None and self.add_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        disable_tqdm = disable_tqdm or not self.progress
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
            lo = min(len(rows[i][0]) - rows[i][1] for i in batch)  # the first position whose logits are scored
            # right padding needs no attention mask: a causal model's real tokens never see a later pad
            ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in batch], device=self.device)
            if self.view is not None:  # rap's own forward (a plan's levels with their values)
                from rap.core.forward import forward_for

                logits = forward_for(self.view).logits(ids, self.mask, keep=width - lo).float()
            else:  # a bare transformers model (the quantization / width-pruning peers)
                with torch.inference_mode():
                    logits = self.lm(input_ids=ids, use_cache=False, logits_to_keep=width - lo).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for b, i in enumerate(batch):
                inputs, n, target = rows[i]
                span = logp[b, len(inputs) - n - lo:len(inputs) - lo]
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
