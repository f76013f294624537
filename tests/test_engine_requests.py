"""Engine.generate under hostile or unusual requests: validation per row, stops, seeds, cancellation,
backend failures. stories260k on CPU, both backends."""

import threading

import pytest
import torch

from rap.serve.engine import Engine, EngineFailure, GenerationRequest
from rap.errors import RequestError
from rap.core.mask import BlockMask

BIG = 1 << 40
PROMPT = "Once upon a time"


@pytest.fixture(scope="module", params=["decoder", "hf"])
def engine(request, stories):
    view, tok = stories
    view.apply(BlockMask.full(view.num_layers))
    torch.set_num_threads(1)
    return Engine(view, tokenizer=tok, budget=BIG, backend=request.param)


def req(**kw):
    return GenerationRequest(**{"prompt": PROMPT, "max_new_tokens": 8, **kw})


@pytest.mark.parametrize("bad", [dict(seed=2**64), dict(seed=True), dict(temperature=float("nan")),
                                 dict(temperature=1e9), dict(top_p=float("inf")), dict(prompt="\ud800"),
                                 dict(stop=("ok", 3)), dict(prompt_ids=[1, 10**9])])
def test_a_bad_field_fails_only_its_own_row(engine, bad):
    good = req(temperature=0)
    fallbacks = engine.stats.backend_fallbacks
    results = engine.generate([good, req(**bad), good])
    assert isinstance(results[1].error, RequestError)
    assert results[0].ok and results[2].ok and results[0].text == results[2].text == engine.complete(PROMPT,
                                                                                                     max_new_tokens=8).text
    assert engine.stats.backend_fallbacks == fallbacks  # validated before batching: no backend ever saw it


def test_temperature_below_1e_5_is_greedy(engine):
    greedy = engine.complete(PROMPT, max_new_tokens=12).text
    assert engine.complete(PROMPT, max_new_tokens=12, temperature=1e-40).text == greedy
    assert engine.complete(PROMPT, max_new_tokens=12, temperature=9e-6, seed=3).text == greedy


def test_stop_string_finishes_the_row_when_generated_and_counts_only_its_tokens(engine):
    full = engine.complete(PROMPT, max_new_tokens=40)
    word = full.text.split()[2]
    cut = engine.complete(PROMPT, max_new_tokens=40, stop=(word,))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(word)]
    # the row stopped at the token that completed the stop: that many tokens, and they decode to the stop
    n = cut.completion_tokens
    assert n < full.completion_tokens and cut.token_ids == full.token_ids[:n]
    assert word in engine.decode(full.token_ids[:n]) and word not in engine.decode(full.token_ids[: n - 1])
    assert cut.step.generated_tokens == n


def test_seeded_rows_sample_the_same_alone_or_batched(engine):
    alone = [engine.complete(PROMPT, max_new_tokens=10, temperature=1.0, seed=s).token_ids for s in (1, 2)]
    batched = engine.generate([req(max_new_tokens=10, temperature=1.0, seed=s, prompt=p)
                               for s, p in ((7, "The dog"), (1, PROMPT), (2, PROMPT))])
    assert [r.token_ids for r in batched[1:]] == alone
    assert alone[0] != alone[1]


def test_a_cancelled_row_stops_within_one_step_and_the_others_finish(engine):
    cancel = threading.Event()
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            cancel.set()

    rows = engine.generate([req(max_new_tokens=60, on_token=on_token, cancel=cancel), req(max_new_tokens=20)])
    assert rows[0].finish_reason == "cancelled" and len(seen) == 3 and rows[0].completion_tokens == 3
    assert rows[1].ok and rows[1].completion_tokens == 20
    # a row cancelled before its batch runs is not computed at all
    done = threading.Event()
    done.set()
    (early,) = engine.generate([req(cancel=done)])
    assert early.finish_reason == "cancelled" and early.step is None


def test_shutdown_cancels_every_running_row(engine):
    def stop_all(t):
        engine.cancel_all.set()

    try:
        rows = engine.generate([req(max_new_tokens=60, on_token=stop_all), req(max_new_tokens=60)])
    finally:
        engine.cancel_all.clear()
    assert [r.finish_reason for r in rows] == ["cancelled", "cancelled"]
    assert rows[0].step.generated_tokens <= 2


def test_a_backend_bug_fails_only_the_row_that_triggers_it_and_does_not_switch_backends(engine, monkeypatch):
    backend = engine.backend
    real = type(backend).generate

    def flaky(self, view, prompts, *args, **kwargs):
        if any(p[-1] == 13 for p in prompts):  # the poisoned row
            raise ValueError("kernel bug")
        return real(self, view, prompts, *args, **kwargs)

    monkeypatch.setattr(type(backend), "generate", flaky)
    fallbacks = engine.stats.backend_fallbacks
    rows = engine.generate([req(prompt_ids=[1, 5, 13]), req(), req(prompt_ids=[1, 7])])
    assert rows[1].ok and rows[2].ok
    assert engine.backend is backend  # the next batch uses the primary backend again
    if backend.name == "rap-decode":  # the failing row got one try on hf-generate (which the patch leaves alone)
        assert rows[0].ok and rows[0].step.backend == "hf-generate"
        assert engine.budget_info()["backend_fallbacks"] == fallbacks + 1
        assert "kernel bug" in engine.budget_info()["last_backend_fallback"]
    else:
        assert isinstance(rows[0].error, EngineFailure)


def test_seeded_cancellable_rows_on_one_by_one_sampling_keep_their_own_tokens(engine):
    """A watched batch (cancel flags, as the server sends) samples the same as an unwatched one."""
    plain = [r.token_ids for r in engine.generate([req(max_new_tokens=10, temperature=1.0, seed=s) for s in (3, 4)])]
    watched = engine.generate([req(max_new_tokens=10, temperature=1.0, seed=s, cancel=threading.Event())
                               for s in (3, 4)])
    assert [r.token_ids for r in watched] == plain and all(len(t) > 0 for t in plain)
