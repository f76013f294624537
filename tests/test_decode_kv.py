"""The fast decode path with a KV keep ratio: SnapKV-kept prompt tokens per (row, KV head), true positions
for decoded tokens, the memory model's bytes, and streamed tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

import rap.decode.decoder as decode
import rap.decode.prefill as prefill
import rap.decode.step as decode_step
from rap.decode.decoder import LENGTH_QUANTUM, Decoder, bucket_batch, bucket_length
from rap.serve.backends import DecoderBackend
from rap.errors import RequestError
from rap.core.hf import cache_kwargs, output_cache
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView
from rap.sources import model_from_config

from conftest import tiny_config

MASKS = {"dense": [], "masked": ["attn.2", "ffn.1"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- a plain reference: HF prefill, SnapKV by hand on HF's own cache, HF decode on the pruned cache --------
def reference_keep(view, layer, hidden, pos_emb, keys, kept):
    """Columns [1, Hkv, kept] (ascending) SnapKV keeps in one layer, from rap.kv's window attention (queries
    recomputed from the layer input, as kvpress does): mean over the window, the default scorer's group
    reduction (mean or max) over the KV group, its pooling (max or zero-padded avg) over the earlier tokens,
    the window ranked first (most recent highest), stable top-k."""
    from rap.kv.base import LayerInputs, window_attention

    sc = decode.DEFAULT_SCORER
    _, Hkv, P, _ = keys.shape
    w = min(sc.window, P)
    attn = window_attention(LayerInputs(view.attention_module(layer), hidden, keys, keys, pos_emb, 0, 1), w)
    grouped = attn.mean(2).view(1, Hkv, -1, P)
    scores = (grouped.mean(2) if sc.group == "mean" else grouped.amax(2))[..., : P - w]
    pool = F.max_pool1d if sc.pool == "max" else F.avg_pool1d
    pooled = pool(scores, sc.kernel, stride=1, padding=sc.kernel // 2)
    ranks = (2.0 + torch.arange(w) / w).expand(1, Hkv, w)
    order = torch.sort(torch.cat([pooled, ranks], -1), dim=-1, descending=True, stable=True).indices
    return order[..., :kept].sort(-1).values


@torch.no_grad()
def hf_on_pruned_cache(view, ids, mask, kv_ratio, new_tokens):
    """(first-step logits [V], greedy tokens): HF's forward throughout, the cache pruned by hand."""
    model, P = view.model, len(ids)
    kept = max(1, math.ceil(kv_ratio * P))
    seen = {}
    hooks = [view.attention_module(i).register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, (kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True)
        for i in mask.kept_attn_layers]
    try:
        with view.masked(mask):
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            cache = output_cache(out)
            for i in mask.kept_attn_layers:
                layer = cache.layers[i]
                idx = reference_keep(view, i, *seen[i], layer.keys, kept)[..., None]
                idx = idx.expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
            tokens = [int(out.logits[0, -1].argmax())]
            first_step = None
            for t in range(new_tokens - 1):
                step = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_kwargs(cache), use_cache=True,
                             position_ids=torch.tensor([[P + t]]), cache_position=torch.tensor([kept + t]))
                logits = step.logits[0, -1].float()
                first_step = logits if first_step is None else first_step
                tokens.append(int(logits.argmax()))
    finally:
        for h in hooks:
            h.remove()
    return first_step, tokens


def decoder_step_logits(monkeypatch, dec, ids, mask, kv_ratio, new_tokens):
    """(logits of each forward [prefill, step 1, ...], tokens) of the decoder's exact path."""
    seen = []
    real = decode.final_logits

    def record(*args):
        seen.append(real(*args)[0])
        return seen[-1][None]

    monkeypatch.setattr(prefill, "final_logits", record)  # the prefill's and the exact step's head
    monkeypatch.setattr(decode_step, "final_logits", record)
    tokens = dec.generate([ids], new_tokens, mask=mask, kv_ratio=kv_ratio, kv_press="snapkv").tokens[0]
    monkeypatch.setattr(prefill, "final_logits", real)
    monkeypatch.setattr(decode_step, "final_logits", real)
    return seen, tokens


# ---- specifications -------------------------------------------------------------------------------------------
def test_kv_ratio_one_is_the_uncompressed_path_token_for_token(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, tok("The little dog ran").input_ids, tok("Tom").input_ids]
    dec = Decoder(view)
    plain = dec.generate(prompts, 16, pad_token_id=0)
    explicit = dec.generate(prompts, 16, pad_token_id=0, kv_ratio=1.0)
    assert explicit.tokens == plain.tokens and explicit.kv_ratio == 1.0
    (ws,) = dec._workspaces.values()
    assert ws.length == ws.rope_length == bucket_length(len(story_ids) + 16) and not ws.shift.any()


@pytest.mark.parametrize("masked", sorted(MASKS))
def test_half_ratio_decodes_like_hf_on_the_same_snapkv_pruned_cache(stories, story_ids, monkeypatch, masked):
    view, _ = stories
    mask = BlockMask.from_drop(5, MASKS[masked])
    want_logits, want = hf_on_pruned_cache(view, story_ids, mask, 0.5, 8)
    logits, got = decoder_step_logits(monkeypatch, Decoder(view), story_ids, mask, 0.5, 8)
    torch.testing.assert_close(logits[1], want_logits, atol=1e-4, rtol=0)
    assert got == want
    full, _ = decoder_step_logits(monkeypatch, Decoder(view), story_ids, mask, 1.0, 2)
    assert (full[1] - logits[1]).abs().max() > 1e-2  # the pruned cache matters: the comparison is not vacuous


def test_each_row_of_a_left_padded_batch_keeps_ceil_ratio_of_its_own_prompt(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, story_ids[:45], tok("Tom ran").input_ids]
    ratio = 0.3
    kept = [max(1, math.ceil(ratio * len(p))) for p in prompts]
    dec = Decoder(view)
    batch = dec.generate(prompts, 10, kv_ratio=ratio, pad_token_id=0, kv_press="snapkv").tokens
    (ws,) = dec._workspaces.values()
    K = max(kept)
    assert int(ws.col) == K + 9  # decoding started at column K
    assert (K - ws.pad[:3]).tolist() == kept  # kept columns per row, right-aligned before column K
    assert ws.shift[:3].tolist() == [len(p) - k for p, k in zip(prompts, kept)]
    kc = ws.kv[0][0].clone()
    for r, p in enumerate(prompts):  # each row alone: the same tokens and the same kept keys
        alone = Decoder(view)
        assert alone.generate([p], 10, kv_ratio=ratio, kv_press="snapkv").tokens[0] == batch[r]
        (solo,) = alone._workspaces.values()
        k = kept[r]
        torch.testing.assert_close(kc[r, :, K - k:K], solo.kv[0][0][0, :, int(solo.pad[0]):int(solo.pad[0]) + k])


def test_the_captured_static_step_keeps_true_positions_too(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, tok("The little dog ran to the park").input_ids]
    mask = BlockMask.from_drop(5, ["attn.1"])
    exact = Decoder(view, step="exact").generate(prompts, 16, mask=mask, kv_ratio=0.4, pad_token_id=0).tokens
    static = Decoder(view, step="static").generate(prompts, 16, mask=mask, kv_ratio=0.4, pad_token_id=0).tokens
    assert static == exact


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_compressed_kv_bytes_equal_the_memory_model_for_the_planned_request(stories, ratio):
    view, _ = stories
    ids = [[(7 * i) % 500 + 3 for i in range(300)]] * 3  # a long prompt: compression frees whole quanta
    mask = BlockMask.from_drop(5, ["attn.3"])
    dec = Decoder(view)
    dec.generate(ids, 20, mask=mask, kv_ratio=ratio, kv_press="snapkv")
    planned = DecoderBackend(view, Decoder, decode).planning_request(Request(3, 300, 20))
    model = MemoryModel.from_view(view, kv_length_quantum=LENGTH_QUANTUM)
    assert dec.kv_resident_bytes == model.kv_bytes(planned, mask, ratio)
    # without the quantum the model still counts rap.kv's variable-length cache, token for token
    assert MemoryModel.from_view(view).kv_tokens(planned, ratio) == math.ceil(ratio * 300) + planned.new_tokens
    (ws,) = dec._workspaces.values()
    assert ws.batch == bucket_batch(3) and ws.length == bucket_length(math.ceil(ratio * 300) + planned.new_tokens)
    dense = Decoder(view)
    dense.generate(ids, 20, mask=mask)
    assert dec.kv_resident_bytes < dense.kv_resident_bytes == model.kv_bytes(planned, mask, 1.0)


def test_on_step_streams_every_new_token_including_the_first(stories, story_ids):
    view, tok = stories
    prompts = [story_ids, tok("The little dog").input_ids]
    dec = Decoder(view)
    free = dec.generate(prompts, 12, kv_ratio=0.5, pad_token_id=0).tokens
    stop = free[1][3]
    steps = []
    got = dec.generate(prompts, 12, kv_ratio=0.5, pad_token_id=0, stop_token_ids=[stop], on_step=steps.append)
    assert all(s.shape == (2,) and s.device.type == "cpu" for s in steps)
    streamed = torch.stack(steps, 1).tolist()
    for row, toks in zip(streamed, got.tokens):
        assert row[:len(toks)] == toks
    assert got.tokens[1] == free[1][:4]


def test_sliding_window_models_take_a_ratio_only_inside_their_window():
    torch.manual_seed(0)
    view = BlockView(model_from_config(tiny_config("mistral", sliding_window=16), dtype=torch.float32, device="cpu"))
    dec = Decoder(view)
    assert not dec.compresses_kv
    prompt = [[(3 * i) % 90 + 2 for i in range(10)]]
    assert dec.generate(prompt, 4, kv_ratio=0.5).tokens  # 10 + 4 <= 16: no window ever bites
    with pytest.raises(RequestError, match="sliding-window"):
        dec.generate(prompt, 8, kv_ratio=0.5)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_a_ratio_outside_zero_one_is_refused(stories, ratio):
    with pytest.raises(RequestError, match="kv_ratio"):
        Decoder(stories[0]).generate([[1, 2, 3]], 2, kv_ratio=ratio)
