"""The one boundary with transformers beyond its public loading API.

rap loads configs, weights and tokenizers through transformers' public API (`AutoConfig`,
`AutoModelForCausalLM`, `AutoTokenizer`, `generate`). Everything else it takes from transformers —
the cache keyword, cache classes, the SDPA attention function, the rotary module's call,
attention registration — goes through this module, so that a release that renames one of
them breaks here, loudly, and nowhere else. `tests/test_hf_boundary.py` checks that no other module
reaches into those internals; CI runs the suite on the oldest and the newest supported release.

Known differences across the supported range (5.17 .. 5.24):
- the cache keyword of `forward`/`generate` and of the attention modules: `past_key_values` up to
  5.23, `cache` from 5.24 (`past_key_values` deprecated there, removed in 5.40);
- the model output's cache attribute: `past_key_values` -> `cache`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer
from transformers.models.llama.modeling_llama import LlamaModel

from rap.errors import RapError

__all__ = ["BaseStreamer", "Cache", "CacheLayerMixin", "DynamicCache", "StaticCache", "CACHE_KWARG", "cache_kwargs",
           "cache_given_to_attention", "output_cache", "sdpa_attention", "rotary_tables",
           "register_attention", "use_attention", "attention_implementation", "TRANSFORMERS_VERSION"]

TRANSFORMERS_VERSION = transformers.__version__
CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


def _cache_keyword() -> str:
    params = inspect.signature(LlamaModel.forward).parameters  # follows deprecate_kwarg's __wrapped__
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise RapError(f"transformers {TRANSFORMERS_VERSION} takes none of {CACHE_KEYWORDS} as its cache keyword; "
                   "rap supports the range in its pyproject.toml")


CACHE_KWARG = _cache_keyword()


def cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """`model(ids, **cache_kwargs(c))` / `model.generate(ids, **cache_kwargs(c))` on every supported release."""
    return {CACHE_KWARG: cache}


def cache_given_to_attention(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a decoder layer handed its attention module (None when the forward uses none).

    Decoder layers always pass the keyword, even as None. Finding neither name means transformers
    changed its calling convention: raise, because a dropped attention block that misses its cache
    would silently leave a normal cache layer behind (the 5.24 break).
    """
    for name in CACHE_KEYWORDS:
        if name in kwargs:
            return kwargs[name]
    raise RapError(f"transformers {TRANSFORMERS_VERSION} passed attention no cache keyword "
                   f"(looked for {', '.join(CACHE_KEYWORDS)}; got {sorted(kwargs)})")


def output_cache(outputs: Any) -> Cache | None:
    """The cache a forward returned (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""
    for name in CACHE_KEYWORDS:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def sdpa_attention(module: torch.nn.Module, query, key, value, attention_mask, scaling: float | None = None,
                   dropout: float = 0.0, **kwargs):
    """transformers' own SDPA attention (GQA expansion, mask handling): the reference rap's eager paths use."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def rotary_tables(rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                  layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) from a model's rotary module; Gemma 3 keeps one table per layer type."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(x, position_ids, layer_type=layer_type)
    return rotary(x, position_ids)


def register_attention(name: str, attention: Callable) -> str:
    """Register `attention` under `name` (with SDPA's mask builder) so `use_attention(model, name)` works."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def use_attention(model: torch.nn.Module, name: str) -> None:
    """Switch `model` to a registered attention implementation through transformers' public setter."""
    if attention_implementation(model) == name:
        return
    model.set_attn_implementation(name)
    if attention_implementation(model) != name:
        raise RapError(f"transformers {TRANSFORMERS_VERSION} did not switch {type(model).__name__} "
                       f"to attention {name!r}")
