"""Perplexity by the standard protocol: join the text, tokenize once, cut non-overlapping windows,
report exp(mean token NLL). BOS starts each window for models that expect one (Gemma)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rap.errors import RequestError


def needs_bos(tokenizer, model_type: str) -> bool:
    """SmolLM2/Qwen/Llama-style GGUFs are measured without BOS; Gemma's PPL doubles without it."""
    return model_type.startswith("gemma") and tokenizer.bos_token_id is not None


def token_windows(text: str, tokenizer, seq_len: int, max_tokens: int | None = None,
                  bos: bool = False) -> torch.Tensor:
    """[num_windows, seq_len] token ids; with `bos`, each window is BOS + (seq_len - 1) text tokens."""
    if seq_len < 2:
        raise RequestError(f"--seq-len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    body = seq_len - 1 if bos else seq_len
    n = ids.numel() // body
    if n == 0:
        raise RequestError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * body].view(n, body)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=ids.dtype), windows], dim=1)
    return windows


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row (fp32), [batch]; logits [batch, seq, vocab], ids [batch, seq]."""
    shift = logits[:, :-1].float()
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(
        ids.shape[0], -1).sum(-1)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_per_window: tuple[float, ...]  # summed NLL of each window
    tokens: int  # scored tokens

    @property
    def mean_nll(self) -> float:
        return sum(self.nll_per_window) / self.tokens


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity", mask=None) -> PerplexityResult:
    """PPL of `windows` [n, seq]. `model`: a BlockView (or rap.core.forward.Forward), run on rap's own
    forward under `mask` (default: every block); or a bare HF causal LM, run on its own forward
    (for other libraries' models, e.g. the quantization peers; no mask then)."""
    from rap.core.forward import Forward, forward_for
    from rap.core.model import BlockView

    if isinstance(model, (BlockView, Forward)):
        fwd = forward_for(model)
        device = fwd.device

        def logits_of(ids):
            return fwd.logits(ids, mask)
    else:
        if mask is not None:
            raise RequestError("a block mask needs a BlockView (rap.sources.load_view), not a bare model")
        device = next(model.parameters()).device

        def logits_of(ids):
            return model(input_ids=ids, use_cache=False).logits
    nlls: list[float] = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        nlls.extend(window_nll(logits_of(ids), ids).tolist())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return PerplexityResult(math.exp(sum(nlls) / tokens), tuple(nlls), tokens)
