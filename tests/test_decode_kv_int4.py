"""int4 KV in the fast decoder: two values per byte, one fp32 (scale, zero) per (token, KV head), quantised on
write and dequantised in the attend by the same pair of functions as int8; the memory model counts its
bytes exactly; unsupported bits and an odd head_dim are one-line errors."""

import pytest
import torch
from conftest import STORY

import rap.decode.decoder as decode
import rap.decode.step as step_module
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.decode.decoder import Decoder
from rap.errors import RequestError
from rap.kv.decode_cache import (
    FlatLayerCache,
    KVLayout,
    dequantize_rows,
    layer_tensor_bytes,
    quantize_rows,
)
from rap.policy.greedy import kv_layout_for_bits
from rap.policy.kv_measure import KVOption, decoder_continuation_nll
from rap.serve.backends import DecoderBackend

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantise_dequantise_round_trip_is_within_half_a_step_per_element(bits):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 64) * torch.rand(5, 7, 1) * 10 + torch.randn(5, 7, 1) * 3  # rows off centre
    x[0, 0] = 0.0  # a constant row comes back exactly
    q, params = quantize_rows(x, bits)
    assert q.shape == ((5, 7, 64) if bits == 8 else (5, 7, 32))
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    x_hat = dequantize_rows(q, params)
    assert x_hat.shape == x.shape
    if bits == 8:  # symmetric: one scale, max|x| / 127
        step = params
        torch.testing.assert_close(step, x.abs().amax(-1) / 127)
    else:  # asymmetric: (scale, zero) = ((max - min) / 15, min)
        step = params[..., 0]
        torch.testing.assert_close(step[1:], (x.amax(-1) - x.amin(-1))[1:] / 15)
        torch.testing.assert_close(params[..., 1], x.amin(-1))
    assert ((x_hat - x).abs() <= step[..., None] / 2 + 1e-5).all()
    assert (x_hat[0, 0] == 0).all()


def test_int4_packs_two_values_per_byte_low_nibble_first():
    x = torch.tensor([[-1.0, 14.0, 0.0, 13.0]])  # min -1, step 1: stored levels 0, 15, 1, 14
    q, params = quantize_rows(x, 4)
    assert params.tolist() == [[1.0, -1.0]]
    assert q.tolist() == [[0 | (15 << 4), 1 | (14 << 4)]]
    assert dequantize_rows(q, params).tolist() == x.tolist()


def test_int4_cache_stores_half_bytes_and_attends_like_a_dequantised_reference():
    torch.manual_seed(0)
    B, Hkv, G, T, P, D = 2, 2, 3, 24, 20, 16
    cache = FlatLayerCache.allocate(B, Hkv, T, D, torch.float32, torch.device("cpu"), 4, positions=P + 4)
    assert cache.bits == 4 and cache.keys.shape == (B * Hkv * T, D // 2) and cache.keys.dtype == torch.uint8
    assert cache.nbytes == sum(layer_tensor_bytes(B, Hkv, T, D, 4, 4))
    k, v = torch.randn(B, Hkv, P, D), torch.randn(B, Hkv, P, D)
    keep = torch.ones(B, Hkv, P, dtype=torch.bool)
    cache.write_prompt(0, k, v, keep, T - P)
    q = torch.randn(B, Hkv * G, 1, D)
    got = cache.attend(q, D ** -0.5)
    kq, ks = quantize_rows(k, 4)  # ks [B, Hkv, P, 2]: (scale, zero) per (token, KV head)
    vq, vs = quantize_rows(v, 4)
    kh, vh = dequantize_rows(kq, ks), dequantize_rows(vq, vs)  # [B, Hkv, P, D]
    qg = q.view(B, Hkv, G, D)
    want = torch.softmax(qg @ kh.transpose(-1, -2) * D ** -0.5, -1) @ vh
    torch.testing.assert_close(got, want.view(B, Hkv * G, 1, D), atol=1e-5, rtol=1e-5)


def _first_decode_logits(view, ids, bits):
    """The logits of the first decode step (the first one to read the quantised cache)."""
    got, real = [], step_module.advance

    def advance(ws, logits, sampled):
        got.append(logits[:1].clone())
        real(ws, logits, sampled)

    step_module.advance = advance
    try:
        dec = Decoder(view, step="exact")
        dec.use_graphs = False
        dec.generate([ids], 3, kv_bits=bits)
    finally:
        step_module.advance = real
    return torch.log_softmax(got[0].float(), -1)


def test_int4_kv_at_full_keep_is_close_to_the_16_bit_cache_and_int8_is_closer(stories, story_ids):
    # stories260k has head_dim 8: one (scale, zero) per 8 values. Measured here (CPU): the first decode
    # step's log-probs differ by at most 0.32 (int8) and 5.4 (int4) from the 16-bit cache's, the
    # argmax agrees for both; continuation NLL 1.109 (16-bit), 1.117 (int8), 1.301 (int4; symmetric
    # int4 measured 2.05) nats per token. Greedy int4 tokens leave the full cache's after 5 tokens
    # (int8: after 23).
    view, _ = stories
    full = _first_decode_logits(view, story_ids, 16)
    d8 = (_first_decode_logits(view, story_ids, 8) - full).abs().max()
    l4 = _first_decode_logits(view, story_ids, 4)
    d4 = (l4 - full).abs().max()
    assert d8 < d4 < 7.0 and l4.argmax() == full.argmax()
    first = Decoder(view).generate([story_ids], 4).tokens[0]
    int4 = Decoder(view).generate([story_ids], 4, kv_bits=4)
    assert int4.tokens[0] == first and int4.kv_bits == 4 and int4.kv_press is None
    ids = torch.tensor([story_ids])
    nll = decoder_continuation_nll(Decoder(view), ids, 30, [KVOption(1.0, b) for b in (16, 8, 4)])
    n16, n8, n4 = (nll[KVOption(1.0, b)] for b in (16, 8, 4))
    assert n16 <= n8 * 1.02 and n8 < n4 < 1.3 * n16


@pytest.mark.parametrize("press,ratio", [("adakv", 1.0), ("adakv", 0.3), ("snapkv", 0.3)])
def test_int4_cache_bytes_equal_the_tensors_and_the_memory_model(stories, press, ratio):
    view, _ = stories
    ids = [[(7 * i) % 500 + 3 for i in range(300)]] * 3
    mask = BlockMask.from_drop(5, ["attn.3"])
    dec = Decoder(view)
    dec.generate(ids, 20, mask=mask, kv_ratio=ratio, kv_press=press, kv_bits=4)
    (ws,) = [w for w in dec._workspaces.values() if w.layout is not None]
    tensors = sum(t.numel() * t.element_size() for c in ws.kv.values()
                  for t in (c.keys, c.values, c.key_scale, c.value_scale, c.starts, c.lengths))
    assert all(c.bits == 4 for c in ws.kv.values())
    planned = DecoderBackend(view, Decoder, decode).planning_request(Request(3, 300, 20))
    model = MemoryModel.from_view(view, kv_length_quantum=decode.LENGTH_QUANTUM)
    predicted = model.kv_bytes(planned, mask, ratio, KVLayout(press, 4))
    assert dec.kv_resident_bytes == tensors == predicted
    int8 = Decoder(view)
    int8.generate(ids, 20, mask=mask, kv_ratio=ratio, kv_press=press, kv_bits=8)
    # a row costs D + 4 bytes at int8 and D / 2 + 8 at int4: equal at stories260k's head_dim 8
    assert view.shape.head_dim == 8 and dec.kv_resident_bytes == int8.kv_resident_bytes
    if press == "adakv":  # what the policy plans a 4-bit decision with
        assert predicted == model.kv_bytes(planned, mask, ratio, kv_layout_for_bits(4))


def test_the_memory_model_charges_int4_rows_half_the_values_and_two_fp32_parameters(stories):
    view, _ = stories
    s = view.shape
    model = MemoryModel.from_view(view)
    request, mask = Request(2, 256, 32), BlockMask.full(s.num_layers)
    b8 = model.kv_layer_bytes(request, mask, 1.0, KVLayout("adakv", 8))
    b4 = model.kv_layer_bytes(request, mask, 1.0, KVLayout("adakv", 4))
    tokens = model.kv_layer_tokens(request, mask, 1.0, KVLayout("adakv", 4))
    segments = request.batch * s.num_kv_heads
    for i in b8:
        rows = segments * tokens[i]
        assert b4[i] == 2 * rows * (s.head_dim // 2 + 8) + 2 * segments * 8  # + starts / lengths
        assert b8[i] == 2 * rows * (s.head_dim + 4) + 2 * segments * 8


@pytest.mark.parametrize("bits", [3, 2])
def test_unsupported_kv_bits_are_one_line_errors_everywhere(stories, bits):
    for call in (lambda: Decoder(stories[0]).generate([[1, 2, 3]], 2, kv_bits=bits),
                 lambda: KVLayout("adakv", bits), lambda: kv_layout_for_bits(bits)):
        with pytest.raises(RequestError, match="KV bits must be one of 16, 8, 4") as err:
            call()
        assert "\n" not in str(err.value)


def test_an_odd_head_dim_refuses_int4_in_one_line():
    # (transformers refuses an odd head_dim for RoPE models, so this guards the cache and the decoder
    # against other families; the decoder runs the same check before any work)
    with pytest.raises(RequestError, match="head_dim, which must be even") as err:
        FlatLayerCache.allocate(1, 2, 8, 7, torch.float32, torch.device("cpu"), 4)
    assert "\n" not in str(err.value)
    with pytest.raises(RequestError, match="must be even"):
        quantize_rows(torch.randn(3, 7), 4)
    FlatLayerCache.allocate(1, 2, 8, 7, torch.float32, torch.device("cpu"), 8)  # int8 has no such limit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_on_cuda_int4_runs_in_the_captured_graph_like_the_static_step(ratio):
    # on CUDA an int4 cache skips the Triton kernel (16-bit / int8 only): the PyTorch attend is captured
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cuda")
    prompts = [tok(STORY).input_ids, tok("The little dog ran to the park").input_ids]
    kw = {"kv_ratio": ratio, "kv_press": "adakv", "kv_bits": 4, "pad_token_id": 0}
    dec = Decoder(view, compile=False)
    got = dec.generate(prompts, 16, **kw)
    assert got.timing.graph and got.kv_bits == 4
    assert got.tokens == Decoder(view, step="static").generate(prompts, 16, **kw).tokens
