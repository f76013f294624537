"""The decoder needle sweep replays one prefill per case: every KV setting must decode exactly as a fresh call."""

import pytest
import torch

import rap.decode.decoder as decode
import rap.decode.prefill as prefill
from rap.decode.decoder import Decoder
from rap.eval.needle_decoder import PrefillReplay

from test_decode_kv import STORY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_replayed_prefill_decodes_every_kv_setting_as_a_fresh_generate(stories, monkeypatch):
    view, tok = stories
    ids = tok(STORY).input_ids
    dec = Decoder(view)
    replay = PrefillReplay(dec)
    replay.capture_logits()
    first = replay.record([ids], 10, kv_ratio=0.5, kv_press="adakv")
    dec._prefill = replay._real_prefill
    assert first.tokens == Decoder(view).generate([ids], 10, kv_ratio=0.5).tokens
    settings = [dict(kv_ratio=0.7, kv_press="snapkv"), dict(kv_ratio=0.3, kv_press="adakv"), dict(kv_bits=8),
                dict(kv_ratio=0.6, kv_press="adakv", kv_bits=8), dict()]
    wants = [Decoder(view).generate([ids], 10, **kw).tokens for kw in settings]

    def no_prefill(*args, **kwargs):
        raise AssertionError("a replay must not run the prefill's layers")

    monkeypatch.setattr(prefill, "prefill_attention", no_prefill)
    assert [replay.replay([ids], 10, **kw).tokens for kw in settings] == wants
    assert dec._prefill == replay._real_prefill  # the decoder is itself again afterwards
