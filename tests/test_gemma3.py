"""Gemma 3 on rap's own forward: greedy tokens equal transformers' `generate`, dense and masked.

The masked reference is transformers with the dropped blocks' outputs zeroed by forward hooks
(`reference.zeroed_blocks`): stock modules, stock cache, nothing of rap's patched HF path involved.
"""

import pytest
import torch

from rap.decode.decoder import Decoder
from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.sources import is_available, load_view, model_from_config

from conftest import tiny_config
from reference import reference_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def tiny_gemma():
    """Sliding window 4 (shorter than every prompt + new tokens), local and global RoPE bases,
    final logit softcapping, and norm weights far from 0 so that (1 + w) matters."""
    torch.manual_seed(0)
    config = tiny_config("gemma3_text", layer_types=LAYER_TYPES, final_logit_softcapping=30.0)
    model = model_from_config(config, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return BlockView(model)


PROMPTS = [[2, 5, 9, 11, 3, 7, 8, 20, 30], [2, 40, 41], [2, 17, 18, 19, 60, 61]]
TINY_MASKS = [[], ["attn.1", "ffn.2"], ["attn.0", "attn.3", "ffn.0"]]


@pytest.mark.parametrize("drop", TINY_MASKS, ids=["dense", "mask-a", "mask-b"])
@pytest.mark.parametrize("step", ["exact", "static"])
def test_tiny_gemma3_greedy_tokens_equal_transformers_padded_and_masked(tiny_gemma, drop, step):
    mask = BlockMask.from_drop(4, drop)
    ours = Decoder(tiny_gemma, step=step).generate(PROMPTS, 12, mask=mask, pad_token_id=0).tokens
    assert ours == reference_generate(tiny_gemma, mask, PROMPTS, 12)


def test_gemma3_sliding_layers_hold_full_length_buffers_and_the_memory_model_counts_them(tiny_gemma):
    dec = Decoder(tiny_gemma)
    mask = BlockMask.from_drop(4, ["attn.1"])
    dec.generate(PROMPTS, 8, mask=mask, pad_token_id=0)
    (ws,) = dec._workspaces.values()
    assert sorted(ws.kv) == [0, 2, 3]
    from rap.core.memory import Request

    assert dec.kv_resident_bytes == dec.memory.kv_bytes(Request(ws.batch, 9, ws.length - 9), mask)
    assert not dec.compresses_kv  # a KV keep ratio needs positions the window can count


def test_the_engine_serves_gemma3_with_rap_decode(tiny_gemma):
    from rap.serve.backends import make_backend

    backend = make_backend(tiny_gemma, "auto")
    assert backend.name == "rap-decode"
    assert not backend.supports_kv_ratio and not backend.window_bounded_kv


@pytest.fixture(scope="module")
def gemma_270m():
    if not is_available("gemma-3-270m"):
        pytest.skip("gemma-3-270m is not fetched (rap models fetch gemma-3-270m)")
    return load_view("gemma-3-270m", dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("drop", [[], ["attn.3", "ffn.7", "attn.11", "ffn.15"]], ids=["dense", "masked"])
def test_gemma_3_270m_greedy_tokens_equal_transformers(gemma_270m, drop):
    view, tok = gemma_270m
    prompts = [tok(t).input_ids for t in ("The capital of France is", "Once upon a time, there was a little")]
    assert all(p[0] == tok.bos_token_id for p in prompts)  # <bos> first, as Gemma needs
    mask = BlockMask.from_drop(view.num_layers, drop)
    pad = tok.pad_token_id
    ours = Decoder(view).generate(prompts, 16, mask=mask, pad_token_id=pad).tokens
    assert ours == reference_generate(view, mask, prompts, 16, pad_id=pad)


def test_a_kv_press_on_sliding_window_layers_is_refused_before_any_work_naming_the_layers(tiny_gemma, stories):
    from rap.errors import RequestError
    from rap.policy.greedy import Decision
    from rap.serve.engine import Engine, GenerationRequest

    class FullKV:
        def decide(self, memory_model, request, budget_bytes, resident_mask):
            return Decision(BlockMask.full(resident_mask.num_layers), 1.0)

    engine = Engine(tiny_gemma, tokenizer=stories[1], budget=1 << 40, backend="decoder", policy=FullKV())
    (result,) = engine.generate(GenerationRequest(prompt_ids=[2, 5, 9, 11, 3, 7], max_new_tokens=4, kv_press="adakv"))
    assert isinstance(result.error, RequestError) and "\n" not in str(result.error)
    assert "sliding-window attention layers [0, 2]" in str(result.error) and engine.stats.steps == 0
    with pytest.raises(RequestError, match=r"sliding-window attention layers \[0, 2\]"):  # the decoder itself
        Decoder(tiny_gemma).generate([[2, 5, 9, 11, 3, 7]], 4, kv_ratio=0.5)
