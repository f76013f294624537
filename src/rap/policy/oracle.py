"""The oracle: an expensive search for the best configuration of one (request, budget).
Evaluation only (seconds per decision, and it may run the model).

For every KV ratio, an evolutionary search over full 2L keep vectors (not just the ladder):
the population starts from the ladder's best feasible entries and random masks, children come
from swapping / adding blocks, every child is repaired to fit (dropping its least damaging kept
block until it does) and scored by the quality model's surrogate. The best `top_k` distinct
candidates over all ratios, plus any `candidates` policies' own decisions, are then re-scored
with the *measured* calibration log-PPL (`MeasuredEvaluator`, memoised) when one is given, and
the best measured one wins. So on the calibration set the oracle is never worse than a policy
whose decisions it was shown.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rap.core.memory import Request
from rap.policy.evaluator import mask_from_keep, mask_key


class OraclePolicy:
    name = "oracle"

    def __init__(self, context, measured=None, candidates: Sequence = (), population: int = 48,
                 generations: int = 25, top_k: int = 4, seed: int = 0):
        self.context = context
        self.measured = measured
        self.candidates = list(candidates)
        self.population = population
        self.generations = generations
        self.top_k = top_k
        self.seed = seed
        self.scored = 0  # masks scored by the surrogate, over all decisions
        self.measured_masks = 0  # masks re-scored by measurement

    def _repair(self, keep: np.ndarray, costs, r_index: int, budget_bytes: int) -> np.ndarray:
        """Drop each row's least damaging kept block until the row fits."""
        w = self.context.quality.surrogate.weights
        keep = keep.copy()
        for _ in range(keep.shape[1] + 1):
            over = costs.peak(keep, r_index) > budget_bytes
            if not over.any():
                break
            rows = np.flatnonzero(over)
            cost = np.where(keep[rows] > 0, w[None, :], np.inf)
            keep[rows, np.argmin(cost, axis=1)] = 0
        return keep

    def _search(self, request: Request, costs, r_index: int, budget_bytes: int, rng) -> list[tuple[float, np.ndarray]]:
        ctx = self.context
        ladder = ctx.ladder
        n2 = 2 * ctx.num_layers
        sur = ctx.quality.surrogate
        pen = ctx.quality.kv_penalty(ctx.kv_ratios[r_index], request.prompt)
        from rap.policy.ladder import peaks

        fits = peaks(ladder, costs)[r_index] <= budget_bytes
        seeds = ladder.keep[fits][np.argsort(ladder.values[fits])[: self.population // 2]]
        rand = (rng.random((self.population - len(seeds), n2)) < rng.random((self.population - len(seeds), 1))).astype(float)
        pop = self._repair(np.vstack([seeds, rand]), costs, r_index, budget_bytes)
        score = sur.predict_drop(1.0 - pop)
        for _ in range(self.generations):
            children = pop[rng.integers(0, len(pop), self.population)].copy()
            for child in children:
                kept, dropped = np.flatnonzero(child > 0), np.flatnonzero(child == 0)
                if len(dropped) and (rng.random() < 0.5 or not len(kept)):
                    child[rng.choice(dropped)] = 1  # add a block; repair drops the cheapest one
                elif len(kept) and len(dropped):
                    child[rng.choice(kept)] = 0  # swap
                    child[rng.choice(dropped)] = 1
            children = self._repair(children, costs, r_index, budget_bytes)
            allpop = np.vstack([pop, children])
            allscore = np.r_[score, sur.predict_drop(1.0 - children)]
            self.scored += len(children)
            _, uniq = np.unique(allpop, axis=0, return_index=True)
            best = uniq[np.argsort(allscore[uniq])[: self.population]]
            pop, score = allpop[best], allscore[best]
        return [(float(s) + pen, k) for s, k in zip(score, pop)]

    def decide(self, request: Request, budget_bytes: int):
        ctx = self.context
        costs = ctx.costs(request)
        ctx.check_budget(request, budget_bytes, costs)
        rng = np.random.default_rng(self.seed)
        pool: dict[tuple[str, float], float] = {}
        masks = {}
        for r_i, r in enumerate(ctx.kv_ratios):
            for s, keep in self._search(request, costs, r_i, budget_bytes, rng):
                m = mask_from_keep(keep)
                pool[(mask_key(m), r)] = s
                masks[mask_key(m)] = m
        ranked = sorted(pool.items(), key=lambda kv: kv[1])
        shortlist, seen = [], set()
        for (key, r), s in ranked:
            if len(shortlist) >= self.top_k:
                break
            shortlist.append((masks[key], r, s))
            seen.add((key, r))
        for policy in self.candidates:
            d = policy.decide(request, budget_bytes)
            if (mask_key(d.mask), d.kv_ratio) not in seen:
                shortlist.append((d.mask, d.kv_ratio, d.predicted_log_ratio))
                seen.add((mask_key(d.mask), d.kv_ratio))
        if self.measured is not None:
            rescored = []
            for m, r, _ in shortlist:
                fresh = not self.measured.known(m)
                y = self.measured.log_ratio(m) + ctx.quality.kv_penalty(r, request.prompt)
                self.measured_masks += fresh
                rescored.append((m, r, y))
            shortlist = rescored
        mask, r, s = min(shortlist, key=lambda t: t[2])
        return ctx.finalize(self.name, mask, r, request, budget_bytes, s)



