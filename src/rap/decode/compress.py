"""KV keep on the decoder's cache: which prompt tokens each kept attention layer keeps, and writing them.

KV keep ratio (`Decoder.generate(..., kv_ratio=r, kv_press=..., kv_bits=...)`, r < 1): right after its
prefill, each kept attention layer scores its prompt with the one SnapKV scorer
(`rap.kv.scorer.SnapKVScorer`, also behind rap.kv's HF-path presses and the policy's KV penalty;
the observation window always ranks first) and row b keeps k_b = max(1, ceil(r * P_b)) tokens per
KV head on average:

* kv_press="adakv" (the default): Ada-KV. The row's Hkv * k_b tokens go to the top scores of all
  KV heads together, each head first keeping its own top floor(0.2 * k_b) (Ada-KV's safeguard), in
  a `rap.kv.decode_cache.FlatLayerCache`: per-(row, KV head) segments in one flat buffer, read by
  the varlen decode attention (`rap.kv.attention`: the Triton kernel on CUDA, the PyTorch
  reference on CPU). Its shapes depend only on (batch bucket, cache length, bits), so the step is
  captured as before; a segment's length lives on the device;
* kv_press="snapkv": uniform per-head budgets in the dense buffers [B, Hkv, T, D]: row b's kept
  tokens sit in ascending order in columns [K - k_b, K) (K = max_b k_b), decoding starts at column
  K and `pad[b]` = K - k_b masks the rest;
* kv_press="pyramidkv" / "ada-pyramidkv": PyramidKV's per-layer budgets
  (`rap.kv.pyramidkv.pyramid_budgets`, the one schedule the HF-path `PyramidKV` and the memory
  model use too): the kept attention layers, first to last, keep k_{b,l} tokens per KV head on
  average, falling with depth and summing to L * k_b, in a flat cache whose layer l has its own
  length T_l (its budget plus the decode reserve, rounded like every cache length). Every head
  of the layer keeps k_{b,l} ("pyramidkv") or the row's Hkv * k_{b,l} are split over heads by
  Ada-KV ("ada-pyramidkv"). The budgets come from the longest prompt, as the memory model plans;
  a shorter row's layer budget is capped by that layer's room (T_l minus the new tokens), which
  only a rounding coincidence makes bind;
* kv_bits=8 / 4: int8 or packed int4 keys and values with one fp32 scale per (token, KV head), in the flat cache
  (any ratio, either press), quantised on write and dequantised in the attend.

Either way `shift[b]` = P_b - k_b keeps every decoded token at its true RoPE position, only the
layer being compressed ever holds its full prompt K/V (the transient q, k, v of its prefill), and
the cache holds `MemoryModel(kv_length_quantum=LENGTH_QUANTUM).kv_bytes(..., kv_layout=...)`
bytes exactly (the compressed length rounded up like every cache length).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rap.kv.decode_cache import ADAKV_ALPHA, FlatLayerCache, KVLayout
from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer, adaptive_keep, uniform_keep

SNAPKV_WINDOW = DEFAULT_SCORER.window  # kept for callers; the scorer is rap.kv.scorer.DEFAULT_SCORER
SNAPKV_KERNEL = DEFAULT_SCORER.kernel


@dataclass(frozen=True, eq=False)
class KeepPlan:
    """Which prompt tokens a compressed prefill keeps: row b keeps `kept[b]` tokens per KV head on
    average. pad [n]: first real prompt column per row. Dense (uniform SnapKV) caches: every head
    keeps its top kept[b] into cache columns [width - kept[b], width). Flat caches (`adaptive`, or
    int8): the row's Hkv * kept[b] tokens, split over heads by Ada-KV (or uniformly), go to the
    row's `FlatLayerCache` segments with `reserve[b]` free rows per head for decoding."""

    pad: torch.Tensor
    kept: torch.Tensor
    width: int
    scorer: SnapKVScorer = DEFAULT_SCORER
    adaptive: bool = False
    reserve: torch.Tensor | None = None
    everything: bool = False  # keep every real prompt token (int8 at ratio 1): no scoring
    r0: int = 0  # first batch row of this prefill chunk (flat caches)
    # PyramidKV (flat caches): [n, num_layers] kept tokens and decode reserve per (row, model layer);
    # None: every layer keeps `kept` with `reserve`
    layer_kept: torch.Tensor | None = None
    layer_reserve: torch.Tensor | None = None

    def rows(self, r0: int, r1: int) -> "KeepPlan":
        """The plan of batch rows [r0, r1) (a prefill chunk)."""
        def part(t):
            return None if t is None else t[r0:r1]

        return replace(self, pad=self.pad[r0:r1], kept=self.kept[r0:r1], reserve=part(self.reserve),
                       layer_kept=part(self.layer_kept), layer_reserve=part(self.layer_reserve))

    def for_layer(self, layer: int) -> "KeepPlan":
        """The plan of one model layer: its own PyramidKV budget and reserve, else this plan."""
        if self.layer_kept is None:
            return self
        return replace(self, kept=self.layer_kept[:, layer], reserve=self.layer_reserve[:, layer])


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, pad: torch.Tensor, scaling: float,
                  scorer: SnapKVScorer = DEFAULT_SCORER) -> torch.Tensor:
    """SnapKV importance of every prompt key per (row, KV head): float32 [n, Hkv, P]; the one scorer,
    `rap.kv.scorer.SnapKVScorer` (q [n, H, P, D], k [n, Hkv, P, D], pad [n])."""
    return scorer(q, k, scaling, pad)


def kept_columns(scores: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Prompt columns to keep, [n, Hkv, width]: row b's top kept[b] by score per head (ties: the
    earlier column), ascending and right-aligned; the first width - kept[b] entries are column 0,
    placeholders that the row's padding masks."""
    n, Hkv, P = scores.shape
    cols = torch.arange(P, device=scores.device).expand(n, Hkv, P)
    chosen = torch.where(uniform_keep(scores, kept), cols, -1)
    return chosen.sort(-1).values[..., P - width:].clamp_min(0)


def keep_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                plan: KeepPlan, scaling: float) -> None:
    """Write the SnapKV-kept prompt keys and values of rows [0, n) into cache columns [0, plan.width)."""
    n, _, _, D = k.shape
    idx = kept_columns(snapkv_scores(q, k, plan.pad, scaling, plan.scorer), plan.kept, plan.width)
    idx = idx[..., None].expand(-1, -1, -1, D)
    kc[:n, :, :plan.width] = k.gather(2, idx)
    vc[:n, :, :plan.width] = v.gather(2, idx)


def keep_prompt_flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: FlatLayerCache, plan: KeepPlan,
                     scaling: float) -> None:
    """Write the kept prompt keys and values of batch rows [plan.r0, plan.r0 + n) into a flat cache:
    Ada-KV's head-adaptive split of each row's Hkv * kept[b] tokens (or a uniform one); `plan` is
    this layer's (`KeepPlan.for_layer`)."""
    n, Hkv, P, _ = k.shape
    real = torch.arange(P, device=k.device)[None, :] >= plan.pad[:, None]  # [n, P]
    if plan.everything:
        keep = real[:, None, :].expand(n, Hkv, P)
    else:
        scores = snapkv_scores(q, k, plan.pad, scaling, plan.scorer)
        keep = (adaptive_keep(scores, plan.kept, ADAKV_ALPHA) if plan.adaptive else uniform_keep(scores, plan.kept))
    cache.write_prompt(plan.r0, k, v, keep, plan.reserve)


def pyramid_plan(plan: KeepPlan, layer_lengths: dict[int, int], num_layers: int, layout: KVLayout,
                 lengths: list[int], kept: list[int], max_new_tokens: int) -> KeepPlan:
    """`plan` with PyramidKV's per-layer budgets: row b's kept attention layers (`layer_lengths`' keys,
    first to last) keep `layout.layer_budgets(L, P_b, k_b)`, each capped by its layer's room (its cache
    length minus the new tokens; binds only for a row shorter than the longest), and every head of a
    layer decodes into that layer's length minus its kept count."""
    layers = sorted(layer_lengths)
    layer_kept = torch.zeros(len(lengths), num_layers, dtype=torch.long)
    room = torch.zeros(num_layers, dtype=torch.long)
    for i in layers:
        room[i] = layer_lengths[i]
    for r, (P, k) in enumerate(zip(lengths, kept)):
        for i, b in zip(layers, layout.layer_budgets(len(layers), P, k)):
            layer_kept[r, i] = max(1, min(b, P, layer_lengths[i] - max_new_tokens))
    device = plan.kept.device
    return replace(plan, layer_kept=layer_kept.to(device), layer_reserve=(room[None, :] - layer_kept).to(device))
