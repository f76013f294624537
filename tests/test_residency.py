"""WeightResidency with levels: blocks move between dtype / int8 / int4 / drop at run time, bytes exactly
as the memory model says, the order of moves within the larger of the old and new totals plus one move."""

import pytest
import torch

from rap.decode.decoder import Decoder
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel
from rap.core.model import BlockView
from rap.core.plan import Plan
from rap.serve.residency import WeightResidency
from rap.sources import model_from_config

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def view():
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      max_position_embeddings=256)
    return BlockView(model_from_config(cfg, dtype=torch.float32, device="cpu"), name="tiny-llama")


PLANS = ["*=int8", "ffn.*=int4g64,attn.0=drop,head=int8", "attn.*=int4g32,ffn.1=int8,ffn.2=drop", "", "*=int4g128",
         "ffn.*=drop,attn.*=int8,head=int8", "head=int8", ""]


def test_resident_bytes_after_every_switch_equal_the_memory_model(view):
    res = WeightResidency(view)
    mem = MemoryModel.from_view(view)
    for spec in PLANS:
        plan = Plan.parse(spec or None, view.num_layers)
        res.apply(plan)
        assert res.plan == plan
        assert res.measured_resident_bytes() == res.resident_bytes() == mem.param_bytes(plan)
    assert res.moves["quantized"] > 0 and res.moves["dequantized"] > 0 and res.moves["dropped"] > 0


def test_dense_weights_come_back_bit_for_bit_with_their_parameters(view):
    before = {n: p.detach().clone() for n, p in view.model.named_parameters()}
    norm = view.layers[1].input_layernorm.weight
    res = WeightResidency(view)
    for spec in PLANS:
        res.apply(Plan.parse(spec or None, view.num_layers))
    res.apply(BlockMask.full(view.num_layers))
    after = dict(view.model.named_parameters())
    assert all(type(p) is torch.nn.Parameter and torch.equal(p, before[n]) for n, p in after.items())
    assert view.layers[1].input_layernorm.weight is norm  # non-linear parameters keep their identity


def test_quantized_residency_decodes_like_the_decoders_own_quantization(view):
    plan = Plan.parse("ffn.*=int4g64,attn.1=int8,attn.2=drop,head=int8", view.num_layers)
    prompts = [[5, 17, 33, 2, 90]]
    want = Decoder(view, step="static").generate(prompts, 10, mask=plan).tokens
    res = WeightResidency(view)
    res.apply(plan)
    dec = Decoder(view, step="static")
    assert dec.generate(prompts, 10, mask=plan).tokens == want and dec.extra_weight_bytes == 0
    res.apply(Plan.full(view.num_layers))
    dec.refresh_weights()
    assert dec.generate(prompts, 10).tokens == Decoder(view, step="static").generate(prompts, 10).tokens


def test_moves_go_down_first_and_never_need_more_than_one_move_beyond_the_totals(view):
    res = WeightResidency(view)
    res.apply(Plan.parse("ffn.*=int8,attn.*=int4g64", view.num_layers))
    target = Plan.parse("ffn.*=int4g64,attn.*=dtype,ffn.0=drop", view.num_layers)
    moves = res.moves_for(target)
    downs = [m.down for m in moves]
    assert downs == sorted(downs, reverse=True) and any(downs) and not all(downs)  # every down before every up
    start, end = res.resident_bytes(), MemoryModel.from_view(view).param_bytes(target)
    worst_move = max(m.after_bytes + m.transient_bytes for m in moves)
    assert max(start, end) <= res.transition_peak_bytes(target) <= max(start, end) + worst_move
    # up moves start with the largest old copy, when the total is lowest
    ups = [m for m in moves if not m.down]
    assert [m.before_bytes for m in ups] == sorted((m.before_bytes for m in ups), reverse=True)


def test_staged_quantized_copies_need_no_quantization_transient(view):
    res = WeightResidency(view)
    plan = Plan.uniform(view.num_layers, "int8")
    assert all(m.transient_bytes > 0 for m in res.moves_for(plan))
    res.stage_host_copies(("int8",))
    assert all(m.transient_bytes == 0 for m in res.moves_for(plan))
    res.apply(plan)
    assert res.measured_resident_bytes() == res.resident_bytes()


def test_engine_switches_levels_between_batches(stories):
    from rap.serve.engine import Engine, GenerationRequest

    view, tok = stories
    engine = Engine(view, budget="1GiB", tokenizer=tok)
    plan = Plan.parse("attn.*=int4g64,ffn.*=int8,ffn.4=drop,head=int8", view.num_layers)
    engine.policy = lambda req, budget: plan
    out = engine.generate([GenerationRequest(prompt="Once upon a time", max_new_tokens=8)])
    assert out[0].ok and engine.residency.plan == plan
    assert engine.residency.measured_resident_bytes() == engine.memory_model.param_bytes(plan)
    engine.policy = lambda req, budget: BlockMask.full(view.num_layers)
    try:
        assert engine.generate([GenerationRequest(prompt="Once upon a time", max_new_tokens=8)])[0].ok
        assert engine.residency.plan == Plan.full(view.num_layers)
    finally:  # the stories view is shared by the whole session: leave it dense
        engine.residency.apply(Plan.full(view.num_layers))
