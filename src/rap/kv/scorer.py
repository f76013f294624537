"""The one SnapKV-style scorer: every place rap ranks prompt tokens for KV compression calls this.

The decoder (`rap.decode.decoder`, right after each layer's prefill), the HF-path presses (`rap.kv.SnapKV`,
`AdaKV(SnapKV())`, `PyramidKV`), the evaluations (`rap kv needle`, L-Eval) and the policy's KV
penalty (`rap.policy.evaluator.continuation_nll`) all score with `SnapKVScorer`, so the policy
prices the compressor the server runs.

Score of key j for KV head h (Li et al. 2024, SnapKV): the softmax attention that the last
`window` prompt queries pay to j (fp32, causal), averaged over those queries, combined over the
query heads sharing h (`group`: "mean" or "max"), then pooled over the earlier keys (`pool`:
"max" or "avg", `kernel` wide) to keep neighbours of a hit together. The observation window
itself always ranks first (2 + index / window: above any probability, the most recent highest);
pad columns score -inf.

Defaults (window 32, average pool 7, group max) were chosen by a bounded measurement on SmolLM2-135M
(CPU; benchmarks/kv_scorer_choice.py, benchmarks/results/kv-scorer-choice-smollm2-135m-2026-12-02.json):
the share of the needle's tokens Ada-KV keeps, over 24 settings (window 16/32/64 x max/avg pool x kernel
5/7 x group mean/max), 14 needle cases (1k and 2k tokens, 7 depths), budgets 5/10/20%. The window
decides most (mean retention 0.26 at 32, 0.23 at 64, 0.17 at 16); pooling and grouping move it by a
few percent (0.267 for this default, 0.256 for the decoder's former max-pool 7 / group mean, 0.222 for
the HF path's former window 64 / avg-pool 5 / group mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rap.errors import RequestError

POOLS = ("max", "avg")
GROUPS = ("mean", "max")


@dataclass(frozen=True)
class SnapKVScorer:
    """Named parameters of the SnapKV score (see the module docstring)."""

    window: int = 32
    pool: str = "avg"
    kernel: int = 7
    group: str = "max"

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise RequestError(f"SnapKV window must be >= 1 and kernel odd >= 1, got {self.window}, {self.kernel}")
        if self.pool not in POOLS or self.group not in GROUPS:
            raise RequestError(f"SnapKV pool must be one of {POOLS} and group one of {GROUPS}, "
                               f"got {self.pool!r}, {self.group!r}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scaling: float,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of every prompt key per (row, KV head): float32 [n, Hkv, P].

        q [n, H, Q, D]: rotated queries of the prompt's last Q >= min(window, P) positions (the
        whole prompt's queries are fine); k [n, Hkv, P, D]: rotated keys of the left-padded
        prompt; pad [n]: first real column per row (None: no padding). Row b's window is its last
        w_b = min(window, P - pad_b) queries. One KV head at a time, so the transient is
        [n, H / Hkv, window, P] in fp32.
        """
        n, H, Q, _ = q.shape
        Hkv, P = k.shape[1], k.shape[2]
        G = H // Hkv
        W = min(self.window, P)
        if Q < W:
            raise ValueError(f"the scorer needs the last {W} queries, got {Q}")
        if pad is None:
            pad = torch.zeros(n, dtype=torch.long, device=k.device)
        cols = torch.arange(P, device=k.device)
        w_row = (P - pad).clamp(max=self.window)  # [n]
        start = P - w_row  # [n] first window column
        q_cols = cols[P - W:]
        in_window = q_cols[None, :] >= start[:, None]  # [n, W]
        sees = (cols[None, None, :] <= q_cols[None, :, None]) & (cols[None, None, :] >= pad[:, None, None])
        weight = (in_window.float() / w_row[:, None].float())[:, None, :, None]  # [n, 1, W, 1]
        scores = torch.empty(n, Hkv, P, device=k.device, dtype=torch.float32)
        qw = q[:, :, Q - W:]
        for h in range(Hkv):
            logits = torch.matmul(qw[:, h * G:(h + 1) * G].float(), k[:, h:h + 1].float().transpose(-1, -2))
            probs = (logits * scaling).masked_fill(~sees[:, None], float("-inf")).softmax(-1)
            # a pad query outside the row's window sees no key (NaN row): where() drops it, weight 0 would not
            probs = torch.where(in_window[:, None, :, None], probs, 0.0)
            per_query_head = (probs * weight).sum(2)  # [n, G, P]
            scores[:, h] = per_query_head.mean(1) if self.group == "mean" else per_query_head.amax(1)
        prefix = (cols[None, :] >= pad[:, None]) & (cols[None, :] < start[:, None])  # [n, P]
        # probabilities are >= 0, so zeroing the window and padding equals pooling over the prefix alone
        # (for "avg", zeros stand in for the missing neighbours, as kvpress's zero-padded avg_pool1d)
        masked = scores.masked_fill(~prefix[:, None], 0.0)
        if self.kernel > 1:
            pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
            masked = pool(masked, self.kernel, stride=1, padding=self.kernel // 2)
        rank = 2.0 + (cols[None, :] - start[:, None]).float() / w_row[:, None].float()  # [n, P]
        rank = rank.masked_fill(cols[None, :] < start[:, None], float("-inf"))
        return torch.where(prefix[:, None], masked, rank[:, None])

    def describe(self) -> str:
        return f"SnapKV(window={self.window}, {self.pool}-pool {self.kernel}, group {self.group})"


DEFAULT_SCORER = SnapKVScorer()


# ---- budgets over heads --------------------------------------------------------------------------
def uniform_keep(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """bool [n, Hkv, P]: each (row, KV head) keeps its top kept[b] columns (ties: the earlier column)."""
    n, Hkv, P = scores.shape
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(P, device=scores.device).expand_as(order))
    return ranks < kept[:, None, None]


def adaptive_keep(scores: torch.Tensor, kept: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """bool [n, Hkv, P]: Ada-KV's head-adaptive split of row b's Hkv * kept[b] tokens.

    Every head first keeps its own top floor(alpha * kept[b]) columns (Ada-KV's safeguard), then
    the rest of the row's budget goes to the highest scores of all heads taken together. Ties go
    to the earlier (head, column), so two callers with equal scores keep equal tokens.
    scores: -inf on pad columns (never kept while a row has enough real columns).
    """
    n, Hkv, P = scores.shape
    safe = torch.floor(alpha * kept.double()).long()  # [n]
    forced = uniform_keep(scores, safe) & torch.isfinite(scores)
    s = scores.float().masked_fill(forced, float("inf")).reshape(n, Hkv * P)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(Hkv * P, device=s.device).expand_as(order))
    return (ranks < (Hkv * kept)[:, None]).view(n, Hkv, P)


def kept_tokens(prompt_tokens: int, kv_ratio: float) -> int:
    """Tokens kept per KV head on average for a prompt: ceil(ratio * prompt), at least 1 (as MemoryModel)."""
    if kv_ratio >= 1.0:
        return prompt_tokens
    return max(1, min(prompt_tokens, math.ceil(kv_ratio * prompt_tokens)))
