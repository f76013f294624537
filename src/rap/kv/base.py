"""Presses: which prompt tokens each KV head keeps, decided layer by layer at the end of prefill.

In the style of NVIDIA kvpress (`BasePress.compress`, `ScorerPress.score`): one method is one
small dataclass in one file, and composition replaces flags (`AdaKV(SnapKV())` wraps a scorer).
Unlike kvpress, a press here returns a keep mask [batch, kv_heads, tokens] with possibly
different counts per head, and `rap.kv.compress` turns it into a `VarlenLayer` that stores only
the kept tokens, so a smaller budget really frees memory.

The budget belongs to the request, not to the press (`Budget(kv_ratio=0.1)` or
`Budget(tokens=512)`): the same press object serves every budget of an evaluation sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rap.errors import RequestError


@dataclass(frozen=True)
class Budget:
    """KV tokens to keep per (sequence, layer), on average per KV head: a keep ratio of the prompt
    (`kv_ratio` in (0, 1], rounded up as the memory model does) or an absolute count (`tokens`)."""

    kv_ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.kv_ratio is None) == (self.tokens is None):
            raise RequestError("give a KV budget as either kv_ratio (e.g. 0.1) or tokens (e.g. 512), not both")
        if self.kv_ratio is not None and not 0.0 < self.kv_ratio <= 1.0:
            raise RequestError(f"kv ratio must be in (0, 1], got {self.kv_ratio}")
        if self.tokens is not None and self.tokens < 1:
            raise RequestError(f"KV token budget must be at least 1, got {self.tokens}")

    def tokens_for(self, prompt_tokens: int) -> int:
        """Average kept tokens per KV head for a prompt of `prompt_tokens` (same rounding as MemoryModel)."""
        if self.tokens is not None:
            return min(self.tokens, prompt_tokens)
        if self.kv_ratio >= 1.0:
            return prompt_tokens
        return max(1, min(prompt_tokens, math.ceil(self.kv_ratio * prompt_tokens)))

    def __str__(self) -> str:
        return f"{self.kv_ratio:.0%}" if self.kv_ratio is not None else f"{self.tokens} tok"


@dataclass
class LayerInputs:
    """What a press sees for one attention layer at the end of prefill.

    hidden_states: [B, T, hidden] (input of self_attn); keys, values: [B, H_kv, T, D] (keys after
    RoPE, as cached); position_embeddings: (cos, sin), each [B, T, D]; rank / num_layers: this
    layer's index among the layers being compressed and their count (PyramidKV's depth).
    """

    module: nn.Module
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    rank: int
    num_layers: int

    @property
    def prompt_tokens(self) -> int:
        return self.keys.shape[2]


class Press:
    """Base: `layer_budgets` spreads the budget over layers, `keep` picks tokens inside a layer."""

    def layer_budgets(self, num_layers: int, prompt_tokens: int, tokens: int) -> list[int]:
        """Average tokens per KV head for each compressed layer; they sum to num_layers * tokens."""
        return [tokens] * num_layers

    def keep(self, x: LayerInputs, tokens: int) -> torch.Tensor:
        """bool [B, H_kv, T]: True where a (sequence, KV head, token) is kept; `tokens` per head on average."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__


class ScorerPress(Press):
    """A press that scores every (sequence, KV head, token) and keeps each head's top `tokens`."""

    def score(self, x: LayerInputs) -> torch.Tensor:
        """float [B, H_kv, T]; higher = more important. Scores are comparable across heads when
        they are attention probabilities (what AdaKV relies on)."""
        raise NotImplementedError

    def keep(self, x: LayerInputs, tokens: int) -> torch.Tensor:
        return topk_mask(self.score(x), tokens)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the top-k entries along the last dimension (ties: the earlier entry, as the decoder)."""
    from rap.kv.scorer import uniform_keep

    k = min(k, scores.shape[-1])
    return uniform_keep(scores.reshape(-1, 1, scores.shape[-1]),
                        torch.full((scores[..., 0].numel(),), k, device=scores.device)).view(scores.shape)


def window_queries(x: LayerInputs, window: int) -> tuple[torch.Tensor, float]:
    """(queries [B, H_q, window, D] of the last `window` prompt positions, the layer's scaling).

    Recomputed from the layer input (q_proj, the optional q_norm of Qwen3/Gemma3, then RoPE with
    the layer's own cos/sin), as kvpress does, so prefill can keep using SDPA, which never
    materialises attention weights.
    """
    from rap.core.layers import rotate_half

    m = x.module
    B, H, T, D = x.keys.shape
    h = x.hidden_states[:, -window:]
    q = m.q_proj(h).view(B, window, -1, D)
    if hasattr(m, "q_norm"):
        q = m.q_norm(q)
    q = q.transpose(1, 2)  # [B, Hq, w, D]
    if x.position_embeddings is not None:
        cos, sin = x.position_embeddings
        cos, sin = cos[:, -window:].unsqueeze(1), sin[:, -window:].unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
    return q, float(getattr(m, "scaling", D ** -0.5))


def window_attention(x: LayerInputs, window: int) -> torch.Tensor:
    """Softmax attention of the last `window` prompt queries over all prompt keys, float32
    [B, H_q, window, T], causal inside the window (queries from `window_queries`)."""
    B, H, T, D = x.keys.shape
    q, scale = window_queries(x, window)
    group = q.shape[1] // H
    keys = x.keys.repeat_interleave(group, dim=1) if group > 1 else x.keys
    logits = torch.matmul(q.float(), keys.float().transpose(2, 3)) * scale  # [B, Hq, w, T]
    rows = torch.arange(window, device=q.device).unsqueeze(1) + (T - window)
    logits = logits.masked_fill(torch.arange(T, device=q.device) > rows, float("-inf"))
    return torch.softmax(logits, dim=-1)
