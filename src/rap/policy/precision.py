"""The precision ladder: before any block is dropped, blocks lose precision.

Rungs, in order (each the first that fits the budget wins):

1. every block at the model's dtype;
2. FFN blocks at int8;
3. every block at int8;
4. every block at int4 (per block the largest group size its shapes allow, 128 then 64 then 32; int8
   where none divides);
5. int4 everywhere, plus the drops (and KV keep ratio) a drop-only policy picks for the remaining
   budget, on a memory model whose blocks are int4 (`MemoryModel.with_levels`).

Why this order, from measurements (SmolLM2-135M, WikiText-2, benchmarks/results/quant-2026-11-24.json,
H100): int8 weight-only 22.05 vs dense 21.98 at 61% of the parameter bytes; int4 g64 31.6 at 45%;
dropping blocks to the same 61% 551, and int8 plus 20% of blocks dropped (50% of the bytes) 97.0. So
int8 costs almost nothing, int4 beats any drop at the bytes it frees, and drops come last. The rung
order is fixed; it does not weigh costs per block (that is the joint profile / solver of issue 15,
items 4 and 5). `measured_ppl_ratio` reports a rung's measured PPL ratio when a results file gives it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from rap.errors import BudgetError
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.core.plan import DROP, INT4_GROUP_SIZES, INT8, Plan, block_linears

log = logging.getLogger(__name__)


def int4_level_for(kind: str, shape, on_cuda: bool = False) -> str:
    """The int4 level with the largest group size that divides every in_features of a block kind, else
    int8 (also on CUDA for weights not in bf16: tinygemm takes bf16 only)."""
    import torch

    if on_cuda and shape.dtype != torch.bfloat16:
        return INT8
    ins = [K for _, _, K in block_linears(kind, shape)]
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if all(K % g == 0 for K in ins):
            return f"int4g{g}"
    return INT8


def precision_rungs(num_layers: int, shape, on_cuda: bool = False,
                    memory: MemoryModel | None = None) -> list[tuple[str, Plan]]:
    """(name, plan) of the ladder's rungs 1-4, in order. With `memory`, a kind of block whose int4
    bytes are not below its int8 bytes stays int8 (tinygemm pads in_features to 1024 on CUDA: SmolLM2's
    576-wide projections store about as many int4 bytes as int8 ones)."""
    L = num_layers
    a4, f4 = int4_level_for("attn", shape, on_cuda), int4_level_for("ffn", shape, on_cuda)
    if memory is not None:
        a4 = a4 if memory.level_bytes("attn.0", a4) < memory.level_bytes("attn.0", INT8) else INT8
        f4 = f4 if memory.level_bytes("ffn.0", f4) < memory.level_bytes("ffn.0", INT8) else INT8
    return [("dtype", Plan.full(L)),
            ("ffn-int8", Plan.from_levels(["dtype"] * L, [INT8] * L)),
            ("int8", Plan.uniform(L, INT8)),
            ("int4", Plan.from_levels([a4] * L, [f4] * L))]


class PrecisionLadder:
    """Engine policy (`decide(memory_model, request, budget_bytes, resident_mask)`): the rungs above,
    then `inner` (any engine policy; default: rap.serve.engine's default drop policy for `profile`) on the
    int4 rung's memory model."""

    name = "precision-ladder"

    def __init__(self, inner: Any = None, profile: dict | str | Path | None = None,
                 measured: dict[str, float] | None = None):
        if inner is None:
            from rap.policy.greedy import default_drop_policy

            inner = default_drop_policy(profile)
        self.inner = inner
        self.measured = dict(measured or {})
        self._leveled: dict[int, MemoryModel] = {}

    def decide(self, memory_model: MemoryModel, request: Request, budget_bytes: int, resident_mask=None):
        from rap.policy.greedy import Decision, _call_policy

        rungs = precision_rungs(memory_model.shape.num_layers, memory_model.shape, memory_model.on_cuda, memory_model)
        for name, plan in rungs:
            if memory_model.fits(budget_bytes, plan, request):
                return Decision(plan, 1.0, memory_model.peak_bytes(plan, request), f"{self.name}:{name}")
        bottom = rungs[-1][1]
        key = id(memory_model)
        if key not in self._leveled:  # cached: policies memoise contexts per memory model
            self._leveled[key] = memory_model.with_levels(bottom)
        leveled = self._leveled[key]
        try:
            inner = _call_policy(self.inner, leveled, request, budget_bytes, resident_mask)
        except BudgetError as e:
            raise BudgetError(f"even with every block at int4 and blocks dropped: {e}") from None
        plan = bottom.with_levels({n: DROP for n in inner.mask.dropped})
        kv = inner.kv_ratio
        return Decision(plan, kv, memory_model.peak_bytes(plan, request, kv), f"{self.name}:int4+{inner.policy}")

    def measured_ppl_ratio(self, rung: str) -> float | None:
        return self.measured.get(rung)


def measured_rung_ratios(path: str | Path, model: str) -> dict[str, float]:
    """PPL ratio to dense per rung from a benchmarks/results/precision-cpu-*.json file (rows with
    "model", "rung" and "ppl"), for `model`; {} when the file has none."""
    try:
        rows = json.loads(Path(path).read_text()).get("rows", [])
    except (OSError, ValueError):
        return {}
    mine = [r for r in rows if r.get("model") == model and "rung" in r and "ppl" in r]
    dense = next((r["ppl"] for r in mine if r["rung"] == "dtype"), None)
    if not dense:
        return {}
    return {r["rung"]: r["ppl"] / dense for r in mine if math.isfinite(r["ppl"])}


class PrecisionPolicy:
    """`rap decide`'s convention (`decide(request, budget_bytes) -> rap.policy.Decision`): the same rungs,
    then the named drop policy (default: the ladder) on a context whose blocks are at int4."""

    name = "precision"

    def __init__(self, context, inner_name: str = "ladder", bundle=None, measured: dict[str, float] | None = None):
        from rap.policy import make_policy
        from rap.policy.context import PolicyContext

        self.context = context
        self.rungs = precision_rungs(context.num_layers, context.memory.shape, context.memory.on_cuda, context.memory)
        leveled = context.memory.with_levels(self.rungs[-1][1])
        self.inner_context = PolicyContext(leveled, context.order, context.quality,
                                           getattr(context, "scores", None), context.model_name,
                                           ladder=getattr(context, "_ladder", None))
        self.inner = make_policy(inner_name, self.inner_context, bundle)
        self.measured = dict(measured or {})

    def decide(self, request: Request, budget_bytes: int):
        from rap.policy import Decision

        memory = self.context.memory
        for name, plan in self.rungs:
            if memory.fits(budget_bytes, plan, request):
                ratio = self.measured.get(name)
                return Decision(f"{self.name}:{name}", plan, 1.0, request, int(budget_bytes),
                                memory.breakdown(plan, request), math.log(ratio) if ratio else float("nan"))
        d = self.inner.decide(request, budget_bytes)
        plan = self.rungs[-1][1].with_levels({n: DROP for n in d.mask.dropped})
        log.debug("precision ladder: int4 plus %s (%s)", d.policy, format_bytes(memory.peak_bytes(plan, request)))
        # quality of drops on top of int4 is not measured: nan rather than the drop-only prediction
        return Decision(f"{self.name}:int4+{d.policy}", plan, d.kv_ratio, request, int(budget_bytes),
                        memory.breakdown(plan, request, d.kv_ratio), float("nan"))
