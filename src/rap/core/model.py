"""BlockView: a Hugging Face causal LM seen as 2L prunable blocks (attn.i, ffn.i).

Applying a `BlockMask` swaps a dropped block's module for a stand-in that adds nothing to the
residual stream; the real module is kept aside (no weight copies) and swapped back when the
block is restored. This works for every decoder layer shaped like

    h = h + post_attn_norm?(self_attn(input_layernorm(h)))      # the attention block
    h = h + post_ffn_norm?(mlp(pre_ffn_norm(h)))                 # the FFN block

(Llama, Mistral, Qwen2, Qwen3, Gemma3): RMSNorm of zeros is zero, and `h + 0` is `h` bit for bit.

A dropped attention block must also create no KV-cache entries. Its stand-in replaces the
layer's entry in whatever transformers `Cache` it is handed with a `SkippedCacheLayer`: no
tensors, only a token count, so the cache still reports the right sequence length (generate
asks layer 0 for it) and the right mask sizes. The cache keyword it is handed comes through
`rap.core.hf` (it was renamed in 5.24); CI checks the oldest and the newest supported release.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from rap.errors import UnsupportedModelError
from rap.core.hf import Cache, CacheLayerMixin, cache_given_to_attention
from rap.core.mask import BlockMask, block_name

log = logging.getLogger(__name__)

# model_type -> family notes. Gemma3's sandwich norms work because RMSNorm(0) == 0.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class Block:
    name: str  # "attn.3"
    kind: str  # "attn" | "ffn"
    layer: int
    params: int
    param_bytes: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory model and the decode path need to know about a model's geometry."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    dtype: torch.dtype
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 1

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Keys and values of one token in one attention layer, over all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


class SkippedCacheLayer(CacheLayerMixin):
    """Cache entry of a dropped attention block: stores nothing, counts tokens.

    Mirrors the mask sizes of the layer it replaces (dynamic, sliding or static), so that the
    causal mask built from this layer index matches the kept layers' key lengths.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, replaced: CacheLayerMixin | None = None):
        super().__init__()
        self.seen_tokens = 0
        self.sliding_window = getattr(replaced, "sliding_window", None)
        self.max_cache_len = getattr(replaced, "max_cache_len", None)
        self.is_sliding = bool(getattr(replaced, "is_sliding", False))
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never stores
        pass

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a dropped attention block has no KV cache to update")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n = self.seen_tokens
        if self.max_cache_len is not None and not self.is_sliding:  # StaticLayer
            return self.max_cache_len, 0
        if self.is_sliding and self.sliding_window is not None:  # DynamicSlidingWindowLayer
            window = self.sliding_window
            if n >= window:
                return window - 1 + query_length, n - window + 1
            return n + query_length, 0
        return n + query_length, 0

    def reset(self) -> None:
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        self.seen_tokens = max(0, self.seen_tokens - abs(tokens_to_remove))

    def reorder_cache(self, beam_idx) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices) -> None:
        pass

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


def skip_cache_layer(cache: Cache | None, layer_idx: int, num_tokens: int) -> None:
    """Record `num_tokens` passing a dropped attention block in `cache` without storing them."""
    if cache is None:
        return
    layers = cache.layers
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if not isinstance(layers[layer_idx], SkippedCacheLayer):
        layers[layer_idx] = SkippedCacheLayer(layers[layer_idx])
    layers[layer_idx].advance(num_tokens)


class SkippedAttention(nn.Module):
    """Stand-in for a dropped attention block: adds zero, caches nothing."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        skip_cache_layer(cache_given_to_attention(kwargs), self.layer_idx, hidden_states.shape[1])
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stand-in for a dropped FFN block: adds zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two weights are one tensor (a tied embedding / lm_head): the same object, or the same storage. A
    quantized tensor subclass has no data pointer of its own (0, or an error), so it is only ever itself."""
    if a is b:
        return True
    try:
        pa, pb = a.data_ptr(), b.data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return pa != 0 and pa == pb


def _module_bytes(module: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return params, nbytes


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.layers; rap supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


class BlockView:
    """A loaded causal LM as 2L blocks, with a mask that can change between forward passes."""

    def __init__(self, model: nn.Module, name: str | None = None):
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
                f"rap supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.config = config
        self.name = name or getattr(config, "_name_or_path", None) or model_type
        self.layers = decoder_layers(model)
        for layer in self.layers:
            if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
                raise UnsupportedModelError(f"{type(layer).__name__} has no self_attn/mlp pair")
        self._attn = [layer.self_attn for layer in self.layers]
        self._mlp = [layer.mlp for layer in self.layers]
        self._mask = BlockMask.full(len(self.layers))
        self.blocks = self._measure_blocks()

    # ---- geometry -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> ModelShape:
        c = self.config
        heads = c.num_attention_heads
        return ModelShape(
            num_layers=self.num_layers,
            hidden_size=c.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_context=getattr(c, "max_position_embeddings", 2048),
            dtype=self.dtype,
            sliding_window=getattr(c, "sliding_window", None),
            layer_types=tuple(getattr(c, "layer_types", None) or ()),
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _measure_blocks(self) -> list[Block]:
        out = []
        for i in range(self.num_layers):
            for kind, module in (("attn", self._attn[i]), ("ffn", self._mlp[i])):
                params, nbytes = _module_bytes(module)
                out.append(Block(block_name(kind, i), kind, i, params, nbytes))
        return out

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def base_bytes(self) -> int:
        """Parameters that stay resident under every mask: embeddings, norms, lm_head (tied weights once)."""
        block_ids = {id(p) for m in (*self._attn, *self._mlp) for p in m.parameters()}
        seen, total = set(), 0
        for p in self.model.parameters():  # parameters() yields a tied tensor once
            if id(p) in block_ids or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
        return total

    @property
    def base_params(self) -> int:
        block_ids = {id(p) for m in (*self._attn, *self._mlp) for p in m.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in block_ids)

    def resident_param_bytes(self, mask: BlockMask | None = None) -> int:
        mask = mask or self._mask
        kept = sum(b.param_bytes for b in self.blocks if mask.keeps(b.name))
        return self.base_bytes + kept

    # ---- masking ------------------------------------------------------------------------
    @property
    def mask(self) -> BlockMask:
        return self._mask

    def apply(self, mask: BlockMask) -> BlockMask:
        """Make the forward pass run exactly the blocks `mask` keeps; returns the previous mask."""
        if mask.num_layers != self.num_layers:
            from rap.errors import MaskError

            raise MaskError(f"mask has {mask.num_layers} layers, the model has {self.num_layers}")
        previous = self._mask
        for i, layer in enumerate(self.layers):
            layer.self_attn = self._attn[i] if mask.keep_attn[i] else SkippedAttention(i)
            layer.mlp = self._mlp[i] if mask.keep_ffn[i] else SkippedMLP()
        self._mask = mask
        return previous

    @contextlib.contextmanager
    def masked(self, mask: BlockMask) -> Iterator["BlockView"]:
        previous = self.apply(mask)
        try:
            yield self
        finally:
            self.apply(previous)

    def attention_module(self, layer: int) -> nn.Module:
        return self._attn[layer]

    def mlp_module(self, layer: int) -> nn.Module:
        return self._mlp[layer]

    def block_module(self, name: str) -> nn.Module:
        b = self.block(name)
        return self._attn[b.layer] if b.kind == "attn" else self._mlp[b.layer]
