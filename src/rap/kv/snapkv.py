"""SnapKV (Li et al., arXiv 2404.14469): keep what the last `window_size` prompt queries attend to.

The score is `rap.kv.scorer.SnapKVScorer`, the one scorer rap's decoder uses too; this press
recomputes the window's queries from the layer input (as kvpress does, so prefill keeps SDPA,
which never materialises attention weights) and hands them to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rap.kv.base import LayerInputs, ScorerPress, window_queries
from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer


@dataclass(frozen=True)
class SnapKV(ScorerPress):
    window_size: int = DEFAULT_SCORER.window
    kernel_size: int = DEFAULT_SCORER.kernel
    pool: str = DEFAULT_SCORER.pool
    group: str = DEFAULT_SCORER.group

    @property
    def scorer(self) -> SnapKVScorer:
        return SnapKVScorer(self.window_size, self.pool, self.kernel_size, self.group)

    def score(self, x: LayerInputs) -> torch.Tensor:
        """float32 [B, H_kv, T] (see SnapKVScorer)."""
        T = x.keys.shape[2]
        q, scale = window_queries(x, min(self.window_size, T))
        return self.scorer(q, x.keys, scale)
