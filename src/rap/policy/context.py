"""PolicyContext: what every policy needs to decide, and the one exit through which decisions leave.

Byte costs come from `MemoryModel` (the single source of truth for fit). To score thousands of
candidate masks per request in microseconds, `costs(request)` rewrites the model's peak as

    peak(mask, r) = base_params + sum_kept(block_params + [attn] layer_kv(r)) + act[any attn, any ffn]

where every term is obtained by calling MemoryModel itself on single-block masks (and the
activation peak, which depends on a mask only through "is any attention / FFN block kept").
tests/test_policy_context.py checks this decomposition against `MemoryModel.peak_bytes`.
Whatever a policy picks, `finalize` checks it with `MemoryModel.fits` before it is returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rap.errors import BudgetError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.policy.decision import Decision
from rap.policy.evaluator import QualityModel, block_index, drop_vector, mask_from_keep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Costs:
    """Peak bytes of any keep vector for one request, for each KV keep ratio."""

    request: Request
    kv_ratios: tuple[float, ...]
    base_bytes: int  # parameters outside blocks
    block_bytes: np.ndarray  # [R, 2L]: a block's parameters, plus (attention) its layer's KV at ratio r
    act_bytes: np.ndarray  # [2, 2]: activation peak by (any attention kept, any FFN kept)

    def peak(self, keep: np.ndarray, r_index: int) -> np.ndarray:
        """keep: [..., 2L] in {0, 1} -> [...] peak bytes (float64; exact for < 2**53)."""
        L = keep.shape[-1] // 2
        any_attn = keep[..., :L].any(-1).astype(int)
        any_ffn = keep[..., L:].any(-1).astype(int)
        return self.base_bytes + keep @ self.block_bytes[r_index] + self.act_bytes[any_attn, any_ffn]


class PolicyContext:
    """Memory model + block importance (profile) + quality model for one model."""

    def __init__(self, memory: MemoryModel, order: Sequence[str], quality: QualityModel,
                 scores: dict[str, float] | None = None, model_name: str = "", ladder=None):
        self.memory = memory
        self.num_layers = L = memory.shape.num_layers
        self.names = [f"attn.{i}" for i in range(L)] + [f"ffn.{i}" for i in range(L)]
        self.order = list(order)  # removal order, least important first
        if sorted(self.order) != sorted(self.names):
            from rap.errors import RapError

            raise RapError(f"the profile's order names {len(self.order)} blocks; the model has {2 * L}: "
                           "was it made for another model?")
        self.order_index = np.array([block_index(n, L) for n in self.order])
        rank = {n: i for i, n in enumerate(self.order)}
        # importance: one-shot scores when the profile has them, else the position in the order
        if scores and all(n in scores for n in self.names):
            self.importance = np.array([float(scores[n]) for n in self.names])
        else:
            self.importance = np.array([float(rank[n] + 1) for n in self.names])
        self.quality = quality
        self.kv_ratios = tuple(quality.kv_ratios)
        self.model_name = model_name
        self.empty = BlockMask((False,) * L, (False,) * L)
        self.full = BlockMask.full(L)
        base = memory.param_bytes(self.empty)
        self.base_bytes = base
        singles = [self._single(i) for i in range(2 * L)]
        self.block_param_bytes = np.array([memory.param_bytes(m) - base for m in singles], dtype=np.float64)
        self._single_attn = singles[:L]
        self.total_block_param_bytes = float(self.block_param_bytes.sum())
        self.log_max_context = math.log(max(memory.shape.max_context, 2))
        # layers whose KV bytes can differ (sliding vs full attention): one representative each
        types = memory.shape.layer_types or ("full",) * L
        self._kv_groups: dict[str, list[int]] = {}
        for i in range(L):
            self._kv_groups.setdefault(types[i] if i < len(types) else "full", []).append(i)
        self._act_masks = {(a, f): BlockMask((a,) + (False,) * (L - 1), (f,) + (False,) * (L - 1))
                           for a in (False, True) for f in (False, True)}
        self._ladder = ladder
        self.repairs = 0  # decisions finalize had to repair (a policy bug if ever > 0)

    def _single(self, index: int) -> BlockMask:
        L = self.num_layers
        keep = np.zeros(2 * L, dtype=bool)
        keep[index] = True
        return mask_from_keep(keep)

    # ---- bytes ------------------------------------------------------------------------------
    def costs(self, request: Request) -> Costs:
        m = self.memory
        block = np.tile(self.block_param_bytes, (len(self.kv_ratios), 1))
        for r_i, r in enumerate(self.kv_ratios):
            for layers in self._kv_groups.values():
                kv = m.kv_bytes(request, self._single_attn[layers[0]], r)
                block[r_i, layers] += kv
        decode = {k: m.decode_activation_bytes(request, mask) for k, mask in self._act_masks.items()}
        act = np.zeros((2, 2))
        for (a, f), mask in self._act_masks.items():
            act[int(a), int(f)] = max(m.prefill_activation_bytes(request, mask), decode[(a, f)])
        return Costs(request, self.kv_ratios, self.base_bytes, block, act)

    def smallest_peak(self, request: Request, costs: Costs | None = None) -> int:
        """Peak bytes of the smallest runnable configuration: every block dropped (no KV cache)."""
        if costs is not None:
            return int(costs.base_bytes + costs.act_bytes[0, 0])
        return self.memory.peak_bytes(self.empty, request, min(self.kv_ratios))

    def check_budget(self, request: Request, budget_bytes: int, costs: Costs | None = None) -> None:
        smallest = self.smallest_peak(request, costs)
        if budget_bytes < smallest:
            raise BudgetError(
                f"nothing fits in {format_bytes(budget_bytes)}: even with every block dropped this request "
                f"(batch {request.batch}, prompt {request.prompt}, new {request.new_tokens}) needs "
                f"{format_bytes(smallest)}; raise the budget or shrink the batch/prompt/new tokens")

    # ---- quality ----------------------------------------------------------------------------
    def predicted_log_ratio(self, mask: BlockMask, kv_ratio: float, request: Request) -> float:
        """The ladder's value for masks on it (measured / residual-corrected), else the quality model."""
        value = self.ladder.value_of(mask)
        if value is None:
            value = self.quality.mask_log_ratio(mask)
        return value + self.quality.kv_penalty(kv_ratio, request.prompt)

    @property
    def ladder(self):
        if self._ladder is None:
            from rap.policy.ladder import MaskLadder

            self._ladder = MaskLadder.from_order(self.quality, self.num_layers, self.order)
        return self._ladder

    # ---- the one exit -------------------------------------------------------------------------
    def finalize(self, policy: str, mask: BlockMask, kv_ratio: float, request: Request, budget_bytes: int,
                 predicted: float | None = None) -> Decision:
        """Check (mask, kv_ratio) with MemoryModel.fits and return it as a Decision.

        A candidate that does not fit is never returned: blocks are dropped in the profile's
        removal order until it fits (logged, and counted in `repairs` so evaluations can see
        it); if even the empty mask does not fit, BudgetError.
        """
        repaired = False
        if not self.memory.fits(budget_bytes, mask, request, kv_ratio):
            self.check_budget(request, budget_bytes)  # BudgetError if even the empty mask does not fit
            repaired = True
            kv_ratio = min(self.kv_ratios)  # compressing more is the cheapest repair
            for name in self.order:
                if self.memory.fits(budget_bytes, mask, request, kv_ratio):
                    break
                if mask.keeps(name):
                    mask = mask.drop(name)
            log.warning("%s picked a configuration that does not fit; repaired to %s (kv %.2f)", policy, mask, kv_ratio)
            predicted = None
            if not self.memory.fits(budget_bytes, mask, request, kv_ratio):  # pragma: no cover - see check_budget
                raise BudgetError(f"{policy}: no configuration fits {format_bytes(budget_bytes)}")
        if predicted is None:
            predicted = self.predicted_log_ratio(mask, kv_ratio, request)
        self.repairs += int(repaired)
        bd = self.memory.breakdown(mask, request, kv_ratio)
        return Decision(mask, kv_ratio, bd.total_bytes, policy, request=request, budget_bytes=int(budget_bytes),
                        breakdown=bd, predicted_log_ratio=float(predicted))

    def keep_vector(self, mask: BlockMask) -> np.ndarray:
        return 1.0 - drop_vector(mask)
