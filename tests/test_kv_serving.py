"""Ada-KV where requests are served: the engine compresses with Ada-KV whenever its policy keeps < 1 of the
prompt's cache, a request may pick the press, and bad presses are one clear line (engine and HTTP)."""

import httpx
import pytest
import torch

from rap.serve.engine import Engine, GenerationRequest
from rap.policy.decision import Decision
from rap.policy.greedy import GreedyPolicy
from rap.kv.decode_cache import KVLayout
from rap.errors import RequestError
from rap.core.mask import BlockMask
from rap.core.memory import Request
from rap.serve.server import ServerThread, create_app


BIG = 1 << 40
PROMPT = "The cat sat on the mat and looked at the dog. " * 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FixedKV:
    def __init__(self, kv_ratio, kv_bits=16, num_layers=None):
        self.kv_ratio, self.kv_bits, self.num_layers = kv_ratio, kv_bits, num_layers

    def decide(self, request, budget_bytes):
        return Decision(BlockMask.full(self.num_layers), self.kv_ratio, kv_bits=self.kv_bits)


def engine_for(stories, ratio, bits=16, budget=BIG, policy=None) -> Engine:
    view, tok = stories
    view.apply(BlockMask.full(view.num_layers))
    return Engine(view, tokenizer=tok, budget=budget, backend="decoder", policy=policy or FixedKV(ratio, bits, view.num_layers))


def test_a_keep_ratio_below_one_runs_adakv_and_the_plan_counts_its_flat_cache_exactly(stories):
    engine = engine_for(stories, 0.5)
    ids = stories[1](PROMPT).input_ids
    step = engine.complete(PROMPT, max_new_tokens=8).step
    planned = engine.planning_request(Request(1, len(ids), 8))
    assert step.decision.kv_press == "adakv" and step.decision.to_dict()["kv_ratio"] == 0.5
    held = engine.backend.decoder.kv_resident_bytes
    assert held == engine.memory_model.kv_bytes(planned, step.decision.mask, 0.5)
    assert step.predicted_peak_bytes == engine.memory_model.peak_bytes(step.decision.mask, planned, 0.5)


def test_a_request_can_ask_for_uniform_snapkv_and_gets_the_decoders_snapkv_tokens(stories):
    engine = engine_for(stories, 0.5)
    ids = stories[1](PROMPT).input_ids
    result = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, kv_press="snapkv"))[0]
    assert result.step.decision.kv_press == "snapkv"
    want = engine.backend.decoder.generate([ids], 8, kv_ratio=0.5, kv_press="snapkv",
                                           stop_token_ids=engine._eos_ids).tokens[0]
    assert list(result.token_ids) == [t for t in want if t not in engine._eos_ids][:8]


def test_at_full_keep_no_press_is_reported(stories):
    step = engine_for(stories, 1.0).complete("Once upon a time", max_new_tokens=4).step
    assert step.decision.kv_press is None and step.decision.kv_ratio == 1.0


def test_an_unknown_press_is_one_line_and_no_work_is_done(stories):
    engine = engine_for(stories, 0.5)
    (result,) = engine.generate(GenerationRequest("Once upon a time", max_new_tokens=4, kv_press="h2o"))
    assert isinstance(result.error, RequestError) and "unknown KV press 'h2o'" in str(result.error)
    assert "\n" not in str(result.error) and engine.stats.steps == 0


@pytest.fixture(scope="module")
def client(stories):
    app = create_app(engine_for(stories, 0.5), batch_window_s=0.01)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def test_http_requests_pick_a_press_and_the_response_reports_the_keep_ratio(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    r = client.post("/v1/completions", json={**body, "rap": {"kv_press": "snapkv"}})
    assert r.status_code == 200
    decision = r.json()["rap"]["decision"]
    assert decision["kv_press"] == "snapkv" and decision["kv_ratio"] == 0.5
    default = client.post("/v1/completions", json=body).json()["rap"]["decision"]
    assert default["kv_press"] == "adakv"


def test_http_an_unknown_press_is_a_400_naming_the_choices(client):
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2, "rap": {"kv_press": "h2o"}})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "h2o" in msg and "adakv" in msg and "\n" not in msg


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_a_policy_can_choose_int8_kv_and_the_plan_counts_it_exactly(stories, ratio):
    engine = engine_for(stories, ratio, bits=8)
    ids = stories[1](PROMPT).input_ids
    step = engine.complete(PROMPT, max_new_tokens=8).step
    planned = engine.planning_request(Request(1, len(ids), 8))
    layout = KVLayout("adakv", 8)
    assert step.decision.kv_bits == 8 and step.decision.to_dict()["kv_bits"] == 8
    held = engine.backend.decoder.kv_resident_bytes
    assert held == engine.memory_model.kv_bytes(planned, step.decision.mask, ratio, layout)
    assert held < engine.memory_model.kv_bytes(planned, step.decision.mask, ratio, KVLayout("adakv", 16))
    assert step.predicted_peak_bytes == engine.memory_model.peak_bytes(step.decision.mask, planned, ratio, layout)


def test_with_int8_kv_the_greedy_policy_drops_fewer_blocks_under_a_tight_budget(stories):
    view, _ = stories
    engine = engine_for(stories, 1.0)
    request = engine.planning_request(Request(16, 200, 56))
    full = BlockMask.full(view.num_layers)
    budget = (engine.memory_model.peak_bytes(full, request, 1.0)
              + engine.memory_model.peak_bytes(full, request, 1.0, KVLayout("adakv", 8))) // 2
    sixteen = GreedyPolicy(engine.memory_model).decide(request, budget)
    eight = GreedyPolicy(engine.memory_model, kv_bits=8).decide(request, budget)
    assert len(eight.mask.dropped) == 0 < len(sixteen.mask.dropped) and eight.kv_bits == 8


def test_unsupported_kv_bits_are_refused_in_one_line():
    with pytest.raises(RequestError, match="KV bits") as err:
        GreedyPolicy(None, kv_bits=3)
    assert "\n" not in str(err.value)


class LargestRatioThatFits:
    """Keeps as much of the cache as fits, priced (as rap's policies price it) with Ada-KV's flat layout."""

    def __init__(self, memory, num_layers):
        self.memory, self.num_layers = memory, num_layers

    def decide(self, request, budget_bytes):
        full = BlockMask.full(self.num_layers)
        for r in (1.0, 0.75, 0.5, 0.3, 0.2, 0.1, 0.05):
            if self.memory.peak_bytes(full, request, r, KVLayout("adakv")) <= budget_bytes:
                return Decision(full, r)
        raise AssertionError("nothing fits")


def engine_at_adakvs_half_keep(stories):
    """(engine, planned request, budget): a LargestRatioThatFits engine whose budget Ada-KV's layout fits at keep
    0.5 exactly, for an 8-token completion of PROMPT."""
    view, tok = stories
    probe = engine_for(stories, 0.5)
    planned = probe.planning_request(Request(1, len(tok(PROMPT).input_ids), 8))
    full = BlockMask.full(view.num_layers)
    budget = probe.memory_model.peak_bytes(full, planned, 0.5, KVLayout("adakv")) + probe.overhead_bytes
    engine = engine_for(stories, None, budget=budget, policy=LargestRatioThatFits(probe.memory_model, view.num_layers))
    return engine, planned, budget


@pytest.mark.parametrize("press", ["snapkv", "pyramidkv", "ada-pyramidkv"])
def test_a_requests_press_is_priced_with_its_own_cache_layout_and_never_exceeds_the_budget(stories, press):
    engine, planned, budget = engine_at_adakvs_half_keep(stories)
    step = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, kv_press=press))[0].step
    d = step.decision
    assert d.kv_press == press
    layout = KVLayout(press)
    assert step.predicted_peak_bytes == engine.memory_model.peak_bytes(d.mask, planned, d.kv_ratio, layout)
    assert step.predicted_peak_bytes <= engine.effective_budget(budget)
    assert engine.backend.decoder.kv_resident_bytes == engine.memory_model.kv_bytes(planned, d.mask, d.kv_ratio, layout)


def test_when_the_requests_press_needs_more_than_the_policy_priced_the_engine_decides_again_within_budget(stories,
                                                                                                      monkeypatch):
    engine, _, budget = engine_at_adakvs_half_keep(stories)
    real = engine.memory_model.peak_bytes

    def pyramid_costs_more(mask, request, kv_ratio=1.0, kv_layout=None):  # as 64-token rounding can on CUDA
        extra = 1.05 if kv_layout is not None and kv_layout.press == "pyramidkv" and kv_ratio < 1 else 1.0
        return int(real(mask, request, kv_ratio, kv_layout) * extra)

    monkeypatch.setattr(engine.memory_model, "peak_bytes", pyramid_costs_more)
    step = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, kv_press="pyramidkv"))[0].step
    assert step.decision.kv_press == "pyramidkv" and step.decision.kv_ratio < 0.5
    assert step.predicted_peak_bytes <= engine.effective_budget(budget)
