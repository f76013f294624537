"""The engine's side of a policy: `Decision` (what runs for one batch) and the built-in greedy policy.

`decide(memory_model, request, budget_bytes, resident_mask)` is the signature the engine calls;
rap.policy's named and trained policies are adapted to it (`rap.policy.engine_policy`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence


from rap.errors import BudgetError, RapError
from rap.core.mask import BlockMask, block_name
from rap.core.memory import MemoryModel, Request, format_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Which blocks run and how much of the prompt's KV cache is kept, for one batch."""

    mask: BlockMask
    kv_ratio: float = 1.0
    predicted_peak_bytes: int = 0
    policy: str = ""
    kv_press: str | None = None  # the press that compressed the KV cache (None: kv_ratio 1, nothing compressed)
    kv_bits: int = 16  # KV storage: 16 = the model's dtype, 8 = int8 keys and values (rap.kv.decode_cache)

    def to_dict(self) -> dict:
        return {"mask": str(self.mask), "dropped": list(self.mask.dropped), "kv_ratio": self.kv_ratio,
                "kv_press": self.kv_press, "kv_bits": self.kv_bits, "predicted_peak_bytes": self.predicted_peak_bytes,
                "policy": self.policy}


def kv_layout_for_bits(kv_bits: int):
    """The KV layout the memory model plans a decision's bits with (None: the model's default layout)."""
    if kv_bits == 16:
        return None
    from rap.kv.decode_cache import KVLayout

    return KVLayout("adakv", kv_bits)  # RequestError for unsupported bits


class Policy(Protocol):
    def decide(self, memory_model: MemoryModel, request: Request, budget_bytes: int,
               resident_mask: BlockMask | None) -> Any: ...


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
    memory model says the request fits. Stands in for rap.policy until that package exists."""

    name = "greedy"

    def __init__(self, order: Sequence[str] | None = None, kv_ratio: float = 1.0, kv_bits: int = 16):
        self.order = list(order) if order is not None else None
        self.kv_ratio = kv_ratio
        self.kv_bits = kv_bits
        kv_layout_for_bits(kv_bits)  # unsupported bits fail here, not at the first request

    @classmethod
    def from_profile(cls, profile: dict | str | Path | None) -> "GreedyPolicy":
        if profile is None:
            return cls()
        if not isinstance(profile, dict):
            import json

            try:
                profile = json.loads(Path(profile).read_text())
            except (OSError, ValueError) as e:
                raise RapError(f"cannot read profile {profile}: {e}") from None
        if "order" not in profile:
            raise RapError('the profile has no "order" (list of blocks, least important first)')
        return cls(profile["order"])

    def decide(self, memory_model: MemoryModel, request: Request, budget_bytes: int,
               resident_mask: BlockMask | None = None) -> Decision:
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
        return Decision(mask, self.kv_ratio, peak(lo), self.name, kv_bits=self.kv_bits)


def default_policy(profile: dict | str | Path | None = None, model: str | None = None) -> Any:
    """For a model with a shipped level profile (`rap.policy.bundled_level_profile`): the level solver
    (rap.policy.solver; the held-out winner, see rap.policy.DEFAULT_LEVEL_POLICY). Otherwise the precision
    ladder (int8, then int4, before any drop: rap.policy.precision) over the drop-only default."""
    if model is not None:
        from rap.policy import DEFAULT_LEVEL_POLICY, bundled_level_profile

        path = bundled_level_profile(model)
        if path is not None and path.exists():
            return level_policy(DEFAULT_LEVEL_POLICY, path)
    from rap.policy.precision import PrecisionLadder

    return PrecisionLadder(inner=default_drop_policy(profile))


def level_policy(name: str, level_profile) -> Any:
    """A level policy by name (rap.policy.LEVEL_POLICY_NAMES) in the engine's convention."""
    from rap.policy import LEVEL_POLICY_NAMES
    from rap.policy.solver import SolverEnginePolicy

    allow = {"solver": None, "int8-only": ("int8",), "int4-only": ("int4g32", "int4g64", "int4g128")}
    if name not in allow:
        raise RapError(f"unknown level policy {name!r}; use one of: {', '.join(LEVEL_POLICY_NAMES)}")
    return SolverEnginePolicy(level_profile, allow[name], name)


def default_drop_policy(profile: dict | str | Path | None = None) -> Any:
    """rap.policy's drop-only default for this profile (its held-out winner, or GreedyPolicy without one)."""
    from rap.policy import default_policy as package_default  # rap.policy's __init__ imports this module

    return package_default(profile=profile)


def as_policy(policy: Any, profile: dict | str | Path | None = None, model: str | None = None) -> Any:
    """None -> default_policy (the level solver where `model` ships a level profile, else the precision
    ladder); "drop" -> the drop-only default; "greedy" -> GreedyPolicy; "solver" / "int8-only" /
    "int4-only" -> that level policy over `model`'s level profile; an object with .decide or a callable -> itself."""
    if policy is None:
        return default_policy(profile, model)
    if isinstance(policy, str):
        from rap.policy import LEVEL_POLICY_NAMES, bundled_level_profile

        if policy in LEVEL_POLICY_NAMES:
            path = bundled_level_profile(model) if model else None
            if path is None or not path.exists():
                raise RapError(f"policy {policy!r} needs a level profile; none ships for {model!r} "
                               "(make one: rap profile MODEL --method levels)")
            return level_policy(policy, path)
        if policy == "greedy":
            return GreedyPolicy.from_profile(profile)
        if policy in ("drop", "drop-only"):
            return default_drop_policy(profile)
        if policy in ("precision", "precision-ladder"):  # int8 / int4 before any drop (rap.policy.precision)
            from rap.policy.precision import PrecisionLadder

            return PrecisionLadder(profile=profile)
        from rap.policy import load_policy  # named policies

        return load_policy(policy, profile=profile)
    if hasattr(policy, "decide") or callable(policy):
        return policy
    raise RapError(f"a policy needs a decide(memory_model, request, budget_bytes, resident_mask) method, got {policy!r}")


def _call_policy(policy: Any, memory_model: MemoryModel, request: Request, budget_bytes: int,
                 resident_mask: BlockMask) -> Decision:
    decide = policy.decide if hasattr(policy, "decide") else policy
    raw = decide(memory_model, request, budget_bytes, resident_mask)
    mask = raw if isinstance(raw, BlockMask) else raw.mask
    kv_ratio = float(getattr(raw, "kv_ratio", 1.0) or 1.0)
    kv_bits = int(getattr(raw, "kv_bits", 16) or 16)
    name = getattr(raw, "policy", None) or getattr(policy, "name", None) or type(policy).__name__
    layout = kv_layout_for_bits(kv_bits)
    return Decision(mask, kv_ratio, memory_model.peak_bytes(mask, request, kv_ratio, layout), str(name),
                    kv_bits=kv_bits)
