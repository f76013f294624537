"""StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first `n_sink` tokens and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rap.kv.base import LayerInputs, ScorerPress


@dataclass(frozen=True)
class StreamingLLM(ScorerPress):
    n_sink: int = 4

    def score(self, x: LayerInputs) -> torch.Tensor:
        """[B, H, T]: sinks rank first, then tokens by recency."""
        B, H, T, _ = x.keys.shape
        pos = torch.arange(T, device=x.keys.device, dtype=torch.float32)
        pos[: self.n_sink] += 2 * T
        return pos.expand(B, H, T)
