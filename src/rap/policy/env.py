"""A gymnasium environment for one decision: one (budget, request) per episode.

Observation: the request and budget as scale-free features (`ladder.observe`: budget / dense
need, the dense model's parameter / KV / activation shares, log batch / prompt / output lengths,
what all attention / all FFN blocks / the base / activations cost relative to the budget).
Action: one of R * (L+1) = (KV keep ratio, attention blocks kept), one shot; the mask is the
ladder entry with that many attention blocks and the best-valued FFN count that fits (see
ladder.py: why one shot, and why the FFN count need not be learned). `action_masks()` marks
exactly the actions for which such an entry fits, computed from the memory model's terms for the
whole table at once (MaskablePPO never samples the others).
Reward: minus the predicted log(PPL / PPL_dense) of the chosen configuration, clipped at
-`reward_clip`; a configuration that MemoryModel.fits rejects earns -`misfit_penalty` (it can
only happen without action masking, e.g. a random agent). Episodes last one step.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rap.policy.ladder import decode_split, n_features, observe, split_choices
from rap.policy.workload import Scenario, Workload


class DecisionEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, context, workload: Workload | None = None, seed: int | None = None,
                 reward_clip: float = 10.0, misfit_penalty: float = 20.0):
        super().__init__()
        self.context = context
        self.ladder = context.ladder
        self.workload = workload or Workload()
        self.reward_clip = reward_clip
        self.misfit_penalty = misfit_penalty
        self.observation_space = spaces.Box(-np.inf, np.inf, (n_features(len(context.kv_ratios)),), np.float32)
        self.action_space = spaces.Discrete(len(context.kv_ratios) * (self.ladder.num_layers + 1))
        self._rng = np.random.default_rng(seed)
        self.scenario: Scenario | None = None
        self._mask = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        ctx = self.context
        scenario = (options or {}).get("scenario")
        while True:
            scenario = scenario or self.workload.sample(self._rng, ctx.memory)
            costs = ctx.costs(scenario.request)
            if scenario.budget_bytes >= ctx.smallest_peak(scenario.request, costs):
                break
            scenario = None  # nothing fits at all: draw another (never happens for the default workload)
        self.scenario, self._costs = scenario, costs
        self._mask, self._entries = split_choices(ctx, self.ladder, scenario.request, costs, scenario.budget_bytes)
        self._obs = observe(ctx, scenario.request, scenario.budget_bytes, costs)
        return self._obs, {}

    def action_masks(self) -> np.ndarray:
        return self._mask

    def step(self, action):
        ctx, sc = self.context, self.scenario
        mask, r = decode_split(self.ladder, ctx.kv_ratios, int(action), self._entries)
        fits = mask is not None and ctx.memory.fits(sc.budget_bytes, mask, sc.request, r)
        if fits:
            entry = int(self._entries[int(action)])
            y = float(self.ladder.values[entry]) + ctx.quality.kv_penalty(r, sc.request.prompt)
            reward = -min(y, self.reward_clip)
        else:
            y, reward = float("nan"), -self.misfit_penalty
        return self._obs.copy(), reward, True, False, {"fits": fits, "log_ratio": y}
