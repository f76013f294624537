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
from typing import Any, Callable

from rap.errors import BudgetError
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.core.plan import DROP, INT4_GROUP_SIZES, INT8, Plan, block_linears
from rap.policy.decision import Decision

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
    """The rungs above over `memory_model`, then the drop policy `make_inner(leveled)` builds over the int4
    rung's memory model (default: the engine's drop-only default, `rap.policy.greedy.default_drop_policy`).

    One class for the engine (name "precision-ladder") and `rap decide` (`precision_policy`, name
    "precision"). A rung's predicted quality is its measured PPL ratio when `measured` gives one, else nan;
    drops on top of int4 are not measured either (nan rather than the drop-only prediction)."""

    def __init__(self, memory_model: MemoryModel, make_inner: Callable[[MemoryModel], Any] | None = None,
                 measured: dict[str, float] | None = None, name: str = "precision-ladder"):
        if make_inner is None:
            from rap.policy.greedy import default_drop_policy

            def make_inner(memory):
                return default_drop_policy(memory)
        self.name = name
        self.memory = memory_model
        self.make_inner = make_inner
        self.measured = dict(measured or {})
        self.rungs = precision_rungs(memory_model.shape.num_layers, memory_model.shape, memory_model.on_cuda,
                                     memory_model)
        self._inner: Any = None
        self._drop_only: Any = None

    @property
    def inner(self) -> Any:
        """The drop policy below the int4 rung, over the int4 rung's memory model (built on first use)."""
        if self._inner is None:
            self._inner = self.make_inner(self.memory.with_levels(self.rungs[-1][1]))
        return self._inner

    @property
    def drop_only(self) -> Any:
        """The same drop policy over the dense memory model: what the engine drops by while idle, when
        dropping frees bytes at once and quantizing would take a pass over the weights."""
        if self._drop_only is None:
            self._drop_only = self.make_inner(self.memory)
        return self._drop_only

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        memory = self.memory
        for name, plan in self.rungs:
            if memory.fits(budget_bytes, plan, request):
                ratio = self.measured.get(name)
                bd = memory.breakdown(plan, request)
                return Decision(plan, 1.0, bd.total_bytes, f"{self.name}:{name}", request=request,
                                budget_bytes=int(budget_bytes), breakdown=bd,
                                predicted_log_ratio=math.log(ratio) if ratio else math.nan)
        try:
            d = self.inner.decide(request, budget_bytes)
        except BudgetError as e:
            raise BudgetError(f"even with every block at int4 and blocks dropped: {e}") from None
        plan = self.rungs[-1][1].with_levels({n: DROP for n in d.mask.dropped})
        bd = memory.breakdown(plan, request, d.kv_ratio)
        log.debug("precision ladder: int4 plus %s (%s)", d.policy, format_bytes(bd.total_bytes))
        return Decision(plan, d.kv_ratio, bd.total_bytes, f"{self.name}:int4+{d.policy}", request=request,
                        budget_bytes=int(budget_bytes), breakdown=bd)

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


def precision_policy(context, inner_name: str = "ladder", bundle=None,
                     measured: dict[str, float] | None = None) -> PrecisionLadder:
    """`rap decide`'s precision ladder: the rungs, then the named rap.policy policy (default: the ladder)
    on a PolicyContext whose blocks are at int4."""
    from rap.policy import make_policy
    from rap.policy.context import PolicyContext

    def make_inner(leveled: MemoryModel):
        inner_context = PolicyContext(leveled, context.order, context.quality, getattr(context, "scores", None),
                                      context.model_name, ladder=getattr(context, "_ladder", None))
        return make_policy(inner_name, inner_context, bundle)

    return PrecisionLadder(context.memory, make_inner, measured, name="precision")
