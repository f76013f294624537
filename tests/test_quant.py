"""int8 / int4 blocks: torchao kernels inside rap's decoder, bytes exactly as the memory model counts them,
and greedy tokens equal to a plain transformers model built from the same quantized-then-dequantized weights."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rap.decode.decoder import Decoder
from rap.core.memory import MemoryModel
from rap.core.model import BlockView
from rap.core.plan import Plan, PlanError
from rap.core.quant import (fake_quantize, module_storage_bytes, quantize_weight, quantized_weight_bytes,
                       set_module_level, storage_bytes)
from rap.sources import model_from_config

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEVELS = ("int8", "int4g32", "int4g64", "int4g128")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_kernel_matches_its_dequantized_values(level, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(96, 256, dtype=dtype), torch.randn(3, 5, 256, dtype=dtype)
    q = quantize_weight(w, level)
    assert storage_bytes(q) == quantized_weight_bytes(96, 256, level, w.element_size(), "cpu")
    assert storage_bytes(q) < w.numel() * w.element_size() * (0.6 if level == "int8" and dtype == torch.float32 else 0.7)
    ref = fake_quantize(w, level)
    assert (ref - w).abs().max() < (0.02 if level == "int8" else 0.5) * w.abs().max()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(F.linear(x, q), F.linear(x, ref), atol=tol * 16, rtol=tol)


def test_cuda_int4_bytes_count_tinygemm_padding():
    # Int4TilePackedTo4dTensor pads K to 1024 and N to 8, scales and zeros in bf16
    assert quantized_weight_bytes(1536, 576, "int4g64", 2, "cuda") == 1536 * 1024 // 2 + 16 * 1536 * 2 * 2
    assert quantized_weight_bytes(4096, 4096, "int4g128", 2, "cuda") == 4096 * 4096 // 2 + 32 * 4096 * 4


def test_int8_runs_torchao_on_cpu_and_a_bad_kernel_choice_is_one_line(monkeypatch):
    from rap.core.quant import int8_kernel

    assert int8_kernel("cpu") == "torchao"
    monkeypatch.setenv("RAP_INT8_KERNEL", "cutlass")
    with pytest.raises(PlanError, match="RAP_INT8_KERNEL='cutlass'"):
        int8_kernel("cuda")
    monkeypatch.setenv("RAP_INT8_KERNEL", "torchao")
    assert int8_kernel("cuda") == "torchao"
    # torchao's Int8Tensor holds a per-row int8 zero point, gemlite a single fp32 meta scale
    assert quantized_weight_bytes(96, 256, "int8", 2, "cuda") == 96 * 256 + 4 * 96 + 96


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 8, 33])
def test_cuda_int8_is_gemlite_with_the_cpu_values_and_counted_bytes(M, monkeypatch):
    from rap.core.gemlite_int8 import GemliteInt8Tensor, available
    from rap.core.quant import int8_kernel, weight_level

    if not available():
        pytest.skip("gemlite not installed (the cuda extra)")
    monkeypatch.delenv("RAP_INT8_KERNEL", raising=False)
    torch.manual_seed(0)
    w = torch.randn(1536, 576, dtype=torch.bfloat16, device="cuda") * 0.05
    q = quantize_weight(w, "int8")
    assert isinstance(q, GemliteInt8Tensor) and int8_kernel("cuda") == "gemlite" and weight_level(q) == "int8"
    assert storage_bytes(q) == quantized_weight_bytes(1536, 576, "int8", 2, "cuda")
    ref = fake_quantize(w, "int8")  # the values torchao's Int8Tensor (the CPU kernel) holds for this weight
    torch.testing.assert_close(q.dequantize(), ref)
    x = torch.randn(M, 576, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(F.linear(x, q).float(), F.linear(x, ref).float(), atol=0.05, rtol=0.02)


def random_llama(layers=3, hidden=128, inter=256, vocab=256):
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, max_position_embeddings=256)
    model = model_from_config(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():  # larger weights than the init's 0.02, so quantization error shows in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return BlockView(model, name="tiny-llama")


@pytest.mark.parametrize("spec", ["*=int8", "*=int4g64", "ffn.*=int4g32,attn.1=drop,attn.0=int8,attn.2=int4g128"])
def test_resident_bytes_of_quantized_blocks_equal_the_memory_model(spec):
    view = random_llama()
    mem = MemoryModel.from_view(view)
    plan = Plan.parse(spec, view.num_layers).validate(view.shape)
    for name, level in plan.items():
        module = view.block_module(name)
        dense = module_storage_bytes(module)
        assert dense == mem.level_bytes(name, "dtype")
        if level in ("dtype", "drop"):
            continue
        set_module_level(module, level, name)
        assert module_storage_bytes(module) == mem.level_bytes(name, level) < dense
    resident = view.base_bytes + sum(module_storage_bytes(view.block_module(n)) for n, lv in plan.items() if lv != "drop")
    assert resident == mem.param_bytes(plan)


def dequantized_copy(view, plan) -> BlockView:
    """A separate copy of the model whose quantized blocks (and int8 head) hold their quantized-then-dequantized
    weights."""
    ref = BlockView(copy.deepcopy(view.model))
    with torch.no_grad():
        if plan.head_level != "dtype":
            for w in {id(m.weight): m.weight for m in (ref.model.get_input_embeddings(),
                                                       ref.model.get_output_embeddings())}.values():
                w.copy_(fake_quantize(w, plan.head_level))
        for name, level in plan.items():
            if level not in ("dtype", "drop"):
                for lin in ref.block_module(name).children():
                    if isinstance(lin, torch.nn.Linear):
                        lin.weight.copy_(fake_quantize(lin.weight, level))
    return ref


def reference_tokens(view, plan, prompts, new_tokens):
    """A separate transformers model: each kept block's linear weights replaced by their quantized-then-
    dequantized values (fake_quantize), dropped blocks masked by BlockView, stock greedy generate."""
    ref = dequantized_copy(view, plan)
    out = []
    with torch.no_grad(), ref.masked(plan.mask):
        for p in prompts:
            ids = torch.tensor([p])
            gen = ref.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("spec", ["*=int8", "*=int4g64", "ffn.*=int4g32,attn.1=drop,attn.0=int8,attn.2=int4g128",
                                  "head=int8", "ffn.*=int4g64,head=int8"])
@pytest.mark.parametrize("step", ["exact", "static"])
def test_plan_tokens_equal_a_transformers_model_with_dequantized_weights(spec, step):
    view = random_llama()
    plan = Plan.parse(spec, view.num_layers)
    prompts = [[5, 17, 33, 2, 90, 14, 7], [200, 3, 41]]
    want = reference_tokens(view, plan, prompts, 12)
    dense = Decoder(view, step=step).generate(prompts, 12).tokens
    got = Decoder(view, step=step).generate(prompts, 12, mask=plan).tokens
    assert got == want
    if "int4" in spec:  # int4 really changes this model's tokens (int8 is too close to dense to, here)
        assert got != dense


def test_the_head_is_a_knob_of_its_own_dtype_or_int8():
    plan = Plan.parse("ffn.*=int8,head=int8", 4)
    assert plan.head_level == "int8" and Plan.parse("*=int8", 4).head_level == "dtype"  # wildcards mean blocks
    assert Plan.parse(plan.spec(), 4) == plan and Plan.from_dict(plan.to_dict(), 4) == plan
    assert plan.with_levels({"ffn.0": "drop"}).head_level == "int8" and plan != plan.with_head("dtype")
    for bad in ("head=int4g64", "head=drop", "head=fp4"):
        with pytest.raises(PlanError, match="head=|unknown level"):
            Plan.parse(bad, 4)


def test_an_int8_head_frees_its_bytes_in_the_memory_model_and_on_the_device():
    view = random_llama()
    mem = MemoryModel.from_view(view)
    V, H = view.shape.vocab_size, view.shape.hidden_size
    tensors = mem.head_tensors
    assert tensors == (1 if view.config.tie_word_embeddings else 2)
    plan = Plan.parse("head=int8", view.num_layers)
    assert mem.param_bytes(Plan.full(view.num_layers)) - mem.param_bytes(plan) == tensors * (4 * V * H - (V * H + 5 * V))
    q = quantize_weight(view.model.get_input_embeddings().weight, "int8")
    assert storage_bytes(q) * tensors == mem.head_bytes("int8")


def test_stories260k_int8_and_int4_attention_match_the_reference(stories):
    view, tok = stories
    plan = Plan.parse("attn.*=int4g64,ffn.*=int8,ffn.4=drop", view.num_layers)
    prompts = [tok("Once upon a time").input_ids, tok("The little dog ran to the").input_ids]
    assert Decoder(view).generate(prompts, 16, mask=plan).tokens == reference_tokens(view, plan, prompts, 16)


def test_fused_projections_quantize_to_the_same_values():
    view = random_llama()
    plan = Plan.parse("*=int4g64", view.num_layers)
    prompts = [[5, 17, 33, 2, 90, 14, 7]]
    plain = Decoder(view, step="static").generate(prompts, 10, mask=plan).tokens
    fused = Decoder(view, step="static", fuse_projections="copy")
    assert fused.generate(prompts, 10, mask=plan).tokens == plain
    assert fused.block_weights(plan)[0][0].wqkv is not None


def test_a_level_the_shape_does_not_allow_is_one_line(stories):
    view, _ = stories
    with pytest.raises(PlanError, match="does not divide"):
        Decoder(view).generate([[1, 2, 3]], 2, mask=Plan.parse("ffn.0=int4g64", view.num_layers))


def test_decoder_uses_blocks_already_resident_at_their_level():
    view = random_llama()
    plan = Plan.parse("ffn.*=int8,attn.0=int4g64", view.num_layers)
    prompts = [[5, 17, 33, 2]]
    want = Decoder(view, step="static").generate(prompts, 8, mask=plan).tokens
    for name, level in plan.items():
        if level != "dtype":
            set_module_level(view.block_module(name), level, name)
    dec = Decoder(view, step="static")
    assert dec.generate(prompts, 8, mask=plan).tokens == want and dec.extra_weight_bytes == 0
    with pytest.raises(Exception, match="is resident at int4g64, the plan runs it at dtype"):
        dec.generate(prompts, 8, mask=Plan.full(view.num_layers))


def test_rap_forward_runs_a_plans_quantized_blocks_with_their_quantized_values(stories):
    """Perplexity, zero-shot and the demo's probe go through rap.core.forward: under a plan they must score
    the quantized model (its logits equal a transformers model holding the dequantized weights)."""
    from rap.core.forward import Forward

    view, _ = stories
    plan = Plan.parse("attn.*=int4g64,ffn.*=int8,ffn.4=drop,head=int8", view.num_layers)
    ref = dequantized_copy(view, plan)
    ids = torch.tensor([[1, 345, 67, 89, 210, 33, 5, 77]])
    fwd = Forward(view)
    got, dense = fwd.logits(ids, plan), fwd.logits(ids, plan.mask)
    with torch.no_grad():
        want = Forward(ref).logits(ids, plan.mask)
    assert torch.equal(got, want) and not torch.equal(got, dense)


def test_an_int8_head_on_torchao_runs_in_vocabulary_chunks_with_the_same_logits():
    from rap.core.layers import head_linear
    from rap.core.quant import HEAD_CHUNK_ROWS

    torch.manual_seed(0)
    w = torch.randn(2 * HEAD_CHUNK_ROWS + 100, 64)
    q, h = quantize_weight(w, "int8"), torch.randn(3, 64)
    torch.testing.assert_close(head_linear(h, q, None), F.linear(h, fake_quantize(w, "int8")), atol=1e-4, rtol=1e-4)
