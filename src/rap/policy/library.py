"""The plan library: plans measured together on the calibration set, so the policy picks by measurement.

Why: the knapsack (`rap.policy.solver`) adds single-move NLL rises as if moves were independent,
and they are not. On SmolLM2-135M (H200, full WikiText-2 test, CPU bytes) its 70% plan (27 dtype,
27 int8, 6 int4 blocks) measured 1.0071x dense while int8 on 34 blocks measured 1.0015x and the
greedy profile's prefix 0.9994x: each int4 block looked cheap alone and cost more among the others.
The level profile therefore also carries a library: the plans every generator below picks at a grid
of budgets (the knapsack, its marginal-cost and greedy-drop variants, int8-only, int4-only,
int8-then-drop, drop-only, and every prefix of the greedy pass), each measured with all its moves
applied at once, on a selection split: calibration-source tokens after the profile's own windows, so
the moves were not chosen on them (`build_library` says why).

`LibrarySolver.decide` takes, among the library plans that fit (each with every priced KV option),
the one with the least measured rise plus KV penalty; measured rises below 0 (int8 often measures a
hair under dense) count as measured, except that the dense plan wins whenever it fits: a full budget
runs the model as shipped. The knapsack decides only where no library
plan fits (a request or budget outside the grid), and the Decision's `policy` says which decided:
"library" or the knapsack's name. Fits are exact (`MemoryModel.breakdown`) for the plan returned.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from rap.core.memory import MemoryModel, Request
from rap.core.plan import DROP, INT8, Plan, is_quantized
from rap.errors import BudgetError
from rap.policy.decision import Decision

LIBRARY_FRACTIONS = tuple(round(0.2 + 0.025 * i, 3) for i in range(33))  # 20% .. 100% of the dense need
LIBRARY_REQUEST = Request(batch=1, prompt=512, new_tokens=128)  # the grid's reference request


def generators(memory: MemoryModel, profile, request: Request, gsi_profile: dict | None = None,
               knapsack=None) -> dict[str, Callable[[int], Plan | None]]:
    """name -> pick(budget_bytes): the plan that policy (or single knob) chooses for `request`, None when
    nothing of that knob fits. The single-knob curves of benchmarks/levels.py and the library's candidates.
    `knapsack`: the caller's `make_solver(memory, profile)`, so it is not built twice."""
    from rap.policy.solver import GreedyDropSolver, make_solver

    L = memory.shape.num_layers
    int4 = next((lv for lv in profile.levels if lv.startswith("int4")), None)
    solvers = {"solver": knapsack or make_solver(memory, profile),
               "solver-marginal": make_solver(memory, profile, costs="marginal", name="solver-marginal"),
               "int8-only": make_solver(memory, profile, allow=(INT8,), name="int8-only")}
    if int4:
        solvers["int4-only"] = make_solver(memory, profile, allow=(int4,), name="int4-only")
    greedy = [profile.plan_after(k) for k in range(len(profile.steps) + 1)]

    def decided(s):
        return lambda budget: s.decide(request, budget).mask

    def no_drops(s):  # a precision-only knob: its plan, if it fits without dropping anything
        def pick(budget):
            plan = s.decide(request, budget).mask
            return plan if memory.fits(budget, plan, request) and not any(v == DROP for _, v in plan.items()) else None
        return pick

    def greedy_prefix(budget):  # the longest prefix of the greedy pass that fits
        return next((p for p in greedy if memory.fits(budget, p, request)), None)

    picks = {"solver": decided(solvers["solver"]), "solver-marginal": decided(solvers["solver-marginal"]),
             "greedy-profile": greedy_prefix, "int8-only": no_drops(solvers["int8-only"])}
    if int4:
        picks["int4-only"] = no_drops(solvers["int4-only"])
    if profile.steps and any(s.level == DROP for s in profile.steps):
        gd = GreedyDropSolver(memory, profile)
        picks["solver-greedy-drops"] = lambda budget: gd.decide(request, budget).mask
    if gsi_profile is not None:
        from rap.policy import DEFAULT_POLICY, make_policy
        from rap.policy.context import PolicyContext
        from rap.policy.evaluator import QualityModel
        from rap.policy.greedy import complete_order
        from rap.policy.precision import precision_policy

        order = complete_order(gsi_profile["order"], L)
        quality = QualityModel.from_profile({**gsi_profile, "order": order, "num_layers": L})
        ctx = PolicyContext(memory, order, quality)
        drop_only = make_policy(DEFAULT_POLICY, ctx)
        int8_all = Plan.uniform(L, INT8)
        drop_on_int8 = make_policy(DEFAULT_POLICY, PolicyContext(memory.with_levels(int8_all), order, quality))
        ladder = precision_policy(ctx)

        def int8_then_drop(budget):
            if memory.fits(budget, Plan.full(L), request):
                return Plan.full(L)
            return int8_all.with_levels({n: DROP for n in drop_on_int8.decide(request, budget).mask.dropped})

        picks["drop-only"] = lambda budget: Plan.of(drop_only.decide(request, budget).mask)
        picks["int8-then-drop"] = int8_then_drop
        picks["precision-ladder"] = lambda budget: Plan.of(ladder.decide(request, budget).mask)
    return picks


def candidates(memories: list[MemoryModel], profile, gsi_profile: dict | None = None,
               fractions=LIBRARY_FRACTIONS, request: Request = LIBRARY_REQUEST) -> dict[Plan, str]:
    """plan -> where it came from ("int8-only@0.700/cpu"): every generator at every fraction of the dense
    need, under each memory model (CPU bytes and, on a GPU, CUDA bytes, where int4 pads and buffers differ)."""
    out: dict[Plan, str] = {}
    for memory in memories:
        dev = "cuda" if memory.on_cuda else "cpu"
        need = memory.dense_need(request)
        for name, pick in generators(memory, profile, request, gsi_profile).items():
            for frac in fractions:
                try:
                    plan = pick(int(frac * need))
                except BudgetError:
                    continue
                if plan is not None:
                    out.setdefault(Plan.of(plan), f"{name}@{frac:.3f}/{dev}")
    return out


def selection_windows(tokenizer, model_type: str, profile, tokens: int = 65_536):
    """The `tokens` tokens of the profile's calibration source that follow its calibration windows: a split
    disjoint from the one the profile's moves were chosen on (a Calibration; RapError when the source is short)."""
    from rap.errors import RapError
    from rap.profile.calibration import Calibration, load_calibration

    cal = profile.calibration
    seq, first = int(cal["seq_len"]), int(cal["windows"])
    both = load_calibration(tokenizer, model_type, cal["source"], (first * seq) + tokens, seq, int(cal.get("seed", 0)))
    if both.num_windows <= first:
        raise RapError(f"{cal['source']} has no tokens after the profile's {first} calibration windows of {seq}: "
                       "the plan library needs a disjoint split (--library-tokens 0 measures on the calibration windows)")
    return Calibration(both.windows[first:], cal["source"], int(cal.get("seed", 0)), both.cleaning)


def build_library(view, selection, profile, gsi_profile: dict | None = None, fractions=LIBRARY_FRACTIONS,
                  batch_windows: int = 4, checkpoint=None, progress: bool = True) -> dict:
    """Measure every candidate plan's mean NLL per token on `selection` (a Calibration) and store them as
    `profile.library`; resumable (plans already measured on the same selection are not measured again),
    checkpointed to `checkpoint` every 30 s.

    Why a selection split: the profile's moves were chosen on its calibration windows, so plans made of them
    measure better there than anywhere else (SmolLM2, H200: the knapsack's 60% plan 0.995x dense on the
    calibration windows, 1.007x on the test set, where int8 alone measured 1.001x and 1.002x). Measured on
    windows the moves were not chosen on, the ranking is honest. When `selection` holds the profile's own
    calibration windows, the greedy pass's prefixes are taken from its steps, not measured again."""
    from tqdm.auto import tqdm

    from rap.profile.levels import LevelRunner, plan_nll

    memories = [MemoryModel.from_view(view, on_cuda=False)]
    if view.device.type == "cuda":
        memories.append(MemoryModel.from_view(view, on_cuda=True))
    cands = candidates(memories, profile, gsi_profile, fractions)
    L = profile.num_layers
    same = selection.sha256 == profile.calibration.get("ids_sha256")
    old = profile.library or {}
    reuse = old.get("selection", {}).get("ids_sha256", profile.calibration.get("ids_sha256")) == selection.sha256
    entries = {Plan.parse(e["plan"], L): e for e in old.get("plans", [])} if reuse else {}
    greedy = {profile.plan_after(k + 1): (k + 1, step) for k, step in enumerate(profile.steps)}
    for plan, (k, step) in greedy.items():
        if same:  # measured by the greedy pass on these windows
            entries.setdefault(plan, {"plan": plan.spec(), "nll": step.nll, "source": f"greedy-profile step {k}"})
        else:
            cands.setdefault(plan, f"greedy-profile step {k}")
    windows = selection.windows.to(view.device)
    runner = LevelRunner(view)
    dense = Plan.full(L)
    dense_nll = profile.dense_nll if same else old.get("dense_nll") if reuse and "dense_nll" in old else None
    if dense_nll is None:
        dense_nll = plan_nll(runner, windows, dense, batch=batch_windows)
    todo = [p for p in cands if p not in entries and p != dense]
    lib = {"fractions": list(fractions), "request": dataclasses.asdict(LIBRARY_REQUEST),
           "memory_models": ["cuda" if m.on_cuda else "cpu" for m in memories],
           "selection": {**selection.describe(), "disjoint_from_calibration": not same,
                         "after_calibration_windows": 0 if same else int(profile.calibration["windows"])},
           "dense_nll": dense_nll, "seconds": float(old.get("seconds", 0.0)) if reuse else 0.0,
           "plans": list(entries.values())}
    profile.library = lib
    t0 = last = time.perf_counter()
    for plan in tqdm(todo, disable=not progress, desc=f"plan library {profile.model}", unit="plan", dynamic_ncols=True):
        nll = plan_nll(runner, windows, plan, batch=batch_windows)
        lib["plans"].append({"plan": plan.spec(), "nll": nll, "source": cands[plan]})
        if checkpoint is not None and time.perf_counter() - last > 30:
            lib["seconds"] += time.perf_counter() - t0
            t0 = last = time.perf_counter()
            profile.save(checkpoint)
    lib["seconds"] += time.perf_counter() - t0
    if checkpoint is not None:
        profile.save(checkpoint)
    return lib


def activation_group(plan: Plan) -> tuple:
    """What a plan's activation bytes depend on (`MemoryModel.prefill_activation_bytes` / `decode_...`):
    whether any attention / FFN block runs, the (kind, quantized level) pairs it holds, the head's level."""
    kinds = sorted({(kind, v) for kind, levels in (("attn", plan.attn_levels), ("ffn", plan.ffn_levels))
                    for v in set(levels) if is_quantized(v)})
    return any(plan.keep_attn), any(plan.keep_ffn), plan.head_level, tuple(kinds)


class LibrarySolver:
    """`decide(request, budget_bytes) -> Decision`: the measured-best library plan that fits, else the knapsack's."""

    name = "library"

    def __init__(self, knapsack, library: dict | None, dense_nll: float):
        self.knapsack = knapsack  # a rap.policy.solver.LevelSolver: its memory model, KV options and fallback
        self.memory = knapsack.memory
        self.kv_penalty = knapsack.kv_penalty
        L = self.memory.shape.num_layers
        dense_nll = (library or {}).get("dense_nll", dense_nll)  # the selection split's own dense NLL
        plans = [(Plan.parse(e["plan"], L), float(e["nll"]) - dense_nll) for e in (library or {}).get("plans", [])]
        plans.append((Plan.full(L), 0.0))
        plans.sort(key=lambda pr: pr[1])
        self.plans = [p for p, _ in plans]
        self.rise = np.array([r for _, r in plans])
        self.param = np.array([self.memory.param_bytes(p) for p in self.plans], dtype=np.float64)
        self.n_attn = np.array([sum(p.keep_attn) for p in self.plans])
        groups: dict[tuple, int] = {}
        self.group = np.array([groups.setdefault(activation_group(p), len(groups)) for p in self.plans])
        self.group_plans = [None] * len(groups)
        for p, g in zip(self.plans, self.group):
            self.group_plans[g] = self.group_plans[g] or p
        self.dense = self.plans.index(Plan.full(L))
        self.kv_full = knapsack.kv_options.index((1.0, 16)) if (1.0, 16) in knapsack.kv_options else 0
        self._decisions: dict = {}
        self._dense_decisions: dict = {}

    def __len__(self) -> int:
        return len(self.plans)

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        """Memoised per (request shape, budget bucket) as the knapsack's; the dense plan is checked against
        the exact budget first, so a budget the dense model fits always runs it."""
        from rap.policy.solver import memoised_decide

        key = (request.batch, request.prompt, request.new_tokens)
        dense = self._dense_decisions.get(key)
        if dense is None:
            plan = self.plans[self.dense]
            bd = self.memory.breakdown(plan, request, 1.0)
            dense = self._dense_decisions[key] = Decision(plan, 1.0, bd.total_bytes, self.name, request=request,
                                                          breakdown=bd, predicted_log_ratio=0.0)
            if len(self._dense_decisions) > 4096:
                self._dense_decisions.pop(next(iter(self._dense_decisions)))
        if dense.predicted_peak_bytes <= budget_bytes:
            return dataclasses.replace(dense, request=request, budget_bytes=int(budget_bytes))
        error = self.knapsack.nothing_fits(request, budget_bytes)
        if error is not None:
            raise error
        return memoised_decide(self, request, budget_bytes, self.knapsack.bucket_bytes)

    def _decide(self, request: Request, budget_bytes: int) -> Decision:
        from rap.policy.greedy import kv_layout_for_bits

        kv, _, pen, _ = self.knapsack.request_terms(request)  # kv [R, L+1] by attention blocks kept
        # a plan's activations depend only on its group (kinds kept, quantized kinds, head level): counted per
        # group when first needed, so the need below is exact (for models whose layers all cache alike; KV of
        # the largest layer type otherwise), and the first plan in order of measured cost whose need fits is
        # the measured-best that fits; the memory model's breakdown confirms it
        base = self.param[None, :] + kv[:, self.n_attn]
        cost = np.where(base <= budget_bytes, self.rise[None, :] + pen[:, None], np.inf)  # [R, plans]
        if math.isfinite(cost[self.kv_full, self.dense]):  # the dense plan with the full cache fits: it runs
            cost[self.kv_full, self.dense] = -np.inf
        acts: dict[int, int] = {}
        m = self.memory
        for flat in np.argsort(cost, axis=None, kind="stable"):
            r_i, p_i = divmod(int(flat), cost.shape[1])
            if cost[r_i, p_i] == np.inf:
                break
            g = self.group[p_i]
            if g not in acts:
                rep = self.group_plans[g]
                acts[g] = max(m.prefill_activation_bytes(request, rep), m.decode_activation_bytes(request, rep))
            if base[r_i, p_i] + acts[g] > budget_bytes:
                continue
            r, bits = self.knapsack.kv_options[r_i]
            plan = self.plans[p_i]
            bd = m.breakdown(plan, request, r, kv_layout_for_bits(bits))
            if bd.total_bytes <= budget_bytes:
                return Decision(plan, r, bd.total_bytes, self.name, request=request, budget_bytes=int(budget_bytes),
                                breakdown=bd, predicted_log_ratio=float(self.rise[p_i] + pen[r_i]), kv_bits=bits)
        return self.knapsack.decide(request, budget_bytes)  # nothing in the library fits: the knapsack decides

    def check_plan(self, plan: Plan, request: Request, budget_bytes: int, kv_ratio: float = 1.0) -> Plan:
        return self.knapsack.check_plan(plan, request, budget_bytes, kv_ratio)

    def smallest(self, request: Request):
        return self.knapsack.smallest(request)
