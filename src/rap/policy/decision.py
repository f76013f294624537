"""`Decision` (what runs for one request) and `Policy` (what picks it): the one type and the one signature.

    policy.decide(request, budget_bytes) -> Decision

A policy is bound to the memory model it plans with (a `PolicyContext`'s, the engine's, a leveled one
for the precision ladder's last rung); every decision it returns fits `budget_bytes` by
`MemoryModel.fits`, and when nothing fits it raises `rap.errors.BudgetError`. The engine
(rap.serve.engine), `rap decide`, the solver, the ladder, the baselines, the RL agent and its
environment all speak this signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rap.core.mask import BlockMask
from rap.core.memory import MemoryBreakdown, Request


@dataclass(frozen=True)
class Decision:
    """Which blocks run (a `BlockMask`, or a `Plan` with a level per block), how much of the prompt's KV
    cache is kept, what it costs and what it is expected to do to quality. Policies fill what they know:
    the engine's own greedy policy the bytes, rap.policy's policies also the request, the breakdown
    and the predicted quality."""

    mask: BlockMask
    kv_ratio: float = 1.0
    predicted_peak_bytes: int = 0  # MemoryModel.peak_bytes for exactly this mask / request / ratio / bits
    policy: str = ""
    kv_press: str | None = None  # the press that compressed the KV cache (None: kv_ratio 1, nothing compressed)
    kv_bits: int = 16  # KV storage: 16 = the model's dtype, 8 = int8 keys and values (rap.kv.decode_cache)
    request: Request | None = None
    budget_bytes: int | None = None
    breakdown: MemoryBreakdown | None = None  # MemoryModel.breakdown for exactly this mask / request / ratio
    predicted_log_ratio: float = math.nan  # predicted log(PPL / PPL_dense); nan: not predicted

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
        """JSON-ready; "plan" and "drop" make the dict readable back as a plan file (`Plan.from_dict`)."""
        out = {"policy": self.policy, "mask": str(self.mask), "plan": str(self.mask), "dropped": list(self.mask.dropped),
               "drop": list(self.mask.dropped), "kept_attn": self.kept_attn, "kept_ffn": self.kept_ffn,
               "kv_ratio": self.kv_ratio, "kv_press": self.kv_press, "kv_bits": self.kv_bits,
               "predicted_peak_bytes": self.predicted_peak_bytes}
        if self.request is not None:
            out["request"] = {"batch": self.request.batch, "prompt": self.request.prompt,
                              "new_tokens": self.request.new_tokens}
        if self.budget_bytes is not None:
            out["budget_bytes"] = self.budget_bytes
        if self.breakdown is not None:
            out["breakdown"] = self.breakdown.to_dict()
        predicted = math.isfinite(self.predicted_log_ratio)  # JSON has no NaN: null when not predicted
        out["predicted_log_ratio"] = self.predicted_log_ratio if predicted else None
        out["predicted_ppl_ratio"] = self.predicted_ppl_ratio if predicted else None
        return out


@runtime_checkable
class Policy(Protocol):
    """Anything that turns (request, budget) into a fitting Decision, over the memory model it was built with."""

    name: str

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        """A decision that fits `budget_bytes`; raises rap.errors.BudgetError if none does."""
        ...
