"""The variable-length cache stores exactly the kept tokens, plugs into generate, and matches the memory model."""

import pytest
import torch

from rap.core.hf import cache_kwargs
from rap.kv import AdaKV, Budget, PyramidKV, SnapKV, StreamingLLM, VarlenLayer, compress, generate
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView, SkippedCacheLayer
from rap.sources import model_from_config

from conftest import tiny_config

PRESSES = [StreamingLLM(), SnapKV(window_size=8), PyramidKV(window_size=8), AdaKV(SnapKV(window_size=8)),
           AdaKV(PyramidKV(window_size=8))]


def tiny(model_type="llama", **kw):
    torch.manual_seed(0)
    return BlockView(model_from_config(tiny_config(model_type, **kw), dtype=torch.float32, device="cpu"))


def prompt(B=1, T=60, seed=0, vocab=97):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("press", PRESSES, ids=lambda p: p.name)
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.4])
def test_compressed_cache_bytes_equal_budget_times_bytes_per_token(press, ratio):
    view = tiny()
    B, T = 2, 100
    comp = compress(view, press, prompt(B, T), Budget(kv_ratio=ratio))
    s = view.shape
    per_token = 2 * s.head_dim * 4  # key + value row of one KV head, float32
    budget_tokens = sum(comp.layer_tokens.values()) * B * s.num_kv_heads
    assert comp.cache.nbytes == budget_tokens * per_token  # no padding to the longest head
    assert sum(comp.layer_tokens.values()) == s.num_layers * Budget(kv_ratio=ratio).tokens_for(T)


@pytest.mark.parametrize("mask_spec", [None, "attn.1", "attn.0,attn.3,ffn.2"])
@pytest.mark.parametrize("ratio", [0.1, 0.33, 1.0])
@pytest.mark.parametrize("press", [SnapKV(window_size=8), AdaKV(PyramidKV(window_size=8))], ids=lambda p: p.name)
def test_memory_model_kv_term_equals_measured_cache_bytes(mask_spec, ratio, press):
    view = tiny()
    mask = BlockMask.parse(mask_spec, view.num_layers) if mask_spec else BlockMask.full(view.num_layers)
    B, T, new = 2, 90, 7
    with view.masked(mask):
        comp = compress(view, press, prompt(B, T), Budget(kv_ratio=ratio), reserve=new)
    predicted = MemoryModel.from_view(view, on_cuda=False).kv_bytes(Request(B, T, new), mask, kv_ratio=ratio)
    assert comp.cache.nbytes == predicted
    for i in range(view.num_layers):
        assert isinstance(comp.cache.layers[i], SkippedCacheLayer) == (not mask.keep_attn[i])


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_full_budget_generation_equals_plain_generate(model_type):
    """Keeping 100% through the varlen cache and varlen attention reproduces generate token for token."""
    view = tiny(model_type)
    ids = prompt(2, 40, seed=1)
    ref = generate(view, ids, 12, press=None)
    for press in (SnapKV(window_size=8), AdaKV(SnapKV(window_size=8))):
        assert torch.equal(generate(view, ids, 12, press=press, budget=Budget(kv_ratio=1.0)), ref)


def test_question_agnostic_full_budget_equals_plain_generate(stories):
    view, tok = stories
    ctx = tok("Once upon a time, there was a little girl named Lily. She loved to play outside.",
              return_tensors="pt").input_ids
    q = tok(" One day, Lily", return_tensors="pt", add_special_tokens=False).input_ids
    ref = generate(view, ctx, 15, press=None, question_ids=q)
    got = generate(view, ctx, 15, press=AdaKV(SnapKV(window_size=8)), budget=Budget(kv_ratio=1.0),
                   question_ids=q, question_aware=False)
    assert torch.equal(got, ref)


def test_dropped_attention_blocks_keep_no_cache_and_generation_still_matches():
    view = tiny()
    mask = BlockMask.from_drop(view.num_layers, ["attn.1", "attn.2"])
    ids = prompt(1, 50, seed=2)
    with view.masked(mask):
        ref = generate(view, ids, 10, press=None)
        got = generate(view, ids, 10, press=SnapKV(window_size=8), budget=Budget(kv_ratio=1.0))
        comp = compress(view, AdaKV(SnapKV(window_size=8)), ids, Budget(kv_ratio=0.2))
        out = view.model.generate(torch.cat([ids, comp.next_logits.argmax(-1, keepdim=True)], 1),
                                  **cache_kwargs(comp.cache), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, ref)
    assert out.shape[1] == 51 + 5
    assert isinstance(comp.cache.layers[1], SkippedCacheLayer) and comp.cache.layers[1].get_seq_length() == 55
    assert comp.cache.get_seq_length() == 55


def test_decode_appends_in_place_within_the_reserve_then_regrows():
    view = tiny()
    ids = prompt(2, 64, seed=3)
    comp = compress(view, AdaKV(SnapKV(window_size=8)), ids, Budget(kv_ratio=0.25), reserve=4)
    layer = comp.cache.layers[0]
    assert isinstance(layer, VarlenLayer)
    kept = layer.kept_lengths()
    ptr = layer.keys.data_ptr()
    ref_keys = {s: layer.flat().dense(s)[0].clone() for s in range(4)}
    out = view.model.generate(torch.cat([ids, comp.next_logits.argmax(-1, keepdim=True)], 1),
                              **cache_kwargs(comp.cache), max_new_tokens=4, do_sample=False)
    assert layer.keys.data_ptr() == ptr  # 4 appends fit the reserve
    assert torch.equal(layer.kept_lengths(), kept + 4)
    out = view.model.generate(out, **cache_kwargs(comp.cache), max_new_tokens=3, do_sample=False)
    assert layer.keys.data_ptr() != ptr and torch.equal(layer.kept_lengths(), kept + 7)
    for s, k in ref_keys.items():  # the compressed prompt part survives regrowth unchanged
        assert torch.equal(layer.flat().dense(s)[0][: k.shape[0]], k)


def test_crop_rolls_a_compressed_cache_back_for_the_next_question(stories):
    view, tok = stories
    ctx = prompt(1, 80, seed=4, vocab=500)
    comp = compress(view, SnapKV(window_size=8), ctx, Budget(kv_ratio=0.3), reserve=20)
    q1, q2 = prompt(1, 5, seed=5, vocab=500), prompt(1, 6, seed=6, vocab=500)
    a = view.model.generate(torch.cat([ctx, q2], 1), **cache_kwargs(comp.cache), max_new_tokens=5, do_sample=False)
    comp2 = compress(view, SnapKV(window_size=8), ctx, Budget(kv_ratio=0.3), reserve=20)
    view.model.generate(torch.cat([ctx, q1], 1), **cache_kwargs(comp2.cache), max_new_tokens=5, do_sample=False)
    comp2.cache.crop(-(comp2.cache.get_seq_length() - 80))
    b = view.model.generate(torch.cat([ctx, q2], 1), **cache_kwargs(comp2.cache), max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_batched_compression_keeps_per_sequence_head_budgets():
    view = tiny()
    ids = prompt(3, 70, seed=7)
    comp = compress(view, AdaKV(SnapKV(window_size=8)), ids, Budget(tokens=10))
    for layer in comp.cache.compressed_layers().values():
        lengths = layer.kept_lengths()
        assert lengths.shape == (3, view.shape.num_kv_heads)
        assert (lengths.sum(-1) == 10 * view.shape.num_kv_heads).all()
    first = comp.next_logits.argmax(-1, keepdim=True)
    out = view.model.generate(torch.cat([ids, first], 1), **cache_kwargs(comp.cache), max_new_tokens=3,
                              do_sample=False)
    assert out.shape == (3, 74)
