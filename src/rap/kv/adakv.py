"""Ada-KV (Feng et al., arXiv 2407.11550): head-adaptive budgets from any scorer.

A layer's budget B (tokens summed over its KV heads, per sequence) goes to the top-B scores of
all heads taken together, so each head gets its own budget. A safeguard first gives every head
its own top floor(alpha * B / H) tokens (alpha = 0.2), as kvpress's AdaKVPress does. Unlike that
press, which only masks evicted keys at attention time and so keeps the full cache, the keep mask
here becomes a `VarlenLayer` holding exactly B tokens per layer and sequence.

`AdaKV(PyramidKV())` is Ada-Pyramid: the scorer's layer budgets are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rap.kv.base import LayerInputs, Press, ScorerPress
from rap.kv.scorer import adaptive_keep
from rap.kv.snapkv import SnapKV


def adaptive_keep_mask(scores: torch.Tensor, tokens: int, alpha: float = 0.2) -> torch.Tensor:
    """bool [B, H, T]: per sequence, the top H*tokens of all heads' scores, every head first
    keeping its own top floor(alpha * tokens) (the safeguard); `rap.kv.scorer.adaptive_keep`,
    the decoder's own split, with one budget for every sequence."""
    B, H, T = scores.shape
    kept = torch.full((B,), min(tokens, T), dtype=torch.long, device=scores.device)
    return adaptive_keep(scores, kept, alpha)


@dataclass(frozen=True)
class AdaKV(Press):
    scorer: ScorerPress = field(default_factory=SnapKV)
    alpha_safeguard: float = 0.2

    def layer_budgets(self, num_layers: int, prompt_tokens: int, tokens: int) -> list[int]:
        return self.scorer.layer_budgets(num_layers, prompt_tokens, tokens)

    def keep(self, x: LayerInputs, tokens: int) -> torch.Tensor:
        return adaptive_keep_mask(self.scorer.score(x), tokens, self.alpha_safeguard)

    @property
    def name(self) -> str:
        return f"AdaKV({self.scorer.name})"
