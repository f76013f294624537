"""The runtime policy: for one request under the live memory budget, which blocks run and how
much of the prompt's KV cache is kept.

Every policy answers `decide(request, budget_bytes) -> Decision` and every Decision it returns
has been checked with `MemoryModel.fits` (the single source of truth for fit); when nothing
fits, policies raise `BudgetError` instead of returning a decision that would not run.

    context.py    PolicyContext: memory model + profile + quality model, fast byte tables, finalize()
    evaluator.py  quality: measured log-PPL ratio (memoised), KV penalty, surrogate, QualityModel
    ladder.py     MaskLadder: the best known mask for each (attention kept, FFN kept) count pair
    baselines.py  gsi-order, knapsack, ffn-first, attn-first
    oracle.py     expensive search (evaluation only)
    env.py        gymnasium environment for one decision
    rl.py         the trained agent (sb3-contrib MaskablePPO) and the bundle file it lives in
    train.py      training loop (seeded, resumable, progress bar)
    commands.py   `rap train-policy`, `rap decide`
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rap.core.mask import BlockMask
from rap.core.memory import MemoryBreakdown, Request

# The policy `rap decide` and the engine use when none is named. Chosen from the held-out evaluation
# in benchmarks/results/policy-smollm2-135m-2026-11-24.json (benchmarks/policy.py, 200 scenarios):
# the ladder has the best geometric-mean PPL ratio of the deployable policies (20.6 vs RL 35.8;
# KV-heavy 29.2 vs 42.9), fits always and decides in 0.52 ms p99. (The arithmetic mean the issue
# names is dominated by a few hopeless 30%-budget scenarios: PPL ratios of 1e5..1e41.)
DEFAULT_POLICY = "ladder"
BASELINE_NAMES = ("gsi-order", "knapsack", "ffn-first", "attn-first")
POLICY_NAMES = ("rl", "ladder", "precision", *BASELINE_NAMES, "oracle")


@dataclass(frozen=True)
class Decision:
    """What runs for one request: a block mask and a KV keep ratio, with what it costs and
    what it is expected to do to quality."""

    policy: str
    mask: BlockMask
    kv_ratio: float
    request: Request
    budget_bytes: int
    breakdown: MemoryBreakdown  # from MemoryModel.breakdown for exactly this mask/request/ratio
    predicted_log_ratio: float  # predicted log(PPL / PPL_dense)
    kv_bits: int = 16  # KV storage the decision prices: 16 = the model's dtype, 8 = int8 keys and values

    @property
    def predicted_ppl_ratio(self) -> float:
        return math.exp(self.predicted_log_ratio)

    @property
    def kept_attn(self) -> int:
        return sum(self.mask.keep_attn)

    @property
    def kept_ffn(self) -> int:
        return sum(self.mask.keep_ffn)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy, "plan": str(self.mask), "drop": list(self.mask.dropped), "kept_attn": self.kept_attn,
            "kept_ffn": self.kept_ffn, "kv_ratio": self.kv_ratio, "kv_bits": self.kv_bits,
            "request": {"batch": self.request.batch, "prompt": self.request.prompt,
                        "new_tokens": self.request.new_tokens},
            "budget_bytes": self.budget_bytes, "breakdown": self.breakdown.to_dict(),
            "predicted_log_ratio": self.predicted_log_ratio, "predicted_ppl_ratio": self.predicted_ppl_ratio,
        }


@runtime_checkable
class Policy(Protocol):
    """Anything that turns (request, budget) into a fitting Decision."""

    name: str

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        """A decision that fits `budget_bytes`; raises rap.errors.BudgetError if none does."""
        ...


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
        from rap.policy.precision import PrecisionPolicy

        return PrecisionPolicy(context, "ladder", bundle)
    if name == "oracle":
        from rap.policy.oracle import OraclePolicy

        return OraclePolicy(context)
    if name == "rl":
        if bundle is None or bundle.agent is None:
            raise RapError("policy 'rl' needs a trained policy file: rap train-policy MODEL --profile ... --out policy.zip")
        from rap.policy.rl import RLPolicy

        return RLPolicy(context, bundle.agent)
    raise RapError(f"unknown policy {name!r}; use a policy .zip or one of: {', '.join(POLICY_NAMES)}")


# ---- for rap.serve.engine: decide(memory_model, request, budget_bytes, resident_mask) -------------------
class EnginePolicy:
    """Adapts a named policy (or a trained policy file) to rap.serve.engine's calling convention,
    building the PolicyContext for whichever memory model the engine passes (once per model).
    `resident_mask` is accepted but not used: switching cost is not modelled yet."""

    def __init__(self, name: str, bundle=None, profile: dict | None = None):
        self.name = name
        self.bundle = bundle
        self.profile = profile
        self._policies: dict[int, Policy] = {}

    def decide(self, memory_model, request: Request, budget_bytes: int, resident_mask: BlockMask | None = None):
        key = id(memory_model)
        if key not in self._policies:
            if self.bundle is not None:
                ctx = self.bundle.context(memory_model)
            else:
                from rap.policy.greedy import complete_order
                from rap.policy.context import PolicyContext
                from rap.policy.evaluator import QualityModel

                L = memory_model.shape.num_layers
                profile = {**self.profile, "num_layers": L, "order": complete_order(self.profile["order"], L)}
                ctx = PolicyContext(memory_model, profile["order"], QualityModel.from_profile(profile),
                                    profile.get("scores"))
            self._policies[key] = make_policy(self.name, ctx, self.bundle)
        return self._policies[key].decide(request, budget_bytes)


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


def load_policy(spec: str, profile=None) -> EnginePolicy:
    """rap.serve.engine's hook: `spec` is a policy name or a trained policy .zip; `profile` a profile
    (dict or path) or a policy .zip providing the quality model."""
    if spec.endswith(".zip"):
        bundle, _ = _read(spec)
        return EnginePolicy("rl", bundle)
    bundle, prof = _read(profile)
    if bundle is None and prof is None:
        from rap.errors import RapError

        raise RapError(f"policy {spec!r} needs a profile (block removal order) or a trained policy .zip")
    return EnginePolicy(spec, bundle, prof)


def default_policy(profile=None):
    """rap.serve.engine's hook: the best policy of the held-out evaluation over what `profile` gives
    (a trained policy .zip, or a profile); with nothing, the engine's own greedy policy."""
    bundle, prof = _read(profile)
    if bundle is None and prof is None:
        from rap.policy.greedy import GreedyPolicy

        return GreedyPolicy()
    name = DEFAULT_POLICY if (bundle is not None and (DEFAULT_POLICY != "rl" or bundle.agent is not None)) else "ladder"
    return EnginePolicy(name, bundle, prof)


# ---- plans with precision levels (issue 15, items 4-5): the hook the engine / `rap decide` read -------
# The policy over joint actions (a level per block + the KV ratio) used when a level profile
# (`rap profile MODEL --method levels`) is given. From the held-out measurement in
# benchmarks/results/levels-smollm2-135m-cpu-2048x2-2026-12-02.json (benchmarks/levels.py; CPU; 2 x 2,048
# WikiText-2 test tokens; the CPU level profile has only 256 calibration tokens): the solver is best at
# 30% of the dense need (172x dense vs 1.3e4x..5e8x for every other policy that fits) and 40% (1.34x vs
# int4-only 1.38x, precision ladder 1.41x), but 3-5% worse than the precision ladder / int8-only at
# 50-90% (1.01-1.05x vs 1.000-1.004x: its 256-token int4 costs are noise). Geometric mean of the PPL
# ratio over 30-100%: solver 2.02, precision ladder 12.9; over 40-100%: ladder 1.050, solver 1.070.
# Kept as the default for the 30-100% range; re-decide on the H200 profile (64k tokens) and the
# full test set (commands in rap/profile/levels.py and benchmarks/levels.py).
DEFAULT_LEVEL_POLICY = "solver"
LEVEL_POLICY_NAMES = ("solver", "int8-only", "int4-only")
BUNDLED_LEVEL_PROFILES = {"smollm2-135m": "smollm2-135m-levels.json"}


def make_level_policy(name: str, memory, level_profile, kv_penalty=None):
    """A policy over plans with levels: `decide(request, budget_bytes) -> Decision` whose mask is a
    `rap.core.plan.Plan`. `level_profile`: a LevelProfile, its dict or a path to its JSON."""
    from rap.errors import RapError
    from rap.policy.solver import make_solver

    allow = {"solver": None, "int8-only": ("int8",), "int4-only": ("int4g32", "int4g64", "int4g128")}
    if name not in allow:
        raise RapError(f"unknown level policy {name!r}; use one of: {', '.join(LEVEL_POLICY_NAMES)}")
    return make_solver(memory, level_profile, kv_penalty, allow[name], name=name)


def bundled_level_profile(model: str):
    """Path of the level profile shipped for `model`, or None."""
    from pathlib import Path

    name = BUNDLED_LEVEL_PROFILES.get(model)
    return None if name is None else Path(__file__).resolve().parent.parent / "assets" / "profiles" / name
