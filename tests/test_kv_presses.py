"""Presses pick the tokens their papers say; AdaKV equals a plain top-k-with-safeguard reference."""

import math

import pytest
import torch

from rap.core.hf import cache_given_to_attention, cache_kwargs
from rap.kv import AdaKV, LayerInputs, PyramidKV, SnapKV, StreamingLLM, adaptive_keep_mask
from rap.kv.base import window_attention


def reference_adakv(scores: torch.Tensor, tokens: int, alpha: float) -> set[tuple[int, int, int]]:
    """Per sequence: each head keeps its own top floor(alpha*tokens); the rest of the layer budget
    H*tokens goes to the highest remaining scores of all heads together. Plain Python."""
    B, H, T = scores.shape
    kept = set()
    safe = math.floor(alpha * tokens)
    for b in range(B):
        chosen = set()
        for h in range(H):
            ranked = sorted(range(T), key=lambda t: -scores[b, h, t].item())
            chosen |= {(h, t) for t in ranked[:safe]}
        rest = sorted(((scores[b, h, t].item(), h, t) for h in range(H) for t in range(T) if (h, t) not in chosen),
                      reverse=True)
        chosen |= {(h, t) for _, h, t in rest[: H * tokens - len(chosen)]}
        kept |= {(b, h, t) for h, t in chosen}
    return kept


@pytest.mark.parametrize("B,H,T,tokens", [(1, 3, 50, 5), (2, 4, 64, 13), (1, 8, 200, 40), (2, 2, 30, 30)])
@pytest.mark.parametrize("skew", [False, True])
def test_adakv_keeps_the_same_head_token_sets_as_a_plain_topk_with_safeguard(B, H, T, tokens, skew):
    g = torch.Generator().manual_seed(B * T + tokens)
    scores = torch.rand(B, H, T, generator=g)
    if skew:  # heads that attend broadly vs narrowly: budgets should move between them
        scores = scores ** torch.linspace(0.5, 8, H).view(1, H, 1)
    mask = adaptive_keep_mask(scores, tokens, alpha=0.2)
    got = {tuple(i) for i in mask.nonzero().tolist()}
    assert got == reference_adakv(scores, tokens, 0.2)
    per_head = mask.sum(-1)
    assert (per_head.sum(-1) == H * min(tokens, T)).all()  # the layer budget, exactly
    assert (per_head >= math.floor(0.2 * tokens)).all()  # the safeguard


def test_adakv_gives_heads_different_budgets_when_their_attention_differs():
    scores = torch.rand(1, 4, 100, generator=torch.Generator().manual_seed(0))
    scores[0, 0] *= 10  # one head's scores dominate the cross-head top-k
    lengths = adaptive_keep_mask(scores, 20, 0.2).sum(-1)[0]
    assert lengths[0] > 20 and lengths.sum() == 80 and lengths.min() >= 4


def test_pyramid_budgets_shrink_with_depth_and_sum_to_the_average_budget():
    budgets = PyramidKV(window_size=8).layer_budgets(30, 8000, 400)
    assert sum(budgets) == 30 * 400
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] >= 8
    assert PyramidKV(window_size=64).layer_budgets(5, 100, 40) == [40] * 5  # budget below the window: uniform


def layer_inputs(T=40, B=2, H=2, D=8):
    keys = torch.randn(B, H, T, D)
    return LayerInputs(None, torch.randn(B, T, 16), keys, torch.randn_like(keys), None, 0, 1)


def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens():
    keep = StreamingLLM(n_sink=4).keep(layer_inputs(T=40), 10)
    expected = torch.zeros(40, dtype=torch.bool)
    expected[:4] = expected[-6:] = True
    assert (keep == expected).all()


def test_window_attention_equals_the_models_own_attention_weights(tiny_view):
    """SnapKV's recomputed queries (q_proj, q_norm, RoPE) reproduce eager attention's last rows."""
    model = tiny_view.model
    if tiny_view.config.model_type == "gemma3_text":
        pytest.skip("gemma3's first layer is sliding-window; covered by the llama-family cases")
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    captured = {}

    def hook(module, args, kwargs, output):
        captured.update(hidden=kwargs["hidden_states"], pe=kwargs["position_embeddings"], attn=output[1],
                        cache=cache_given_to_attention(kwargs))

    from rap.core.hf import DynamicCache

    attn = tiny_view.attention_module(0)
    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, **cache_kwargs(DynamicCache(config=model.config)), output_attentions=True)
    finally:
        h.remove()
        model.set_attn_implementation("sdpa")
    layer = captured["cache"].layers[0]
    x = LayerInputs(attn, captured["hidden"], layer.keys, layer.values, captured["pe"], 0, 1)
    ours = window_attention(x, 6)
    torch.testing.assert_close(ours, captured["attn"][:, :, -6:].float(), atol=1e-5, rtol=1e-4)


def test_snapkv_always_keeps_the_observation_window(stories):
    view, _ = stories
    attn = view.attention_module(0)
    s = view.shape
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, s.num_kv_heads, 120, s.head_dim, generator=g)
    x = LayerInputs(attn, torch.randn(2, 120, s.hidden_size, generator=g), keys, torch.randn_like(keys), None, 0, 1)
    for press in (SnapKV(window_size=16), AdaKV(SnapKV(window_size=16))):
        keep = press.keep(x, 24)
        assert keep[..., -16:].all()
        assert (keep.sum(-1).sum(-1) == 24 * s.num_kv_heads).all()
    assert SnapKV(window_size=16).keep(x, 24).sum(-1).eq(24).all()  # uniform: every head 24
