"""rap's decode path against stock `generate`: same tokens under the same mask, less work."""

import pytest
import torch

from rap.decode.decoder import Decoder, bucket_batch, bucket_length
from rap.errors import BudgetError, RequestError, UnsupportedModelError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView
from rap.sources import model_from_config

from conftest import tiny_config

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw", "Tom"]
MASKS = {"dense": [], "masked": ["attn.1", "ffn.3", "attn.4"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stock_generate(view, mask, prompts, new_tokens, pad_id=0, eos=None):
    """transformers' generate on left-padded prompts; returns the new tokens per row."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        attn[r, P - len(p):] = 1
    with torch.no_grad(), view.masked(mask):
        out = view.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad_id)
    return [row[P:].tolist() for row in out]


def trim_at(rows, stop):
    return [row[: row.index(stop) + 1] if stop in row else row for row in rows]


@pytest.fixture(scope="module")
def tiny_views():
    views = {}
    for family, extra in (("qwen3", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5})):
        torch.manual_seed(0)
        views[family] = BlockView(model_from_config(tiny_config(family, **extra), dtype=torch.float32, device="cpu"))
    return views


@pytest.mark.parametrize("masked", sorted(MASKS))
def test_greedy_tokens_equal_stock_generate_at_batch_1(stories, masked):
    view, tok = stories
    mask = BlockMask.from_drop(5, MASKS[masked])
    ids = [tok(PROMPTS[0]).input_ids]
    ours = Decoder(view).generate(ids, 40, mask=mask).tokens
    assert ours == stock_generate(view, mask, ids, 40)
    assert view.mask.is_full  # the decoder never touches the view's own mask


@pytest.mark.parametrize("masked", sorted(MASKS))
def test_greedy_tokens_equal_stock_generate_for_a_left_padded_batch(stories, masked):
    view, tok = stories
    mask = BlockMask.from_drop(5, MASKS[masked])
    ids = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in ids}) == 3
    ours = Decoder(view).generate(ids, 24, mask=mask, pad_token_id=0).tokens
    assert ours == stock_generate(view, mask, ids, 24)


@pytest.mark.parametrize("kv_ratio", [1.0, 0.5])
def test_a_prefill_run_one_row_at_a_time_gives_the_same_tokens(stories, kv_ratio):
    view, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS]
    mask = BlockMask.from_drop(5, MASKS["masked"])
    whole = Decoder(view).generate(ids, 12, mask=mask, pad_token_id=0, kv_ratio=kv_ratio).tokens
    rowwise = Decoder(view)
    rowwise.prefill_chunk_tokens = 1  # one row per chunk
    assert rowwise.generate(ids, 12, mask=mask, pad_token_id=0, kv_ratio=kv_ratio).tokens == whole


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "mistral"])
def test_other_families_match_stock_generate_padded_and_masked(tiny_views, family):
    """Qwen3's q/k norms, Qwen2's q/k/v biases, Mistral's sliding window (5 < prompt + new)."""
    view = tiny_views[family]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 9, 9, 1]]
    for mask in (BlockMask.full(4), BlockMask.from_drop(4, ["attn.2", "ffn.0"])):
        assert Decoder(view).generate(prompts, 12, mask=mask).tokens == stock_generate(view, mask, prompts, 12)


@pytest.mark.parametrize("which", ["stories", "qwen3"])
def test_the_captured_static_step_gives_the_same_tokens_run_eagerly(stories, tiny_views, which):
    """step='static' is the code CUDA graphs capture (whole static cache, key mask, in-graph sampling
    bookkeeping); on CPU it must agree with the exact path."""
    if which == "stories":
        view, tok = stories
        prompts = [tok(p).input_ids for p in PROMPTS]
        mask = BlockMask.from_drop(5, ["attn.0", "ffn.2"])
    else:
        view, prompts, mask = tiny_views["qwen3"], [[1, 2, 3], [4, 5, 6, 7, 8]], BlockMask.from_drop(4, ["attn.1"])
    exact = Decoder(view, step="exact").generate(prompts, 20, mask=mask, pad_token_id=0).tokens
    static = Decoder(view, step="static").generate(prompts, 20, mask=mask, pad_token_id=0).tokens
    assert static == exact


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy(stories):
    view, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    dec = Decoder(view)
    a = dec.generate(ids, 30, temperature=0.9, top_p=0.95, seed=11).tokens
    b = dec.generate(ids, 30, temperature=0.9, top_p=0.95, seed=11).tokens
    c = dec.generate(ids, 30, temperature=0.9, top_p=0.95, seed=12).tokens
    assert a == b and a != c
    assert all(0 <= t < 512 for row in a for t in row)
    greedy = dec.generate(ids, 30).tokens
    assert dec.generate(ids, 30, temperature=1.0, top_p=1e-6, seed=5).tokens == greedy
    static = Decoder(view, step="static").generate(ids, 30, temperature=0.9, top_p=0.95, seed=11).tokens
    assert static == a  # same noise stream, same picks on both step paths


def test_stop_tokens_end_each_row_like_generate_eos(stories):
    view, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS]
    free = Decoder(view).generate(ids, 30).tokens
    stop = free[0][6]  # a token row 0 emits early
    ours = Decoder(view).generate(ids, 30, stop_token_ids=[stop]).tokens
    assert ours[0] == free[0][:7]
    assert ours == trim_at(stock_generate(view, BlockMask.full(5), ids, 30, eos=stop), stop)
    assert all(stop not in row[:-1] for row in ours)


def test_dropped_attention_blocks_own_no_cache_and_the_cache_is_what_the_memory_model_says(stories):
    view, tok = stories
    mask = BlockMask.from_drop(5, ["attn.1", "attn.3", "ffn.0"])
    dec = Decoder(view)
    ids = [tok(p).input_ids for p in PROMPTS]
    dec.generate(ids, 10, mask=mask)
    (ws,) = dec._workspaces.values()
    assert sorted(ws.kv) == [0, 2, 4]
    P = max(len(p) for p in ids)
    B, T = bucket_batch(3), bucket_length(P + 10)
    assert dec.kv_resident_bytes == MemoryModel.from_view(view).kv_bytes(Request(B, P, T - P), mask)


def test_requests_the_budget_cannot_hold_are_refused(stories):
    view, tok = stories
    dec = Decoder(view, budget_bytes=view.resident_param_bytes() + 1000)
    with pytest.raises(BudgetError, match="budget"):
        dec.generate([tok(PROMPTS[0]).input_ids] * 4, 200)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]], max_new_tokens=4), "at least one token"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "at least 1"),
    (dict(prompts=[[1, 99999]], max_new_tokens=4), "token ids"),
    (dict(prompts=[[1, 2]], max_new_tokens=4, top_p=0.0), "top_p"),
])
def test_bad_requests_get_one_line_errors(stories, kwargs, message):
    with pytest.raises(RequestError, match=message):
        Decoder(stories[0]).generate(**kwargs)


def test_layer_math_rap_does_not_implement_is_refused():
    model = model_from_config(tiny_config("llama", hidden_act="relu"), dtype=torch.float32, device="cpu")
    with pytest.raises(UnsupportedModelError, match="relu"):
        Decoder(BlockView(model))


def test_graphs_need_cuda(stories):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RequestError, match="CUDA"):
        Decoder(stories[0], step="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_per_mask_matches_eager_and_switching_back_costs_no_capture():
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cuda")
    ids = [tok(p).input_ids for p in PROMPTS]
    dec = Decoder(view, compile=False)  # the graph mechanics; compiled kernels may round differently
    dense, masked = BlockMask.full(5), BlockMask.from_drop(5, ["attn.2", "ffn.1"])
    for mask in (dense, masked):
        got = dec.generate(ids, 24, mask=mask, pad_token_id=0)
        assert got.timing.graph and got.timing.capture_ms > 0
        want = Decoder(view, step="static").generate(ids, 24, mask=mask, pad_token_id=0).tokens
        assert got.tokens == want
    again = dec.generate(ids, 24, mask=dense, pad_token_id=0)
    assert again.timing.capture_ms == 0.0
    assert dec.prepare(dense, 3, max(len(p) for p in ids) + 24) < 1.0  # milliseconds


def test_rap_generate_prints_the_continuation_and_the_speed(one_torch_thread):
    import json

    from conftest import run_rap

    out = run_rap("generate", "stories260k", "--prompt", "Once upon a time", "--max-new", "24", "--drop", "ffn.4",
                  "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["mask"] == "-ffn.4" and res["texts"][0].startswith(", there was")
    assert res["timing"]["decode_steps"] >= 1


@pytest.mark.parametrize("fuse", ["copy", "inplace"])
def test_fused_projections_change_no_token_and_inplace_adds_no_bytes(fuse):
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cpu")  # fresh: inplace re-lays it out
    ids = [tok(p).input_ids for p in PROMPTS]
    mask = BlockMask.from_drop(5, ["ffn.1"])
    before = Decoder(view, step="static").generate(ids, 16, mask=mask, pad_token_id=0).tokens
    params = sum(p.numel() for p in view.model.parameters())
    dec = Decoder(view, step="static", fuse_projections=fuse)
    assert dec.generate(ids, 16, mask=mask, pad_token_id=0).tokens == before
    assert sum(p.numel() for p in view.model.parameters()) == params
    assert (dec.extra_weight_bytes > 0) == (fuse == "copy")
    if fuse == "inplace":
        a = view.attention_module(0)
        assert a.q_proj.weight.untyped_storage().data_ptr() == a.v_proj.weight.untyped_storage().data_ptr()
        assert Decoder(view).generate(ids, 16, mask=mask, pad_token_id=0).tokens == \
            stock_generate(view, mask, ids, 16)  # the HF model still computes the same function
