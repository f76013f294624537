"""benchmarks/width_peer.py: torch-pruning FFN-width pruning of stories260k at rap's parameter budgets."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the checkout, not installed

from benchmarks.quality import calibration_windows
from benchmarks.width_peer import (block_params, channels_for_budget, count_params, ffn_width,
                                   prune_ffn_width)


def _pruned(model, budget, importance="magnitude", calib=None, round_to=1, budget_of="total"):
    model = copy.deepcopy(model)
    keep = channels_for_budget(model, budget, budget_of, round_to)
    info = prune_ffn_width(model, keep, importance, calib, round_to)
    return model, info


@pytest.fixture(scope="module")
def calib(stories):
    view, tok = stories
    return calibration_windows(view, tok, windows=2, seq_len=64)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("budget", [0.8, 0.6])
def test_counted_parameters_after_pruning_are_within_2_percent_of_the_budget(stories, calib, importance, budget):
    view, _ = stories
    dense = count_params(view.model)
    model, info = _pruned(view.model, budget, importance, calib)
    params = count_params(model)
    assert params <= budget * dense
    assert abs(params - budget * dense) <= 0.02 * budget * dense
    assert info["ffn_channels"] == ffn_width(model) < ffn_width(view.model)
    # width pruning keeps the hidden size, the embeddings and every attention block as they were
    assert model.model.embed_tokens.weight.shape == view.model.model.embed_tokens.weight.shape
    for pruned, orig in zip(model.model.layers, view.model.model.layers):
        assert all(torch.equal(a, b) for a, b in zip(pruned.self_attn.parameters(), orig.self_attn.parameters()))


def test_block_budget_counts_only_block_parameters(stories):
    view, _ = stories
    model, _ = _pruned(view.model, 0.6, budget_of="blocks")
    ratio = block_params(model) / block_params(view.model)
    assert 0.58 <= ratio <= 0.6


@torch.no_grad()
def test_pruned_model_runs_forward_and_generate(stories):
    view, tok = stories
    model, _ = _pruned(view.model, 0.6, round_to=4)
    ids = torch.tensor([tok("Once upon a time").input_ids])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], view.config.vocab_size) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 6)


@torch.no_grad()
def test_magnitude_pruning_at_full_budget_is_a_no_op(stories):
    view, _ = stories
    model, info = _pruned(view.model, 1.0, round_to=4)
    assert info["ffn_channels"] == ffn_width(view.model)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, view.model(input_ids=ids).logits)


@torch.no_grad()
def test_pruned_ffn_equals_dense_ffn_with_the_removed_channels_zeroed(stories):
    """The slow, obvious reference: keep the dense weights, zero the down_proj columns of the channels that
    torch-pruning removed (found by matching gate rows); the logits must agree."""
    view, _ = stories
    model, _ = _pruned(view.model, 0.6, round_to=4)
    reference = copy.deepcopy(view.model)
    for small, ref in zip(model.model.layers, reference.model.layers):
        kept = [int((ref.mlp.gate_proj.weight == row).all(1).nonzero()[0]) for row in small.mlp.gate_proj.weight]
        removed = sorted(set(range(ref.mlp.gate_proj.out_features)) - set(kept))
        assert torch.equal(ref.mlp.up_proj.weight[kept], small.mlp.up_proj.weight)
        assert torch.equal(ref.mlp.down_proj.weight[:, kept], small.mlp.down_proj.weight)
        ref.mlp.down_proj.weight[:, removed] = 0
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
