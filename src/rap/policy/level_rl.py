"""The RL agent on the joint action (issue 15, item 5): a level for every block, plus the KV keep ratio.

The RAP paper's method (sb3-contrib MaskablePPO) on the solver's action space. One episode is one
decision (a request and a budget); it is sequential, so that action masking can keep every plan
within the budget:

* step 0 (when more than one KV ratio is known): the KV keep ratio;
* steps 1..2L: the level of each block, attn.0, ffn.0, attn.1, ... Action i is the block's i-th
  level of the `LevelTable` (dtype / int8 / int4gG / drop). The mask allows a level only when its
  bytes (an attention block also carries its layer's KV cache at the chosen ratio) fit in what is left
  of the budget; drop (0 bytes) always fits, so every episode ends in a plan that fits the table's
  byte model (the same terms as `LevelSolver`: base, activations, the quantized linears' transient).

Reward: minus the level profile's measured single-move NLL rise of each chosen level (per step; the
episode's return is minus the predicted log(PPL / PPL_dense), the solver's objective), minus the KV
penalty at step 0. The agent therefore optimises the same prediction the solver solves exactly:
its distance from the solver is what the evaluation reports (benchmarks/levels.py, policy "rl").

Observation (scale-free): position (step / steps), is-attention, budget left / dense parameter bytes,
the bytes the remaining blocks need at dtype / int8 / the smallest quantized level / relative to what
is left, this block's costs per level (log1p of 100 x rise) and bytes per level / its dense bytes, the
budget / dense need. Deciding runs the actor in numpy (`rap.policy.rl.Agent`): 2L small matrix-vector
chains, no torch.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from rap.core.memory import MemoryModel, Request
from rap.core.plan import DROP, DTYPE, Plan
from rap.errors import BudgetError, RapError

MAX_LEVELS = 4  # dtype, int8, int4gG, drop


class LevelTerms:
    """The byte terms of one (request, budget) in the solver's model: what the episode spends from."""

    def __init__(self, solver, request: Request, budget_bytes: int):
        kv, act, pen, reserve = solver.request_terms(request)
        self.kv_layer = kv[:, 1]  # [R] KV bytes of one kept attention block, per ratio
        self.pen = pen
        self.capacity = budget_bytes - solver.base_bytes - act - reserve  # for block parameters and KV


class LevelEnv:
    """gymnasium.Env (built lazily so deciding never imports gymnasium): see the module doc."""

    def __new__(cls, *args, **kwargs):
        import gymnasium as gym
        from gymnasium import spaces

        class _Env(gym.Env):
            metadata = {"render_modes": []}

            def __init__(self, solver, seed: int = 0, budget_range=(0.3, 1.0)):
                super().__init__()
                self.core = EpisodeCore(solver)
                self.budget_range = budget_range
                self.observation_space = spaces.Box(-np.inf, np.inf, (self.core.n_obs,), np.float32)
                self.action_space = spaces.Discrete(self.core.n_actions)
                self._rng = np.random.default_rng(seed)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                if seed is not None:
                    self._rng = np.random.default_rng(seed)
                req, budget = (options or {}).get("scenario") or sample_scenario(self._rng, self.core.solver.memory,
                                                                                 self.budget_range)
                return self.core.start(req, budget), {}

            def action_masks(self):
                return self.core.mask()

            def step(self, action):
                reward, done = self.core.step(int(action))
                obs = self.core.observe() if not done else np.zeros(self.core.n_obs, np.float32)
                return obs, reward, done, False, {}

        return _Env(*args, **kwargs)


def sample_scenario(rng, memory: MemoryModel, budget_range=(0.3, 1.0)) -> tuple[Request, int]:
    """A random request (batch 1-8, prompt 16-1024, 8-256 new tokens) and budget (a uniform fraction of its dense need)."""
    req = Request(batch=int(rng.integers(1, 9)), prompt=int(rng.integers(16, 1025)),
                  new_tokens=int(rng.integers(8, 257)))
    return req, int(memory.dense_need(req) * rng.uniform(*budget_range))


class EpisodeCore:
    """The episode's state machine, shared by training (LevelEnv) and deciding (LevelAgentPolicy)."""

    def __init__(self, solver):
        self.solver = solver
        t = solver.table
        self.table = t
        self.R = len(solver.kv_ratios)
        self.kv_step = self.R > 1
        self.n_actions = max(MAX_LEVELS, self.R)
        self.n_obs = 8 + 2 * MAX_LEVELS
        self.is_attn = np.array([b.startswith("attn") for b in t.blocks])
        self.nb = np.zeros((len(t.blocks), MAX_LEVELS))
        self.cost = np.zeros((len(t.blocks), MAX_LEVELS))
        self.valid = np.zeros((len(t.blocks), MAX_LEVELS), dtype=bool)
        for b in range(len(t.blocks)):
            k = len(t.levels[b])
            if k > MAX_LEVELS:
                raise RapError(f"{t.blocks[b]} has {k} levels; the level agent takes at most {MAX_LEVELS}")
            self.nb[b, :k], self.cost[b, :k], self.valid[b, :k] = t.bytes[b], t.costs[b], True
        self.dense_block = self.nb[:, 0].copy()
        self.dense_param = float(self.dense_block.sum() + solver.base_bytes)
        self.min_q = np.where(self.valid & (self.nb > 0), self.nb, np.inf).min(1)  # smallest kept level
        self.int8 = np.array([t.bytes[b][t.levels[b].index("int8")] if "int8" in t.levels[b] else t.bytes[b][0]
                              for b in range(len(t.blocks))])

    def start(self, request: Request, budget_bytes: int) -> np.ndarray:
        self.request, self.budget = request, int(budget_bytes)
        self.terms = LevelTerms(self.solver, request, budget_bytes)
        self.frac = budget_bytes / max(self.solver.memory.dense_need(request), 1)
        self.r_i = 0 if not self.kv_step else None
        self.left = float(self.terms.capacity)
        self.i = 0  # next block
        self.choice = []
        return self.observe()

    def _kv(self) -> float:
        return float(self.terms.kv_layer[self.r_i if self.r_i is not None else 0])

    def weights(self, b: int) -> np.ndarray:
        return self.nb[b] + (self._kv() * (self.valid[b] & (self.nb[b] > 0)) if self.is_attn[b] else 0)

    def observe(self) -> np.ndarray:
        if self.r_i is None:  # the KV step: no block yet
            b, w, cost = 0, self.nb[0], np.zeros(MAX_LEVELS)
        else:
            b = self.i
            w, cost = self.weights(b), self.cost[b]
        rest = slice(b, None)
        kv_rest = self._kv() * self.is_attn[rest].sum()
        left = max(self.left, 1.0)
        o = [b / len(self.nb), float(self.is_attn[b]), self.left / self.dense_param,
             min((self.dense_block[rest].sum() + kv_rest) / left, 10.0),
             min((self.int8[rest].sum() + kv_rest) / left, 10.0),
             min((self.min_q[rest].sum() + kv_rest) / left, 10.0), self.frac, float(self.r_i is None)]
        o += list(np.log1p(100 * np.maximum(cost, 0)))
        o += list(np.where(self.valid[b], w / max(self.dense_block[b], 1.0), -1.0))
        return np.asarray(o, np.float32)

    def mask(self) -> np.ndarray:
        m = np.zeros(self.n_actions, dtype=bool)
        if self.r_i is None:
            m[:self.R] = True  # any ratio leaves the drop-everything plan (KV bytes come with attention blocks)
            return m
        w = self.weights(self.i)
        m[:MAX_LEVELS] = self.valid[self.i] & (w <= self.left)
        m[:MAX_LEVELS] |= self.valid[self.i] & (self.nb[self.i] == 0)  # drop always fits
        return m

    def step(self, action: int) -> tuple[float, bool]:
        if self.r_i is None:
            self.r_i = action
            return -float(self.terms.pen[action]), False
        b = self.i
        self.left -= float(self.weights(b)[action])
        self.choice.append(action)
        self.i += 1
        return -float(max(self.cost[b, action], 0.0)), self.i == len(self.nb)

    def plan(self) -> Plan:
        levels = {"attn": [DTYPE] * self.solver.num_layers, "ffn": [DTYPE] * self.solver.num_layers}
        head = DTYPE
        for b, k in enumerate(self.choice):
            if self.table.blocks[b] == "head":  # the embedding / lm_head (rap.core.plan.HEAD), when the profile has it
                head = self.table.levels[b][k]
                continue
            kind, layer = self.table.blocks[b].split(".")
            levels[kind][int(layer)] = self.table.levels[b][k]
        return Plan.from_levels(levels["attn"], levels["ffn"], head)

    @property
    def kv_ratio(self) -> float:
        return self.solver.kv_ratios[self.r_i or 0]

    @property
    def predicted(self) -> float:
        return float(sum(max(self.cost[b, k], 0.0) for b, k in enumerate(self.choice)) + self.terms.pen[self.r_i or 0])


class LevelAgentPolicy:
    """`decide(request, budget_bytes) -> rap.policy.Decision` by the trained actor (numpy), greedily."""

    name = "rl"

    def __init__(self, solver, agent):
        self.solver, self.agent = solver, agent
        self.core = EpisodeCore(solver)

    def decide(self, request: Request, budget_bytes: int):
        from rap.policy.decision import Decision

        memory = self.solver.memory
        for shrink in (0, 1, 2, 4, 8, 16):  # a term the byte model leaves out: plan for a little less
            core = self.core
            obs = core.start(request, int(budget_bytes) - shrink * self.solver.bucket_bytes)
            done = False
            while not done:
                _, done = core.step(self.agent.act(obs, core.mask()))
                obs = core.observe() if not done else obs
            plan, r = core.plan(), core.kv_ratio
            bd = memory.breakdown(plan, request, r)
            if bd.total_bytes <= budget_bytes:
                return Decision(plan, r, bd.total_bytes, self.name, request=request, budget_bytes=int(budget_bytes),
                                breakdown=bd, predicted_log_ratio=core.predicted)
        return self.solver.decide(request, budget_bytes)  # raises BudgetError naming what fits, or fits


def train_level_agent(solver, steps: int = 100_000, seed: int = 0, net_arch=(64, 64), progress: bool = False):
    """MaskablePPO on LevelEnv; returns (Agent, training record)."""
    import time

    import torch
    from sb3_contrib import MaskablePPO

    from rap.policy.rl import Agent

    torch.manual_seed(seed)
    env = LevelEnv(solver, seed=seed)
    model = MaskablePPO("MlpPolicy", env, n_steps=2048, batch_size=256, n_epochs=5, learning_rate=5e-4,
                        gamma=1.0, gae_lambda=0.95, ent_coef=0.003, seed=seed, device="cpu", verbose=0,
                        policy_kwargs={"net_arch": list(net_arch)})
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps, progress_bar=progress)
    record = {"algorithm": "sb3-contrib MaskablePPO", "timesteps": steps, "seed": seed, "net_arch": list(net_arch),
              "gamma": 1.0, "n_steps": 2048, "batch_size": 256, "n_epochs": 5, "learning_rate": 5e-4,
              "seconds": time.perf_counter() - t0,
              "reward": "minus the level profile's single-move NLL rise per block (the solver's objective)"}
    return Agent.from_sb3(model), record


def save_level_agent(agent, record: dict, path: str | Path) -> Path:
    """A zip with agent.npz (the actor, numpy) and rap_level_agent.json (how it was trained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("agent.npz", agent.to_npz())
        z.writestr("rap_level_agent.json", json.dumps(record, indent=1))
    return path


def load_level_agent(path: str | Path):
    from rap.policy.rl import Agent

    try:
        with zipfile.ZipFile(path) as z:
            return Agent.from_npz(z.read("agent.npz")), json.loads(z.read("rap_level_agent.json"))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise RapError(f"cannot read level agent {path}: {e}") from None


def distance_from_solver(policy: LevelAgentPolicy, solver, scenarios) -> dict:
    """Predicted log-ratio gap (agent - solver) on held-out scenarios, and how often both fit."""
    gaps, fails = [], 0
    for req, budget in scenarios:
        try:
            s = solver.decide(req, budget)
        except BudgetError:
            continue
        a = policy.decide(req, budget)
        if not solver.memory.fits(budget, a.mask, req, a.kv_ratio):
            fails += 1
        gaps.append(a.predicted_log_ratio - s.predicted_log_ratio)
    g = np.array(gaps)
    return {"scenarios": len(gaps), "misfits": fails, "mean_gap": float(g.mean()), "median_gap": float(np.median(g)),
            "p90_gap": float(np.percentile(g, 90)), "solver_at_least_as_good": float((g >= -1e-9).mean())}
