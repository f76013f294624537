"""The decoder's static state per (batch bucket, cache length): the buffers a captured step reads and writes.

Layout. Cache column j of row b holds the token at padded position j; prompts are left-padded to
the longest one, so row b's real tokens start at column `pad[b]` and its RoPE position is
`j - pad[b] + shift[b]` (= cumsum of the attention mask - 1, as in `generate`; shift is 0 without
KV compression). Keys before `pad[b]` and after the current column are masked. Each kept
attention layer owns a [B, Hkv, T, D] key and value buffer (zero-initialised: masked garbage
must never be NaN, since 0 * NaN poisons P @ V); buffers live per (batch bucket, T, RoPE length)
workspace and are shared by every mask's graph, so the resident KV is that of the union of kept
attention layers over the cached graphs. A flat cache (`rap.kv.decode_cache.FlatLayerCache`) replaces a
layer's pair under Ada-KV / PyramidKV / int8; under PyramidKV each layer has its own length
(`layer_lengths`, from the mask's kept layers and the prompt): a workspace of its own per set of lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rap.core.mask import BlockMask
from rap.core.memory import Request
from rap.kv.decode_cache import FlatLayerCache, KVLayout

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
LENGTH_QUANTUM = 64  # cache lengths are rounded up to this, so nearby requests share a graph
MAX_STOP_IDS = 16


@dataclass(eq=False)
class Workspace:
    """Static buffers a captured step reads and writes; shared by the graphs of every mask."""

    batch: int
    length: int  # cache columns T
    rope_length: int  # positions the RoPE table covers (> T when the KV press dropped prompt tokens)
    tokens: torch.Tensor  # [B] current token per row
    col: torch.Tensor  # [1] cache column of the current token
    pad: torch.Tensor  # [B] first real column per row
    shift: torch.Tensor  # [B] RoPE position minus (column - pad): prompt tokens the KV press dropped
    done: torch.Tensor  # [B] row has emitted a stop token
    out: torch.Tensor  # [B, T] token per column (generated ones from the first decode column on)
    stop: torch.Tensor  # [S] stop ids, -1 = unused slot
    pad_id: torch.Tensor  # [] token written after a row stops
    temperature: torch.Tensor  # []
    top_p: torch.Tensor  # []
    noise: torch.Tensor  # [B, V] uniform noise for sampling
    arange: torch.Tensor  # [T]
    cos: torch.Tensor  # [R, rope_length, D] RoPE tables (R: RoPE kinds, see rope_kinds)
    sin: torch.Tensor
    # dense: layer -> (keys, values) [B, Hkv, T, D]; flat (Ada-KV / int8): layer -> FlatLayerCache
    kv: dict[int, tuple[torch.Tensor, torch.Tensor] | FlatLayerCache] = field(default_factory=dict)
    graphs: dict[tuple[BlockMask, bool], "torch.cuda.CUDAGraph"] = field(default_factory=dict)
    layout: KVLayout | None = None  # None: dense buffers; else the flat layout's press and bits
    # flat caches under PyramidKV: layer -> its own cache length (rows per (row, KV head)); others use `length`
    layer_lengths: dict[int, int] = field(default_factory=dict)

    @classmethod
    def allocate(cls, batch: int, length: int, rope_length: int, cos: torch.Tensor, sin: torch.Tensor,
                 vocab_size: int, device: torch.device, layout: KVLayout | None = None,
                 layer_lengths: dict[int, int] | None = None) -> "Workspace":
        """Fresh request state for `batch` rows x `length` cache columns (no KV buffers yet)."""
        long = dict(device=device, dtype=torch.long)
        return cls(
            batch=batch, length=length, rope_length=rope_length, tokens=torch.zeros(batch, **long),
            col=torch.zeros(1, **long), pad=torch.zeros(batch, **long), shift=torch.zeros(batch, **long),
            done=torch.zeros(batch, device=device, dtype=torch.bool),
            out=torch.zeros(batch, length, **long), stop=torch.full((MAX_STOP_IDS,), -1, **long),
            pad_id=torch.zeros((), **long), temperature=torch.ones((), device=device),
            top_p=torch.ones((), device=device), noise=torch.rand(batch, vocab_size, device=device),
            arange=torch.arange(length, **long), cos=cos, sin=sin, layout=layout,
            layer_lengths=dict(layer_lengths or {}))

    def add_kv(self, layers, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zeroed KV buffers for `layers`: dense [B, Hkv, T, D] keys and values, or a flat cache."""
        shape = (self.batch, kv_heads, self.length, head_dim)
        for i in layers:
            if self.layout is not None:
                self.kv[i] = FlatLayerCache.allocate(self.batch, kv_heads, self.layer_length(i), head_dim,
                                                     dtype, device, self.layout.bits, self.rope_length)
                continue
            self.kv[i] = (torch.zeros(shape, device=device, dtype=dtype),
                          torch.zeros(shape, device=device, dtype=dtype))

    def layer_length(self, layer: int) -> int:
        """Rows per (row, KV head) of a layer's cache: its PyramidKV length, else the workspace's."""
        return self.layer_lengths.get(layer, self.length)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes if isinstance(c, FlatLayerCache) else sum(t.numel() * t.element_size() for t in c)
                   for c in self.kv.values())


def bucket_batch(n: int) -> int:
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    return n


def bucket_length(n: int) -> int:
    return LENGTH_QUANTUM * math.ceil(n / LENGTH_QUANTUM)


def planning_request(request: Request) -> Request:
    """The request as the Decoder allocates it: batch rounded up to its bucket, prompt + new tokens to the
    cache length (`bucket_length`); the extra columns count as new tokens. What the engine, its backends
    and the benchmarks plan with (the memory model's `Request`)."""
    length = bucket_length(request.total_tokens)
    return Request(bucket_batch(request.batch), request.prompt, max(request.new_tokens, length - request.prompt))
