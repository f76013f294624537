"""Specifications of the runtime policy: byte accounting, fit, baselines, evaluator, CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_rap as rap
from rap.errors import BudgetError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from test_policy_support import stories_context, stories_setup

POLICIES = ("ladder", "gsi-order", "knapsack", "ffn-first", "attn-first", "oracle")


def random_masks(L: int, n: int, seed: int = 0) -> list[BlockMask]:
    rng = np.random.default_rng(seed)
    return [BlockMask(tuple(rng.random(L) < p), tuple(rng.random(L) < p)) for p in rng.random(n)]


def scenarios(ctx, n=40, seed=3):
    from rap.policy.workload import Workload

    return Workload().scenarios(n, seed, ctx.memory)


# ---- bytes ----------------------------------------------------------------------------------------
def test_cost_table_equals_memory_model_peak_for_random_masks_requests_and_ratios():
    ctx = stories_context()
    L = ctx.num_layers
    for sc in scenarios(ctx, 15):
        costs = ctx.costs(sc.request)
        for mask in random_masks(L, 20) + [ctx.empty, ctx.full]:
            keep = ctx.keep_vector(mask)
            for r_i, r in enumerate(ctx.kv_ratios):
                assert costs.peak(keep, r_i) == ctx.memory.peak_bytes(mask, sc.request, r)


def test_cost_table_handles_sliding_window_layers_of_different_kv_cost():
    """Gemma 3 mixes sliding and full attention layers: KV bytes differ per layer."""
    from conftest import tiny_config

    from rap.core.model import BlockView
    from rap.policy.context import PolicyContext
    from rap.policy.evaluator import KVPenalty, MaskSurrogate, QualityModel
    from rap.sources import model_from_config

    types = ["sliding_attention", "full_attention"] * 2
    view = BlockView(model_from_config(tiny_config("gemma3_text", layer_types=types), torch.float32, "meta"))
    mem = MemoryModel.from_view(view)
    L = view.num_layers
    quality = QualityModel(MaskSurrogate(np.full(2 * L, 0.1), 1.0, 0.1, 1.0), KVPenalty.zero((1.0, 0.5)))
    order = [f"{k}.{i}" for i in range(L) for k in ("ffn", "attn")]
    ctx = PolicyContext(mem, order, quality)
    req = Request(3, 100, 20)
    costs = ctx.costs(req)
    assert len(set(costs.block_bytes[0, :L])) > 1  # the sliding layers really are cheaper
    for mask in random_masks(L, 30):
        for r_i, r in enumerate(ctx.kv_ratios):
            assert costs.peak(ctx.keep_vector(mask), r_i) == mem.peak_bytes(mask, req, r)


# ---- fit --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
def test_every_decision_of_every_policy_fits_the_memory_model(name):
    from rap.policy import make_policy

    ctx = stories_context()
    policy = make_policy(name, ctx)
    for sc in scenarios(ctx, 25 if name == "oracle" else 60):
        d = policy.decide(sc.request, sc.budget_bytes)
        assert ctx.memory.fits(sc.budget_bytes, d.mask, sc.request, d.kv_ratio)
        assert d.breakdown == ctx.memory.breakdown(d.mask, sc.request, d.kv_ratio)
        assert d.kv_ratio in ctx.kv_ratios
    assert ctx.repairs == 0  # no policy leaned on finalize's safety net


def test_finalize_repairs_a_non_fitting_pick_instead_of_returning_it():
    ctx = stories_context()
    req = Request(8, 256, 64)
    budget = ctx.memory.peak_bytes(ctx.full, req) // 2
    d = ctx.finalize("test", ctx.full, 1.0, req, budget)
    assert ctx.memory.fits(budget, d.mask, req, d.kv_ratio) and ctx.repairs == 1


@pytest.mark.parametrize("name", POLICIES)
def test_budget_below_the_smallest_configuration_raises_budget_error(name):
    from rap.policy import make_policy

    ctx = stories_context()
    req = Request(4, 200, 50)
    too_small = ctx.memory.peak_bytes(ctx.empty, req) - 1
    with pytest.raises(BudgetError, match="nothing fits"):
        make_policy(name, ctx).decide(req, too_small)


def test_a_generous_budget_keeps_the_dense_model_and_full_cache():
    from rap.policy import make_policy

    ctx = stories_context()
    req = Request(1, 64, 16)
    for name in ("ladder", "gsi-order", "knapsack"):
        d = make_policy(name, ctx).decide(req, 10 * ctx.memory.dense_need(req))
        assert d.mask.is_full and d.kv_ratio == 1.0


# ---- baselines ---------------------------------------------------------------------------------------
def test_gsi_order_drops_the_shortest_fitting_prefix_of_the_profile_order():
    from rap.policy.baselines import make_baseline

    ctx = stories_context()
    policy = make_baseline("gsi-order", ctx, kv_ratios=(1.0,))
    for sc in scenarios(ctx, 30):
        d = policy.decide(sc.request, sc.budget_bytes)
        k = len(d.mask.dropped)
        assert d.mask == BlockMask.from_order(ctx.num_layers, ctx.order, k)
        if k:
            shorter = BlockMask.from_order(ctx.num_layers, ctx.order, k - 1)
            assert not ctx.memory.fits(sc.budget_bytes, shorter, sc.request, 1.0)


def test_ffn_first_drops_no_attention_block_while_an_ffn_block_remains():
    from rap.policy import make_policy

    ctx = stories_context()
    for sc in scenarios(ctx, 30):
        d = make_policy("ffn-first", ctx).decide(sc.request, sc.budget_bytes)
        if d.kept_attn < ctx.num_layers:
            assert d.kept_ffn == 0
        d = make_policy("attn-first", ctx).decide(sc.request, sc.budget_bytes)
        if d.kept_ffn < ctx.num_layers:
            assert d.kept_attn == 0


def test_knapsack_is_within_rounding_of_the_brute_force_optimum():
    """Over all 2^10 masks of stories260k: knapsack's summed importance is at least the best a
    1%-smaller budget allows (the DP rounds costs up over 1024 steps)."""
    from rap.policy.baselines import KnapsackPolicy

    ctx = stories_context()
    L = ctx.num_layers
    value = np.maximum(ctx.importance, 1e-6)
    all_keep = np.array(list(itertools.product([0, 1], repeat=2 * L)), dtype=float)
    policy = KnapsackPolicy(ctx, kv_ratios=(1.0,))
    for sc in scenarios(ctx, 20):
        d = policy.decide(sc.request, sc.budget_bytes)
        got = float(value @ ctx.keep_vector(d.mask))
        costs = ctx.costs(sc.request)
        ok = costs.peak(all_keep, 0) <= 0.99 * sc.budget_bytes
        if ok.any():
            assert got >= float((all_keep[ok] @ value).max()) - 1e-9


def test_ladder_policy_picks_the_best_predicted_fitting_action():
    """Brute force over (kv ratio, ladder entry) with MemoryModel.fits as the judge."""
    from rap.policy.ladder import LadderPolicy, action_scores

    ctx = stories_context()
    policy = LadderPolicy(ctx)
    for sc in scenarios(ctx, 20):
        d = policy.decide(sc.request, sc.budget_bytes)
        scores = action_scores(ctx, policy.ladder, sc.request)
        best = min(scores[i * policy.ladder.size + e] for i, r in enumerate(ctx.kv_ratios)
                   for e in range(policy.ladder.size)
                   if ctx.memory.fits(sc.budget_bytes, policy.ladder.mask(e), sc.request, r))
        assert d.predicted_log_ratio == pytest.approx(best)


def test_order_baselines_only_pick_masks_on_the_ladder():
    from rap.policy import make_policy

    ctx = stories_context()
    on_ladder = set(ctx.ladder.all_masks())
    for name in ("gsi-order", "ffn-first", "attn-first"):
        for sc in scenarios(ctx, 20):
            assert make_policy(name, ctx).decide(sc.request, sc.budget_bytes).mask in on_ladder


def test_oracle_is_never_worse_on_calibration_than_the_policies_it_is_shown():
    from rap.policy import make_policy
    from rap.policy.oracle import OraclePolicy

    ctx = stories_context()
    evaluator = stories_setup()[3]
    shown = [make_policy(n, ctx) for n in ("ladder", "gsi-order", "knapsack")]
    oracle = OraclePolicy(ctx, measured=evaluator, candidates=shown, generations=5, population=16)
    measured = lambda d: evaluator.log_ratio(d.mask) + ctx.quality.kv_penalty(d.kv_ratio, d.request.prompt)  # noqa
    for sc in scenarios(ctx, 10):
        o = oracle.decide(sc.request, sc.budget_bytes)
        for p in shown:
            assert measured(o) <= measured(p.decide(sc.request, sc.budget_bytes)) + 1e-9


# ---- evaluator ---------------------------------------------------------------------------------------
def test_measured_evaluator_runs_each_mask_once_and_dense_is_zero(tmp_path):
    from rap.policy.evaluator import MeasuredEvaluator

    view, *_ = stories_setup()
    windows = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    ev = MeasuredEvaluator(view, windows, cache_path=tmp_path / "c.json")
    m = BlockMask.from_drop(view.num_layers, ["ffn.2"])
    a = ev.log_ratio(m)
    assert ev.log_ratio(m) == a and ev.measured == 2  # dense + m
    assert ev.log_ratio(BlockMask.full(view.num_layers)) == 0.0
    ev.save()
    again = MeasuredEvaluator(view, windows, cache_path=tmp_path / "c.json")
    assert again.log_ratio(m) == a and again.measured == 0  # from the file
    other = MeasuredEvaluator(view, windows[:, :16], cache_path=tmp_path / "c.json")
    other.log_ratio(m)
    assert other.measured == 2  # different windows never reuse numbers


def test_kv_penalty_continuation_with_full_cache_equals_a_plain_forward():
    from rap.eval.perplexity import window_nll
    from rap.policy.evaluator import continuation_nll

    view, *_ = stories_setup()
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = float(window_nll(view.model(input_ids=ids).logits[:, 31:], ids[:, 31:]).sum())
    assert continuation_nll(view.model, ids, 32, (1.0,))[1.0] == pytest.approx(ref, rel=1e-4)


def test_kv_penalty_is_free_at_ratio_one_monotone_and_interpolated_in_log_prompt():
    from rap.policy.evaluator import KVPenalty

    p = KVPenalty((64, 1024), (1.0, 0.5, 0.1), ((0.0, 0.2, 0.8), (0.0, 0.1, 0.4)))
    assert p(1.0, 100) == 0.0
    assert p(0.1, 256) == pytest.approx(0.6)  # halfway between log2 64 and log2 1024
    assert p(0.1, 16) == 0.8 and p(0.1, 10_000) == 0.4  # clamped
    _, _, _, _, quality, _ = stories_setup()
    table = np.array(quality.kv_penalty.table)
    assert (table[:, 0] == 0).all() and (np.diff(table, axis=1) >= 0).all()


def test_surrogate_recovers_a_synthetic_damage_model():
    from rap.policy.evaluator import MaskSurrogate

    rng = np.random.default_rng(0)
    w = rng.uniform(0.01, 0.3, 20)
    D = (rng.random((300, 20)) < rng.random((300, 1))).astype(float)
    y = 0.8 * np.log1p(D @ w) + 0.05 * np.expm1(0.7 * (D @ w))
    s = MaskSurrogate.fit(D, y, steps=1500)
    assert s.cv_rmse < 0.05
    assert s(BlockMask.full(10)) == 0.0


def test_quality_model_prefers_measured_values_and_round_trips():
    from rap.policy.evaluator import QualityModel, mask_key

    _, _, profile, evaluator, quality, _ = stories_setup()
    m = BlockMask.from_order(5, profile["order"], 3)
    assert quality.mask_log_ratio(m) == pytest.approx(evaluator.log_ratio(m))
    back = QualityModel.from_dict(json.loads(json.dumps(quality.to_dict())))
    assert back.log_ratio(m, 0.5, 100) == pytest.approx(quality.log_ratio(m, 0.5, 100))
    assert mask_key(m) in back.measured


def test_quality_from_a_profile_alone_follows_its_removal_curve():
    from rap.policy.evaluator import QualityModel

    L = 5
    order = [f"{k}.{i}" for i in range(L) for k in ("attn", "ffn")]
    curve = [10 * math.exp(0.2 * k * k / 10) for k in range(1, 2 * L + 1)]
    q = QualityModel.from_profile({"order": order, "dense_ppl": 10.0, "ppl_after": curve})
    ys = [q.log_ratio(BlockMask.from_order(L, order, k)) for k in range(2 * L + 1)]
    assert ys[0] == 0.0 and all(b >= a for a, b in zip(ys, ys[1:]))
    assert q.kv_ratios == (1.0,)


# ---- workload ---------------------------------------------------------------------------------------------
def test_workload_draws_requests_in_range_and_budgets_between_30_and_100_percent_of_dense():
    ctx = stories_context()
    for sc in scenarios(ctx, 200, seed=7):
        r = sc.request
        assert 1 <= r.batch <= 64 and 64 <= r.prompt and 16 <= r.new_tokens <= 1024
        assert r.prompt + r.new_tokens <= ctx.memory.shape.max_context or r.prompt == 64
        assert 0.3 <= sc.budget_bytes / ctx.memory.dense_need(r) <= 1.0


# ---- CLI ------------------------------------------------------------------------------------------------


def test_decide_with_a_profile_prints_decision_breakdown_and_predicted_quality(tmp_path):
    _, _, profile, *_ = stories_setup()
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**profile, "ppl_after": [profile["dense_ppl"] * (1 + 0.3 * k) for k in range(1, 11)]}))
    ctx = stories_context()
    req = Request(4, 256, 32)
    budget = (ctx.smallest_peak(req) + ctx.memory.dense_need(req)) // 2
    out = rap("decide", "stories260k", "--budget", str(budget), "--batch", "4", "--prompt", "256", "--new", "32",
              "--policy", "gsi-order", "--profile", str(path), "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    assert "KV keep ratio" in out.stdout and "total peak" in out.stdout and "PPL ratio to dense" in out.stdout


def test_decide_with_an_impossible_budget_exits_2_with_one_line(tmp_path):
    _, _, profile, *_ = stories_setup()
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    out = rap("decide", "stories260k", "--budget", "10KiB", "--batch", "4", "--prompt", "256", "--new", "32",
              "--policy", "knapsack", "--profile", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: nothing fits") and len(out.stderr.strip().splitlines()) == 1
