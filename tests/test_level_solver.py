"""LevelSolver (rap.policy.solver): the multiple-choice knapsack over per-block levels and the KV ratio."""

import itertools
import math

import numpy as np
import pytest

from rap.errors import BudgetError
from rap.core.memory import MemoryModel, Request
from rap.core.plan import DROP, DTYPE, Plan
from rap.policy.solver import LevelSolver, LevelTable


@pytest.fixture(scope="module")
def memory(stories):
    return MemoryModel.from_view(stories[0], on_cuda=False)


def _table(memory, seed=0, free=("attn.0", "ffn.1", "attn.2", "ffn.3", "attn.4")):
    """Random costs; only the `free` blocks may leave dtype (so brute force stays small)."""
    rng = np.random.default_rng(seed)
    blocks, levels, nbytes, costs = [], [], [], []
    for name in memory.dense_block_bytes:
        lv = [DTYPE]
        if name in free:
            lv += ["int8", DROP] + (["int4g64"] if name.startswith("attn") else [])
        blocks.append(name)
        levels.append(tuple(lv))
        nbytes.append(tuple(memory.level_bytes(name, v) for v in lv))
        costs.append((0.0, *sorted(rng.uniform(0, 1, len(lv) - 1))))
    return LevelTable(tuple(blocks), tuple(levels), tuple(nbytes), tuple(costs))


def test_solver_finds_the_brute_force_optimum_among_fitting_plans(memory):
    table = _table(memory)
    solver = LevelSolver(memory, table, buckets=1 << 16)
    req = Request(batch=1, prompt=64, new_tokens=16)
    dense = memory.peak_bytes(Plan.full(5), req)
    free = [i for i, lv in enumerate(table.levels) if len(lv) > 1]
    low = memory.peak_bytes(Plan.full(5).with_levels({table.blocks[i]: DROP for i in free}), req)
    for frac in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        budget = int(low + frac * (dense - low))
        # bytes are rounded up to buckets, per block; a plan with quantized blocks reserves the largest
        # quantized linear's transient (the int8 weight cast), whichever of its blocks is quantized
        slack = len(table.blocks) * solver.bucket_bytes + solver.request_terms(req)[3]
        best, near = math.inf, math.inf  # optimum at the budget, and at the budget less the rounding
        for pick in itertools.product(*[range(len(table.levels[i])) for i in free]):
            levels = {table.blocks[i]: table.levels[i][k] for i, k in zip(free, pick)}
            plan = Plan.full(5).with_levels(levels)
            cost = sum(table.costs[i][k] for i, k in zip(free, pick))
            if memory.fits(budget + slack, plan, req):
                best = min(best, cost)
            if memory.fits(budget, plan, req):
                near = min(near, cost)
        d = solver.decide(req, budget + slack)
        assert memory.fits(budget + slack, d.mask, req, d.kv_ratio)
        assert math.isfinite(near) and best - 1e-9 <= d.predicted_log_ratio <= near + 1e-9, frac


def test_a_budget_below_the_smallest_configuration_names_it(memory):
    solver = LevelSolver(memory, _table(memory))
    req = Request(batch=1, prompt=64, new_tokens=16)
    _, _, need = solver.smallest(req)
    with pytest.raises(BudgetError, match="every block dropped"):
        solver.decide(req, need - 1)
    assert memory.fits(need, solver.decide(req, need).mask, req, solver.decide(req, need).kv_ratio)


def test_a_plan_that_cannot_fit_is_refused_with_a_plan_that_does(memory):
    solver = LevelSolver(memory, _table(memory))
    req = Request(batch=1, prompt=64, new_tokens=16)
    budget = int(0.7 * memory.peak_bytes(Plan.full(5), req))
    with pytest.raises(BudgetError, match="what fits: --plan") as e:
        solver.check_plan(Plan.full(5), req, budget)
    spec = str(e.value).split("--plan '")[1].split("'")[0]
    assert memory.fits(budget, Plan.from_spec(spec, 5), req)


def test_more_budget_never_predicts_worse_quality(memory):
    solver = LevelSolver(memory, _table(memory, seed=3))
    req = Request(batch=1, prompt=32, new_tokens=8)
    dense = memory.peak_bytes(Plan.full(5), req)
    low = solver.smallest(req)[2]
    preds = [solver.decide(req, int(low + f * (dense - low))).predicted_log_ratio for f in np.linspace(0.3, 1.0, 11)]
    assert all(a >= b - 1e-12 for a, b in zip(preds, preds[1:]))
    slack = len(solver.table.blocks) * solver.bucket_bytes  # per-block rounding up to buckets
    assert solver.decide(req, dense + slack).predicted_log_ratio == 0.0


def test_the_level_policy_hook_builds_the_default_over_the_bundled_smollm2_profile():
    from rap.policy import DEFAULT_LEVEL_POLICY, bundled_level_profile, make_level_policy
    from rap.profile.levels import load_level_profile

    path = bundled_level_profile("smollm2-135m")
    prof = load_level_profile(path)
    assert prof.calibration["tokens"] >= 65536 and len(prof.single) == 2 * prof.num_layers  # the issue: >= 64k
    assert prof.command and prof.calibration["ids_sha256"]
    from rap.errors import RapError

    with pytest.raises(RapError, match="unknown level policy"):
        make_level_policy("magic", None, prof)
    assert DEFAULT_LEVEL_POLICY in ("library", "solver", "int8-only", "int4-only")


def test_int8_only_never_picks_another_level(memory):
    from rap.policy.solver import make_solver

    prof = {"single": {b: {"int8": 0.01, "int4g64": 0.001, DROP: 0.5} for b in memory.dense_block_bytes}}
    solver = make_solver(memory, prof, allow=("int8",))
    req = Request(batch=1, prompt=64, new_tokens=16)
    d = solver.decide(req, int(0.9 * memory.peak_bytes(Plan.full(5), req)))
    assert set(v for _, v in d.mask.items()) <= {DTYPE, "int8"}


def _kv_penalty(int8_cost: float):
    from rap.policy.evaluator import KVPenalty

    return KVPenalty((64, 512), (1.0, 0.5), ((0.0, 0.3), (0.0, 0.3)),
                     int8_table=((int8_cost, 0.3 + int8_cost), (int8_cost, 0.3 + int8_cost)))


def test_the_solver_chooses_kv_bits_with_the_keep_ratio_and_the_plan(memory):
    from rap.kv.decode_cache import KVLayout

    table = _table(memory)
    req = Request(batch=16, prompt=400, new_tokens=64)
    dense = memory.peak_bytes(Plan.full(5), req)
    budget = int(0.8 * dense)  # the full 16-bit cache does not fit with every block at dtype
    cheap = LevelSolver(memory, table, kv_penalty=_kv_penalty(0.001), buckets=1 << 14).decide(req, budget)
    assert cheap.kv_bits == 8 and cheap.kv_ratio == 1.0  # int8 KV at full keep costs less than dropping
    assert cheap.breakdown == memory.breakdown(cheap.mask, req, 1.0, KVLayout("adakv", 8))
    assert cheap.breakdown.total_bytes <= budget and cheap.to_dict()["kv_bits"] == 8
    dear = LevelSolver(memory, table, kv_penalty=_kv_penalty(5.0), buckets=1 << 14).decide(req, budget)
    assert dear.kv_bits == 16  # a measured int8 penalty above every alternative keeps 16-bit KV
    assert dear.predicted_log_ratio < 5.0


def test_the_solver_weighs_levels_by_the_memory_model_of_the_device_it_plans_for(memory):
    from rap.policy.solver import make_solver

    # a profile whose recorded bytes (made on another device) disagree with this memory model's
    prof = {"single": {b: {"int8": 0.01, "int4g64": 0.02, DROP: 0.5} for b in memory.dense_block_bytes},
            "bytes": {"cuda": {b: {"int8": 1, "int4g64": 1, DTYPE: 2, DROP: 0} for b in memory.dense_block_bytes}}}
    table = make_solver(memory, prof).table
    for name, levels, nbytes in zip(table.blocks, table.levels, table.bytes):
        assert nbytes == tuple(memory.level_bytes(name, lv) for lv in levels)


def test_memoised_decisions_fit_every_budget_of_their_bucket(memory):
    solver = LevelSolver(memory, _table(memory, seed=5), buckets=256)
    req = Request(batch=2, prompt=48, new_tokens=8)
    dense = memory.peak_bytes(Plan.full(5), req)
    edge = (int(0.7 * dense) // solver.bucket_bytes) * solver.bucket_bytes
    budgets = [edge, edge + solver.bucket_bytes // 2, edge + solver.bucket_bytes - 1]
    plans = []
    for b in budgets + budgets[::-1]:  # second pass: from the memo
        d = solver.decide(req, b)
        assert d.budget_bytes == b and memory.fits(b, d.mask, req, d.kv_ratio)
        plans.append(d.mask)
    assert len(set(plans)) == 1


def _profile_with_steps(memory):
    blocks = list(memory.dense_block_bytes)
    single = {b: {"int8": 0.01, "int4g64": 0.05, DROP: 1.0} for b in blocks}
    nll, steps = 2.0, []
    for b, lv, rise in [(blocks[0], "int8", -0.001), (blocks[0], "int4g64", 0.002), (blocks[3], DROP, 0.5),
                        (blocks[1], "int8", 0.0), (blocks[5], DROP, 2.0), (blocks[2], DROP, -0.3)]:
        nll += rise
        steps.append({"block": b, "level": lv, "nll": nll})
    return {"single": single, "steps": steps, "dense_nll": 2.0}, blocks


def test_marginal_costs_are_the_greedy_rises_up_to_its_first_drop(memory):
    prof, blocks = _profile_with_steps(memory)
    table = LevelTable.from_profile(prof, memory, costs="marginal", clamp_gains=False)
    cost = {b: dict(zip(lv, c)) for b, lv, c in zip(table.blocks, table.levels, table.costs)}
    assert cost[blocks[0]]["int8"] == pytest.approx(-0.001)  # re-measured in the greedy pass
    assert cost[blocks[0]]["int4g64"] == pytest.approx(0.001)  # dtype -> int8 -> int4: both rises
    assert cost[blocks[1]]["int8"] == 0.01  # taken after the first drop: the single-move rise
    assert cost[blocks[3]][DROP] == 1.0 and cost[blocks[2]][DROP] == 1.0  # drops keep their single rise


def test_greedy_drop_solver_drops_a_prefix_of_the_greedy_drops_and_fits(memory):
    from rap.policy.solver import GreedyDropSolver

    prof, blocks = _profile_with_steps(memory)
    solver = GreedyDropSolver(memory, prof, buckets=256)
    req = Request(batch=1, prompt=32, new_tokens=8)
    dense = memory.peak_bytes(Plan.full(5), req)
    prefixes = [set(), {blocks[3]}, {blocks[3], blocks[5]}, {blocks[3], blocks[5], blocks[2]}]
    for frac in (1.0, 0.6, 0.4, 0.3, 0.2):
        try:
            d = solver.decide(req, int(frac * dense))
        except BudgetError:
            continue
        assert set(d.mask.dropped) in prefixes and memory.fits(int(frac * dense), d.mask, req, d.kv_ratio)


def test_the_head_is_one_more_choice_when_the_profile_measured_it(memory):
    blocks = list(memory.dense_block_bytes)
    prof = {"single": {b: {"int8": 0.01, DROP: 1.0} for b in blocks}, "head": {"single": {"int8": 0.001}}}
    solver = LevelSolver(memory, LevelTable.from_profile(prof, memory), buckets=1 << 14)
    req = Request(batch=1, prompt=32, new_tokens=8)
    dense = memory.peak_bytes(Plan.full(5), req)
    tight = solver.decide(req, int(0.6 * dense))
    assert tight.mask.head_level == "int8" and memory.fits(int(0.6 * dense), tight.mask, req, tight.kv_ratio)
    assert solver.decide(req, 2 * dense).mask.head_level == "dtype"  # a measured rise is only paid when needed
    without = LevelSolver(memory, LevelTable.from_profile({"single": prof["single"]}, memory), buckets=1 << 14)
    assert without.decide(req, int(0.6 * dense)).mask.head_level == "dtype"


def test_the_smallest_configuration_is_every_block_dropped_with_the_smaller_head_and_below_it_nothing_fits(memory):
    import torch
    from transformers import AutoConfig

    from rap.core.model import BlockView
    from rap.sources import model_from_config

    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
    for memory in (memory, MemoryModel.from_view(BlockView(model_from_config(config, torch.bfloat16, "meta")))):
        blocks = list(memory.dense_block_bytes)
        prof = {"single": {b: {"int8": 0.01, DROP: 1.0} for b in blocks}, "head": {"single": {"int8": 0.001}}}
        solver = LevelSolver(memory, LevelTable.from_profile(prof, memory), buckets=1 << 14)
        req = Request(batch=1, prompt=32, new_tokens=8)
        empty = Plan.from_levels([DROP] * 5, [DROP] * 5)
        peaks = {h: memory.peak_bytes(empty.with_head(h), req) for h in ("dtype", "int8")}
        plan, _, need = solver.smallest(req)
        assert need == min(peaks.values()) and plan == empty.with_head(min(peaks, key=peaks.get))
        assert solver.decide(req, need).breakdown.total_bytes <= need  # what the error names does fit
        with pytest.raises(BudgetError, match="the smallest configuration .every block dropped"):
            solver.decide(req, need - 1)
    assert plan.head_level == "int8"  # a 32k vocabulary: the int8 head halves the largest fixed tensor
