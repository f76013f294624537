"""The KV penalty measured on the compressor that serves: rap's decoder (Ada-KV, uniform SnapKV, int8 KV).

`decoder_continuation_nll(decoder, ids, prompt, options)` prefills `ids[:, :prompt]` through
`rap.decode.decoder.Decoder.generate` with each KV option (keep ratio, KV bits, press), then feeds
the continuation tokens one by one through the compressed (and, at 8 bits, quantised) cache and
sums their NLL: teacher forcing on the decoder's own prefill, token selection, cache layout and
decode attention. The decoder has no teacher-forcing entry point, so this wraps its prefill (to
keep its logits and workspace) and its token step (`rap.decode.step.advance`: to score the step's
logits and put the continuation's next token in place of the sampled one), on the exact step (no
captured graph, whose step could not be intercepted). What the policy prices is then what `rap serve` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

import rap.decode.step as step_module
from rap.errors import RequestError


@dataclass(frozen=True)
class KVOption:
    """One KV configuration the policy can pick: keep ratio, storage bits, the press choosing tokens."""

    kv_ratio: float = 1.0
    kv_bits: int = 16
    kv_press: str = "adakv"

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_ratio <= 1.0:
            raise RequestError(f"kv_ratio must be in (0, 1], got {self.kv_ratio}")


@torch.no_grad()
def decoder_continuation_nll(decoder, ids: torch.Tensor, prompt: int, options: Sequence[KVOption]) -> dict:
    """{option: summed NLL of ids[0, prompt:]} through `decoder` with each option's KV cache.

    ids: [1, prompt + C] token ids (C >= 1 continuation tokens).
    """
    if ids.dim() != 2 or ids.shape[0] != 1 or not 0 < prompt < ids.shape[1]:
        raise ValueError("ids must be [1, prompt + continuation] with at least one continuation token")
    prompt_ids = ids[0, :prompt].tolist()
    cont = ids[0, prompt:].to(decoder.device)
    C = cont.numel()
    out = {}
    real_prefill, real_advance = decoder._prefill, step_module.advance
    graphs, step = decoder.use_graphs, decoder.step
    for opt in options:
        state = {"ws": None, "j": 0, "nll": 0.0}

        def prefill(ws, *a, **kw):
            logits = real_prefill(ws, *a, **kw)
            state["ws"] = ws
            state["nll"] += float(F.cross_entropy(logits[:1].float(), cont[:1], reduction="sum"))
            return logits

        def advance(ws, logits, sampled):
            j = state["j"]  # this step read cont[j]; its logits predict cont[j + 1]
            state["nll"] += float(F.cross_entropy(logits[:1].float(), cont[j + 1:j + 2], reduction="sum"))
            real_advance(ws, logits, sampled)
            ws.tokens[0] = cont[j + 1]
            state["j"] = j + 1

        def force_first(tokens):
            if state["j"] == 0 and state["ws"] is not None:
                state["ws"].tokens[0] = cont[0]
            return None

        decoder._prefill, step_module.advance = prefill, advance
        decoder.use_graphs, decoder.step = False, "exact"
        try:
            decoder.generate([prompt_ids], C, kv_ratio=opt.kv_ratio, kv_press=opt.kv_press, kv_bits=opt.kv_bits,
                             on_step=force_first)
        finally:
            decoder._prefill, step_module.advance = real_prefill, real_advance
            decoder.use_graphs, decoder.step = graphs, step
            decoder.release()
        if state["j"] != C - 1:
            raise RuntimeError(f"the decoder ran {state['j']} of {C - 1} forced steps")
        out[opt] = state["nll"]
    return out
