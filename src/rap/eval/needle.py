"""Needle in a haystack over the Paul Graham essays (gkamradt/LLMTest_NeedleInAHaystack defaults).

A needle sentence is placed at a depth (0 = start, 1 = end) of a haystack cut to a context
length, then the model is asked the retrieval question. As in the original, the needle is moved
back to the nearest sentence end before its depth. Instead of a GPT-4 grader, an answer scores
the fraction of the needle's key phrases it contains ("sandwich", "Dolores Park"); accuracy is
the mean score. With a KV press, the prompt's cache is compressed before answering (question-
aware: context + question together; question-agnostic: the context alone).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rap.data import data_file
from rap.errors import RequestError

log = logging.getLogger(__name__)

HAYSTACK_DIR = "needle-haystack-paulgraham"
KEY_PHRASES = ("sandwich", "dolores park")
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct."


@dataclass(frozen=True)
class NeedleSpec:
    needle: str
    question: str
    key_phrases: tuple[str, ...] = KEY_PHRASES


def default_spec() -> NeedleSpec:
    d = json.loads(data_file(f"{HAYSTACK_DIR}/needle_defaults.json").read_text())
    return NeedleSpec(d["needle"], d["retrieval_question"])


@lru_cache(maxsize=2)
def haystack_text() -> str:
    folder = data_file(f"{HAYSTACK_DIR}/PaulGrahamEssays")
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(folder).glob("*.txt")))


def split_chat_prompt(tok, user_head: str, user_tail: str, system: str | None = SYSTEM) -> tuple[list[int], list[int]]:
    """Token ids before and after a document placed between `user_head` and `user_tail` in one user
    turn, rendered with the tokenizer's chat template (plain text with BOS when it has none)."""
    marker = "\u2063DOC\u2063"
    if getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_head + marker + user_tail}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        return (tok(head, add_special_tokens=False).input_ids, tok(tail, add_special_tokens=False).input_ids)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", True) else []
    head_ids = bos + (tok(user_head, add_special_tokens=False).input_ids if user_head else [])
    return head_ids, tok(user_tail + "\nAnswer:", add_special_tokens=False).input_ids


@dataclass(frozen=True)
class NeedleCase:
    context_tokens: int  # whole prompt length in tokens
    depth: float
    context_ids: torch.Tensor  # [1, n]: template head + haystack with the needle
    question_ids: torch.Tensor  # [1, m]: question + template tail (assistant turn opened)


def _sentence_end_before(tokens: list[str], pos: int, lookback: int = 200) -> int:
    for i in range(pos, max(0, pos - lookback), -1):
        if "." in tokens[i - 1]:
            return i
    return pos


def build_case(tok, context_tokens: int, depth: float, spec: NeedleSpec | None = None) -> NeedleCase:
    spec = spec or default_spec()
    head, tail = split_chat_prompt(tok, "", f"\n\n{spec.question} Don't give information outside the document "
                                           "or repeat your findings.")
    needle = tok(spec.needle, add_special_tokens=False).input_ids
    hay = _haystack_ids(tok)
    n = context_tokens - len(head) - len(tail) - len(needle)
    if n < 16:
        raise RequestError(f"context length {context_tokens} leaves no room for a haystack")
    if n > len(hay):
        raise RequestError(f"the haystack has only {len(hay)} tokens, fewer than {n}")
    body = hay[:n]
    pos = n if depth >= 1.0 else _sentence_end_before(tok.convert_ids_to_tokens(body), int(round(depth * n)))
    ids = head + body[:pos] + needle + body[pos:]
    return NeedleCase(context_tokens, depth, torch.tensor([ids]), torch.tensor([tail]))


_HAYSTACK_IDS: dict[int, list[int]] = {}


def _haystack_ids(tok) -> list[int]:
    """The whole haystack tokenized once per tokenizer (about 150k tokens)."""
    if id(tok) not in _HAYSTACK_IDS:
        _HAYSTACK_IDS[id(tok)] = tok(haystack_text(), add_special_tokens=False).input_ids
    return _HAYSTACK_IDS[id(tok)]


def score_answer(answer: str, spec: NeedleSpec | None = None) -> float:
    """Fraction of the needle's key phrases found in the answer (case-insensitive)."""
    spec = spec or default_spec()
    text = answer.lower()
    return sum(p in text for p in spec.key_phrases) / len(spec.key_phrases)


def run_needle(view, tok, presses: dict, budgets: list[float], lengths: list[int], depths: list[float],
               max_new_tokens: int = 32, question_aware: bool = True, progress: bool = True) -> list[dict]:
    """One row per (press, budget, length, depth). `presses`: name -> Press, or None for the full cache
    (run once, budget 1.0)."""
    from rap.kv import Budget, generate

    spec = default_spec()
    device = view.device
    eos = tok.eos_token_id
    rows = []
    cases = [build_case(tok, n, d, spec) for n in lengths for d in depths]
    jobs = [(name, press, b) for name, press in presses.items() for b in ([1.0] if press is None else budgets)]
    bar = tqdm(total=len(jobs) * len(cases), desc="needle", disable=not progress, leave=False)
    for name, press, b in jobs:
        for case in cases:
            out = generate(view, case.context_ids.to(device), max_new_tokens, press=press,
                           budget=Budget(kv_ratio=b), question_ids=case.question_ids.to(device),
                           question_aware=question_aware, eos_token_id=eos)
            answer = tok.decode(out[0], skip_special_tokens=True)
            rows.append({"press": name, "budget": b, "length": case.context_tokens, "depth": case.depth,
                         "score": score_answer(answer, spec), "answer": answer.strip()[:200]})
            bar.update()
    bar.close()
    return rows


def summarize(rows: list[dict], key: str = "score") -> dict[str, dict[str, float]]:
    """{press: {budget: mean score}}, budgets as strings ("0.1") for JSON."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        acc.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r[key])
    return {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in acc.items()}


def default_lengths(max_context: int) -> list[int]:
    """Haystack lengths worth testing under a context window: 1k..8k, plus the longest that fits."""
    lens = [n for n in (1024, 2048, 4096, 8192) if n <= max_context - 64]
    if max_context - 64 > (lens[-1] if lens else 0) * 1.5:
        lens.append(max_context - 64)
    return lens or [max_context // 2, max_context - 16]
