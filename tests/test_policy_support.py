"""Helpers for the policy tests (no tests here): a one-shot profile and a quality model for the
bundled stories260k, built in seconds from tiny calibration data. The real profiles come from
rap.profile; these tests must not depend on it."""

from __future__ import annotations

import functools

import torch

from rap.data import WIKITEXT2_VALID, read_text
from rap.eval.perplexity import token_windows
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel


def oneshot_profile(view, evaluator) -> dict:
    """Removal order by the measured cost of dropping each block alone (least important first)."""
    L = view.num_layers
    names = [f"{k}.{i}" for i in range(L) for k in ("attn", "ffn")]
    scores = {n: evaluator.log_ratio(BlockMask.from_drop(L, [n])) for n in names}
    order = sorted(names, key=lambda n: scores[n])
    return {"model": view.name, "method": "oneshot (test helper)", "order": order, "scores": scores,
            "dense_ppl": float(torch.tensor(evaluator.dense_nll()).exp())}


@functools.lru_cache(maxsize=1)
def stories_setup():
    """(view, tokenizer, profile, evaluator, quality, ladder) for stories260k."""
    from rap.policy.evaluator import MeasuredEvaluator
    from rap.policy.train import prepare_quality
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cpu")
    text = read_text(WIKITEXT2_VALID)[:20_000]
    windows = token_windows(text, tok, 64, 128)
    evaluator = MeasuredEvaluator(view, windows, label="test")
    profile = oneshot_profile(view, evaluator)
    stream = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    quality, ladder = prepare_quality(view, profile, evaluator, kv_stream=stream, design_count=20, ladder_step=1,
                                      kv_prompt_lens=(32, 128), kv_samples=1, kv_continuation=16, progress=False)
    return view, tok, profile, evaluator, quality, ladder


def stories_context(kv_ratios=None):
    from rap.policy.context import PolicyContext

    view, _, profile, _, quality, ladder = stories_setup()
    return PolicyContext(MemoryModel.from_view(view), profile["order"], quality, profile["scores"], "stories260k",
                         ladder=ladder)
