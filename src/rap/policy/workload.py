"""The workload a policy is trained and judged on: (budget, request) scenarios.

Batch, prompt and output lengths are log-uniform (so short prompts and batch 1 are as common as
the long and large ones); the budget is a uniform fraction of what the dense model needs for
that request (r = 1). Prompts are capped so that prompt + new tokens fit the model's context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rap.core.memory import MemoryModel, Request


@dataclass(frozen=True)
class Scenario:
    request: Request
    budget_bytes: int
    budget_fraction: float  # of the dense need

    @property
    def kv_heavy(self) -> bool:
        """KV-dominated by the issue's definition: batch >= 16 or prompt >= 4k tokens."""
        return self.request.batch >= 16 or self.request.prompt >= 4096

    def to_dict(self) -> dict:
        return {"batch": self.request.batch, "prompt": self.request.prompt, "new_tokens": self.request.new_tokens,
                "budget_bytes": self.budget_bytes, "budget_fraction": self.budget_fraction}

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        return cls(Request(d["batch"], d["prompt"], d["new_tokens"]), d["budget_bytes"], d["budget_fraction"])


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


@dataclass(frozen=True)
class Workload:
    budget_fraction: tuple[float, float] = (0.3, 1.0)
    batch: tuple[int, int] = (1, 64)
    prompt: tuple[int, int | None] = (64, None)  # None: the model's context
    new_tokens: tuple[int, int] = (16, 1024)

    def sample(self, rng: np.random.Generator, memory: MemoryModel) -> Scenario:
        context = memory.shape.max_context
        new = _log_uniform(rng, *self.new_tokens)
        hi = min(self.prompt[1] or context, context - new)
        prompt = _log_uniform(rng, self.prompt[0], max(self.prompt[0], hi))
        request = Request(_log_uniform(rng, *self.batch), prompt, new)
        fraction = float(rng.uniform(*self.budget_fraction))
        return Scenario(request, int(fraction * memory.dense_need(request)), fraction)

    def scenarios(self, n: int, seed: int, memory: MemoryModel) -> list[Scenario]:
        rng = np.random.default_rng(seed)
        return [self.sample(rng, memory) for _ in range(n)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(**{k: tuple(v) for k, v in d.items()})
