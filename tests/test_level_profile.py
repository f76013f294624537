"""The level profile (rap.profile.levels): single-move NLL table, greedy sequential pass, checkpoint/resume."""

import math

import pytest
import torch

from rap.eval.perplexity import window_nll
from rap.core.forward import Forward
from rap.core.plan import DROP
from rap.profile import load_calibration
from rap.profile.levels import allowed_levels, level_profile, load_level_profile
from rap.core.quant import fake_quantize


@pytest.fixture(scope="module")
def calib(stories):
    view, tok = stories
    return load_calibration(tok, view.config.model_type, tokens=512, seq_len=128)


def _reference_nll(view, calib, block: str, level: str) -> float:
    """Mean NLL with block's linear weights replaced in the HF modules themselves (or the block masked)."""
    kind, i = block.split(".")
    module = view.attention_module(int(i)) if kind == "attn" else view.mlp_module(int(i))
    saved = {n: m.weight.data.clone() for n, m in module.named_children() if isinstance(m, torch.nn.Linear)}
    mask = None
    try:
        if level == DROP:
            from rap.core.mask import BlockMask

            mask = BlockMask.full(view.num_layers).drop(block)
        elif level != "dtype":
            for n, m in module.named_children():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data.copy_(fake_quantize(saved[n], level))
        fwd = Forward(view)  # fresh: reads the (patched) module tensors
        ids = calib.windows
        return float(window_nll(fwd.logits(ids, mask), ids).double().sum()) / calib.scored_tokens
    finally:
        for n, m in module.named_children():
            if n in saved:
                m.weight.data.copy_(saved[n])


def test_single_move_rise_equals_a_full_forward_with_that_block_fake_quantized(stories, calib):
    view, _ = stories
    prof = level_profile(view, calib, steps=0, progress=False)
    dense = _reference_nll(view, calib, "attn.0", "dtype")
    assert prof.dense_nll == pytest.approx(dense, rel=1e-5)
    for block, level in (("attn.2", "int4g64"), ("ffn.1", "int8"), ("ffn.3", DROP)):
        assert prof.single[block][level] == pytest.approx(_reference_nll(view, calib, block, level) - dense, abs=2e-5)


def test_the_heads_int8_rise_equals_a_full_forward_with_an_int8_head(stories, calib):
    from rap.core.plan import Plan

    view, _ = stories
    prof = level_profile(view, calib, steps=0, progress=False)
    ids = calib.windows
    plan = Plan.full(view.num_layers).with_head("int8")
    measured = float(window_nll(Forward(view).logits(ids, plan), ids).double().sum()) / calib.scored_tokens
    assert prof.head["single"]["int8"] == pytest.approx(measured - prof.dense_nll, abs=2e-5)
    assert prof.head["bytes"]["cpu"]["int8"] < prof.head["bytes"]["cpu"]["dtype"] / 3  # fp32 -> int8 + scales


def test_int4_is_offered_only_where_the_group_divides_every_projection(stories):
    view, _ = stories
    allowed = allowed_levels(view, 64)
    assert "int4g64" in allowed["attn.0"]  # hidden 64
    assert "int4g64" not in allowed["ffn.0"]  # down_proj in_features 172


def test_exact_greedy_first_move_is_the_smallest_single_rise_per_byte(stories, calib):
    view, _ = stories
    prof = level_profile(view, calib, steps=1, remeasure=None, progress=False, bytes_device="cpu")
    b = prof.bytes["cpu"]
    ratio = {(blk, lv): rise / (b[blk]["dtype"] - b[blk][lv])
             for blk, lvs in prof.single.items() for lv, rise in lvs.items()}
    best = min(ratio, key=lambda k: ratio[k])
    assert (prof.steps[0].block, prof.steps[0].level) == best
    assert prof.steps[0].bytes_freed == b[best[0]]["dtype"] - b[best[0]][best[1]]
    assert prof.steps[0].nll == pytest.approx(prof.dense_nll + prof.single[best[0]][best[1]], abs=1e-9)


def test_greedy_steps_free_bytes_and_their_nll_is_the_plans_measured_nll(stories, calib):
    view, _ = stories
    prof = level_profile(view, calib, steps=6, remeasure=3, progress=False)
    freed = [s.total_bytes_freed for s in prof.steps]
    assert all(s.bytes_freed > 0 for s in prof.steps) and freed == sorted(freed)
    plan = prof.plan_after(6)
    # re-measure the final plan from scratch with the HF modules patched
    fwd = Forward(view)
    from rap.profile.levels import LevelRunner, Streams

    streams = Streams(LevelRunner(view), calib.windows, [lv for _, lv in plan.items()], 8)
    assert streams.current_nll() / calib.scored_tokens == pytest.approx(prof.steps[-1].nll, abs=1e-5)
    assert fwd is not None and math.isfinite(prof.steps[-1].ppl)


def test_an_interrupted_profile_resumes_to_the_same_moves(stories, calib, tmp_path):
    view, _ = stories
    path = tmp_path / "levels.json"
    level_profile(view, calib, steps=2, remeasure=3, checkpoint=path, progress=False)
    part = load_level_profile(path)
    part.complete = False  # as if killed after two moves
    part.save(path)
    resumed = level_profile(view, calib, steps=4, remeasure=3, checkpoint=path, progress=False)
    fresh = level_profile(view, calib, steps=4, remeasure=3, progress=False)
    assert [(s.block, s.level) for s in resumed.steps] == [(s.block, s.level) for s in fresh.steps]
    assert load_level_profile(path).calibration["tokens"] == 512 and load_level_profile(path).command


@pytest.mark.gpu
def test_level_profile_runs_on_cuda_in_bf16_and_agrees_with_the_cpu_table(stories, calib):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rap.sources import load_view

    gview, _ = load_view("stories260k", dtype=torch.bfloat16, device="cuda")
    cpu = level_profile(stories[0], calib, steps=0, progress=False)
    gpu = level_profile(gview, calib, steps=2, remeasure=3, batch_windows=4, progress=False)
    assert gpu.bytes_device == "cuda" and len(gpu.steps) == 2
    assert gpu.dense_nll == pytest.approx(cpu.dense_nll, rel=2e-2)
    assert gpu.single["ffn.2"]["drop"] == pytest.approx(cpu.single["ffn.2"]["drop"], abs=5e-2)


def test_profile_cli_levels_method_writes_a_level_profile(tmp_path):
    from typer.testing import CliRunner

    from rap.cli import app

    out = tmp_path / "levels.json"
    res = CliRunner().invoke(app, ["profile", "stories260k", "--method", "levels", "--tokens", "512", "--seq-len",
                                   "128", "--steps", "2", "--remeasure", "2", "--out", str(out), "--dtype", "fp32",
                                   "--device", "cpu", "--library-tokens", "512"])
    assert res.exit_code == 0, res.output
    prof = load_level_profile(out)
    assert prof.complete and len(prof.steps) == 2 and prof.calibration["tokens"] == 512
    assert set(prof.bytes) == {"cpu", "cuda"} and prof.command  # (under CliRunner: the test runner's argv)
    # then its plan library, measured on the 512 tokens after the calibration's (4 windows of 128)
    sel = prof.library["selection"]
    assert sel["disjoint_from_calibration"] and sel["windows"] == 4 and len(prof.library["plans"]) > 10


def test_calibration_on_wikitext2_valid_takes_out_its_unk_markers_and_says_so(stories):
    # the tokenized release's <unk> markers are absent from the raw test text that perplexity is measured on
    view, tok = stories
    cal = load_calibration(tok, view.config.model_type, tokens=4096, seq_len=256)
    text = tok.decode(cal.windows.flatten().tolist())
    assert "unk>" not in text and cal.describe()["cleaning"] == "<unk> markers removed"
