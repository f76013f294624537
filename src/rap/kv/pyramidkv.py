"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scores, with per-layer budgets that shrink with depth.

Layer budgets follow the Ada-KV repository's pyramid (FFY0/AdaKV `AdaptiveSnapKVCluster`): every
layer keeps the observation window plus a share of the rest that falls linearly from the first
compressed layer to the last, steepness `beta`; here they are rounded so that they sum exactly to
num_layers x the average budget, which keeps the memory model's KV term exact.

`pyramid_budgets` is that schedule as a plain function: this press, rap's decoder
(`kv_press="pyramidkv"` / `"ada-pyramidkv"`, `rap.decode.compress`) and the memory model
(`rap.core.memory.MemoryModel.kv_layer_tokens`) all call it, so the three agree on every layer's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from rap.kv.snapkv import SnapKV


def round_to_total(values: list[float], total: int) -> list[int]:
    """Integers close to `values` summing to `total` (largest remainders get the rounding)."""
    floors = [int(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


PYRAMID_BETA = 20.0


def pyramid_budgets(num_layers: int, prompt_tokens: int, tokens: int, window: int,
                    beta: float = PYRAMID_BETA) -> list[int]:
    """Average kept tokens per KV head for each of `num_layers` compressed layers (first to last),
    summing to num_layers * tokens: the observation window `window` plus a share of the rest that
    falls linearly with depth (first layer high, last low = base / beta, base = tokens - window).

    PyramidKV's own clamps: the first layer keeps at most the whole prompt (then the last layer
    gets what the sum leaves), and a budget at or below the window (no room for a pyramid), a
    single layer, or a budget of the whole prompt gives every layer `tokens` (the uniform split).
    Every layer so keeps between 1 and `prompt_tokens` tokens.
    """
    w = min(window, prompt_tokens - 1)
    base = tokens - w  # what is left after the window, on average
    if num_layers < 2 or base <= 0 or tokens >= prompt_tokens:
        return [tokens] * num_layers
    low = base / beta
    high = 2 * base - low
    if high > prompt_tokens - w:
        high = prompt_tokens - w
        low = 2 * base - high
    step = (high - low) / (num_layers - 1)
    return round_to_total([w + high - i * step for i in range(num_layers)], num_layers * tokens)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: float = PYRAMID_BETA

    def layer_budgets(self, num_layers: int, prompt_tokens: int, tokens: int) -> list[int]:
        return pyramid_budgets(num_layers, prompt_tokens, tokens, self.window_size, self.beta)
