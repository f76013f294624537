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
    cleaning: str = ""  # what was taken out of the text before tokenizing ("" = nothing)

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
        out = {"source": self.source, "tokens": self.tokens, "windows": self.num_windows,
               "seq_len": self.seq_len, "seed": self.seed, "ids_sha256": self.sha256}
        return {**out, "cleaning": self.cleaning} if self.cleaning else out


def load_calibration(tokenizer, model_type: str, source: str | None = None, tokens: int = 262_144,
                     seq_len: int = 2048, seed: int = 0) -> Calibration:
    """The first `tokens` tokens of `source` (plain text; default WikiText-2 valid) cut into windows.

    WikiText-2 valid ships as the tokenized release, whose rare words are `<unk>` markers; held-out
    perplexity is measured on the raw test text, which has none. The markers are taken out: with them, SmolLM2's
    level choices were ranked by how they predict `<unk>` (at 60% of the dense need, the plan library's pick
    measured 0.996x dense on valid windows and 1.005x with the markers out, int8 alone 1.001x on both; on the test
    set 1.006x and 1.002x: the markers had reversed the order)."""
    source = source or WIKITEXT2_VALID
    text, cleaning = read_text(source), ""
    if str(source) == WIKITEXT2_VALID:
        text, cleaning = text.replace(" <unk>", ""), "<unk> markers removed"
    windows = token_windows(text, tokenizer, seq_len, tokens, bos=needs_bos(tokenizer, model_type))
    return Calibration(windows, source, seed, cleaning)
