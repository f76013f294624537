"""A KV cache that holds a different number of tokens per KV head, with no padding.

Layout of one attention layer (`VarlenLayer`): one flat key buffer and one flat value buffer of
shape [capacity, head_dim]. Segment s = b * num_kv_heads + h (sequence b, KV head h) owns the
rows [starts[s], starts[s] + capacity[s]); its first lengths[s] rows are live. After compression
capacity[s] = kept[s] + reserve, where `reserve` is the number of decode tokens the caller plans
to append (the memory model's "new tokens"), so decoding writes in place and never copies the
prompt part. Going past the reserve regrows the buffer (one copy, amortised by doubling).

This mirrors Ada-KV's flattened cache (FFY0/AdaKV `DynamicCacheSplitHeadFlatten`, which keeps
[sum of head lengths, head_dim] per layer and cu_seqlens for flash-attn varlen), with per-head
slack so that decode appends need no CUDA extension.

`VarlenCache` is a transformers `Cache`: `model.generate(**rap.core.hf.cache_kwargs(cache))` works unchanged.
Its layers are `VarlenLayer`s for compressed attention layers, `SkippedCacheLayer`s for attention
blocks a `BlockMask` dropped (no tensors at all), and plain `DynamicSlidingWindowLayer`s for
sliding-window layers (Gemma 3), which are bounded already and are left uncompressed.
`VarlenLayer.update` returns a `FlatKV` instead of dense tensors; the attention function
registered by `rap.kv.attention.use_varlen_attention` understands it. Checked against
transformers 5.17 and 5.23 (`CacheLayerMixin` / `Cache(layers=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rap.errors import RapError
from rap.core.hf import Cache, CacheLayerMixin, DynamicCache
from rap.core.model import SkippedCacheLayer


@dataclass
class FlatKV:
    """One layer's compressed keys/values as handed to attention (instead of [B, H, T, D] tensors).

    keys, values: [capacity, head_dim]; starts, lengths: [batch * num_kv_heads] int64 on the same
    device; segment s = b * num_kv_heads + h holds rows starts[s] .. starts[s] + lengths[s] - 1.
    `max_length` is a host-side upper bound of lengths (sizes kernel grids without a device sync).
    """

    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    max_length: int
    batch: int
    num_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    def dense(self, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one segment, [length, head_dim] each (tests and debugging)."""
        start, length = int(self.starts[segment]), int(self.lengths[segment])
        return self.keys[start:start + length], self.values[start:start + length]


def _segment_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Flat row index of every live token, segment by segment: [sum(lengths)]."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(seg.numel(), device=lengths.device) - first[seg]
    return starts[seg] + within


class VarlenLayer(CacheLayerMixin):
    """One attention layer's cache with per-(sequence, KV head) lengths; see the module docstring."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, capacity: torch.Tensor,
                 batch: int, num_kv_heads: int, seen_tokens: int):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.batch, self.num_kv_heads = batch, num_kv_heads
        # Host copies size grids and decide regrowth without a device sync; device copies feed kernels.
        # (clone: on the CPU `.to` would alias them and every append would count twice)
        self.capacity_host = capacity.to("cpu", torch.int64).clone()
        self.lengths_host = lengths.to("cpu", torch.int64).clone()
        starts_host = torch.cumsum(self.capacity_host, 0) - self.capacity_host
        self.starts = starts_host.to(keys.device)
        self.lengths = self.lengths_host.to(keys.device, copy=True)
        self.compressed_lengths = self.lengths_host.clone()  # what compression kept; appends come after
        self.seen_tokens = seen_tokens  # positions seen so far (RoPE positions continue from here)
        self.is_initialized = True

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_keep_mask(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                       reserve: int = 0) -> "VarlenLayer":
        """Keep the (sequence, head, token) entries where `keep` is True.

        keys, values: [B, H, T, D]; keep: bool [B, H, T]; `reserve` free rows per segment for decoding.
        Kept tokens stay in their original order within each head.
        """
        B, H, T, D = keys.shape
        lengths = keep.sum(-1).reshape(-1).to(torch.int64)  # [B*H]
        # nonzero is row-major: segment by segment, positions in order. Indexing [b, h, t] avoids a
        # contiguous copy of the whole layer (RoPE'd keys are a transposed view).
        b, h, t = keep.nonzero(as_tuple=True)
        k_rows, v_rows = keys[b, h, t], values[b, h, t]
        capacity = lengths + reserve
        if reserve == 0:
            flat_k, flat_v = k_rows, v_rows
        else:
            total = int(capacity.sum())
            flat_k = keys.new_empty(total, D)
            flat_v = values.new_empty(total, D)
            starts = torch.cumsum(capacity, 0) - capacity
            dst = _segment_rows(starts, lengths)
            flat_k[dst], flat_v[dst] = k_rows, v_rows
        return cls(flat_k, flat_v, lengths, capacity, B, H, seen_tokens=T)

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, reserve: int = 0) -> "VarlenLayer":
        """An uncompressed layer in the flat layout (every head keeps every token)."""
        keep = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        return cls.from_keep_mask(keys, values, keep, reserve)

    # ---- views ------------------------------------------------------------------------------
    def flat(self) -> FlatKV:
        return FlatKV(self.keys, self.values, self.starts, self.lengths, int(self.lengths_host.max()),
                      self.batch, self.num_kv_heads)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (their whole storage, reserve included)."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    @property
    def tokens(self) -> int:
        """Live tokens summed over all (sequence, KV head) segments."""
        return int(self.lengths_host.sum())

    def kept_lengths(self) -> torch.Tensor:
        """Live tokens per (sequence, KV head): [B, H] on the CPU."""
        return self.lengths_host.view(self.batch, self.num_kv_heads).clone()

    # ---- CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # built initialised
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append q new tokens [B, H, q, D] to every segment; returns (FlatKV, FlatKV)."""
        B, H, q, D = key_states.shape
        if (B, H) != (self.batch, self.num_kv_heads):
            raise RapError(f"compressed cache holds batch {self.batch} x {self.num_kv_heads} KV heads, "
                           f"got {B} x {H}: generate with the same batch the prompt was compressed with")
        if bool((self.lengths_host + q > self.capacity_host).any()):
            self._grow(q)
        rows = (self.starts + self.lengths).unsqueeze(1) + torch.arange(q, device=self.starts.device)  # [S, q]
        rows = rows.reshape(-1)
        self.keys.index_copy_(0, rows, key_states.reshape(B * H * q, D).to(self.dtype))
        self.values.index_copy_(0, rows, value_states.reshape(B * H * q, D).to(self.dtype))
        self.lengths += q
        self.lengths_host += q
        self.seen_tokens += q
        flat = self.flat()
        return flat, flat

    def _grow(self, q: int) -> None:
        """Reallocate with more free rows per segment (doubling the slack, at least 64 rows)."""
        appended = self.lengths_host - self.compressed_lengths
        slack = torch.maximum(2 * (self.capacity_host - self.compressed_lengths), appended + q).clamp(min=64)
        capacity = self.compressed_lengths + slack
        self._relayout(torch.arange(self.lengths_host.numel()), capacity, self.batch)

    def _relayout(self, segments: torch.Tensor, capacity: torch.Tensor, batch: int) -> None:
        """Rebuild the buffers keeping `segments` (old segment ids, in new order) with new capacities."""
        seg_dev = segments.to(self.starts.device)
        old_rows = _segment_rows(self.starts[seg_dev], self.lengths[seg_dev])
        lengths = self.lengths_host[segments]
        new_starts = torch.cumsum(capacity, 0) - capacity
        new_rows = _segment_rows(new_starts.to(self.starts.device), lengths.to(self.starts.device))
        total, D = int(capacity.sum()), self.keys.shape[-1]
        keys, values = self.keys.new_empty(total, D), self.values.new_empty(total, D)
        keys[new_rows], values[new_rows] = self.keys[old_rows], self.values[old_rows]
        compressed = self.compressed_lengths[segments]
        self.__init__(keys, values, lengths, capacity, batch, self.num_kv_heads, self.seen_tokens)
        self.compressed_lengths = compressed

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.3 names get_max_length so (kvpress side-by-side)
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Positions, not stored tokens: the mask (when one is built) spans every position seen.
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        self.lengths.zero_()
        self.lengths_host.zero_()
        self.compressed_lengths.zero_()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last |n| appended tokens of every segment (never into the compressed prompt)."""
        n = abs(tokens_to_remove)
        if n == 0:
            return
        appended = int((self.lengths_host - self.compressed_lengths).min())
        if n > appended:
            raise RapError(f"cannot crop {n} tokens: only {appended} were appended after compression")
        self.lengths -= n
        self.lengths_host -= n
        self.seen_tokens -= n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = torch.as_tensor(indices, device="cpu").reshape(-1)
        segments = (rows.unsqueeze(1) * self.num_kv_heads + torch.arange(self.num_kv_heads)).reshape(-1)
        self._relayout(segments, self.capacity_host[segments], rows.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def offload(self) -> None:
        self.keys, self.values = self.keys.to("cpu", non_blocking=True), self.values.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.keys.device != self.device:
            self.keys = self.keys.to(self.device, non_blocking=True)
            self.values = self.values.to(self.device, non_blocking=True)


class VarlenCache(Cache):
    """A transformers Cache whose compressed attention layers are `VarlenLayer`s.

    Built by `rap.kv.compress` from the prefill's `DynamicCache` layers: each full-attention layer
    is replaced by a `VarlenLayer` right after its forward (so the full prompt cache of all layers
    never coexists), dropped attention blocks stay `SkippedCacheLayer`s.
    """

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    @classmethod
    def for_prefill(cls, config) -> "VarlenCache":
        """Dense per-layer caches of the model's own kinds (full / sliding), ready for the prompt."""
        return cls(list(DynamicCache(config=config).layers))

    @property
    def nbytes(self) -> int:
        """Bytes held by key/value tensors over all layers (what the memory model's KV term counts)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, VarlenLayer):
                total += layer.nbytes
            elif isinstance(layer, SkippedCacheLayer):
                continue
            elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                total += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        return total

    def compressed_layers(self) -> dict[int, VarlenLayer]:
        return {i: layer for i, layer in enumerate(self.layers) if isinstance(layer, VarlenLayer)}


def cache_nbytes(cache: Cache) -> int:
    """K/V bytes of any transformers cache (VarlenCache counts reserve rows too)."""
    if isinstance(cache, VarlenCache):
        return cache.nbytes
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel() > 0:
            total += keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
    return total
