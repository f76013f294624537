"""Baseline policies behind the same `decide(request, budget)` interface.

Each baseline is a rule for the mask; the KV keep ratio is chosen the same way for all of them
(and for the ladder/RL policies): try every ratio in the set, keep the candidate the quality
model predicts best. So a difference between policies is a difference in which blocks they
drop, not in access to the third knob. (`kv_ratios=(1.0,)` gives the paper's two-knob version.)

* gsi-order:  drop blocks in the profile's removal order until the configuration fits.
* ffn-first:  drop FFN blocks (in profile order) before any attention block; attn-first: reverse.
* knapsack:   keep the blocks that maximise summed one-shot importance under the byte budget,
              an attention block costing its parameters plus its layer's KV bytes for this
              request (0/1 knapsack by dynamic programming over the budget in 1024 steps,
              costs rounded up so the chosen set always fits).
"""

from __future__ import annotations


from typing import Sequence

import numpy as np

from rap.core.memory import Request
from rap.policy.evaluator import mask_from_keep


class _KVChoice:
    """Shared: run a mask rule for each KV ratio, return the best predicted fitting candidate."""

    name = "?"

    def __init__(self, context, kv_ratios: Sequence[float] | None = None, name: str | None = None):
        self.context = context
        self.kv_ratios = tuple(kv_ratios or context.kv_ratios)
        self._r_index = [context.kv_ratios.index(r) for r in self.kv_ratios]
        if name:
            self.name = name

    def keep_for(self, costs, r_index: int, budget_bytes: int) -> np.ndarray | None:  # pragma: no cover
        raise NotImplementedError

    def decide(self, request: Request, budget_bytes: int):
        ctx = self.context
        costs = ctx.costs(request)
        ctx.check_budget(request, budget_bytes, costs)
        best = None
        for r, r_i in zip(self.kv_ratios, self._r_index):
            keep = self.keep_for(costs, r_i, budget_bytes)
            if keep is None:
                continue
            mask = mask_from_keep(keep)
            score = ctx.predicted_log_ratio(mask, r, request)
            if best is None or score < best[0]:
                best = (score, mask, r)
        if best is None:  # no ratio in this policy's set admits a fitting prefix: smallest config
            best = (None, ctx.empty, min(self.kv_ratios))
        score, mask, r = best
        return ctx.finalize(self.name, mask, r, request, budget_bytes, score)


class OrderPolicy(_KVChoice):
    """Drop blocks in a fixed order until the configuration fits."""

    def __init__(self, context, order: Sequence[str], name: str, kv_ratios: Sequence[float] | None = None):
        super().__init__(context, kv_ratios, name)
        L = context.num_layers
        from rap.policy.evaluator import block_index

        idx = [block_index(n, L) for n in order]
        # prefixes[k] keeps everything but the first k blocks of the order
        self.prefixes = np.ones((len(idx) + 1, 2 * L))
        for k in range(1, len(idx) + 1):
            self.prefixes[k:, idx[k - 1]] = 0

    def keep_for(self, costs, r_index, budget_bytes):
        ok = costs.peak(self.prefixes, r_index) <= budget_bytes
        if not ok.any():
            return None
        return self.prefixes[int(np.argmax(ok))]


class KnapsackPolicy(_KVChoice):
    """Maximise summed importance of kept blocks; attention blocks also pay their KV bytes."""

    name = "knapsack"
    steps = 1024

    def keep_for(self, costs, r_index, budget_bytes):
        ctx = self.context
        L = ctx.num_layers
        value = np.maximum(ctx.importance, 1e-6)
        weight = costs.block_bytes[r_index]
        best = None
        # the activation peak depends on whether any attention / FFN block is kept: solve each case
        for any_attn, any_ffn in ((1, 1), (0, 1), (1, 0)):
            allowed = np.r_[np.full(L, bool(any_attn)), np.full(L, bool(any_ffn))]
            capacity = budget_bytes - costs.base_bytes - costs.act_bytes[any_attn, any_ffn]
            if capacity <= 0:
                continue
            keep = self._solve(value * allowed, weight, capacity, allowed)
            total = float(value @ keep)
            if best is None or total > best[0]:
                best = (total, keep)
        return None if best is None else best[1]

    def _solve(self, value: np.ndarray, weight: np.ndarray, capacity: float, allowed: np.ndarray) -> np.ndarray:
        G = self.steps
        unit = capacity / G
        units = np.ceil(weight / unit).astype(int)  # rounding up keeps the solution feasible
        dp = np.zeros(G + 1)
        took = np.zeros((len(value), G + 1), dtype=bool)
        for i in np.flatnonzero(allowed & (units <= G)):
            u = units[i]
            cand = np.full(G + 1, -np.inf)
            cand[u:] = dp[: G + 1 - u] + value[i]
            took[i] = cand > dp
            dp = np.maximum(dp, cand)
        keep = np.zeros(len(value))
        c = G
        for i in reversed(range(len(value))):
            if took[i, c]:
                keep[i] = 1
                c -= units[i]
        return keep


def kind_first_order(order: Sequence[str], first: str) -> list[str]:
    return [n for n in order if n.startswith(first)] + [n for n in order if not n.startswith(first)]


def make_baseline(name: str, context, kv_ratios: Sequence[float] | None = None):
    if name == "gsi-order":
        return OrderPolicy(context, context.order, name, kv_ratios)
    if name == "ffn-first":
        return OrderPolicy(context, kind_first_order(context.order, "ffn"), name, kv_ratios)
    if name == "attn-first":
        return OrderPolicy(context, kind_first_order(context.order, "attn"), name, kv_ratios)
    if name == "knapsack":
        return KnapsackPolicy(context, kv_ratios, name)
    raise ValueError(name)



