"""Perplexity of a continuation after compressing its prefix: how much a press loses for language modelling.

Each window of prefix + continuation tokens: the prefix's cache is compressed (question-agnostic:
the observation window is the prefix's own tail), then the continuation is read through the
compressed cache in one forward pass and every continuation token is scored. The full-cache
reference scores the same tokens with the uncompressed prefix. PPL = exp(mean NLL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rap.errors import RequestError
from rap.core.hf import cache_kwargs
from rap.kv.base import Budget, Press
from rap.kv.compress import _model, compress


@torch.no_grad()
def continuation_nll(view_or_model, ids: torch.Tensor, prefix_tokens: int, press: Press | None = None,
                     budget: Budget | None = None) -> torch.Tensor:
    """Summed NLL (float32) of ids[:, prefix_tokens:] given ids[:, :prefix_tokens], per row: [B]."""
    model = _model(view_or_model)
    P = prefix_tokens
    if not 2 <= P < ids.shape[1]:
        raise RequestError(f"prefix of {P} tokens does not fit a window of {ids.shape[1]}")
    target = ids[:, P:]
    if press is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, P - 1:-1].float()
    else:
        comp = compress(model, press, ids[:, :P], budget or Budget(kv_ratio=1.0), reserve=ids.shape[1] - P)
        rest = model(input_ids=ids[:, P:-1], **cache_kwargs(comp.cache), use_cache=True).logits.float()
        logits = torch.cat([comp.next_logits.unsqueeze(1), rest], dim=1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).sum(-1)


def run_continuation(view, windows: torch.Tensor, prefix_tokens: int, presses: dict, budgets: list[float],
                     progress: bool = True) -> list[dict]:
    """One row per (press, budget): continuation PPL over `windows` [N, prefix + continuation]."""
    device = view.device
    jobs = [(name, press, b) for name, press in presses.items() for b in ([1.0] if press is None else budgets)]
    bar = tqdm(total=len(jobs) * windows.shape[0], desc="continuation", disable=not progress, leave=False)
    rows = []
    scored = windows.shape[0] * (windows.shape[1] - prefix_tokens)
    for name, press, b in jobs:
        total = 0.0
        for w in windows:
            total += float(continuation_nll(view, w.unsqueeze(0).to(device), prefix_tokens, press,
                                            Budget(kv_ratio=b))[0])
            bar.update()
        rows.append({"press": name, "budget": b, "ppl": math.exp(total / scored), "nll": total / scored,
                     "windows": int(windows.shape[0]), "prefix_tokens": prefix_tokens,
                     "continuation_tokens": int(windows.shape[1] - prefix_tokens)})
    bar.close()
    return rows
