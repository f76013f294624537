"""The decoder needle sweep replays one prefill per case: every KV setting must decode exactly as a fresh call."""

import pytest

import rap.decode.prefill as prefill
from rap.decode.decoder import Decoder
from rap.eval.needle_decoder import PrefillReplay

from conftest import STORY

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
                dict(kv_ratio=0.6, kv_press="adakv", kv_bits=8), dict(kv_ratio=0.5, kv_press="pyramidkv"),
                dict(kv_ratio=0.6, kv_press="ada-pyramidkv", kv_bits=8), dict()]
    wants = [Decoder(view).generate([ids], 10, **kw).tokens for kw in settings]

    def no_prefill(*args, **kwargs):
        raise AssertionError("a replay must not run the prefill's layers")

    monkeypatch.setattr(prefill, "prefill_attention", no_prefill)
    assert [replay.replay([ids], 10, **kw).tokens for kw in settings] == wants
    assert dec._prefill == replay._real_prefill  # the decoder is itself again afterwards


def test_settings_are_checked_before_any_work_and_name_their_rows():
    from rap.errors import RequestError
    from rap.eval.needle_decoder import settings_for

    names = [s.name for s in settings_for(["snapkv", "adakv"], [0.1, 0.2], kv_bits=8)]
    assert names == ["full", "int8", "snapkv+int8", "snapkv+int8", "adakv+int8", "adakv+int8"]
    with pytest.raises(RequestError, match="unknown KV press 'h2o'"):
        settings_for(["adakv", "h2o"], [0.1])
    assert [s.name for s in settings_for(["adakv"], [0.2], kv_bits=4)] == ["full", "int4", "adakv+int4"]
    with pytest.raises(RequestError, match="KV bits"):
        settings_for(["adakv"], [0.1], kv_bits=3)


def test_leval_on_the_decoder_scores_every_setting_with_its_real_kv_bytes(stories, tmp_path, monkeypatch):
    import json

    from rap.eval.leval import run_leval_decoder
    from rap.eval.needle_decoder import settings_for

    view, tok = stories
    task = tmp_path / "leval" / "Closed-ended-tasks" / "coursera.jsonl"
    task.parent.mkdir(parents=True)
    doc = {"input": STORY * 3, "instructions": ["Which are true? A. x B. y", "Pick one. A. u B. v"],
           "outputs": ["AB", "B"], "source": "test", "evaluation": "exam"}
    task.write_text(json.dumps(doc) + "\n")
    monkeypatch.setenv("RAP_DATA", str(tmp_path))
    settings = settings_for(["snapkv", "adakv"], [0.2, 0.5])
    rows = run_leval_decoder(Decoder(view), tok, settings, ["coursera"], 480, max_new_tokens=4, progress=False)
    assert len(rows) == 2 * len(settings)
    by = {(r["press"], r["budget"], r["question"]): r for r in rows}
    for q in (0, 1):
        full = by[("full", 1.0, q)]["kv_bytes"]
        assert by[("adakv", 0.2, q)]["kv_bytes"] < by[("adakv", 0.5, q)]["kv_bytes"] < full
        assert by[("snapkv", 0.2, q)]["kv_bytes"] < by[("snapkv", 0.5, q)]["kv_bytes"] < full
    assert {r["score"] for r in rows} <= {0.0, 1.0}
