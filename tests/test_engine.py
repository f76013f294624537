"""Engine: budget -> decision -> resident weights -> generate, on the real stories260k (CPU)."""

import logging
from collections import Counter

import pytest
import torch

from rap.serve.engine import Engine, GenerationRequest, OutOfMemoryAfterRetry
from rap.serve.budget import CallableBudget, DeviceFractionBudget, FixedBudget, LiveBudget, budget_from_spec
from rap.policy.decision import Decision
from rap.policy.greedy import GreedyPolicy, default_removal_order
from rap.serve.backends import HFGenerateBackend
from rap.serve.residency import WeightResidency
from rap.errors import BudgetError, RequestError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request

BIG = 1 << 40


@pytest.fixture(scope="module")
def loaded():
    from rap.sources import load_view

    return load_view("stories260k", dtype=torch.float32, device="cpu")


def make_engine(loaded, budget=BIG, **kwargs) -> Engine:
    """An engine with the drop-only policy unless told otherwise: these tests are about dropping blocks
    (the default precision ladder quantizes first; tests/test_precision_policy.py covers it)."""
    view, tok = loaded
    view.apply(BlockMask.full(view.num_layers))
    kwargs.setdefault("policy", "drop")
    return Engine(view, tokenizer=tok, budget=budget, **kwargs)


def hf_tokens(view, tok, prompt_ids, mask, new):
    with view.masked(mask), torch.inference_mode():
        out = view.model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                  dtype=torch.long), max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    row = out[0, len(prompt_ids):].tolist()
    return row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row


# ---- budgets ------------------------------------------------------------------------------------------
def test_budget_specs_become_fixed_fraction_live_or_callable_sources():
    assert budget_from_spec("6GiB") == FixedBudget(6 * 2**30)
    assert budget_from_spec(12345) == FixedBudget(12345)
    assert budget_from_spec("0.5", total_bytes=1000) == DeviceFractionBudget(0.5, "cpu", 1000)
    assert budget_from_spec("25%", total_bytes=1000)() == 250
    live = budget_from_spec("live:100", total_bytes=1000)
    assert isinstance(live, LiveBudget) and live() == 900
    trace = iter([5, 7])
    source = budget_from_spec(lambda: next(trace))
    assert isinstance(source, CallableBudget) and source() == 5 and source() == 7
    for bad in ("lots", "-1GiB", 0, "0", None):
        with pytest.raises(RequestError):
            budget_from_spec(bad)


def test_engine_reads_the_budget_at_every_batch(loaded):
    engine = make_engine(loaded)
    readings = iter([BIG, BIG // 2])
    engine.set_budget(lambda: next(readings))
    steps = [engine.generate(GenerationRequest("Once upon a time", max_new_tokens=2))[0].step for _ in range(2)]
    assert [s.budget_bytes for s in steps] == [BIG, BIG // 2]


# ---- the built-in policy ------------------------------------------------------------------------------
def test_greedy_policy_drops_ffn_from_the_last_layer_then_attention_until_it_fits(loaded):
    view, _ = loaded
    mm = MemoryModel.from_view(view)
    request = Request(2, 16, 16)
    order = default_removal_order(view.num_layers)
    assert order[:2] == ["ffn.4", "ffn.3"] and order[view.num_layers] == "attn.4"
    dense, smallest = mm.dense_need(request), mm.peak_bytes(BlockMask.from_drop(view.num_layers, order), request)
    for budget in range(smallest, dense + 1, (dense - smallest) // 17):
        d = GreedyPolicy(mm).decide(request, budget)
        count = len(d.mask.dropped)
        assert d.mask == BlockMask.from_order(view.num_layers, order, count)
        assert d.predicted_peak_bytes == mm.peak_bytes(d.mask, request) <= budget
        if count:  # the fewest drops: one block fewer would not fit
            assert mm.peak_bytes(BlockMask.from_order(view.num_layers, order, count - 1), request) > budget
    with pytest.raises(BudgetError):
        GreedyPolicy(mm).decide(request, smallest - 1)


def test_greedy_policy_follows_a_profile_order(loaded):
    view, _ = loaded
    mm = MemoryModel.from_view(view)
    profile = {"order": ["attn.1", "ffn.0", "ffn.2"]}
    request = Request(1, 8, 8)
    budget = mm.peak_bytes(BlockMask.from_drop(view.num_layers, ["attn.1", "ffn.0"]), request)
    assert GreedyPolicy.from_profile(mm, profile).decide(request, budget).mask.dropped == ("ffn.0", "attn.1")


# ---- generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["hf", "auto"])
def test_greedy_engine_output_equals_hf_generate_under_the_decided_mask(loaded, backend):
    view, tok = loaded
    engine = make_engine(loaded, backend=backend)
    prompt = "Once upon a time"
    ids = engine.encode(prompt)
    request = engine.planning_request(Request(1, len(ids), 24))
    for fraction in (1.0, 0.6):
        engine.set_budget(int(fraction * engine.dense_need_bytes(request)))
        result = engine.complete(prompt, max_new_tokens=24)
        mask = result.step.decision.mask
        assert mask.is_full == (fraction == 1.0)
        assert list(result.token_ids) == hf_tokens(view, tok, ids, mask, 24)
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)


def test_shrinking_budget_drops_blocks_and_growing_it_restores_them(loaded):
    view, _ = loaded
    engine = make_engine(loaded)
    request = engine.planning_request(Request(1, 5, 8))
    dense = engine.complete("Once upon a time", max_new_tokens=8)
    assert dense.step.decision.mask.is_full and engine.residency.resident_bytes() == view.resident_param_bytes()
    # residency state lives on the (shared) view: count this test's moves only
    before = Counter(engine.residency.moves)
    # halfway between the smallest configuration and dense (fixed runtime bytes dominate a model this small)
    engine.set_budget((engine.smallest_need_bytes(request) + engine.dense_need_bytes(request)) // 2)
    small = engine.complete("Once upon a time", max_new_tokens=8).step
    gone = small.decision.mask.dropped
    assert gone and set(small.dropped_blocks) == set(gone)
    assert small.resident_bytes == view.resident_param_bytes() - sum(view.block(n).param_bytes for n in gone)
    assert engine.residency.mask == small.decision.mask
    engine.set_budget(BIG)
    back = engine.complete("Once upon a time", max_new_tokens=8).step
    assert set(back.restored_blocks) == set(gone) and back.resident_bytes == view.resident_param_bytes()
    assert engine.residency.moves - before == {"dropped": len(gone), "restored": len(gone)}


def test_bytes_held_since_the_last_batch_are_released_when_they_would_not_fit_beside_the_next(loaded):
    # On the GPU the engine measures everything it holds beyond the weights (KV buffers AND graph
    # pools, which no backend reports); here we plant the backend's own reading and check the consequence.
    engine = make_engine(loaded)
    released = []
    engine.backend.release = lambda: released.append(True)
    engine.backend.resident_extra_bytes = lambda: 1 << 20  # fits beside the plan under a big budget: kept
    engine.complete("Once upon a time", max_new_tokens=8)
    assert not released
    engine.backend.resident_extra_bytes = lambda: BIG  # cannot fit beside any plan: released first
    engine.complete("Once upon a time", max_new_tokens=8)
    assert released


def test_request_that_cannot_fit_is_rejected_while_the_others_are_served(loaded):
    engine = make_engine(loaded)
    short, long_ = GenerationRequest("Once upon a time", max_new_tokens=8), \
        GenerationRequest("The cat sat on the mat. " * 40, max_new_tokens=8)
    need = {k: engine.smallest_need_bytes(engine.planning_request(Request(1, len(engine.encode(r.prompt)), 8)))
            for k, r in (("short", short), ("long", long_))}
    assert need["short"] < need["long"]
    engine.set_budget((need["short"] + need["long"]) // 2)
    ok, rejected = engine.generate([short, long_])
    assert ok.ok and ok.completion_tokens > 0
    assert isinstance(rejected.error, BudgetError) and "budget" in str(rejected.error)
    assert engine.stats.rejected_by_reason["budget"] == 1
    assert engine.complete("Once upon a time", max_new_tokens=4).ok  # still serving


def test_invalid_requests_get_errors_and_do_not_stop_the_batch(loaded):
    engine = make_engine(loaded)
    results = engine.generate([GenerationRequest("", max_new_tokens=4), GenerationRequest("Hi", max_new_tokens=0),
                               GenerationRequest("word " * 600, max_new_tokens=4),
                               GenerationRequest("Once upon a time", max_new_tokens=4)])
    assert [type(r.error) for r in results[:3]] == [RequestError] * 3
    assert "context" in str(results[2].error)
    assert results[3].ok and results[3].completion_tokens == 4


class FlakyBackend(HFGenerateBackend):
    """Raises torch.OutOfMemoryError on the first `failures` calls."""

    def __init__(self, failures):
        self.failures, self.calls = failures, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().generate(*args, **kwargs)


def test_out_of_memory_is_caught_logged_and_retried_once_with_a_smaller_decision(loaded, caplog):
    engine = make_engine(loaded, backend="hf")
    engine.backend = engine._fallback_backend = FlakyBackend(failures=1)
    with caplog.at_level(logging.WARNING, logger="rap.serve.engine"):
        result = engine.complete("Once upon a time", max_new_tokens=6)
    assert result.ok and result.step.oom_retry and result.completion_tokens == 6
    assert len(result.step.decision.mask.dropped) > 0  # dense did not survive the shrink
    assert engine.stats.oom_events == 1 and engine.stats.oom_failures == 0
    assert any("out of memory" in r.message for r in caplog.records)


def test_repeated_out_of_memory_rejects_the_batch_without_raising(loaded):
    engine = make_engine(loaded, backend="hf")
    engine.backend = engine._fallback_backend = FlakyBackend(failures=2)
    (result,) = engine.generate(GenerationRequest("Once upon a time", max_new_tokens=6))
    assert isinstance(result.error, OutOfMemoryAfterRetry) and isinstance(result.error, BudgetError)
    assert engine.stats.oom_failures == 1
    assert engine.complete("Once upon a time", max_new_tokens=3).ok


def test_streamed_tokens_are_exactly_the_returned_ones_for_mixed_lengths(loaded):
    engine = make_engine(loaded)
    seen = {0: [], 1: []}
    reqs = [GenerationRequest("Once upon a time", max_new_tokens=12, on_token=seen[0].append),
            GenerationRequest("The little dog", max_new_tokens=5, on_token=seen[1].append)]
    results = engine.generate(reqs)
    assert results[0].step is results[1].step and results[0].step.batch == 2  # one batch
    for i, r in enumerate(results):
        assert seen[i] == list(r.token_ids) and len(r.token_ids) == reqs[i].max_new_tokens


def test_streamed_requests_are_served_by_the_decoder_and_stream_what_it_returns(loaded):
    engine = make_engine(loaded, backend="decoder")
    assert engine.backend.streams
    seen = []
    (result,) = engine.generate(GenerationRequest("The little dog", max_new_tokens=10, on_token=seen.append))
    assert result.step.backend == "rap-decode" and seen == list(result.token_ids) and len(seen) == 10


class FixedKV:
    def __init__(self, kv_ratio, num_layers):
        self.kv_ratio, self.num_layers = kv_ratio, num_layers

    def decide(self, request, budget_bytes):
        return Decision(BlockMask.from_drop(self.num_layers, ["ffn.2"]), self.kv_ratio)


def test_a_policy_kv_ratio_is_applied_by_the_decoder_and_shrinks_its_cache_as_predicted(loaded):
    view, tok = loaded
    prompt = "The cat sat on the mat and looked at the dog. " * 12
    ids = tok(prompt).input_ids
    request = Request(1, len(ids), 8)
    held = {}
    for ratio in (1.0, 0.5):
        engine = make_engine(loaded, backend="decoder", policy=FixedKV(ratio, view.num_layers))
        assert engine.backend.supports_kv_ratio
        step = engine.complete(prompt, max_new_tokens=8).step
        planned = engine.planning_request(request)
        assert step.backend == "rap-decode" and step.decision.kv_ratio == ratio
        assert step.predicted_peak_bytes == engine.memory_model.peak_bytes(step.decision.mask, planned, ratio)
        held[ratio] = engine.backend.decoder.kv_resident_bytes
        assert held[ratio] == engine.memory_model.kv_bytes(planned, step.decision.mask, ratio)
    assert held[0.5] < held[1.0]


def test_stop_strings_cut_the_text(loaded):
    engine = make_engine(loaded)
    full = engine.complete("Once upon a time", max_new_tokens=20).text
    word = full.split()[3]
    cut = engine.complete("Once upon a time", max_new_tokens=20, stop=(word,))
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(word)]


def test_results_carry_decision_memory_and_time(loaded):
    engine = make_engine(loaded)
    step = engine.complete("Once upon a time", max_new_tokens=4).step
    d = step.to_dict()
    for key in ("budget_bytes", "decision", "predicted_peak_bytes", "measured_peak_bytes", "resident_bytes",
                "seconds", "tokens_per_s", "backend"):
        assert key in d
    assert d["decision"]["mask"] == "dense" and step.seconds > 0 and step.generated_tokens == 4
    assert step.measured_peak_bytes is None  # only measured on the GPU
    assert step.predicted_peak_bytes == engine.memory_model.peak_bytes(
        step.decision.mask, engine.planning_request(Request(1, 5, 4)))


def test_any_object_with_decide_or_a_plain_callable_is_a_policy(loaded):
    view, _ = loaded
    chosen = BlockMask.from_drop(view.num_layers, ["ffn.1"])
    calls = []

    class Fixed:
        def decide(self, request, budget_bytes):
            calls.append((request, budget_bytes))
            return Decision(chosen)

    engine = make_engine(loaded, policy=Fixed())
    assert engine.complete("Once upon a time", max_new_tokens=3).step.decision.mask == chosen
    assert calls[0][1] == BIG

    engine = make_engine(loaded, policy=lambda req, budget: chosen)
    assert engine.complete("Once upon a time", max_new_tokens=3).step.decision.mask == chosen
    # a decision that does not fit is never run, whoever made it
    engine.set_budget(engine.memory_model.peak_bytes(chosen, engine.planning_request(Request(1, 5, 3))) - 1)
    (result,) = engine.generate(GenerationRequest("Once upon a time", max_new_tokens=3))
    assert isinstance(result.error, BudgetError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropped_blocks_leave_the_gpu_and_come_back():
    from conftest import tiny_config
    from rap.core.model import BlockView
    from rap.sources import load_view, model_from_config

    torch.manual_seed(0)
    # sizes that are multiples of the allocator's 512-byte rounding, so the drop is exact
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=512, max_position_embeddings=256)
    view = BlockView(model_from_config(cfg, dtype=torch.float32, device="cuda"))
    _, tok = load_view("stories260k", device="cpu")
    engine = Engine(view, tokenizer=tok, budget=BIG)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    drop = BlockMask.from_drop(view.num_layers, ["ffn.3", "ffn.2", "attn.3"])
    engine.residency.apply(drop)
    torch.cuda.synchronize()
    dropped_bytes = sum(view.block(n).param_bytes for n in drop.dropped)
    assert before - torch.cuda.memory_allocated() == dropped_bytes
    assert all(p.device.type == "cpu" and p.is_pinned() for p in view.block_module("ffn.3").parameters())
    engine.residency.apply(BlockMask.full(view.num_layers))
    engine.residency.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(p.device.type == "cuda" for p in view.model.parameters())
    # and through the engine: a small budget makes memory_allocated fall by the dropped bytes
    engine.set_budget(BIG)
    engine.complete("Once upon a time", max_new_tokens=4)
    dense_alloc = torch.cuda.memory_allocated()
    request = engine.planning_request(Request(1, 5, 4))
    # halfway between the smallest configuration and dense (fixed runtime bytes dominate a model this small)
    engine.set_budget((engine.smallest_need_bytes(request) + engine.dense_need_bytes(request)) // 2)
    step = engine.complete("Once upon a time", max_new_tokens=4).step
    engine._release_backend_buffers()
    torch.cuda.synchronize()
    gone = sum(view.block(n).param_bytes for n in step.decision.mask.dropped)
    assert gone > 0 and dense_alloc - torch.cuda.memory_allocated() >= gone
    assert step.measured_peak_bytes <= step.budget_bytes


def test_staging_host_copies_is_a_no_op_on_cpu_where_weights_already_live_in_host_memory(loaded):
    engine = make_engine(loaded)
    assert engine.residency.stage_host_copies() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staged_host_copies_make_a_later_drop_allocate_no_host_memory():
    from conftest import tiny_config
    from rap.core.model import BlockView
    from rap.sources import model_from_config

    torch.manual_seed(0)
    view = BlockView(model_from_config(tiny_config("llama"), dtype=torch.float32, device="cuda"))
    residency = WeightResidency(view)
    staged = residency.stage_host_copies()
    assert staged == sum(b.param_bytes for b in view.blocks)
    residency.apply(BlockMask.from_drop(view.num_layers, ["ffn.1", "attn.2"]))
    assert residency.host_bytes() == staged  # the drop reused the staged copies
    assert set(residency.mask.dropped) == {"attn.2", "ffn.1"}


@pytest.mark.parametrize("policy", [None, "greedy"])
def test_a_profile_stopped_early_still_lets_the_policy_drop_as_far_as_the_budget_needs(loaded, policy):
    import json

    from rap.sources import bundled_profile

    view, _ = loaded
    full = json.loads(bundled_profile("stories260k", view.num_layers).read_text())
    partial = {**full, "order": full["order"][:2], "ppl_after": full["ppl_after"][:2], "complete": False}
    engine = make_engine(loaded, profile=partial, policy=policy)
    request = engine.planning_request(Request(1, 5, 8))
    engine.set_budget((engine.smallest_need_bytes(request) + engine.dense_need_bytes(request)) // 4)
    step = engine.complete("Once upon a time", max_new_tokens=8).step
    assert len(step.decision.mask.dropped) > 2  # beyond the two blocks the profile ranks
    assert step.predicted_peak_bytes <= step.budget_bytes
