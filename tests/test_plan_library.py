"""The plan library (rap.policy.library): plans measured together, the policy picks the measured-best that fits."""

import random

import pytest

from rap.core.memory import MemoryModel, Request
from rap.core.plan import Plan
from rap.errors import BudgetError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from rap.policy.library import build_library
    from rap.profile import load_calibration
    from rap.profile.levels import level_profile
    from rap.sources import load_view

    view, tok = load_view("stories260k")
    cal = load_calibration(tok, view.config.model_type, tokens=2048, seq_len=256)
    prof = level_profile(view, cal, remeasure=3, progress=False)
    path = tmp_path_factory.mktemp("lib") / "levels.json"
    build_library(view, cal, prof, progress=False, checkpoint=path)
    return view, cal, prof, path


def library_policy(prof, memory):
    from rap.policy import make_level_policy

    return make_level_policy("library", memory, prof)


def test_the_library_holds_every_generators_plan_and_every_greedy_prefix(made):
    from rap.policy.library import candidates

    view, _, prof, _ = made
    plans = {Plan.parse(e["plan"], view.num_layers) for e in prof.library["plans"]}
    expected = set(candidates([MemoryModel.from_view(view)], prof)) - {Plan.full(view.num_layers)}
    assert expected <= plans
    assert {prof.plan_after(k) for k in range(1, len(prof.steps) + 1)} <= plans


def test_a_library_plan_is_measured_with_all_its_moves_applied_together(made):
    from rap.profile.levels import LevelRunner, plan_nll

    view, cal, prof, _ = made
    entry = next(e for e in prof.library["plans"] if not e["source"].startswith("greedy"))
    plan = Plan.parse(entry["plan"], view.num_layers)
    assert plan_nll(LevelRunner(view), cal.windows, plan) == pytest.approx(entry["nll"], rel=1e-6)


def test_every_decision_fits_and_is_the_measured_best_library_plan_that_fits(made):
    from rap.policy.greedy import kv_layout_for_bits

    view, _, prof, _ = made
    memory = MemoryModel.from_view(view)
    policy = library_policy(prof, memory)
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        req = Request(batch=rng.randint(1, 4), prompt=rng.randint(8, 200), new_tokens=rng.randint(1, 64))
        budget = int(memory.dense_need(req) * rng.uniform(0.3, 0.99))
        try:
            d = policy.decide(req, budget)
        except BudgetError:
            continue
        assert memory.peak_bytes(d.mask, req, d.kv_ratio, kv_layout_for_bits(d.kv_bits)) <= budget
        seen.add(d.policy)
        if d.policy != "library":
            continue
        # no library plan that fits this budget's bucket measured better
        edge = budget // policy.knapsack.bucket_bytes * policy.knapsack.bucket_bytes
        fitting = [r for p, r in zip(policy.plans, policy.rise) if memory.fits(edge, p, req)]
        assert d.predicted_log_ratio == pytest.approx(min(fitting))
    assert "library" in seen


def test_the_dense_plan_runs_whenever_it_fits(made):
    view, _, prof, _ = made
    memory = MemoryModel.from_view(view)
    req = Request(batch=2, prompt=64, new_tokens=16)
    policy = library_policy(prof, memory)
    for budget in (int(memory.dense_need(req) * 1.05), memory.peak_bytes(Plan.full(view.num_layers), req)):
        d = policy.decide(req, budget)
        assert d.mask == Plan.full(view.num_layers) and d.policy == "library" and d.predicted_peak_bytes <= budget


def test_where_nothing_in_the_library_fits_the_knapsack_decides_and_says_so(made):
    from rap.policy.library import LibrarySolver
    from rap.policy.solver import make_solver

    view, _, prof, _ = made
    memory = MemoryModel.from_view(view)
    only_dense = LibrarySolver(make_solver(memory, prof), {"plans": []}, prof.dense_nll)
    req = Request(batch=1, prompt=64, new_tokens=16)
    d = only_dense.decide(req, int(memory.dense_need(req) * 0.6))
    assert d.policy == "solver" and d.mask != Plan.full(view.num_layers)


def test_the_library_is_saved_with_the_profile_and_a_rerun_measures_nothing_again(made, monkeypatch):
    from rap.policy.library import build_library
    from rap.profile import levels
    from rap.profile.levels import load_level_profile

    view, cal, prof, path = made
    loaded = load_level_profile(path)
    assert loaded.library["plans"] == prof.library["plans"]
    calls = []
    monkeypatch.setattr(levels, "plan_nll", lambda *a, **k: calls.append(a) or 0.0)
    build_library(view, cal, loaded, progress=False)
    assert calls == [] and len(loaded.library["plans"]) == len(prof.library["plans"])


def test_on_a_split_after_the_calibration_windows_every_plan_is_measured_there(made):
    from rap.policy.library import build_library, selection_windows
    from rap.profile.levels import LevelRunner, load_level_profile, plan_nll
    from rap.sources import load_view

    view, cal, _, path = made
    prof = load_level_profile(path)
    _, tok = load_view("stories260k")
    sel = selection_windows(tok, view.config.model_type, prof, 1024)
    # disjoint: the windows right after the profile's calibration windows of the same source
    assert sel.windows.shape[1] == cal.seq_len and sel.sha256 != cal.sha256
    assert not any(bool((w == c).all()) for w in sel.windows for c in cal.windows)
    lib = build_library(view, sel, prof, progress=False)
    assert lib["selection"]["disjoint_from_calibration"] and lib["selection"]["ids_sha256"] == sel.sha256
    step = prof.plan_after(len(prof.steps) // 2)  # a greedy prefix: re-measured on the split, not copied
    entry = next(e for e in lib["plans"] if Plan.parse(e["plan"], view.num_layers) == step)
    assert entry["nll"] == pytest.approx(plan_nll(LevelRunner(view), sel.windows, step), rel=1e-6)
    assert lib["dense_nll"] == pytest.approx(plan_nll(LevelRunner(view), sel.windows, Plan.full(view.num_layers)))
