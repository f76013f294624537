"""Token log-probabilities of given token sequences under the engine's current decision.

    rows = score(engine, [[1, 345, 278, 931]], top_k=1)   # rows[0][j]: log p(token j | tokens < j)

What the OpenAI API's `logprobs` / `top_logprobs` / `echo` need (and so lm-eval's loglikelihood
tasks through `local-completions`). The sequences are scored teacher-forced in one forward pass
of the block-masked model (Hugging Face forward under `BlockView.masked`), with the mask the
engine's policy picks for that length under the budget now: the same blocks a generation of that
request would run. A generated completion is scored the same way after it is generated (prompt +
completion in one pass), so its log-probabilities are those of the model the tokens came from,
without a logit output path in the fast decoder. With KV compression (kv_ratio < 1) the generated
tokens saw a compressed cache; the scores are of the full cache (said in the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from rap.core.forward import forward_for

from rap.core.memory import Request

if TYPE_CHECKING:
    from rap.serve.engine import Engine

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    logprob: float | None  # None for the first token (nothing conditions it)
    top: tuple[tuple[int, float], ...] = ()  # the top_k (token id, logprob) at this position


def score(engine: "Engine", rows: Sequence[Sequence[int]], top_k: int = 0) -> list[list[TokenScore]]:
    """Per row, per token: its log-probability given the tokens before it, and the top_k
    alternatives. Runs on the engine's thread (it takes the engine's lock and moves weights)."""
    out = []
    with engine._lock:
        for ids in rows:
            ids = [int(t) for t in ids]
            decision = engine.decide(engine.planning_request(Request(1, len(ids), 1)))
            engine.residency.apply(decision.mask)
            engine.residency.synchronize()
            logits = forward_for(engine.view).logits(torch.tensor([ids]), decision.mask)[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)  # position j-1 predicts token j
            picked = logp.gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].tolist()
            tops: list[tuple[tuple[int, float], ...]] = [()] * (len(ids) - 1)
            if top_k > 0:
                values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            row = [TokenScore(ids[0], None, ())]
            row += [TokenScore(t, lp, top) for t, lp, top in zip(ids[1:], picked, tops)]
            out.append(row)
    return out
