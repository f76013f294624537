"""PyramidKV in the fast decoder (kv_press "pyramidkv" / "ada-pyramidkv"): every kept attention layer keeps
its own PyramidKV budget (rap.kv.pyramidkv.pyramid_budgets, the HF path's schedule), in a flat cache whose
layers shrink with depth; the same kept tokens and greedy tokens as rap.kv's PyramidKV / AdaKV(PyramidKV),
and the memory model's exact bytes."""

import itertools
import math

import pytest
import torch

import rap.decode.decoder as decode
from rap.core.hf import cache_kwargs
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.decode.decoder import Decoder
from rap.errors import RequestError
from rap.kv import AdaKV, Budget, PyramidKV, compress
from rap.kv.decode_cache import DECODER_PRESSES, KVLayout
from rap.kv.pyramidkv import pyramid_budgets
from rap.serve.backends import DecoderBackend

from test_decode_adakv import flat_caches, segment_keys
from conftest import STORY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HF_PRESS = {"pyramidkv": PyramidKV, "ada-pyramidkv": lambda: AdaKV(PyramidKV())}


@pytest.mark.parametrize("press", ["pyramidkv", "ada-pyramidkv"])
def test_decoder_pyramid_keeps_the_hf_paths_tokens_per_layer_and_head_and_decodes_the_same_greedy_tokens(
        stories, story_ids, press):
    view, _ = stories
    ratio, new = 0.6, 12  # keeps more than the observation window: the pyramid has room to slope
    dec = Decoder(view)
    gen = dec.generate([story_ids], new, kv_ratio=ratio, kv_press=press)
    ids = torch.tensor([story_ids])
    comp = compress(view, HF_PRESS[press](), ids, Budget(kv_ratio=ratio), reserve=new)
    first = comp.next_logits.argmax(-1, keepdim=True)
    hf = view.model.generate(torch.cat([ids, first], 1), **cache_kwargs(comp.cache),
                             max_new_tokens=new - 1, do_sample=False, temperature=None, top_p=None, top_k=None)
    want = [int(first)] + hf[0, ids.shape[1] + 1:].tolist()
    layers = comp.cache.compressed_layers()
    assert sorted(layers) == list(range(view.num_layers))
    per_layer = []
    spread = False
    for i, layer in layers.items():
        cache = flat_caches(dec)[i]
        kept = layer.compressed_lengths
        assert (cache.lengths.cpu() - (new - 1)).tolist() == kept.tolist()  # per-head counts equal
        per_layer.append(int(kept.sum()))
        spread |= len(set(kept.tolist())) > 1
        for s in range(kept.numel()):
            hf_keys, _ = layer.flat().dense(s)
            torch.testing.assert_close(segment_keys(cache, s, int(kept[s])), hf_keys[:int(kept[s])])
    Hkv, k = view.shape.num_kv_heads, math.ceil(ratio * len(story_ids))
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]  # a real pyramid
    assert sum(per_layer) == view.num_layers * Hkv * k  # the uniform budget, redistributed over layers
    assert spread == (press == "ada-pyramidkv")  # Ada-KV splits a layer unevenly, PyramidKV never does
    assert gen.kv_press == press
    assert gen.tokens[0] == want


@pytest.mark.parametrize("press,bits,ratio", [("pyramidkv", 16, 0.3), ("ada-pyramidkv", 16, 0.1),
                                              ("ada-pyramidkv", 16, 0.5), ("pyramidkv", 8, 0.2),
                                              ("ada-pyramidkv", 8, 1.0)])
def test_pyramid_cache_bytes_equal_the_memory_model_for_the_planned_request(stories, press, bits, ratio):
    view, _ = stories
    ids = [[(7 * i) % 500 + 3 for i in range(300)]] * 3
    mask = BlockMask.from_drop(5, ["attn.3"])
    dec = Decoder(view)
    dec.generate(ids, 20, mask=mask, kv_ratio=ratio, kv_press=press, kv_bits=bits)
    planned = DecoderBackend(view, Decoder, decode).planning_request(Request(3, 300, 20))
    model = MemoryModel.from_view(view, kv_length_quantum=decode.LENGTH_QUANTUM)
    layout = KVLayout(press, bits)
    caches = flat_caches(dec)
    storage = sum(t.untyped_storage().nbytes() for c in caches.values()
                  for t in (c.keys, c.values, c.key_scale, c.value_scale, c.starts, c.lengths) if t is not None)
    assert dec.kv_resident_bytes == storage == model.kv_bytes(planned, mask, ratio, layout)
    lengths = model.kv_layer_tokens(planned, mask, ratio, layout)
    assert {i: c.tokens for i, c in caches.items()} == lengths
    if ratio * 300 > 32 + 20 and ratio < 1:  # room above the window: the layers get their own lengths
        assert len(set(lengths.values())) > 1 and list(lengths.values()) == sorted(lengths.values(), reverse=True)
    dense = Decoder(view)
    dense.generate(ids, 20, mask=mask)
    assert dec.kv_resident_bytes < dense.kv_resident_bytes  # the flat layout frees the dropped tokens' bytes


def test_each_row_keeps_its_own_pyramid_and_a_padded_batch_decodes_as_each_row_alone(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, story_ids[:60], tok("Tom ran to the park").input_ids]
    ratio, new = 0.5, 10
    dec = Decoder(view)
    batch = dec.generate(prompts, new, kv_ratio=ratio, kv_press="ada-pyramidkv", pad_token_id=0).tokens
    Hkv, L = view.shape.num_kv_heads, view.num_layers
    caches = flat_caches(dec)
    for r, p in enumerate(prompts):
        k = max(1, math.ceil(ratio * len(p)))
        got = [int(caches[i].lengths.view(-1, Hkv)[r].sum()) - Hkv * (new - 1) for i in range(L)]
        assert got == [Hkv * b for b in pyramid_budgets(L, len(p), k, 32)]
        assert Decoder(view).generate([p], new, kv_ratio=ratio, kv_press="ada-pyramidkv").tokens[0] == batch[r]


def test_the_captured_static_step_equals_the_exact_step_for_the_pyramid_presses(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, tok("The little dog ran to the park").input_ids]
    mask = BlockMask.from_drop(5, ["attn.1"])
    for press, bits in (("pyramidkv", 16), ("ada-pyramidkv", 8)):
        kw = dict(mask=mask, kv_ratio=0.4, pad_token_id=0, kv_press=press, kv_bits=bits)
        exact = Decoder(view, step="exact").generate(prompts, 16, **kw).tokens
        static = Decoder(view, step="static").generate(prompts, 16, **kw).tokens
        assert static == exact


def test_pyramid_budgets_stay_within_one_and_the_prompt_and_sum_to_the_uniform_budget():
    for L, P, window in itertools.product((1, 2, 5, 30), (2, 33, 100, 1000), (1, 8, 32, 64)):
        for tokens in sorted({1, 2, window - 1, window, window + 1, P // 10, P // 2, P - 1, P}):
            if not 1 <= tokens <= P:
                continue
            b = pyramid_budgets(L, P, tokens, window)
            assert sum(b) == L * tokens and min(b) >= 1 and max(b) <= P, (L, P, window, tokens, b)
            assert b == sorted(b, reverse=True)
    assert PyramidKV(window_size=8).layer_budgets(30, 8000, 400) == pyramid_budgets(30, 8000, 400, 8)  # one home


@pytest.mark.parametrize("press", ["pyramidkv", "ada-pyramidkv"])
def test_a_budget_below_the_observation_window_falls_back_to_uniform_layers_without_error(stories, story_ids, press):
    view, _ = stories
    ratio = 0.05  # ceil(0.05 * P) tokens, fewer than the 32-token window: no room for a pyramid
    dec = Decoder(view)
    dec.generate([story_ids], 4, kv_ratio=ratio, kv_press=press)
    Hkv, k = view.shape.num_kv_heads, math.ceil(ratio * len(story_ids))
    for cache in flat_caches(dec).values():
        lens = cache.lengths[:Hkv] - 3
        assert int(lens.sum()) == Hkv * k and int(lens.min()) >= math.floor(0.2 * k)


def test_an_unknown_press_is_one_line_naming_the_pyramid_presses(stories):
    assert {"pyramidkv", "ada-pyramidkv"} <= set(DECODER_PRESSES)
    with pytest.raises(RequestError, match="unknown KV press") as err:
        Decoder(stories[0]).generate([[1, 2, 3]], 2, kv_ratio=0.5, kv_press="pyramid")
    assert "\n" not in str(err.value) and "ada-pyramidkv" in str(err.value)


def test_a_served_request_can_ask_for_ada_pyramidkv_and_gets_the_decoders_tokens(stories):
    from rap.serve.engine import GenerationRequest

    from test_kv_serving import PROMPT, engine_for

    engine = engine_for(stories, 0.5)
    ids = stories[1](PROMPT).input_ids
    result = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, kv_press="ada-pyramidkv"))[0]
    assert result.error is None and result.step.decision.kv_press == "ada-pyramidkv"
    want = engine.backend.decoder.generate([ids], 8, kv_ratio=0.5, kv_press="ada-pyramidkv",
                                           stop_token_ids=engine._eos_ids).tokens[0]
    assert list(result.token_ids) == [t for t in want if t not in engine._eos_ids][:8]


def test_a_replayed_prefill_keeps_each_layers_own_pyramid_budget(stories, story_ids):
    from rap.eval.needle_decoder import PrefillReplay

    view, _ = stories
    dec = Decoder(view)
    replay = PrefillReplay(dec)
    replay.capture_logits()
    replay.record([story_ids], 6, kv_ratio=0.5, kv_press="adakv")
    dec._prefill = replay._real_prefill
    dec.release()
    got = replay.replay([story_ids], 6, kv_ratio=0.6, kv_press="ada-pyramidkv")
    fresh = Decoder(view)
    want = fresh.generate([story_ids], 6, kv_ratio=0.6, kv_press="ada-pyramidkv")
    assert got.tokens == want.tokens
    assert {i: c.lengths.tolist() for i, c in flat_caches(dec).items()} == {
        i: c.lengths.tolist() for i, c in flat_caches(fresh).items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("press", ["pyramidkv", "ada-pyramidkv"])
def test_on_cuda_the_captured_graph_decodes_the_pyramid_like_the_static_step_and_is_reused(press):
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cuda")
    prompts = [tok(STORY).input_ids, tok("The little dog ran to the park").input_ids]
    kw = dict(kv_ratio=0.5, kv_press=press, pad_token_id=0)
    dec = Decoder(view, compile=False)  # the graph mechanics; compiled kernels may round differently
    got = dec.generate(prompts, 16, **kw)
    assert got.timing.graph and got.timing.capture_ms > 0 and got.kv_press == press
    assert got.tokens == Decoder(view, step="static").generate(prompts, 16, **kw).tokens
    assert dec.generate(prompts, 16, **kw).timing.capture_ms == 0.0  # same prompt: same layer lengths, same graph
