"""L-Eval closed-ended long-document tasks (OpenLMLab/LEval; GPL-3.0, never bundled: `leval/` under $RAP_DATA),
exact-match scored.

Tasks: `topic_retrieval_longchat` (name the first/second/third topic of a long chat; correct if
the gold topic appears in the answer), the multiple-choice sets `quality`, `tpo` (one letter) and
`coursera` (one or more letters, all must match), `sci_fi` (True/False, loyal to the document)
and `gsm100` (last number of the answer). The document goes first, then one instruction, in the
model's chat template. Documents longer than the context budget keep their beginning (as L-Eval's
baselines truncate). All questions about one document share the document's prefix, so in the
question-agnostic mode the document's cache is compressed once and reused for each question.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rap.data import data_file
from rap.errors import RequestError
from rap.eval.needle import split_chat_prompt

log = logging.getLogger(__name__)

KINDS = {"topic_retrieval_longchat": "topic", "quality": "choice", "tpo": "choice", "coursera": "multi_choice",
         "sci_fi": "true_false", "gsm100": "number"}
DEFAULT_TASKS = ("topic_retrieval_longchat", "quality", "tpo", "coursera", "sci_fi")
HEAD = ("Now you are given a very long document. Please follow the instruction after this document. "
        "These instructions may include summarizing a document, answering questions based on the document, "
        "or writing a required paragraph.\n\nDocument is as follows.\n")
SUFFIX = {"choice": "\nAnswer with the letter of the correct option.",
          "multi_choice": "\nAnswer with the letters of all correct options.",
          "true_false": "\nAnswer True or False.", "topic": "", "number": ""}


@dataclass(frozen=True)
class Document:
    task: str
    index: int
    context_ids: torch.Tensor  # [1, n] template head + (truncated) document
    questions: tuple[torch.Tensor, ...]  # [1, m] each: instruction + template tail
    golds: tuple[str, ...]
    truncated: bool


def load_documents(tok, task: str, max_context: int, max_docs: int | None = None,
                   max_questions: int | None = None, max_new_tokens: int = 32) -> list[Document]:
    if task not in KINDS:
        raise RequestError(f"unknown L-Eval task {task!r}; choose from {', '.join(KINDS)}")
    path = data_file(f"leval/Closed-ended-tasks/{task}.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    docs, budget_q = [], max_questions
    for i, rec in enumerate(records[:max_docs] if max_docs else records):
        pairs = list(zip(rec["instructions"], rec["outputs"]))
        if budget_q is not None:
            pairs = pairs[:budget_q]
            budget_q -= len(pairs)
        if not pairs:
            break
        head, _ = split_chat_prompt(tok, HEAD, "")
        tails = [split_chat_prompt(tok, HEAD, f"\n\nInstruction: {inst}{SUFFIX[KINDS[task]]}")[1] for inst, _ in pairs]
        # instructions too long for this context (small models) are left out, with a note
        fits = [k for k, t in enumerate(tails) if len(head) + len(t) + max_new_tokens + 64 <= max_context]
        if len(fits) < len(pairs):
            log.warning("%s doc %d: %d of %d instructions do not fit %d tokens; skipped",
                        task, i, len(pairs) - len(fits), len(pairs), max_context)
        if not fits:
            continue
        pairs, tails = [pairs[k] for k in fits], [tails[k] for k in fits]
        doc = tok(rec["input"], add_special_tokens=False).input_ids
        room = max_context - len(head) - max(len(t) for t in tails) - max_new_tokens
        docs.append(Document(task, i, torch.tensor([head + doc[:room]]), tuple(torch.tensor([t]) for t in tails),
                             tuple(g for _, g in pairs), len(doc) > room))
    if not docs:
        raise RequestError(f"no {task} instruction fits {max_context} tokens; raise --max-context or pick other tasks")
    return docs


def _letters(text: str) -> set[str]:
    return set(re.findall(r"(?<![A-Za-z])([A-D])(?![a-z])", text))


def score_answer(task: str, prediction: str, gold: str) -> float:
    kind = KINDS[task]
    pred = prediction.strip()
    if kind == "topic":
        norm = lambda s: re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()  # noqa: E731
        return float(norm(gold) in norm(pred))
    if kind == "choice":
        want = re.match(r"\s*\(?([A-D])", gold)
        got = re.search(r"(?<![A-Za-z])\(?([A-D])(?![a-z])", pred)
        return float(bool(want and got and want.group(1) == got.group(1)))
    if kind == "multi_choice":
        first_line = pred.splitlines()[0] if pred else ""
        return float(_letters(first_line) == set(gold.strip()))
    if kind == "true_false":
        want = gold.split("[")[0].strip().lower()
        got = re.search(r"\b(true|false)\b", pred.lower())
        return float(bool(got) and got.group(1) == want)
    nums = re.findall(r"-?\d[\d,]*\.?\d*", pred)
    return float(bool(nums) and nums[-1].replace(",", "").rstrip(".") == gold.strip())


def run_leval(view, tok, presses: dict, budgets: list[float], tasks: list[str], max_context: int,
              max_docs: int | None = None, max_questions: int | None = 20, max_new_tokens: int = 32,
              question_aware: bool = True, progress: bool = True) -> list[dict]:
    """One row per (press, budget, task, question); `presses`: name -> Press or None (full cache)."""
    from rap.kv import Budget
    from rap.kv.compress import answer_questions

    device = view.device
    docs = {t: load_documents(tok, t, max_context, max_docs, max_questions, max_new_tokens) for t in tasks}
    jobs = [(name, press, b) for name, press in presses.items() for b in ([1.0] if press is None else budgets)]
    total = len(jobs) * sum(len(d.questions) for ds in docs.values() for d in ds)
    bar = tqdm(total=total, desc="leval", disable=not progress, leave=False)
    rows = []
    for name, press, b in jobs:
        for task, ds in docs.items():
            for doc in ds:
                answers = answer_questions(view, doc.context_ids.to(device), [q.to(device) for q in doc.questions],
                                           max_new_tokens, press, Budget(kv_ratio=b), question_aware,
                                           tok.eos_token_id)
                for k, (ans, gold) in enumerate(zip(answers, doc.golds)):
                    text = tok.decode(ans[0], skip_special_tokens=True)
                    rows.append({"press": name, "budget": b, "task": task, "doc": doc.index, "question": k,
                                 "context_tokens": int(doc.context_ids.shape[1]), "truncated": doc.truncated,
                                 "score": score_answer(task, text, gold), "answer": text.strip()[:120],
                                 "gold": gold[:120]})
                    bar.update()
    bar.close()
    return rows


def run_leval_decoder(decoder, tok, settings: list, tasks: list[str], max_context: int,
                      max_docs: int | None = None, max_questions: int | None = 20, max_new_tokens: int = 32,
                      progress: bool = True) -> list[dict]:
    """L-Eval through rap's decoder (the path requests are served on), question-aware: each question's
    prompt is its document + the question, every KV setting (`rap.eval.needle_decoder.KVSetting`)
    replaying that prompt's one prefill. One row per (setting, task, question), with the KV bytes held."""
    from rap.eval.needle_decoder import answer_settings

    docs = {t: load_documents(tok, t, max_context, max_docs, max_questions, max_new_tokens) for t in tasks}
    total = sum(len(d.questions) for ds in docs.values() for d in ds)
    bar = tqdm(total=total, desc="leval (decoder)", disable=not progress, leave=False)
    rows = []
    for task, ds in docs.items():
        for doc in ds:
            for k, (q, gold) in enumerate(zip(doc.questions, doc.golds)):
                ids = doc.context_ids[0].tolist() + q[0].tolist()
                for s, (tokens, nbytes) in zip(settings, answer_settings(decoder, ids, settings, max_new_tokens,
                                                                         tok.eos_token_id)):
                    text = tok.decode(tokens, skip_special_tokens=True)
                    rows.append({"press": s.name, "budget": s.kv_ratio, "kv_bits": s.kv_bits, "task": task,
                                 "doc": doc.index, "question": k, "context_tokens": int(doc.context_ids.shape[1]),
                                 "prompt_tokens": len(ids), "truncated": doc.truncated,
                                 "score": score_answer(task, text, gold), "kv_bytes": nbytes,
                                 "answer": text.strip()[:120], "gold": gold[:120]})
                bar.update()
    bar.close()
    return rows
