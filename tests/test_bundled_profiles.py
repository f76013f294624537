"""Profiles shipped in the package: a fresh install drops blocks in a measured order, not a guess."""

import json

import pytest
import torch

from rap.profile import load_profile
from rap.sources import bundled_profile


@pytest.mark.parametrize("name, num_layers", [("stories260k", 5), ("smollm2-135m", 30)])
def test_shipped_profiles_are_complete_gsi_orders_of_every_block(name, num_layers):
    path = bundled_profile(name, num_layers)
    assert path is not None, f"no profile ships for {name}"
    profile = load_profile(path)
    assert profile.method == "gsi" and profile.complete
    assert sorted(profile.order) == sorted([f"attn.{i}" for i in range(num_layers)] + [f"ffn.{i}" for i in range(num_layers)])
    assert len(profile.ppl_after) == len(profile.order)


def test_no_profile_is_offered_for_another_model_or_shape():
    assert bundled_profile("stories260k", 6) is None
    assert bundled_profile("no-such-model", 5) is None


def test_engine_without_a_profile_uses_the_shipped_one():
    from rap.serve.engine import Engine
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cpu")
    # the drop-only policy reads the removal order (the default precision ladder quantizes first)
    engine = Engine(view, tokenizer=tok, budget=1 << 40, policy="drop")
    assert engine.profile == bundled_profile("stories260k", 5)
    order = json.loads(engine.profile.read_text())["order"]
    # the smallest budget that still fits once the first block of the order is gone drops exactly that block
    from rap.core.mask import BlockMask
    from rap.core.memory import Request

    request = engine.planning_request(Request(1, 8, 8))
    one_dropped = BlockMask.from_order(view.num_layers, order, 1)
    engine.set_budget(engine.need_bytes(engine.memory_model.peak_bytes(one_dropped, request)))
    decision = engine.decide(request)
    assert order[0] in decision.mask.dropped
