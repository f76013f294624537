import pytest
import torch
from rap.core.hf import DynamicCache, StaticCache, cache_kwargs

from rap.errors import UnsupportedModelError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView, SkippedCacheLayer
from rap.sources import model_from_config

from conftest import tiny_config

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw", "Tom"]


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def greedy_without_cache(model, ids, steps):
    """Obviously correct reference: recompute the whole sequence every step."""
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_all_ones_mask_is_bit_identical_to_the_stock_model(tiny_view):
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        stock = tiny_view.model(input_ids=ids).logits
        tiny_view.apply(BlockMask.from_drop(4, ["attn.1", "ffn.2"]))
        tiny_view.apply(BlockMask.full(4))
        again = tiny_view.model(input_ids=ids).logits
    assert torch.equal(stock, again)


def test_dropped_ffn_block_adds_nothing(stories):
    view, tok = stories
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    layer = view.layers[2]
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad(), view.masked(BlockMask.from_drop(5, ["attn.2", "ffn.2"])):
        view.model(input_ids=ids)
    hook.remove()
    assert torch.equal(seen["inp"], seen["out"])


def test_removing_attn_block_drops_its_kv_cache(stories):
    view, tok = stories
    mask = BlockMask.from_drop(5, ["attn.0", "attn.3", "ffn.1"])
    batch, prompt, new = 2, 7, 5
    ids = torch.randint(3, 500, (batch, prompt))
    cache = DynamicCache(config=view.model.config)
    with torch.no_grad(), view.masked(mask):
        out = view.model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        for _ in range(new):  # decode steps append one token each
            nxt = out.logits[:, -1:].argmax(-1)
            out = view.model(input_ids=nxt, **cache_kwargs(cache), use_cache=True)
    assert isinstance(cache.layers[0], SkippedCacheLayer) and isinstance(cache.layers[3], SkippedCacheLayer)
    assert cache.layers[0].keys is None and cache.layers[3].values is None
    # the cache still reports the true length even though layer 0 stores nothing
    assert cache.get_seq_length() == prompt + new
    expected = MemoryModel.from_view(view).kv_bytes(Request(batch, prompt, new), mask)
    assert cache_bytes(cache) == expected


@pytest.mark.parametrize("drop", [[], ["attn.0"], ["attn.0", "ffn.4", "attn.2"], ["ffn.0", "ffn.1"]])
def test_masked_generate_matches_uncached_recomputation(stories, drop):
    view, tok = stories
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad(), view.masked(BlockMask.from_drop(5, drop)):
        fast = view.model.generate(ids, max_new_tokens=12, do_sample=False)
        slow = greedy_without_cache(view.model, ids, 12)
    assert torch.equal(fast, slow)


def test_masked_generation_of_a_padded_batch_equals_per_sequence_generation(stories):
    view, tok = stories
    mask = BlockMask.from_drop(5, ["attn.0", "ffn.2", "attn.4"])
    with torch.no_grad(), view.masked(mask):
        batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
        together = view.model.generate(**batch, max_new_tokens=10, do_sample=False)[:, -10:]
        for row, prompt in enumerate(PROMPTS):
            single = tok([prompt], return_tensors="pt")
            alone = view.model.generate(**single, max_new_tokens=10, do_sample=False)[:, -10:]
            assert torch.equal(together[row], alone[0]), prompt


def test_static_cache_generation_works_when_layer_0_attention_is_dropped(stories):
    view, tok = stories
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    mask = BlockMask.from_drop(5, ["attn.0", "attn.1"])
    with torch.no_grad(), view.masked(mask):
        cache = StaticCache(config=view.model.config, max_cache_len=ids.shape[1] + 8)
        static = view.model.generate(ids, **cache_kwargs(cache), max_new_tokens=8, do_sample=False)
        dynamic = view.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(static, dynamic)
    assert cache.layers[0].keys is None


def test_gemma3_sliding_layers_generate_correctly_under_a_mask():
    torch.manual_seed(0)
    view = BlockView(model_from_config(tiny_config("gemma3_text"), torch.float32, "cpu"))
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad(), view.masked(BlockMask.from_drop(4, ["attn.0", "ffn.3"])):
        fast = view.model.generate(ids, max_new_tokens=6, do_sample=False)
        slow = greedy_without_cache(view.model, ids, 6)
    assert torch.equal(fast, slow)


def test_block_bytes_and_base_add_up_to_all_parameters_counting_tied_weights_once(tiny_view):
    model = tiny_view.model
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    assert tiny_view.resident_param_bytes(BlockMask.full(4)) == total
    assert len(tiny_view.blocks) == 8 and [b.name for b in tiny_view.blocks[:2]] == ["attn.0", "ffn.0"]
    dropped = BlockMask.from_drop(4, ["ffn.1"])
    assert tiny_view.resident_param_bytes(dropped) == total - tiny_view.block("ffn.1").param_bytes


def test_unsupported_architecture_names_what_is_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen3"):
        BlockView(model)
