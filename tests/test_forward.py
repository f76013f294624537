"""rap's full-sequence forward against stock transformers `forward`, for every supported family."""

import pytest
import torch

from rap.core.forward import Forward
from rap.core.mask import BlockMask
from rap.sources import is_available, load_view

from reference import reference_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROPS = {"dense": [], "masked": ["attn.1", "ffn.2", "attn.3"]}


@pytest.mark.parametrize("masked", sorted(DROPS))
def test_logits_are_bit_identical_to_stock_forward_in_float32(tiny_view, masked):
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 3 (sandwich norms, window 4 < 20)."""
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = BlockMask.from_drop(4, DROPS[masked])
    got = Forward(tiny_view).logits(ids, mask)
    assert torch.equal(got, reference_logits(tiny_view, ids, mask))
    assert tiny_view.mask.is_full and type(tiny_view.layers[1].self_attn).__name__ != "SkippedAttention"


def test_chosen_positions_and_block_streams(tiny_view):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    fwd = Forward(tiny_view)
    mask = BlockMask.from_drop(4, ["ffn.0", "attn.2"])
    full = fwd.logits(ids, mask)
    keep = torch.tensor([0, 5, 11])
    assert torch.equal(fwd.logits(ids, mask, keep=keep), full[:, keep])
    assert torch.equal(fwd.logits(ids, mask, keep=2), full[:, -2:])
    streams = []
    out = fwd.hidden(ids, mask, streams=streams)
    assert len(streams) == 6 + 1 and torch.equal(streams[0], fwd.embed(ids)) and torch.equal(streams[-1], out)
    # one block at a time, from any cached input, gives the same stream
    names = [n for n in ("attn.0", "ffn.0", "attn.1", "ffn.1", "attn.2", "ffn.2", "attn.3", "ffn.3") if mask.keeps(n)]
    for p, name in enumerate(names):
        assert torch.equal(fwd.block(name, streams[p]), streams[p + 1])


def test_a_custom_mask_with_positions_scores_packed_rows_like_separate_ones(tiny_view):
    """Row = context + two continuations that each see only the context: each continuation's logits
    equal those of context + that continuation alone (sliding-window layers included)."""
    g = torch.Generator().manual_seed(3)
    ctx, c1, c2 = (torch.randint(0, 97, (n,), generator=g) for n in (9, 4, 3))
    packed = torch.cat([ctx, c1, c2])[None]
    n0, n1, n2 = 9, 4, 3
    pos = torch.cat([torch.arange(n0), torch.arange(n0, n0 + n1), torch.arange(n0, n0 + n2)])[None]
    T = n0 + n1 + n2
    allowed = torch.zeros(T, T, dtype=torch.bool)
    causal = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    allowed[:n0, :n0] = causal(n0)
    allowed[n0:n0 + n1, :n0] = True
    allowed[n0:n0 + n1, n0:n0 + n1] = causal(n1)
    allowed[n0 + n1:, :n0] = True
    allowed[n0 + n1:, n0 + n1:] = causal(n2)
    fwd = Forward(tiny_view)
    mask = BlockMask.from_drop(4, ["attn.0"])
    got = fwd.logits(packed, mask, positions=pos, attn_mask=allowed[None, None])
    alone1 = fwd.logits(torch.cat([ctx, c1])[None], mask)
    alone2 = fwd.logits(torch.cat([ctx, c2])[None], mask)
    torch.testing.assert_close(got[:, n0:n0 + n1], alone1[:, n0:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, n0 + n1:], alone2[:, n0:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", sorted(DROPS))
def test_stories260k_logits_equal_stock_forward(stories, masked):
    view, tok = stories
    ids = torch.tensor([tok("Once upon a time, there was a little girl named Lily. She loved").input_ids] * 2)
    mask = BlockMask.from_drop(5, DROPS[masked])
    assert torch.equal(Forward(view).logits(ids, mask), reference_logits(view, ids, mask))


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m"])
def test_real_models_logits_equal_stock_forward_in_float32(name):
    if not is_available(name):
        pytest.skip(f"{name} is not fetched (rap models fetch {name})")
    view, tok = load_view(name, dtype=torch.float32, device="cpu")
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is").input_ids])
    mask = BlockMask.from_drop(view.num_layers, ["attn.2", "ffn.5", "attn.9"])
    got = Forward(view).logits(ids, mask)
    assert torch.equal(got, reference_logits(view, ids, mask))


def test_perplexity_on_rap_forward_equals_stock_forward_under_a_mask(stories):
    from rap.eval.perplexity import perplexity
    from reference import zeroed_blocks

    view, _ = stories
    windows = torch.randint(3, 500, (3, 48), generator=torch.Generator().manual_seed(4))
    mask = BlockMask.from_drop(5, ["attn.1", "ffn.3"])
    ours = perplexity(view, windows, batch_size=2, progress=False, mask=mask)
    with zeroed_blocks(view, mask):
        stock = perplexity(view.model, windows, batch_size=2, progress=False)
    assert ours.nll_per_window == stock.nll_per_window and ours.ppl == stock.ppl


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_logits_are_bit_identical_to_stock_forward_in_bfloat16_on_cpu(family):
    from rap.core.model import BlockView
    from rap.sources import model_from_config

    from conftest import tiny_config

    torch.manual_seed(0)
    view = BlockView(model_from_config(tiny_config(family), dtype=torch.bfloat16, device="cpu"))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = BlockMask.from_drop(4, ["attn.2", "ffn.1"])
    assert torch.equal(Forward(view).logits(ids, mask), reference_logits(view, ids, mask))
