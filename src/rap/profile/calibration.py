"""Calibration text -> windows of token ids, with what a profile file records about them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from rap.data import WIKITEXT2_VALID, read_text
from rap.eval.perplexity import needs_bos, token_windows


@dataclass(frozen=True)
class Calibration:
    windows: torch.Tensor  # [num_windows, seq_len] token ids
    source: str  # file as given (default: WikiText-2 valid, never the test split)
    seed: int  # for anything random downstream (racing's window order, the random baseline)

    @property
    def num_windows(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    @property
    def scored_tokens(self) -> int:
        return self.num_windows * (self.seq_len - 1)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.windows.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "windows": self.num_windows,
                "seq_len": self.seq_len, "seed": self.seed, "ids_sha256": self.sha256}


def load_calibration(tokenizer, model_type: str, source: str | None = None, tokens: int = 262_144,
                     seq_len: int = 2048, seed: int = 0) -> Calibration:
    """The first `tokens` tokens of `source` (plain text; default WikiText-2 valid) cut into windows."""
    source = source or WIKITEXT2_VALID
    text = read_text(source)
    windows = token_windows(text, tokenizer, seq_len, tokens, bos=needs_bos(tokenizer, model_type))
    return Calibration(windows, source, seed)
