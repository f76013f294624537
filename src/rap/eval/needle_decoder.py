"""Needle retrieval through rap's own decoder (the path requests are served on), many KV settings per case.

`run_needle_decoder(decoder, tok, settings, cases)` answers every needle case under every KV
setting (press, keep ratio, KV bits) with `Decoder.generate`, and records the answer's score and
the cache bytes the decoder really held. The prefill's per-layer queries / keys / values and its
logits do not depend on the KV setting (each layer attends over its full prompt; compression only
decides what the cache keeps afterwards), so they are computed once per case and replayed for the
other settings (`PrefillReplay`): token selection, cache layout, quantisation and every decode
step are the decoder's own code for each setting. This makes a press x budget sweep cost one
prefill per case instead of one per setting (the CPU's bottleneck).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

import rap.decode.decoder as decode
import rap.decode.prefill as prefill
from rap.eval.needle import NeedleSpec, build_case, score_answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVSetting:
    name: str  # the press label of the result rows ("full", "adakv", "snapkv", "int8", "int8+adakv", ...)
    kv_ratio: float = 1.0
    kv_press: str | None = None
    kv_bits: int = 16


class PrefillReplay:
    """Record one prefill's (q, k, v) per kept layer and its logits, then stand in for it.

    While recording, `rap.decode.prefill.project_qkv` is wrapped so that every multi-token call (a prefill
    layer) is kept. While replaying, `Decoder._prefill` writes the recorded tensors through the
    decoder's own `keep_prompt` / `keep_prompt_flat` into the request's caches.
    """

    def __init__(self, decoder: "decode.Decoder"):
        self.decoder = decoder
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.logits: torch.Tensor | None = None
        self._real_prefill = decoder._prefill

    def record(self, *args, **kwargs):
        real = prefill.project_qkv
        seen = self.layers

        def spy(x, a, cos, sin):
            out = real(x, a, cos, sin)
            if x.shape[1] > 1:
                seen.append(out)
            return out

        prefill.project_qkv = spy
        try:
            gen = self.decoder.generate(*args, **kwargs)
        finally:
            prefill.project_qkv = real
        return gen

    def _replay(self, ws, mask, ids, pad, plan=None):
        kept = mask.kept_attn_layers
        if len(kept) != len(self.layers) or ids.shape[0] != 1:
            raise RuntimeError("a prefill replay needs the recorded mask and one row")
        P = ids.shape[1]
        for i, (q, k, v) in zip(kept, self.layers):
            a, cache = self.decoder.attn[i], ws.kv[i]
            if isinstance(cache, decode.FlatLayerCache):
                decode.keep_prompt_flat(q, k, v, cache, replace(plan.for_layer(i), r0=0), a.scaling)
            elif plan is None:
                kc, vc = cache
                kc[:1, :, :P], vc[:1, :, :P] = k, v
            else:
                decode.keep_prompt(q, k, v, *cache, plan, a.scaling)
        return self.logits

    def replay(self, *args, **kwargs):
        self.decoder._prefill = self._replay
        try:
            return self.decoder.generate(*args, **kwargs)
        finally:
            self.decoder._prefill = self._real_prefill

    def capture_logits(self):
        """Wrap the real prefill once to keep its logits (call before `record`)."""
        real = self._real_prefill

        def keep(*a, **kw):
            self.logits = real(*a, **kw)
            return self.logits

        self.decoder._prefill = keep


def answer_settings(decoder: "decode.Decoder", ids: list[int], settings: list[KVSetting], max_new_tokens: int,
                    stop_token_ids=None) -> list[tuple[list[int], int]]:
    """(new tokens, the decoder's KV bytes) for one prompt under every setting, one prefill shared
    (`PrefillReplay`: recorded with the first setting, replayed for the others)."""
    replay = PrefillReplay(decoder)
    out = []
    for j, s in enumerate(settings):
        decoder.release()  # this setting's cache alone, so kv_resident_bytes is its bytes
        kw = dict(kv_ratio=s.kv_ratio, kv_press=s.kv_press, kv_bits=s.kv_bits, stop_token_ids=stop_token_ids)
        if j == 0:
            replay.capture_logits()
            try:
                gen = replay.record([ids], max_new_tokens, **kw)
            finally:
                decoder._prefill = replay._real_prefill
        else:
            gen = replay.replay([ids], max_new_tokens, **kw)
        out.append((gen.tokens[0], decoder.kv_resident_bytes))
    decoder.release()
    return out


def run_needle_decoder(decoder: "decode.Decoder", tok, settings: list[KVSetting], lengths: list[int],
                       depths: list[float], specs: list[NeedleSpec], max_new_tokens: int = 24,
                       progress: bool = True) -> list[dict]:
    """One row per (setting, length, depth, needle): score, answer, the decoder's KV bytes."""
    rows = []
    cases = [(spec_i, spec, n, d) for spec_i, spec in enumerate(specs) for n in lengths for d in depths]
    bar = tqdm(total=len(cases), desc="needle (decoder)", disable=not progress, leave=False)
    for spec_i, spec, n, d in cases:
        case = build_case(tok, n, d, spec)
        ids = case.context_ids[0].tolist() + case.question_ids[0].tolist()
        for s, (tokens, nbytes) in zip(settings, answer_settings(decoder, ids, settings, max_new_tokens,
                                                                 tok.eos_token_id)):
            answer = tok.decode(tokens, skip_special_tokens=True)
            rows.append({"press": s.name, "budget": s.kv_ratio, "kv_bits": s.kv_bits, "length": n, "depth": d,
                         "needle": spec_i, "score": score_answer(answer, spec), "kv_bytes": nbytes,
                         "prompt_tokens": len(ids), "answer": answer.strip()[:160]})
        bar.update()
    bar.close()
    return rows


def settings_for(presses: list[str], budgets: list[float], kv_bits: int = 16, full: bool = True) -> list[KVSetting]:
    """The decoder's KV settings of a press x budget sweep (+ the full cache), validated before any work:
    an unknown press or unsupported bits is one `RequestError` line here, not after a prefill."""
    from rap.kv.decode_cache import layout_for

    out = [KVSetting("full")] if full else []
    suffix = "" if kv_bits == 16 else f"+int{kv_bits}"
    if kv_bits != 16:
        layout_for(None, kv_bits)
        out.append(KVSetting(f"int{kv_bits}", 1.0, None, kv_bits))
    for p in presses:
        layout_for(p, kv_bits)
        out += [KVSetting(f"{p}{suffix}", b, p, kv_bits) for b in budgets]
    return out
