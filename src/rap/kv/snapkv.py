"""SnapKV (Li et al., arXiv 2404.14469): keep what the last `window_size` prompt queries attend to.

Scores follow kvpress's SnapKVPress: attention of the observation window over the earlier keys,
averaged over the window's queries, smoothed by a 1-D average pool of `kernel_size`, averaged
over each KV head's query group (GQA); the window itself always ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerInputs, ScorerPress, window_attention


@dataclass(frozen=True)
class SnapKV(ScorerPress):
    window_size: int = 64
    kernel_size: int = 5

    def score(self, x: LayerInputs) -> torch.Tensor:
        B, H, T, _ = x.keys.shape
        w = min(self.window_size, T - 1)
        if w < 1:
            return torch.ones(B, H, T, device=x.keys.device)
        attn = window_attention(x, w)[..., : T - w]  # [B, Hq, w, T - w]
        scores = attn.mean(dim=-2)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        scores = scores.view(B, H, -1, T - w).mean(dim=2)  # average each KV head's query group
        # The window ranks above every earlier token (probabilities are <= 1), most recent first.
        window = 2.0 + torch.arange(w, device=scores.device, dtype=scores.dtype) / w
        return torch.cat([scores, window.expand(B, H, w)], dim=-1)
