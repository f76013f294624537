"""Ada-KV and int8 KV in the fast decoder: head-adaptive budgets in a flat cache that frees the bytes,
the same kept tokens and greedy tokens as rap.kv's HF-path AdaKV, the memory model's exact bytes."""

import math

import pytest
import torch

import rap.decode.decoder as decode
from rap.decode.decoder import Decoder
from rap.serve.backends import DecoderBackend
from rap.errors import RequestError
from rap.core.hf import cache_kwargs
from rap.kv import AdaKV, Budget, SnapKV, compress
from rap.kv.decode_cache import FlatLayerCache, KVLayout, quantize_rows
from rap.kv.scorer import SnapKVScorer, adaptive_keep
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flat_caches(dec: Decoder) -> dict[int, FlatLayerCache]:
    (ws,) = [w for w in dec._workspaces.values() if w.layout is not None]
    return ws.kv


def segment_keys(cache: FlatLayerCache, s: int, n: int) -> torch.Tensor:
    start = int(cache.starts[s])
    return cache.keys[start:start + n]


def test_decoder_adakv_keeps_the_hf_paths_tokens_and_decodes_the_same_greedy_tokens(stories, story_ids):
    view, _ = stories
    ratio, new = 0.7, 12  # keeps more than the observation window, so scores (not recency) split the budget
    dec = Decoder(view)
    got = dec.generate([story_ids], new, kv_ratio=ratio, kv_press="adakv").tokens[0]
    ids = torch.tensor([story_ids])
    comp = compress(view, AdaKV(SnapKV()), ids, Budget(kv_ratio=ratio), reserve=new)
    first = comp.next_logits.argmax(-1, keepdim=True)
    hf = view.model.generate(torch.cat([ids, first], 1), **cache_kwargs(comp.cache),
                             max_new_tokens=new - 1, do_sample=False, temperature=None, top_p=None, top_k=None)
    want = [int(first)] + hf[0, ids.shape[1] + 1:].tolist()
    spread = False
    for i, layer in comp.cache.compressed_layers().items():
        cache = flat_caches(dec)[i]
        kept = layer.compressed_lengths
        appended = new - 1
        assert (cache.lengths.cpu() - appended).tolist() == kept.tolist()  # per-head counts equal
        spread |= len(set(kept.tolist())) > 1
        for s in range(kept.numel()):
            hf_keys, _ = layer.flat().dense(s)
            torch.testing.assert_close(segment_keys(cache, s, int(kept[s])), hf_keys[:int(kept[s])])
    assert spread  # heads really got different budgets: the comparison is not the uniform case
    assert got == want


def test_each_row_splits_hkv_times_its_budget_over_heads_above_the_floor(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, story_ids[:45], tok("Tom ran to the park").input_ids]
    ratio = 0.25
    dec = Decoder(view)
    dec.generate(prompts, 1, kv_ratio=ratio, pad_token_id=0)
    Hkv = view.shape.num_kv_heads
    for cache in flat_caches(dec).values():
        lens = cache.lengths.view(-1, Hkv)
        for r, p in enumerate(prompts):
            k = max(1, math.ceil(ratio * len(p)))
            assert int(lens[r].sum()) == Hkv * k
            assert int(lens[r].min()) >= math.floor(0.2 * k)
            assert int(lens[r].max()) <= len(p)
        assert not lens[len(prompts):].any()  # idle bucket rows hold nothing


def test_adaptive_keep_gives_the_top_scores_of_all_heads_after_each_heads_floor():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 20)
    scores[0, 0] += 1.0  # head 0 of row 0 dominates: it takes all its 20 tokens, the others share the rest
    keep = adaptive_keep(scores, torch.tensor([10, 5]), alpha=0.2)
    assert keep.sum((1, 2)).tolist() == [30, 15]
    assert keep[0, 0].all() and keep.sum(-1)[0, 1:].min() >= 2
    flat = scores[1].reshape(-1)
    assert set(flat[keep[1].reshape(-1)].tolist()) == set(flat.topk(15).values.tolist())  # floor 1 each, met here


@pytest.mark.parametrize("press,bits,ratio", [("adakv", 16, 0.5), ("adakv", 16, 0.1), ("adakv", 8, 0.2),
                                              ("snapkv", 8, 0.3), ("adakv", 8, 1.0)])
def test_flat_cache_bytes_equal_the_memory_model_for_the_planned_request(stories, press, bits, ratio):
    view, _ = stories
    ids = [[(7 * i) % 500 + 3 for i in range(300)]] * 3
    mask = BlockMask.from_drop(5, ["attn.3"])
    dec = Decoder(view)
    dec.generate(ids, 20, mask=mask, kv_ratio=ratio, kv_press=press, kv_bits=bits)
    planned = DecoderBackend(view, Decoder, decode).planning_request(Request(3, 300, 20))
    model = MemoryModel.from_view(view, kv_length_quantum=decode.LENGTH_QUANTUM)
    layout = KVLayout(press, bits)
    assert dec.kv_resident_bytes == model.kv_bytes(planned, mask, ratio, layout)
    dense = Decoder(view)
    dense.generate(ids, 20, mask=mask)
    if bits == 8 or ratio < 1:
        assert dec.kv_resident_bytes < dense.kv_resident_bytes


def test_the_captured_static_step_equals_the_exact_step_for_adakv_int8_and_int4(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, tok("The little dog ran to the park").input_ids]
    mask = BlockMask.from_drop(5, ["attn.1"])
    for bits in (16, 8, 4):
        kw = dict(mask=mask, kv_ratio=0.4, pad_token_id=0, kv_press="adakv", kv_bits=bits)
        exact = Decoder(view, step="exact").generate(prompts, 16, **kw).tokens
        static = Decoder(view, step="static").generate(prompts, 16, **kw).tokens
        assert static == exact


def test_each_row_of_a_padded_adakv_batch_decodes_as_it_would_alone(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, story_ids[:45], tok("Tom ran").input_ids]
    dec = Decoder(view)
    batch = dec.generate(prompts, 10, kv_ratio=0.3, pad_token_id=0).tokens
    for r, p in enumerate(prompts):
        assert Decoder(view).generate([p], 10, kv_ratio=0.3).tokens[0] == batch[r]


def test_int8_kv_keeps_every_token_within_quantisation_error(stories, story_ids):
    view, _ = stories
    x = torch.randn(5, 7, 64)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and ((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-6).all()
    full = Decoder(view).generate([story_ids], 16).tokens
    int8 = Decoder(view).generate([story_ids], 16, kv_bits=8)
    assert int8.tokens == full and int8.kv_bits == 8 and int8.kv_press is None


def test_scorer_parameters_reach_the_decoder(stories, story_ids):
    view, _ = stories
    dec = Decoder(view)
    a = dec.generate([story_ids], 1, kv_ratio=0.2, kv_scorer=SnapKVScorer(window=8, pool="avg", kernel=5))
    lens_a = {i: c.lengths.clone() for i, c in flat_caches(dec).items()}
    dec.generate([story_ids], 1, kv_ratio=0.2)
    assert a.kv_press == "adakv"
    assert any(not torch.equal(lens_a[i], c.lengths) for i, c in flat_caches(dec).items())


@pytest.mark.parametrize("kw,match", [(dict(kv_press="h2o"), "unknown KV press"), (dict(kv_bits=3), "KV bits"),
                                      (dict(kv_ratio=0.0), "kv_ratio")])
def test_unknown_press_bad_bits_and_bad_ratio_are_one_line_errors(stories, kw, match):
    with pytest.raises(RequestError, match=match) as err:
        Decoder(stories[0]).generate([[1, 2, 3]], 2, **kw)
    assert "\n" not in str(err.value)


def _triton_runs(device: str) -> bool:
    from rap.kv.attention import triton_available

    return triton_available() and (device == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("bits", [16, 8])
def test_the_triton_kernel_reads_a_flat_decoder_cache_like_the_torch_attend(bits):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _triton_runs(device):
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 with triton installed")
    from rap.kv.attention import varlen_attention_triton
    from rap.kv.cache import FlatKV

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, T, P, D = 2, 3, 3, 48, 40, 64
    cache = FlatLayerCache.allocate(B, Hkv, T, D, torch.float32, torch.device(device), bits, positions=P + 8)
    k, v = torch.randn(B, Hkv, P, D, generator=g).to(device), torch.randn(B, Hkv, P, D, generator=g).to(device)
    keep = adaptive_keep(torch.rand(B, Hkv, P, generator=g).to(device), torch.tensor([30, 12], device=device))
    cache.write_prompt(0, k, v, keep, torch.tensor([T - 30, T - 12], device=device))
    q = torch.randn(B, Hkv * G, 1, D, generator=g).to(device)
    flat = FlatKV(cache.keys, cache.values, cache.starts, cache.lengths, cache.bound, B, Hkv)
    got = varlen_attention_triton(q, flat, D ** -0.5, cache.key_scale, cache.value_scale).transpose(1, 2)
    want = cache._attend_quantized(q, D ** -0.5, cache.bound) if bits == 8 else __import__(
        "rap.kv.attention", fromlist=["x"]).varlen_attention_torch(q, flat, D ** -0.5).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
