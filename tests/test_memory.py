import pytest

from rap.errors import RequestError
from rap.mask import BlockMask
from rap.memory import MemoryModel, Request, parse_bytes


@pytest.fixture
def mem(stories):
    return MemoryModel.from_view(stories[0])


def test_kv_term_scales_with_kept_attention_layers_batch_and_tokens(mem):
    s = mem.shape
    full = BlockMask.full(5)
    req = Request(3, 100, 20)
    assert mem.kv_bytes(req, full) == 3 * 120 * 5 * 2 * s.num_kv_heads * s.head_dim * 4
    two_gone = full.drop("attn.1", "attn.4")
    assert mem.kv_bytes(req, two_gone) == mem.kv_bytes(req, full) * 3 // 5
    assert mem.kv_bytes(req, full.drop("ffn.0")) == mem.kv_bytes(req, full)


def test_kv_keep_ratio_shrinks_only_the_prompt_part(mem):
    full = BlockMask.full(5)
    req = Request(1, 1000, 10)
    per_token = mem.kv_bytes_per_token(full)
    assert mem.kv_bytes(req, full, kv_ratio=0.1) == (100 + 10) * per_token


def test_dropping_blocks_frees_exactly_their_parameter_bytes(stories, mem):
    view = stories[0]
    mask = BlockMask.from_drop(5, ["ffn.0", "attn.3"])
    freed = view.block("ffn.0").param_bytes + view.block("attn.3").param_bytes
    assert mem.param_bytes(BlockMask.full(5)) - mem.param_bytes(mask) == freed


def test_fits_agrees_with_the_breakdown(mem):
    req, mask = Request(8, 256, 64), BlockMask.full(5)
    peak = mem.breakdown(mask, req).total_bytes
    assert mem.fits(peak, mask, req) and not mem.fits(peak - 1, mask, req)


def test_prefill_activations_grow_with_the_prompt(mem):
    mask = BlockMask.full(5)
    small = mem.prefill_activation_bytes(Request(1, 128, 8), mask)
    large = mem.prefill_activation_bytes(Request(1, 512, 8), mask)
    assert large > 3 * small


@pytest.mark.parametrize("text, n", [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9), (42, 42)])
def test_sizes_parse(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["six gigs", "-1GB", "12XB"])
def test_bad_sizes_are_request_errors(bad):
    with pytest.raises(RequestError):
        parse_bytes(bad)


@pytest.mark.parametrize("args", [(0, 10, 10), (1, 0, 10), (1, 10, -5)])
def test_non_positive_request_sizes_are_rejected(args):
    with pytest.raises(RequestError, match="positive"):
        Request(*args)
