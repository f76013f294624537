"""LevelSolver: a level for every block plus the KV keep ratio, by a multiple-choice knapsack.

Each block picks one level (dtype / int8 / int4gG / drop); its cost is the level profile's
measured single-move calibration NLL rise (`rap.profile.levels`, mean NLL per token, so the sum is
the predicted log(PPL / PPL_dense) when moves are independent), its weight the memory model's
exact bytes at that level (`MemoryModel.level_bytes`). An attention block also carries its layer's
KV cache, so the knapsack is solved, once, over (parameter bytes, attention blocks kept):

    best[n_a][c] = least summed cost of a plan keeping n_a attention blocks in <= c byte buckets

by dynamic programming (buckets of `bucket_bytes`, each level's bytes rounded *up*, so a plan
the table admits never needs more than its buckets say: near-exact, exact to one bucket). A
decision then is a lookup: for every KV ratio r and attention count n_a, the parameter bytes left
are budget - base - n_a * KV(r) - activations; the cheapest (n_a, r) wins; its plan is
reconstructed from the DP's choices (a plan with quantized blocks reserves the largest quantized
linear's transient, e.g. the int8 weight cast, even when only smaller blocks are quantized: a
conservatism of at most one such transient; a second table without quantized levels has no reserve),
checked with `MemoryModel.fits` and, if a term the table
does not model (activation transients of quantized linears) tips it over, the next bucket down
is taken. `decide` is a few numpy lookups plus one exact fit check, memoised per (request shape,
budget bucket): CPU p50 0.57 ms cold, 0.01 ms warm (benchmarks/decide_latency.py).

Why not a library MCKP solver: the decision must be sub-millisecond per request and the table is
reused for every budget; the DP is 30 lines and exact to the bucket.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from rap.errors import BudgetError
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.core.plan import DROP, DTYPE, HEAD, INT8, Plan
from rap.policy.decision import Decision

DEFAULT_BUCKETS = 4096


@dataclass(frozen=True)
class LevelTable:
    """Per block: the levels it may take, their bytes (on the target device) and costs."""

    blocks: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...]
    bytes: tuple[tuple[int, ...], ...]
    costs: tuple[tuple[float, ...], ...]

    @classmethod
    def from_profile(cls, profile, memory: MemoryModel, allow: tuple[str, ...] | None = None,
                     clamp_gains: bool = True, costs: str = "single") -> "LevelTable":
        """From a `LevelProfile` (or its dict). `allow`: only these levels (plus dtype), e.g. ("int8",)
        for an int8-only knob. A measured NLL *drop* counts as 0 with `clamp_gains` (calibration noise).

        costs="single": each level's single-move rise (every other block at dtype). costs="marginal": where
        the profile's greedy pass moved the block to that quantized level before its first drop, the rises
        it re-measured on the way there (in the context of the moves before it, so interactions count:
        int8 on top of int8 blocks costs ~nothing); the single-move rise elsewhere (every drop)."""
        single = profile["single"] if isinstance(profile, dict) else profile.single
        marginal = greedy_marginals(profile) if costs == "marginal" else {}
        if costs not in ("single", "marginal"):
            raise ValueError(f"costs must be 'single' or 'marginal', not {costs!r}")
        blocks, levels, nbytes, costs_ = [], [], [], []
        for name in memory.dense_block_bytes:
            lv = [DTYPE] + [v for v in single.get(name, {}) if allow is None or v in allow]
            rises = [0.0] + [float(marginal.get((name, v), single[name][v])) for v in lv[1:]]
            if clamp_gains:
                rises = [max(0.0, r) for r in rises]
            blocks.append(name)
            levels.append(tuple(lv))
            nbytes.append(tuple(memory.level_bytes(name, v) for v in lv))
            costs_.append(tuple(rises))
        head = (profile.get("head") if isinstance(profile, dict) else getattr(profile, "head", None)) or {}
        rise = head.get("single", {}).get(INT8)
        if rise is not None and (allow is None or INT8 in allow):  # the embedding / lm_head: one more choice
            blocks.append(HEAD)
            levels.append((DTYPE, INT8))
            nbytes.append((memory.head_bytes(DTYPE), memory.head_bytes(INT8)))
            costs_.append((0.0, max(0.0, float(rise)) if clamp_gains else float(rise)))
        return cls(tuple(blocks), tuple(levels), tuple(nbytes), tuple(costs_))


def greedy_marginals(profile) -> dict[tuple[str, str], float]:
    """{(block, level): the NLL rise the greedy pass re-measured for reaching that quantized level}: the sum
    of the rises of the block's moves from dtype down to it (dtype -> int8 -> int4gG, say), each measured
    with the moves before it applied; moves up to the pass's first drop only."""
    steps = profile["steps"] if isinstance(profile, dict) else [s.__dict__ for s in profile.steps]
    dense = float(profile["dense_nll"] if isinstance(profile, dict) else profile.dense_nll)
    out, so_far, prev = {}, {}, dense
    for st in steps:
        st = st if isinstance(st, dict) else st.__dict__
        if st["level"] == DROP:  # from here on the context is a model with blocks gone: its rises do not
            break                # carry to plans that keep them (late drops in a wrecked model even "gain")
        rise = float(st["nll"]) - prev
        prev = float(st["nll"])
        total = so_far.get(st["block"], 0.0) + rise
        so_far[st["block"]] = total
        out[(st["block"], st["level"])] = total
    return out


def memoised_decide(solver, request: Request, budget_bytes: int, step: int) -> Decision:
    """`solver._decide` for the lower edge of the budget's bucket of `step` bytes, memoised per (request shape,
    bucket) in `solver._decisions`: it fits every budget in the bucket. Falls back to the exact budget when
    only that fits (or nothing does, so the error names the real budget)."""
    bucket = int(budget_bytes) // step
    key = (request.batch, request.prompt, request.new_tokens, bucket)
    hit = solver._decisions.get(key)
    if hit is None:
        try:
            hit = solver._decide(request, bucket * step)
        except BudgetError:
            return solver._decide(request, int(budget_bytes))
        solver._decisions[key] = hit
        if len(solver._decisions) > 65536:
            solver._decisions.pop(next(iter(solver._decisions)))
    return dataclasses.replace(hit, request=request, budget_bytes=int(budget_bytes))


class LevelSolver:
    """`decide(request, budget_bytes) -> rap.policy.Decision` over plans with levels and a KV ratio."""

    name = "solver"

    def __init__(self, memory: MemoryModel, table: LevelTable, kv_penalty=None, buckets: int = DEFAULT_BUCKETS,
                 name: str | None = None):
        from rap.policy.evaluator import KVPenalty

        self.memory = memory
        self.table = table
        self.kv_penalty = kv_penalty or KVPenalty.zero()
        self.kv_ratios = tuple(self.kv_penalty.ratios)
        # the KV options priced: every measured keep ratio at every measured KV bits (16, and 8 when the
        # penalty has an int8 table): the policy picks bits with the ratio and the weight plan
        self.kv_options = tuple((r, b) for b in self.kv_penalty.bits for r in self.kv_ratios)
        if name:
            self.name = name
        self.num_layers = L = memory.shape.num_layers
        total = sum(max(b) for b in table.bytes)
        self.bucket_bytes = max(1, math.ceil(total / buckets))
        self.G = sum(math.ceil(max(b) / self.bucket_bytes) for b in table.bytes) + 1  # the dense plan fits
        self.base_bytes = memory.param_bytes(Plan.from_levels([DROP] * L, [DROP] * L))
        if HEAD in table.blocks:  # the head is an item of the table: its bytes are chosen, not fixed
            self.base_bytes -= memory.head_bytes(DTYPE)
        # two tables: every level, and dtype/drop only. A quantized linear adds a transient the
        # per-block bytes cannot carry (an int8 weight cast to the dtype, on CUDA int4's padded
        # input): the quantized table is looked up with that reserve taken off the budget.
        self._tables = [self._dp(table), self._dp(table, unquantized=True)]
        self._plans: dict[tuple[int, int, int], Plan] = {}
        self._kv_cache: dict = {}
        self._decisions: dict = {}
        self._smallest: dict = {}
        empty = Plan.from_levels([DROP] * L, [DROP] * L)
        heads = table.levels[table.blocks.index(HEAD)] if HEAD in table.blocks else (DTYPE,)
        self._empty_plans = [empty.with_head(h) for h in heads]  # smallest(): every block dropped, each head level

    def _dp(self, table: LevelTable, unquantized: bool = False):
        L, G, INF = self.num_layers, self.G, np.inf
        best = np.full((L + 1, G), INF)  # best[a, c]: least cost keeping a attention blocks in exactly c buckets
        best[0, 0] = 0.0
        choices = []  # per block: [L+1, G] level index chosen (for reconstruction)
        for b, name_ in enumerate(table.blocks):
            is_attn = name_.startswith("attn")
            new = np.full_like(best, INF)
            choice = np.full(best.shape, -1, dtype=np.int8)
            for k, (lv, nb, cost) in enumerate(zip(table.levels[b], table.bytes[b], table.costs[b])):
                if unquantized and lv not in (DTYPE, DROP):
                    continue
                w = math.ceil(nb / self.bucket_bytes)
                shift_a = 1 if (is_attn and lv != DROP) else 0
                cand = np.full_like(best, INF)
                cand[shift_a:, w:] = best[:L + 1 - shift_a, :G - w] + cost
                better = cand < new
                new[better] = cand[better]
                choice[better] = k
            best = new
            choices.append(choice)
        # prefix minimum over c, remembering where the minimum sits (on ties the larger plan: a level
        # whose measured rise is 0 is only taken when its bytes are needed)
        arg = np.zeros_like(best, dtype=np.int64)
        pref = np.empty_like(best)
        run, at = np.full(L + 1, INF), np.zeros(L + 1, dtype=np.int64)
        for c in range(G):
            better = best[:, c] <= run
            run = np.where(better, best[:, c], run)
            at = np.where(better, c, at)
            pref[:, c], arg[:, c] = run, at
        return best, pref, arg, choices

    # ---- plans ------------------------------------------------------------------------------
    def plan_at(self, n_attn: int, c: int, q: int = 0) -> Plan:
        """Table q's plan (0: every level, 1: dtype/drop) with n_attn attention blocks kept in exactly c buckets."""
        key = (n_attn, c, q)
        if key not in self._plans:
            t = self.table
            if not hasattr(self, "_walk"):  # per block: (kind, layer, its levels, their buckets), for the walk back
                self._walk = [(name.split(".")[0], int(name.split(".")[1]) if "." in name else 0, t.levels[b],
                               [math.ceil(n / self.bucket_bytes) for n in t.bytes[b]])
                              for b, name in enumerate(t.blocks)][::-1]
            levels = {"attn": [DTYPE] * self.num_layers, "ffn": [DTYPE] * self.num_layers, HEAD: [DTYPE]}
            a = n_attn
            choices = self._tables[q][3][::-1]
            for (kind, layer, lvs, w), choice in zip(self._walk, choices):
                k = choice[a, c]
                lv = lvs[k]
                levels[kind][layer] = lv
                c -= w[k]
                if kind == "attn" and lv != DROP:
                    a -= 1
            self._plans[key] = Plan.from_levels(levels["attn"], levels["ffn"], levels[HEAD][0])
            if len(self._plans) > 65536:
                self._plans.pop(next(iter(self._plans)))
        return self._plans[key]

    def frontier(self) -> list[tuple[int, float, Plan]]:
        """(parameter bytes, predicted log ratio, plan) of the solver's plans, best per byte bucket,
        each strictly better than every smaller one (for plots and the int8/int4-only curves)."""
        exact = self._tables[0][0]
        flat = exact.min(0)
        out, run = [], math.inf
        for c in range(self.G):
            if flat[c] < run - 1e-12:
                run = float(flat[c])
                a = int(np.argmin(exact[:, c]))
                plan = self.plan_at(a, c)
                out.append((self.memory.param_bytes(plan), run, plan))
        return out

    # ---- deciding -----------------------------------------------------------------------------
    def request_terms(self, request: Request):
        """(KV bytes [R, L+1] by attention blocks kept, activation bytes, KV penalties [R], quantized reserve),
        R = the KV options (keep ratio, bits)."""
        from rap.policy.greedy import kv_layout_for_bits

        key = (request.batch, request.prompt, request.new_tokens)
        if key not in self._kv_cache:
            m, L = self.memory, self.num_layers
            if not hasattr(self, "_one_attn"):
                types = m.shape.layer_types or ("full",) * L
                reps = {}
                for i in range(L):
                    reps.setdefault(types[i] if i < len(types) else "full", i)
                self._one_attn = [Plan.from_levels([DTYPE if j == i else DROP for j in range(L)], [DROP] * L)
                                  for i in reps.values()]
                self._full = Plan.full(L)
                self._quantized = [Plan.uniform(L, lv) for lv in {v for lvs in self.table.levels for v in lvs}
                                   if lv not in (DTYPE, DROP)]
            kv_layer = np.array([[max(m.kv_bytes(request, p, r, kv_layout_for_bits(b)) for p in self._one_attn)]
                                 for r, b in self.kv_options])
            full = m.breakdown(self._full, request, 1.0)
            act = max(full.total_bytes - full.param_bytes - full.kv_bytes, 0)
            pen = np.array([self.kv_penalty(r, request.prompt, b) for r, b in self.kv_options])
            tokens = request.batch * max(request.prompt, 1)
            reserve = max([m.quant_transient_bytes(p, tokens) for p in self._quantized] + [0])
            self._kv_cache[key] = (kv_layer * np.arange(L + 1)[None, :], act, pen, reserve)
            if len(self._kv_cache) > 4096:
                self._kv_cache.pop(next(iter(self._kv_cache)))
        return self._kv_cache[key]

    def smallest(self, request: Request) -> tuple[Plan, float, int]:
        """(plan, kv ratio, peak bytes) of the smallest runnable configuration: every block dropped, the
        head at its smallest level where the table lets it move (int8: half the embedding's bytes)."""
        key = (request.batch, request.prompt, request.new_tokens)
        if key not in self._smallest:
            r = min(self.kv_ratios)
            self._smallest[key] = min(((p, r, self.memory.peak_bytes(p, request, r)) for p in self._empty_plans),
                                      key=lambda t: t[2])
            if len(self._smallest) > 4096:
                self._smallest.pop(next(iter(self._smallest)))
        return self._smallest[key]

    def nothing_fits(self, request: Request, budget_bytes: int) -> BudgetError | None:
        """The BudgetError for a budget below the smallest configuration (None when it fits): checked
        before any search, so a hopeless request costs one lookup."""
        plan, r, need = self.smallest(request)
        if need <= budget_bytes:
            return None
        head = "" if plan.head_level == DTYPE else f", head {plan.head_level}"
        return BudgetError(f"nothing fits in {format_bytes(budget_bytes)}: the smallest configuration (every block "
                           f"dropped{head}, KV ratio {r:g}) needs {format_bytes(need)} for batch {request.batch}, "
                           f"prompt {request.prompt}, {request.new_tokens} new tokens; raise the budget or shrink "
                           "the request")

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        """The cheapest (plan, KV ratio) that fits. Memoised per (request shape, budget bucket): the
        decision is made for the bucket's lower edge, so it fits every budget in the bucket (at most
        one bucket, `bucket_bytes`, below what the exact budget could have bought)."""
        error = self.nothing_fits(request, budget_bytes)
        if error is not None:
            raise error
        return memoised_decide(self, request, budget_bytes, self.bucket_bytes)

    def _decide(self, request: Request, budget_bytes: int) -> Decision:
        from rap.policy.greedy import kv_layout_for_bits

        kv, act, pen, reserve = self.request_terms(request)
        A = self.num_layers + 1
        costs, idxs = [], []
        for q, extra in ((0, reserve), (1, 0)):
            left = budget_bytes - self.base_bytes - act - kv - extra  # [R, L+1] bytes left for block parameters
            c = np.clip(np.floor(left / self.bucket_bytes).astype(np.int64), -1, self.G - 1)
            ok = c >= 0
            idx = np.where(ok, c, 0)
            a = np.broadcast_to(np.arange(A), c.shape)
            costs.append(np.where(ok, self._tables[q][1][a, idx], np.inf) + pen[:, None])
            idxs.append(idx)
        cost = np.stack(costs)  # [2, R, L+1]
        for flat in np.argsort(cost, axis=None)[:8]:
            q, rest = divmod(int(flat), cost.shape[1] * A)
            r_i, n_a = divmod(rest, A)
            if not math.isfinite(cost[q, r_i, n_a]):
                break
            r, bits = self.kv_options[r_i]
            layout = kv_layout_for_bits(bits)
            exact, pref, arg, _ = self._tables[q]
            cc = int(arg[n_a, idxs[q][r_i, n_a]])
            for _ in range(64):  # a term the table does not model: step down the frontier until it fits
                plan = self.plan_at(n_a, cc, q)
                bd = self.memory.breakdown(plan, request, r, layout)  # what MemoryModel.fits compares
                if bd.total_bytes <= budget_bytes:
                    return Decision(plan, r, bd.total_bytes, self.name, request=request,
                                    budget_bytes=int(budget_bytes), breakdown=bd,
                                    predicted_log_ratio=float(exact[n_a, cc] + pen[r_i]), kv_bits=bits)
                if cc == 0 or not math.isfinite(pref[n_a, cc - 1]):
                    break
                cc = int(arg[n_a, cc - 1])
        plan, r, need = self.smallest(request)
        if need <= budget_bytes:  # pragma: no cover - the table always has it
            bd = self.memory.breakdown(plan, request, r)
            return Decision(plan, r, bd.total_bytes, self.name, request=request, budget_bytes=int(budget_bytes),
                            breakdown=bd, predicted_log_ratio=float(sum(max(c) for c in self.table.costs)))
        raise self.nothing_fits(request, budget_bytes)

    def check_plan(self, plan: Plan, request: Request, budget_bytes: int, kv_ratio: float = 1.0) -> Plan:
        """`plan` if it fits; else BudgetError naming what does: the solver's choice at this budget
        (or, when nothing fits, the smallest configuration and its bytes)."""
        if self.memory.fits(budget_bytes, plan, request, kv_ratio):
            return plan
        need = self.memory.peak_bytes(plan, request, kv_ratio)
        d = self.decide(request, budget_bytes)  # raises BudgetError naming the smallest configuration
        raise BudgetError(f"plan {Plan.of(plan).spec() or '*=dtype'} needs {format_bytes(need)}, more than the budget {format_bytes(budget_bytes)}; "
                          f"what fits: --plan '{Plan.of(d.mask).spec() or '*=dtype'}' with KV ratio {d.kv_ratio:g} "
                          f"({format_bytes(d.breakdown.total_bytes)})")


def make_solver(memory: MemoryModel, profile, kv_penalty=None, allow: tuple[str, ...] | None = None,
                name: str | None = None, buckets: int = DEFAULT_BUCKETS, costs: str = "single") -> LevelSolver:
    """A solver over a level profile (LevelProfile, its dict or a path to its JSON)."""
    from pathlib import Path

    if isinstance(profile, (str, Path)):
        from rap.profile.levels import load_level_profile

        profile = load_level_profile(profile)
    return LevelSolver(memory, LevelTable.from_profile(profile, memory, allow, costs=costs), kv_penalty, buckets, name)


def greedy_drop_order(profile) -> list[tuple[str, float]]:
    """(block, re-measured rise) of the profile's greedy drops, in the order the pass took them."""
    steps = profile["steps"] if isinstance(profile, dict) else [s.__dict__ for s in profile.steps]
    prev = float(profile["dense_nll"] if isinstance(profile, dict) else profile.dense_nll)
    out = []
    for st in steps:
        st = st if isinstance(st, dict) else st.__dict__
        if st["level"] == DROP:
            out.append((st["block"], float(st["nll"]) - prev))
        prev = float(st["nll"])
    return out


class GreedyDropSolver:
    """Drops in the order the profile's greedy pass took them (re-measured, so their interactions count),
    precision by the knapsack: for k drops (a grid), the first k greedy drops are forced and the solver
    picks every other block's level among dtype / int8 / int4gG; the decision is the k whose predicted
    cost (the greedy pass's re-measured rises of those k drops, floored at their single-move sum, plus the
    knapsack's quantization costs) is least among those that fit.

    Why: single-move drop costs add up to far less than a set of drops costs together (SmolLM2 at 30%
    of the dense need: the free solver's 35 drops measured 302x dense, the greedy prefix's 36 104x)."""

    name = "solver-greedy-drops"

    def __init__(self, memory: MemoryModel, profile, ks=None, buckets: int = 1024):
        if isinstance(profile, (str,)) or hasattr(profile, "__fspath__"):
            from rap.profile.levels import load_level_profile

            profile = load_level_profile(profile)
        self.memory = memory
        full = LevelTable.from_profile(profile, memory)
        order = greedy_drop_order(profile)
        if not order:
            raise BudgetError("the level profile has no greedy drops (rap profile --method levels --steps N)")
        ks = ks or sorted({*range(0, min(len(order), 12) + 1), *range(12, len(order) + 1, 3), len(order)})
        self.solvers, self.drop_cost, self.dropped, self.smallest_plans = {}, {}, {}, {}
        for k in ks:
            dropped = {b for b, _ in order[:k]}
            levels, nbytes, costs = [], [], []
            for b, lv, nb, c in zip(full.blocks, full.levels, full.bytes, full.costs):
                keep = [(v, n, x) for v, n, x in zip(lv, nb, c) if (v == DROP) == (b in dropped)]
                levels.append(tuple(v for v, _, _ in keep))
                nbytes.append(tuple(n for _, n, _ in keep))
                costs.append(tuple(0.0 if v == DROP else x for v, _, x in keep))
            table = LevelTable(full.blocks, tuple(levels), tuple(nbytes), tuple(costs))
            self.solvers[k] = LevelSolver(memory, table, buckets=buckets, name=self.name)
            self.dropped[k] = frozenset(dropped)
            single = sum(max(0.0, full.costs[full.blocks.index(b)][full.levels[full.blocks.index(b)].index(DROP)])
                         for b, _ in order[:k])
            self.drop_cost[k] = max(sum(r for _, r in order[:k]), single)
            # the smallest plan with these drops: every other block at its fewest bytes
            smallest = {b: lv[min(range(len(lv)), key=lambda i: nb[i])] for b, lv, nb in
                        zip(table.blocks, table.levels, table.bytes)}
            self.smallest_plans[k] = Plan.full(memory.shape.num_layers).with_levels(smallest)
        self.ks = sorted(self.solvers)
        self._decisions: dict = {}
        # least drop cost from k on: once it is above the best found, no larger k can win
        self.suffix_min, run = {}, math.inf
        for k in reversed(self.ks):
            run = min(run, self.drop_cost[k])
            self.suffix_min[k] = run

    def _first_fitting(self, request: Request, budget_bytes: int) -> int:
        """Index in `ks` of the fewest drops whose smallest plan fits (len(ks) if none): fits only get
        easier with more drops, so a binary search."""
        lo, hi = 0, len(self.ks)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.memory.fits(budget_bytes, self.smallest_plans[self.ks[mid]], request):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        """Memoised per (request shape, budget bucket of the finest sub-solver), as LevelSolver.decide."""
        return memoised_decide(self, request, budget_bytes, self.solvers[self.ks[0]].bucket_bytes)

    def _decide(self, request: Request, budget_bytes: int) -> Decision:
        best, err = None, None
        for k in self.ks[self._first_fitting(request, budget_bytes):]:
            if best is not None and self.suffix_min[k] >= best[0]:
                break
            solver = self.solvers[k]
            try:
                d = solver.decide(request, budget_bytes)
            except BudgetError as e:
                err = e
                continue
            if set(d.mask.dropped) != self.dropped[k]:  # the table had nothing that fits: its every-block-dropped fallback
                continue
            cost = self.drop_cost[k] + d.predicted_log_ratio
            if best is None or cost < best[0]:
                best = (cost, d)
        if best is None:
            if err is not None:
                raise err
            plan, r, need = self.solvers[max(self.solvers)].smallest(request)
            raise BudgetError(f"nothing fits in {format_bytes(budget_bytes)} with drops in the greedy pass's order: "
                              f"the smallest configuration (every block dropped, KV ratio {r:g}) needs "
                              f"{format_bytes(need)}; raise the budget or shrink the request")
        cost, d = best
        return dataclasses.replace(d, policy=self.name, budget_bytes=int(budget_bytes), predicted_log_ratio=cost)
