"""The precision ladder: int8, then int4, before any block is dropped; every decision fits."""

import pytest
import torch

from rap.serve.engine import Engine, GenerationRequest
from rap.core.memory import MemoryModel, Request
from rap.core.plan import Plan
from rap.policy.precision import PrecisionLadder, precision_rungs


@pytest.fixture
def mem(stories):
    return MemoryModel.from_view(stories[0])


def test_rungs_lose_precision_before_dropping_anything(mem):
    req = Request(1, 64, 16)
    L = mem.shape.num_layers
    rungs = precision_rungs(L, mem.shape)
    peaks = [mem.peak_bytes(p, req) for _, p in rungs]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    # stories260k: attention takes int4 g64; the FFN's down_proj (172 in) no group size: int8
    assert rungs[-1][1].attn_levels[0] == "int4g64" and rungs[-1][1].ffn_levels[0] == "int8"
    policy = PrecisionLadder(mem)
    for (name, plan), peak in zip(rungs, peaks):
        d = policy.decide(req, peak)
        assert d.mask == plan and d.policy.endswith(name) and d.predicted_peak_bytes <= peak


def test_below_the_int4_rung_blocks_drop_on_int4_bytes(mem):
    req = Request(1, 64, 16)
    bottom = precision_rungs(mem.shape.num_layers, mem.shape)[-1][1]
    budget = mem.peak_bytes(bottom, req) - 60_000
    d = PrecisionLadder(mem).decide(req, budget)
    assert d.mask.dropped and d.predicted_peak_bytes <= budget
    kept = [(n, lv) for n, lv in d.mask.items() if lv != "drop"]
    assert all(lv == bottom.level(n) for n, lv in kept)
    assert mem.with_levels(bottom).param_bytes(d.mask.mask) == mem.param_bytes(d.mask)


def test_engine_serves_with_the_precision_ladder(stories):
    view, tok = stories
    engine = Engine(view, budget="1GiB", tokenizer=tok)  # the default policy is the precision ladder
    req = engine.planning_request(Request(1, 8, 8))
    int8 = precision_rungs(view.num_layers, view.shape)[2][1]
    engine.set_budget(engine.need_bytes(engine.memory_model.peak_bytes(int8, req)))
    try:
        out = engine.generate([GenerationRequest(prompt="Once upon a time", max_new_tokens=8)])
        assert out[0].ok and engine.residency.plan == int8, out[0]
        assert engine.residency.measured_resident_bytes() == engine.memory_model.param_bytes(int8)
        assert out[0].step.decision.policy == "precision-ladder:int8"
    finally:  # the stories view is shared by the whole session: leave it dense
        engine.residency.apply(Plan.full(view.num_layers))
