import math

import pytest

from rap.errors import RequestError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request, cuda_block_bytes, parse_bytes


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


# ---- the decoder path's fixed and transient terms (derivations in rap/memory.py) --------------------
def test_cuda_runtime_is_two_cublas_workspaces_and_only_on_cuda(mem, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from rap.core.memory import cuda_cublas_workspace_bytes

    assert cuda_cublas_workspace_bytes() == 32 * 2**20
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")
    assert cuda_cublas_workspace_bytes() == 8 * 2**20 + 128 * 2**10
    cuda = MemoryModel(mem.shape, mem.base_bytes, mem.block_bytes, on_cuda=True, compiled=False,
                       cublas_workspace_bytes=32 * 2**20)
    assert cuda.runtime_bytes == 2 * 32 * 2**20 and mem.runtime_bytes == 0
    req, mask = Request(2, 64, 8), BlockMask.full(5)
    assert cuda.prefill_activation_bytes(req, mask) - mem.prefill_activation_bytes(req, mask) == cuda.runtime_bytes


def test_compiling_on_cuda_adds_the_autotuners_l2_flush_buffer_to_the_decode_peak(mem):
    kw = dict(on_cuda=True, cublas_workspace_bytes=0, l2_cache_bytes=50 * 2**20)
    plain = MemoryModel(mem.shape, mem.base_bytes, mem.block_bytes, compiled=False, **kw)
    compiled = MemoryModel(mem.shape, mem.base_bytes, mem.block_bytes, compiled=True, **kw)
    req, mask = Request(1, 16, 16), BlockMask.full(5)
    assert compiled.decode_activation_bytes(req, mask) >= 50 * 2**20 + compiled.buffer_bytes(req)
    assert compiled.decode_activation_bytes(req, mask) > plain.decode_activation_bytes(req, mask)
    assert compiled.prefill_activation_bytes(req, mask) == plain.prefill_activation_bytes(req, mask)


def test_sampler_peak_is_the_sort_with_its_radix_buffers(mem):
    V = mem.shape.vocab_size
    # logits, logits / T, sorted values, int64 indices + CUB buffers (measured on the H100: 36.4 and
    # 48.2 bytes per element on top of the logits, benchmarks/_memdiag.py)
    assert mem.sampler_bytes(1) == 40 * V
    assert mem.sampler_bytes(8) == 8 * 52 * V
    assert mem.sampler_bytes(128) == 128 * 40 * V


def test_decoder_buffers_scale_with_batch_vocab_and_length(mem):
    s = mem.shape
    one, two = mem.buffer_bytes(Request(1, 10, 6)), mem.buffer_bytes(Request(2, 10, 6))
    assert two - one == 4 * s.vocab_size + 8 * 16  # another row of noise and of the token record


def test_prefill_peak_is_one_layers_transient_on_the_residual_stream(mem):
    s, e = mem.shape, mem.shape.dtype_bytes
    req = Request(1, 256, 8)
    only_ffn = BlockMask((False,) * 5, (True,) * 5)
    stream = 256 * (e * s.hidden_size + 16 + 2 * e * s.head_dim) + 8 * 256 + 4 * s.vocab_size  # + fp32 logits
    # normed input, up, act(gate), their product and down's output live together (the gate is freed by
    # `g = act(g)`): what a CUDA memory snapshot of the prefill's peak holds
    mlp = 256 * max(8 * s.hidden_size, e * (s.hidden_size + 3 * s.intermediate_size),
                    e * (2 * s.hidden_size + 3 * s.intermediate_size), e * (3 * s.hidden_size + 2 * s.intermediate_size))
    assert mem.prefill_activation_bytes(req, only_ffn) == stream + mlp + mem.buffer_bytes(req)
    fused = MemoryModel(mem.shape, mem.base_bytes, mem.block_bytes)
    fused.fused_projections = True  # one [gate; up] buffer, freed only with up: one intermediate row more
    assert fused.prefill_activation_bytes(req, only_ffn) - mem.prefill_activation_bytes(req, only_ffn) == \
        256 * e * s.intermediate_size
    # the peak depends on the mask only through "some attention / some FFN block kept" (the policy's
    # cost tables rely on it)
    assert mem.prefill_activation_bytes(req, only_ffn) == mem.prefill_activation_bytes(
        req, BlockMask((False,) * 5, (True, False, False, False, False)))


def test_prefill_runs_a_few_rows_at_a_time_so_its_transients_stop_growing_with_the_batch(mem):
    from rap.core.memory import PREFILL_CHUNK_TOKENS

    s, P = mem.shape, 1024
    rows = PREFILL_CHUNK_TOKENS // P
    full = BlockMask.full(5)
    small, large = Request(rows, P, 8), Request(4 * rows, P, 8)
    grown = mem.prefill_activation_bytes(large, full) - mem.prefill_activation_bytes(small, full)
    # only what the whole batch holds grows: prompt ids, fp32 logits and the decoder's buffers
    whole = 3 * rows * (8 * P + 4 * s.vocab_size)
    assert grown == whole + mem.buffer_bytes(large) - mem.buffer_bytes(small)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_decoder_peak_on_cuda_is_what_the_memory_model_says():
    import torch
    from transformers import AutoConfig

    from rap.decode.decoder import Decoder, bucket_batch, bucket_length
    from rap.core.model import BlockView
    from rap.sources import model_from_config

    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=4096)
    view = BlockView(model_from_config(config, dtype=torch.bfloat16, device="cuda"))
    mask, (B, P, N) = BlockMask.full(6), (4, 2048, 8)
    prompts = torch.randint(10, 32000, (B, P)).tolist()
    dec = Decoder(view, compile=False)
    dec.generate(prompts, N, mask=mask, temperature=1.0, top_p=0.9, seed=0)  # every workspace exists now
    dec.release()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dec.generate(prompts, N, mask=mask, temperature=1.0, top_p=0.9, seed=0)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    T = bucket_length(P + N)
    mem = MemoryModel.from_view(view, on_cuda=True)
    req = Request(bucket_batch(B), P, T - P)
    predicted = mem.kv_bytes(req, mask) + mem.prefill_activation_bytes(req, mask) - mem.runtime_bytes
    # H200, torch 2.11: 149.21 MiB predicted, 149.28 measured (the FFN's live tensors, each rounded as the
    # caching allocator rounds it; the allocator's reuse of cached blocks moves the measurement a little)
    assert abs(predicted - measured) <= 0.02 * measured


def test_cuda_kv_tensors_are_charged_as_the_caching_allocator_rounds_them(mem):
    MiB = 2**20
    assert cuda_block_bytes(1000) == 1024  # 512-byte granules
    assert cuda_block_bytes(33 * MiB) == 34 * MiB  # own 2 MiB-rounded segment, 1 MiB remainder kept
    assert cuda_block_bytes(int(24.75 * MiB)) == int(24.75 * MiB)  # 1.25 MiB remainder is split off
    assert cuda_block_bytes(int(3.1875 * MiB)) == math.ceil(20 * MiB / 6)  # 6 per 20 MiB segment, last takes the rest
    cuda = MemoryModel(mem.shape, mem.base_bytes, mem.block_bytes, on_cuda=True, cublas_workspace_bytes=0,
                       l2_cache_bytes=0)
    req, mask = Request(3, 100, 20), BlockMask.full(5)
    layer = mem.kv_bytes(req, mask) // 5
    assert cuda.kv_bytes(req, mask) == 5 * 2 * cuda_block_bytes(layer // 2) >= mem.kv_bytes(req, mask)


def test_a_tied_head_is_one_tensor_and_quantized_tensors_never_look_tied():
    import torch

    from rap.core.model import same_tensor
    from rap.core.quant import quantize_weight

    w = torch.randn(64, 32)
    assert same_tensor(w, w) and same_tensor(w, w.view(64, 32)) and not same_tensor(w, w.clone())
    a, b = quantize_weight(w, "int8", "head"), quantize_weight(w.clone(), "int8", "head")
    assert not same_tensor(a, b)
