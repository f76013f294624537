"""MaskLadder: one mask per (attention blocks kept, FFN blocks kept) pair, and the one-shot action
space built on it.

Why a ladder: in a model whose layers all cost the same (every Llama/Qwen, Gemma aside), a
mask's peak bytes depend only on how many attention and FFN blocks it keeps (plus the KV ratio),
so the best configuration for any request is "the best mask with n_a attention and n_f FFN
blocks" for some (n_a, n_f, r). The ladder precomputes that best-known mask for each of the
(L+1)^2 pairs (offline, where quality can be measured), and a decision becomes one choice
among R * (L+1)^2 actions whose fit is computed exactly for the whole table in one matrix
product. Models with layers of different KV cost (sliding windows) still work: the table's fit
is computed per mask, not per count.

`LadderPolicy` picks the best-scoring feasible (r, entry) by enumeration. The RL agent (rl.py)
learns the hard part of that choice from request features: the KV ratio and how many attention
blocks to keep (R * (L+1) actions); given those, the FFN count is the best one that fits
(`split_choices`), because keeping fewer FFN blocks than the budget allows never helps.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rap.core.mask import BlockMask
from rap.core.memory import Request
from rap.policy.evaluator import block_index, mask_from_keep, mask_key

def n_features(num_kv_ratios: int) -> int:
    """Length of `observe`'s vector."""
    return 13 + 2 * num_kv_ratios


class MaskLadder:
    """keep: [(L+1)^2, 2L] {0,1}; entry n_a * (L+1) + n_f keeps n_a attention and n_f FFN blocks.
    values: [(L+1)^2] predicted (or measured) log(PPL / PPL_dense) of each entry's mask."""

    def __init__(self, keep: np.ndarray, values: np.ndarray):
        self.keep = np.asarray(keep, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.float64)
        self.num_layers = self.keep.shape[1] // 2
        L = self.num_layers
        self.any_attn = self.keep[:, :L].any(1).astype(int)
        self.any_ffn = self.keep[:, L:].any(1).astype(int)
        self._masks = [mask_from_keep(k) for k in self.keep]
        self._entry = {m: i for i, m in enumerate(self._masks)}

    @property
    def size(self) -> int:
        return self.keep.shape[0]

    def index(self, kept_attn: int, kept_ffn: int) -> int:
        return kept_attn * (self.num_layers + 1) + kept_ffn

    def mask(self, entry: int) -> BlockMask:
        return self._masks[entry]

    def value_of(self, mask: BlockMask) -> float | None:
        """The ladder's predicted log ratio of `mask`, None if the mask is not on the ladder."""
        entry = self._entry.get(mask)
        return None if entry is None else float(self.values[entry])

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def keep_matrix(num_layers: int, attn_order: Sequence[str], ffn_order: Sequence[str]) -> np.ndarray:
        """Entry (n_a, n_f) drops the first L-n_a of attn_order and L-n_f of ffn_order."""
        L = num_layers
        a_idx = [block_index(n, L) for n in attn_order]
        f_idx = [block_index(n, L) for n in ffn_order]
        keep = np.ones(((L + 1) ** 2, 2 * L))
        for n_a in range(L + 1):
            for n_f in range(L + 1):
                row = keep[n_a * (L + 1) + n_f]
                row[a_idx[: L - n_a]] = 0
                row[f_idx[: L - n_f]] = 0
        return keep

    @classmethod
    def from_order(cls, quality, num_layers: int, order: Sequence[str]) -> "MaskLadder":
        """Entry (n_a, n_f) drops the first L-n_a attention and L-n_f FFN blocks of `order`.

        With the profile's order, every mask gsi-order, ffn-first and attn-first can pick is on
        the ladder, so the ladder policies differ from them only in which (n_a, n_f, r) they pick.
        Values: measured where the calibration set measured the mask; elsewhere the surrogate
        plus the measured-minus-surrogate residual interpolated (bilinearly in the counts) from
        the measured grid; finally made monotone (keeping more blocks is never predicted worse).
        """
        L = num_layers
        attn = [n for n in order if n.startswith("attn")]
        ffn = [n for n in order if n.startswith("ffn")]
        keep = cls.keep_matrix(L, attn, ffn)
        masks = [mask_from_keep(k) for k in keep]
        surrogate = quality.surrogate.predict_drop(1.0 - keep).reshape(L + 1, L + 1)
        measured = np.array([quality.measured.get(mask_key(m), np.nan) for m in masks]).reshape(L + 1, L + 1)
        measured = np.where(np.isnan(measured), np.nan, np.maximum(measured, 0.0))
        values = surrogate + _interpolated_residual(measured - surrogate)
        values = np.where(np.isnan(measured), np.maximum(values, 0.0), measured)
        for a in range(L + 1):  # monotone: a mask keeping more of either kind is never worse
            for f in range(L + 1):
                if a:
                    values[a, f] = min(values[a, f], values[a - 1, f])
                if f:
                    values[a, f] = min(values[a, f], values[a, f - 1])
        return cls(keep, values.reshape(-1))

    @staticmethod
    def grid_masks(num_layers: int, order: Sequence[str], step: int) -> list[BlockMask]:
        """Ladder masks at every `step`-th count of each kind (plus both ends): what to measure."""
        L = num_layers
        counts = sorted(set(range(0, L + 1, max(1, step))) | {0, 1, L - 1, L})
        attn = [n for n in order if n.startswith("attn")]
        ffn = [n for n in order if n.startswith("ffn")]
        return [BlockMask.from_drop(L, attn[: L - a] + ffn[: L - f]) for a in counts for f in counts]

    def all_masks(self) -> list[BlockMask]:
        return list(self._masks)

    def to_dict(self) -> dict:
        return {"keep": [mask_key(m) for m in self._masks], "values": [float(v) for v in self.values]}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskLadder":
        from rap.policy.evaluator import mask_from_key

        masks = [mask_from_key(k) for k in d["keep"]]
        keep = np.array([[*m.keep_attn, *m.keep_ffn] for m in masks], dtype=np.float64)
        return cls(keep, np.asarray(d["values"]))


def _interpolated_residual(residual: np.ndarray) -> np.ndarray:
    """Bilinear interpolation over (n_a, n_f) of residuals known on a regular sub-grid (NaN elsewhere)."""
    known = ~np.isnan(residual)
    grid = [c for c in range(residual.shape[0]) if known[c].sum() >= 2 and known[:, c].sum() >= 2]
    grid = [c for c in grid if all(known[c, g] and known[g, c] for g in grid)]
    if len(grid) < 2:
        return np.zeros_like(residual)
    sub = residual[np.ix_(grid, grid)]
    x = np.arange(residual.shape[0])
    rows = np.stack([np.interp(x, grid, sub[i]) for i in range(len(grid))])  # [G, L+1] along n_f
    return np.stack([np.interp(x, grid, rows[:, j]) for j in range(residual.shape[1])], axis=1)


# ---- the one-shot action space ------------------------------------------------------------------
def peaks(ladder: MaskLadder, costs) -> np.ndarray:
    """[R, E] peak bytes of every (KV ratio, ladder entry)."""
    act = costs.act_bytes[ladder.any_attn, ladder.any_ffn]  # [E]
    return costs.base_bytes + (ladder.keep @ costs.block_bytes.T).T + act[None, :]


def feasible(ladder: MaskLadder, costs, budget_bytes: int) -> np.ndarray:
    """[R * E] bool: which actions fit (flattened as r_index * E + entry)."""
    return (peaks(ladder, costs) <= budget_bytes).reshape(-1)


def action_scores(context, ladder: MaskLadder, request: Request) -> np.ndarray:
    """[R * E] predicted log ratio of every action (lower is better)."""
    pen = np.array([context.quality.kv_penalty(r, request.prompt) for r in context.kv_ratios])
    # ties (e.g. several configurations predicted lossless) go to more kept blocks, then more KV
    tie = 1e-9 * (ladder.keep.shape[1] - ladder.keep.sum(1))[None, :] + 1e-10 * np.arange(len(pen))[:, None]
    return (ladder.values[None, :] + pen[:, None] + tie).reshape(-1)


def decode_action(ladder: MaskLadder, kv_ratios: Sequence[float], action: int) -> tuple[BlockMask, float]:
    """Full action space (R * E): (KV ratio index, ladder entry)."""
    r_index, entry = divmod(int(action), ladder.size)
    return ladder.mask(entry), kv_ratios[r_index]


def split_choices(context, ladder: MaskLadder, request: Request, costs, budget_bytes: int):
    """The agent's action space: (KV ratio, attention blocks kept), R * (L+1) actions.

    For each, the FFN count is not a choice: the best-valued ladder entry with that many attention
    blocks that fits is taken (exact, by enumeration). Returns (ok [R*(L+1)] bool: some entry
    fits; entry [R*(L+1)] int: the entry to use, -1 where none fits).
    """
    L1 = ladder.num_layers + 1
    R = len(context.kv_ratios)
    fits = (peaks(ladder, costs) <= budget_bytes).reshape(R, L1, L1)
    scores = np.where(fits, action_scores(context, ladder, request).reshape(R, L1, L1), np.inf)
    best_f = scores.argmin(-1)  # [R, L1]
    ok = np.isfinite(np.take_along_axis(scores, best_f[..., None], -1)[..., 0])
    entry = np.where(ok, np.arange(L1)[None, :] * L1 + best_f, -1)
    return ok.reshape(-1), entry.reshape(-1)


def decode_split(ladder: MaskLadder, kv_ratios: Sequence[float], action: int, entries: np.ndarray):
    """Split action -> (mask, kv ratio); mask None if that (ratio, attention count) has no fitting entry."""
    r_index = int(action) // (ladder.num_layers + 1)
    entry = int(entries[int(action)])
    return (ladder.mask(entry) if entry >= 0 else None), kv_ratios[r_index]


def observe(context, request: Request, budget_bytes: int, costs) -> np.ndarray:
    """Request and budget as scale-free features (fractions and log lengths), float32 [n_features(R)]."""
    L = context.num_layers
    block1 = costs.block_bytes[0]  # parameters + KV at r = 1
    attn_all, ffn_all = float(block1[:L].sum()), float(block1[L:].sum())
    dense_params = costs.base_bytes + context.total_block_param_bytes
    dense_act = float(costs.act_bytes[1, 1])
    dense_kv = attn_all + ffn_all + costs.base_bytes - dense_params
    dense = dense_params + dense_kv + dense_act
    b = float(budget_bytes)
    room = np.full(len(costs.kv_ratios), b - costs.base_bytes - dense_act)
    return np.array([
        b / dense,
        dense_params / dense,
        dense_kv / dense,
        dense_act / dense,
        math.log(request.batch) / math.log(64),
        math.log(request.prompt) / context.log_max_context,
        math.log(request.new_tokens) / math.log(1024),
        request.prompt / request.total_tokens,
        attn_all / b,
        ffn_all / b,
        costs.base_bytes / b,
        dense_act / b,
        float(costs.act_bytes[0, 1]) / b,
        # the frontier's geometry: how many attention (FFN) blocks alone would fit, per KV ratio
        *np.clip(room / (costs.block_bytes[:, :L].mean(1) * L), 0.0, 2.0),
        *np.clip(room / (costs.block_bytes[:, L:].mean(1) * L), 0.0, 2.0),
    ], dtype=np.float32)


class LadderPolicy:
    """Enumerate all R * (L+1)^2 (KV ratio, ladder entry) actions; take the best that fits."""

    name = "ladder"

    def __init__(self, context):
        self.context = context
        self.ladder = context.ladder

    def decide(self, request: Request, budget_bytes: int):
        ctx = self.context
        costs = ctx.costs(request)
        ctx.check_budget(request, budget_bytes, costs)
        ok = feasible(self.ladder, costs, budget_bytes)
        scores = np.where(ok, action_scores(ctx, self.ladder, request), np.inf)
        action = int(np.argmin(scores))
        mask, r = decode_action(self.ladder, ctx.kv_ratios, action)
        predicted = float(scores[action]) if math.isfinite(scores[action]) else None
        return ctx.finalize(self.name, mask, r, request, budget_bytes, predicted)
