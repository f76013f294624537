"""The runtime policy: for one request under the live memory budget, which blocks run and how
much of the prompt's KV cache is kept.

Every policy answers `decide(request, budget_bytes) -> Decision` (rap.policy.decision: the one type and
signature, used by the engine, `rap decide`, the solver, the ladder, the baselines and the RL agent) and
every Decision it returns has been checked with `MemoryModel.fits` (the single source of truth for fit);
when nothing fits, policies raise `BudgetError` instead of returning a decision that would not run.

    decision.py   Decision, Policy
    greedy.py     the engine's built-in greedy policy, default removal orders, as_policy
    precision.py  the precision ladder (int8, int4 before any drop)
    solver.py     plans with levels (a level per block) and a KV ratio
    context.py    PolicyContext: memory model + profile + quality model, fast byte tables, finalize()
    evaluator.py  quality: measured log-PPL ratio (memoised), KV penalty, surrogate, QualityModel
    ladder.py     MaskLadder: the best known mask for each (attention kept, FFN kept) count pair
    baselines.py  gsi-order, knapsack, ffn-first, attn-first
    oracle.py     expensive search (evaluation only)
    env.py        gymnasium environment for one decision
    rl.py         the trained agent (sb3-contrib MaskablePPO) and the bundle file it lives in
    train.py      training loop (seeded, resumable, progress bar)
"""

from __future__ import annotations

from rap.policy.decision import Decision, Policy  # noqa: F401 (the package's central types)

# The policy `rap decide` and the engine use when none is named. Chosen from the held-out evaluation
# in benchmarks/results/policy-smollm2-135m-2026-11-24.json (benchmarks/policy.py, 200 scenarios):
# the ladder has the best geometric-mean PPL ratio of the deployable policies (20.6 vs RL 35.8;
# KV-heavy 29.2 vs 42.9), fits always and decides in 0.52 ms p99. (The arithmetic mean the issue
# names is dominated by a few hopeless 30%-budget scenarios: PPL ratios of 1e5..1e41.)
DEFAULT_POLICY = "ladder"
BASELINE_NAMES = ("gsi-order", "knapsack", "ffn-first", "attn-first")
POLICY_NAMES = ("rl", "ladder", "precision", *BASELINE_NAMES, "oracle")


def make_policy(name: str, context, bundle=None) -> Policy:
    """A policy by name over `context` (a PolicyContext). 'rl' needs a trained bundle."""
    from rap.errors import RapError

    if name in BASELINE_NAMES:
        from rap.policy.baselines import make_baseline

        return make_baseline(name, context)
    if name == "ladder":
        from rap.policy.ladder import LadderPolicy

        return LadderPolicy(context)
    if name == "precision":  # int8 / int4 rungs before any drop, then the ladder on int4 blocks
        from rap.policy.precision import precision_policy

        return precision_policy(context, "ladder", bundle)
    if name == "oracle":
        from rap.policy.oracle import OraclePolicy

        return OraclePolicy(context)
    if name == "rl":
        if bundle is None or bundle.agent is None:
            raise RapError("policy 'rl' needs a trained policy file: rap train-policy MODEL --profile ... --out policy.zip")
        from rap.policy.rl import RLPolicy

        return RLPolicy(context, bundle.agent)
    raise RapError(f"unknown policy {name!r}; use a policy .zip or one of: {', '.join(POLICY_NAMES)}")


# ---- for rap.serve.engine: a policy bound to the engine's memory model ------------------------------
def bound_policy(name: str, memory_model, bundle=None, profile: dict | None = None) -> Policy:
    """The named policy over `memory_model`: its PolicyContext from the trained bundle, or from `profile`
    (its removal order completed with the default order for the blocks it does not rank)."""
    if bundle is not None:
        ctx = bundle.context(memory_model)
    else:
        from rap.policy.context import PolicyContext
        from rap.policy.evaluator import QualityModel
        from rap.policy.greedy import complete_order

        L = memory_model.shape.num_layers
        profile = {**profile, "num_layers": L, "order": complete_order(profile["order"], L)}
        ctx = PolicyContext(memory_model, profile["order"], QualityModel.from_profile(profile), profile.get("scores"))
    return make_policy(name, ctx, bundle)


def _read(profile):
    """A profile dict, a profile .json path or a trained policy .zip path -> (bundle, profile)."""
    import json
    from pathlib import Path

    from rap.errors import RapError

    if profile is None or isinstance(profile, dict):
        return None, profile
    path = Path(profile)
    if path.suffix == ".zip":
        from rap.policy.rl import Bundle

        return Bundle.load(path), None
    try:
        return None, json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RapError(f"cannot read profile {path}: {e}") from None


def load_policy(spec: str, memory_model, profile=None) -> Policy:
    """rap.serve.engine's hook: `spec` is a policy name or a trained policy .zip; `profile` a profile
    (dict or path) or a policy .zip providing the quality model; the policy plans with `memory_model`."""
    if spec.endswith(".zip"):
        bundle, _ = _read(spec)
        return bound_policy("rl", memory_model, bundle)
    bundle, prof = _read(profile)
    if bundle is None and prof is None:
        from rap.errors import RapError

        raise RapError(f"policy {spec!r} needs a profile (block removal order) or a trained policy .zip")
    return bound_policy(spec, memory_model, bundle, prof)


def default_policy(memory_model, profile=None) -> Policy:
    """rap.serve.engine's hook: the best policy of the held-out evaluation over what `profile` gives
    (a trained policy .zip, or a profile); with nothing, the engine's own greedy policy."""
    bundle, prof = _read(profile)
    if bundle is None and prof is None:
        from rap.policy.greedy import GreedyPolicy

        return GreedyPolicy(memory_model)
    name = DEFAULT_POLICY if (bundle is not None and (DEFAULT_POLICY != "rl" or bundle.agent is not None)) else "ladder"
    return bound_policy(name, memory_model, bundle, prof)


# ---- plans with precision levels (issue 15, items 4-5): the hook the engine / `rap decide` read -------
# The policy over joint actions (a level per block + the KV ratio) used when a level profile ships
# (`rap profile MODEL --method levels`). From the held-out measurement (benchmarks/levels.py, CPU, fp32 bytes,
# 2 x 2,048 WikiText-2 test tokens, the H200 level profile of 65,536 valid tokens:
# benchmarks/results/levels-smollm2-135m-cpu-2048x2-h200profile-2026-12-02.json and
# levels-smollm2-135m-cpu-2048x2-policies-2026-12-02.json), PPL ratio to dense:
#   solver 30% 302x, 40% 1.22-1.24x, 50% 1.003x, 60% 1.001x, 70% 1.000x, 80-100% 0.999-1.000x;
#   solver-greedy-drops 30% 132x (best of the knapsack policies), 40% 2.04x, 50% 1.008x, 70% 1.001x;
#   rl (MaskablePPO) 30% 7.7e3x, 40% 1.95x, 50% 1.036x, 70% 1.004x; int8-only (fits from 50%) 0.997-1.001x, 0.1-0.3% below the solver at 50-90%.
# So the solver is the default: best at 40%, within 0.3% of the best single knob from 50% up; at 30%
# (where every plan is 100x+ dense) the greedy-drop variant is 2.3x better. The H200 run with CUDA bytes
# (levels-frontier-smollm2-135m-h200-cudabytes-2026-12-02.json: drops needed from 70% down) favoured the
# greedy profile's re-measured drops over the solver's single-move ones; re-decide once that run includes
# solver-greedy-drops (`--policies solver,solver-greedy-drops,...`).
# Since then (issue 15's frontier): the profile carries a plan library (rap.policy.library), plans measured
# together on the calibration windows, and "library" picks the measured-best that fits; the knapsack decides
# where nothing in the library fits, and each Decision's `policy` names which one decided.
DEFAULT_LEVEL_POLICY = "library"
LEVEL_POLICY_NAMES = ("library", "solver", "solver-greedy-drops", "int8-only", "int4-only")
BUNDLED_LEVEL_PROFILES = {"smollm2-135m": "smollm2-135m-levels.json"}


def make_level_policy(name: str, memory, level_profile, kv_penalty=None):
    """A policy over plans with levels: `decide(request, budget_bytes) -> Decision` whose mask is a
    `rap.core.plan.Plan`. `level_profile`: a LevelProfile, its dict or a path to its JSON."""
    from rap.errors import RapError
    from rap.policy.solver import make_solver

    if name == "library":  # the measured library first, the knapsack where nothing in it fits
        from rap.policy.library import LibrarySolver

        level_profile = _loaded(level_profile)
        library = level_profile.get("library") if isinstance(level_profile, dict) else level_profile.library
        dense = level_profile["dense_nll"] if isinstance(level_profile, dict) else level_profile.dense_nll
        return LibrarySolver(make_solver(memory, level_profile, kv_penalty), library, dense)
    if name == "solver-greedy-drops":  # drops in the greedy pass's order, levels of the rest by the knapsack
        from rap.policy.solver import GreedyDropSolver

        return GreedyDropSolver(memory, _loaded(level_profile))
    allow = {"solver": None, "int8-only": ("int8",), "int4-only": ("int4g32", "int4g64", "int4g128")}
    if name not in allow:
        raise RapError(f"unknown level policy {name!r}; use one of: {', '.join(LEVEL_POLICY_NAMES)}")
    return make_solver(memory, level_profile, kv_penalty, allow[name], name=name)


def _loaded(level_profile):
    """A LevelProfile (or its dict) as given; a path loaded."""
    if hasattr(level_profile, "steps") or isinstance(level_profile, dict):
        return level_profile
    from rap.profile.levels import load_level_profile

    return load_level_profile(level_profile)


def bundled_level_profile(model: str):
    """Path of the level profile shipped for `model`, or None."""
    from pathlib import Path

    name = BUNDLED_LEVEL_PROFILES.get(model)
    return None if name is None else Path(__file__).resolve().parent.parent / "assets" / "profiles" / name
