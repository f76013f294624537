"""The engine's built-in greedy policy, the default removal orders, and `as_policy` (what the engine accepts).

Every policy speaks `decide(request, budget_bytes) -> rap.policy.decision.Decision` over the memory model
it was built with; the engine builds its policy over its own memory model (`as_policy`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rap.core.mask import BlockMask, block_name
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.errors import BudgetError, RapError
from rap.policy.decision import Decision, Policy

log = logging.getLogger(__name__)


def kv_layout_for_bits(kv_bits: int):
    """The KV layout the memory model plans a decision's bits with (None: the model's default layout)."""
    if kv_bits == 16:
        return None
    from rap.kv.decode_cache import KVLayout

    return KVLayout("adakv", kv_bits)  # RequestError for unsupported bits (16, 8 and 4 are supported)


def default_removal_order(num_layers: int) -> list[str]:
    """No profile: FFN blocks from the last layer backwards, then attention blocks likewise.

    Late layers change the residual stream least in most LMs, and FFN blocks are the larger ones,
    so this frees the most bytes for the least quality in the absence of measured importance.
    """
    return [block_name("ffn", i) for i in reversed(range(num_layers))] + [
        block_name("attn", i) for i in reversed(range(num_layers))]


def complete_order(order: Sequence[str] | None, num_layers: int) -> list[str]:
    """A profile's removal order, then every block it does not rank in the default order: a profile
    stopped early (`rap profile --steps 12`) still lets a policy go as far as the budget needs."""
    ranked = list(order or [])
    seen = set(ranked)
    return ranked + [b for b in default_removal_order(num_layers) if b not in seen]


class GreedyPolicy:
    """Drop blocks in a removal order (a profile's "order", else `default_removal_order`) until the
    memory model says the request fits (binary search: peak bytes only fall as more blocks go)."""

    name = "greedy"

    def __init__(self, memory_model: MemoryModel, order: Sequence[str] | None = None, kv_ratio: float = 1.0,
                 kv_bits: int = 16):
        self.memory_model = memory_model
        self.order = list(order) if order is not None else None
        self.kv_ratio = kv_ratio
        self.kv_bits = kv_bits
        kv_layout_for_bits(kv_bits)  # unsupported bits fail here, not at the first request

    @classmethod
    def from_profile(cls, memory_model: MemoryModel, profile: dict | str | Path | None) -> GreedyPolicy:
        if profile is None:
            return cls(memory_model)
        if not isinstance(profile, dict):
            from rap.policy import _read

            bundle, profile = _read(profile)  # a profile .json, or a trained policy .zip carrying its order
            if bundle is not None:
                return cls(memory_model, bundle.order)
        if "order" not in profile:
            raise RapError('the profile has no "order" (list of blocks, least important first)')
        return cls(memory_model, profile["order"])

    def decide(self, request: Request, budget_bytes: int) -> Decision:
        memory_model = self.memory_model
        num_layers = memory_model.shape.num_layers
        order = complete_order(self.order, num_layers)

        layout = kv_layout_for_bits(self.kv_bits)

        def peak(count: int) -> int:
            return memory_model.peak_bytes(BlockMask.from_order(num_layers, order, count), request, self.kv_ratio,
                                           layout)

        # Peak bytes only fall as more blocks go, so the fewest drops that fit is a binary search.
        lo, hi = 0, len(order)
        if peak(hi) > budget_bytes:
            raise BudgetError(
                f"a batch of {request.batch} x {request.total_tokens} tokens needs {format_bytes(peak(hi))} even with "
                f"all {len(order)} droppable blocks dropped, but the budget is {format_bytes(budget_bytes)}")
        while lo < hi:
            mid = (lo + hi) // 2
            if peak(mid) <= budget_bytes:
                hi = mid
            else:
                lo = mid + 1
        mask = BlockMask.from_order(num_layers, order, lo)
        return Decision(mask, self.kv_ratio, peak(lo), self.name, kv_bits=self.kv_bits, request=request,
                        budget_bytes=int(budget_bytes))


def default_policy(memory_model: MemoryModel, profile: dict | str | Path | None = None,
                   model: str | None = None) -> Policy:
    """For a model with a shipped level profile (`rap.policy.bundled_level_profile`): the level solver
    (rap.policy.solver; the held-out winner, see rap.policy.DEFAULT_LEVEL_POLICY). Otherwise the precision
    ladder (int8, then int4, before any drop: rap.policy.precision) over the drop-only default
    (`default_drop_policy`)."""
    if model is not None:
        from rap.policy import DEFAULT_LEVEL_POLICY, bundled_level_profile, make_level_policy

        path = bundled_level_profile(model)
        if path is not None and path.exists():
            return make_level_policy(DEFAULT_LEVEL_POLICY, memory_model, path)
    from rap.policy.precision import PrecisionLadder

    return PrecisionLadder(memory_model, lambda leveled: default_drop_policy(leveled, profile))


def default_drop_policy(memory_model: MemoryModel, profile: dict | str | Path | None = None) -> Policy:
    """rap.policy's drop-only default for this profile (its held-out winner, or GreedyPolicy without one)."""
    from rap.policy import (
        default_policy as package_default,  # rap.policy's __init__ imports this module lazily
    )

    return package_default(memory_model, profile=profile)


def as_policy(policy: Any, memory_model: MemoryModel, profile: dict | str | Path | None = None,
              model: str | None = None) -> Any:
    """What the engine plans with, over its `memory_model`: None -> default_policy (the level solver where
    `model` ships a level profile, else the precision ladder); "drop" -> the drop-only default; "greedy" ->
    GreedyPolicy; "precision" -> the precision ladder; "solver" / "int8-only" / "int4-only" -> that level
    policy over `model`'s level profile; another name or a policy .zip -> rap.policy's policy; an object
    with .decide(request, budget_bytes) or a callable(request, budget_bytes) -> itself."""
    if policy is None:
        return default_policy(memory_model, profile, model)
    if isinstance(policy, str):
        from rap.policy import LEVEL_POLICY_NAMES, bundled_level_profile, make_level_policy

        if policy in LEVEL_POLICY_NAMES:
            path = bundled_level_profile(model) if model else None
            if path is None or not path.exists():
                raise RapError(f"policy {policy!r} needs a level profile; none ships for {model!r} "
                               "(make one: rap profile MODEL --method levels)")
            return make_level_policy(policy, memory_model, path)
        if policy == "greedy":
            return GreedyPolicy.from_profile(memory_model, profile)
        if policy in ("drop", "drop-only"):
            return default_drop_policy(memory_model, profile)
        if policy in ("precision", "precision-ladder"):  # int8 / int4 before any drop (rap.policy.precision)
            return default_policy(memory_model, profile)
        from rap.policy import load_policy  # named policies

        return load_policy(policy, memory_model, profile=profile)
    if hasattr(policy, "decide") or callable(policy):
        return policy
    raise RapError(f"a policy needs a decide(request, budget_bytes) method, got {policy!r}")
