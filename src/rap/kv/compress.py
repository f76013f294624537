"""Prefill a prompt, compress its KV cache with a press, and hand back a cache `generate` can use.

    comp = compress(view, AdaKV(SnapKV()), prompt_ids, Budget(kv_ratio=0.1), reserve=new_tokens)
    first = comp.next_logits.argmax(-1, keepdim=True)
    out = view.model.generate(torch.cat([prompt_ids, first], 1), **cache_kwargs(comp.cache), ...)

Prefill runs the model once with a `VarlenCache` of ordinary dense layers and SDPA attention
(full attention over the prompt, as in kvpress). A forward hook on every kept full-attention
module compresses that layer's cache right after the layer ran, so the full prompt cache of all
layers never coexists. Attention blocks dropped by a `BlockMask` are `SkippedAttention`s, get no
hook and keep a `SkippedCacheLayer`; sliding-window layers (Gemma 3) stay dense (they are bounded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from rap.errors import RequestError
from rap.core.hf import cache_kwargs
from rap.core.model import BlockView, SkippedAttention, decoder_layers
from rap.kv.attention import use_varlen_attention
from rap.kv.base import Budget, LayerInputs, Press
from rap.kv.cache import VarlenCache, VarlenLayer

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    cache: VarlenCache
    next_logits: torch.Tensor  # [B, vocab]: logits after the last prompt token
    prompt_tokens: int
    layer_tokens: dict[int, int] = field(default_factory=dict)  # layer -> average kept tokens per KV head


def _model(view_or_model) -> nn.Module:
    return view_or_model.model if isinstance(view_or_model, BlockView) else view_or_model


def compressible_layers(model: nn.Module) -> list[int]:
    """Layers whose attention block runs now and is full (not sliding-window) attention."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = list(getattr(config, "layer_types", None) or [])
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.self_attn, SkippedAttention):
            continue
        if types and types[i] != "full_attention":
            continue
        out.append(i)
    return out


@torch.no_grad()
def compress(view_or_model, press: Press, input_ids: torch.Tensor, budget: Budget, reserve: int = 0) -> Compressed:
    """Prefill `input_ids` [B, T] (no padding) and keep `budget` of its KV cache per layer.

    `reserve`: free rows per (sequence, KV head) for tokens appended later (question + new tokens),
    so that decoding writes in place; the cache then holds exactly what the memory model counts.
    """
    model = _model(view_or_model)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise RequestError("compress needs a [batch, tokens] prompt of at least 2 tokens")
    use_varlen_attention(model)
    T = input_ids.shape[1]
    layers = compressible_layers(model)
    budgets = press.layer_budgets(len(layers), T, budget.tokens_for(T))
    plan = dict(zip(layers, budgets))
    rank = {layer: r for r, layer in enumerate(layers)}
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = VarlenCache.for_prefill(config)

    def hook(module, args, kwargs, output):
        i = module.layer_idx
        layer = cache.layers[i]
        if isinstance(layer, VarlenLayer):  # already compressed: this is a later forward
            return output
        keys, values = layer.keys, layer.values
        tokens = plan[i]
        if tokens >= keys.shape[2]:
            cache.layers[i] = VarlenLayer.from_dense(keys, values, reserve)
            return output
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x = LayerInputs(module, hidden, keys, values, kwargs.get("position_embeddings"), rank[i], len(layers))
        keep = press.keep(x, tokens)
        cache.layers[i] = VarlenLayer.from_keep_mask(keys, values, keep, reserve)
        return output

    blocks = decoder_layers(model)
    handles = [blocks[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return Compressed(cache, out.logits[:, -1].float(), T, plan)


@torch.no_grad()
def generate(view_or_model, input_ids: torch.Tensor, max_new_tokens: int, press: Press | None = None,
             budget: Budget | None = None, question_ids: torch.Tensor | None = None,
             question_aware: bool = True, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """Greedy continuation of `input_ids` (+ `question_ids`), [B, <= max_new_tokens] new tokens.

    press None: plain `generate` with the full cache (the reference). Question-aware: the context
    and the question are compressed together (the observation window sees the question).
    Question-agnostic: only the context is compressed, then the question is read through the
    compressed cache (the setting where one compressed context serves many questions).
    """
    model = _model(view_or_model)
    prompt = input_ids if question_ids is None else torch.cat([input_ids, question_ids], dim=1)
    gen = dict(do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id if isinstance(eos_token_id, int)
               else None, temperature=None, top_p=None, top_k=None)
    if press is None:
        out = model.generate(prompt, max_new_tokens=max_new_tokens, **gen)
        return out[:, prompt.shape[1]:]
    budget = budget or Budget(kv_ratio=1.0)
    if question_aware or question_ids is None:
        comp = compress(model, press, prompt, budget, reserve=max_new_tokens)
        first = comp.next_logits.argmax(-1, keepdim=True).to(prompt.dtype)
        if max_new_tokens == 1 or _is_eos(first, eos_token_id):
            return first
        out = model.generate(torch.cat([prompt, first], 1), **cache_kwargs(comp.cache),
                             max_new_tokens=max_new_tokens - 1, **gen)
        return out[:, prompt.shape[1]:]
    comp = compress(model, press, input_ids, budget, reserve=question_ids.shape[1] + max_new_tokens)
    out = model.generate(prompt, **cache_kwargs(comp.cache), max_new_tokens=max_new_tokens, **gen)
    return out[:, prompt.shape[1]:]


def _is_eos(token: torch.Tensor, eos) -> bool:
    if eos is None:
        return False
    eos = [eos] if isinstance(eos, int) else list(eos)
    return bool(torch.isin(token, torch.tensor(eos, device=token.device)).all())


@torch.no_grad()
def answer_questions(view_or_model, context_ids: torch.Tensor, questions: list[torch.Tensor], max_new_tokens: int,
                     press: Press | None = None, budget: Budget | None = None, question_aware: bool = True,
                     eos_token_id: int | list[int] | None = None) -> list[torch.Tensor]:
    """Answers [1, <= max_new_tokens] to several questions about one context.

    Question-agnostic with a press: the context is compressed once and every question is read
    through that cache, which is cropped back to the compressed context after each answer.
    """
    if press is None or question_aware:
        return [generate(view_or_model, context_ids, max_new_tokens, press, budget, q, question_aware, eos_token_id)
                for q in questions]
    model = _model(view_or_model)
    longest = max(q.shape[1] for q in questions)
    comp = compress(model, press, context_ids, budget or Budget(kv_ratio=1.0), reserve=longest + max_new_tokens)
    T = context_ids.shape[1]
    gen = dict(do_sample=False, eos_token_id=eos_token_id, temperature=None, top_p=None, top_k=None,
               pad_token_id=eos_token_id if isinstance(eos_token_id, int) else None)
    answers = []
    for q in questions:
        prompt = torch.cat([context_ids, q], dim=1)
        out = model.generate(prompt, **cache_kwargs(comp.cache), max_new_tokens=max_new_tokens, **gen)
        answers.append(out[:, prompt.shape[1]:])
        comp.cache.crop(-(comp.cache.get_seq_length() - T))
    return answers
