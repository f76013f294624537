"""Block importance: the block-by-block forward, exact GSI against the plain algorithm, racing,
checkpoint/resume, the one-shot baselines, the profile file and the curve command."""

import importlib
import json

import pytest
import torch
from typer.testing import CliRunner

from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.profile import (BlockRunner, Calibration, Racing, gsi, load_calibration, load_profile, naive_gsi,
                         oneshot, random_order, shortgpt)

gsi_module = importlib.import_module("rap.profile.gsi")  # the package exports the function under the same name
from rap.sources import model_from_config

from conftest import tiny_config
from reference import zeroed_blocks


@pytest.fixture(scope="module")
def stories_calib(stories):
    view, tok = stories
    return load_calibration(tok, view.config.model_type, tokens=16 * 128, seq_len=128, seed=0)


def tiny_calib(vocab: int = 97, windows: int = 6, seq_len: int = 24, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, vocab, (windows, seq_len), generator=g), "random ids", seed)


def test_block_by_block_forward_is_bit_identical_to_the_stock_forward(tiny_view):
    runner = BlockRunner(tiny_view)
    ids = torch.randint(0, 97, (3, 20))  # longer than gemma3's sliding window of 4
    for mask in (BlockMask.full(4), BlockMask.from_drop(4, ["attn.1", "ffn.2", "attn.3"])):
        with torch.no_grad(), zeroed_blocks(tiny_view, mask):
            stock = tiny_view.model(input_ids=ids, use_cache=False).logits
            ours = runner.logits(runner.forward(ids, mask))
        assert torch.equal(stock, ours), str(mask)


def test_block_by_block_forward_matches_the_real_tiny_model(stories):
    view, tok = stories
    runner = BlockRunner(view)
    ids = tok(["Once upon a time, there was a little dog.", "Tom and Lily went to the park."],
              return_tensors="pt", padding=True).input_ids
    for mask in (BlockMask.full(5), BlockMask.from_drop(5, ["attn.0", "ffn.3"])):
        with torch.no_grad(), zeroed_blocks(view, mask):
            assert torch.equal(view.model(input_ids=ids, use_cache=False).logits,
                               runner.logits(runner.forward(ids, mask)))


def test_gsi_reuses_prefix_activations_but_matches_naive_order(stories, stories_calib):
    view, _ = stories
    naive = naive_gsi(view, stories_calib, progress=False)
    exact = gsi(view, stories_calib, progress=False)
    assert exact.order == naive.order
    assert exact.dense_ppl == pytest.approx(naive.dense_ppl, rel=1e-5)
    assert exact.ppl_after == pytest.approx(naive.ppl_after, rel=1e-5)
    # how much is saved depends on where the removed blocks sit (a block late in the model leaves a long
    # prefix to reuse): 1.87x on this calibration text, 2x before its <unk> markers were taken out
    assert naive.block_forwards / exact.block_forwards >= 1.5
    assert len(exact.order) == len(set(exact.order)) == 10


def test_every_memory_plan_gives_the_same_exact_result(stories, stories_calib):
    view, _ = stories
    ref = gsi(view, stories_calib, steps=6, progress=False, predict=0)
    for kwargs in (dict(predict=4), dict(cache_bytes=1), dict(batch_windows=3, chunk_windows=5)):
        other = gsi(view, stories_calib, steps=6, progress=False, **kwargs)
        assert other.order == ref.order, kwargs
        assert other.ppl_after == pytest.approx(ref.ppl_after, rel=1e-6), kwargs
    no_cache = gsi(view, stories_calib, steps=6, progress=False, cache_bytes=1)
    with_snapshots = gsi(view, stories_calib, steps=6, progress=False, predict=4)
    assert not no_cache.settings["resident_cache"]
    assert with_snapshots.block_forwards < ref.block_forwards < no_cache.block_forwards


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_exact_gsi_matches_naive_on_other_families(model_type):
    torch.manual_seed(0)
    view = BlockView(model_from_config(tiny_config(model_type), dtype=torch.float32, device="cpu"), name=model_type)
    calib = tiny_calib()
    naive = naive_gsi(view, calib, progress=False)
    exact = gsi(view, calib, progress=False)
    assert exact.order == naive.order
    assert exact.ppl_after == pytest.approx(naive.ppl_after, rel=1e-5)


def test_racing_gsi_spends_fewer_block_forwards_and_agrees_with_exact_here(stories, stories_calib):
    view, _ = stories
    exact = gsi(view, stories_calib, progress=False)
    racing = gsi(view, stories_calib, progress=False, racing=Racing(first_windows=4))
    assert racing.method == "gsi-racing"
    assert racing.block_forwards < exact.block_forwards
    assert racing.order[:4] == exact.order[:4]
    assert any(min(s.windows.values()) < stories_calib.num_windows for s in racing.steps)  # something was dropped
    audit = gsi(view, stories_calib, progress=False, follow=racing.order)
    assert audit.order == racing.order
    assert all(s.argmin in audit.steps[i].candidates for i, s in enumerate(audit.steps))


def test_killed_gsi_run_resumes_from_its_checkpoint(stories, stories_calib, tmp_path, monkeypatch):
    view, _ = stories
    fresh = gsi(view, stories_calib, steps=6, progress=False)
    path = tmp_path / "profile.json"
    real_remove, calls = gsi_module.Wavefront.remove, []

    def dies_at_third(self, r):
        calls.append(r)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_remove(self, r)

    monkeypatch.setattr(gsi_module.Wavefront, "remove", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        gsi(view, stories_calib, steps=6, progress=False, checkpoint=path)
    monkeypatch.setattr(gsi_module.Wavefront, "remove", real_remove)
    saved = json.loads(path.read_text())
    assert len(saved["order"]) == 2 and not saved["complete"]
    resumed = gsi(view, stories_calib, steps=6, progress=False, checkpoint=path)
    assert resumed.order == fresh.order and resumed.complete
    assert resumed.ppl_after == pytest.approx(fresh.ppl_after, rel=1e-6)
    assert load_profile(path).order == fresh.order


def test_oneshot_scores_are_the_first_gsi_step(stories, stories_calib):
    view, _ = stories
    one = oneshot(view, stories_calib, progress=False)
    first = naive_gsi(view, stories_calib, steps=1, progress=False)
    for block, ppl in first.steps[0].candidates.items():
        assert one.scores[block] == pytest.approx(ppl - first.dense_ppl, rel=1e-4, abs=1e-6)
    assert one.order[0] == first.order[0]
    assert sorted(one.order) == sorted(b.name for b in view.blocks)
    assert len(one.ppl_after) == 10
    with view.masked(BlockMask.from_order(5, one.order, 3)):
        from rap.eval.perplexity import perplexity

        assert one.ppl_after[2] == pytest.approx(perplexity(view.model, stories_calib.windows, 4, False).ppl, rel=1e-5)


def test_shortgpt_block_influence_is_one_minus_cosine_of_block_input_and_output(stories, stories_calib):
    view, _ = stories
    prof = shortgpt(view, stories_calib, steps=0, progress=False)
    # reference from the stock forward: streams entering each layer, each mid-layer and the final norm
    streams = []
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: streams.append(("mid", a[0])))
             for layer in view.layers]
    hooks += [layer.register_forward_pre_hook(lambda m, a: streams.append(("in", a[0]))) for layer in view.layers]
    hooks.append(view.model.model.norm.register_forward_pre_hook(lambda m, a: streams.append(("out", a[0]))))
    sums = torch.zeros(10, dtype=torch.float64)
    with torch.no_grad():
        for ids in stories_calib.windows.split(4):
            streams.clear()
            view.model(input_ids=ids, use_cache=False)
            seq = [s for _, s in streams]  # in0, mid0, in1, mid1, ..., out
            for b in range(10):
                sums[b] += (1 - torch.nn.functional.cosine_similarity(seq[b], seq[b + 1], dim=-1)).double().sum()
    for h in hooks:
        h.remove()
    expected = sums / stories_calib.tokens
    for b, block in enumerate(view.blocks):
        assert prof.scores[block.name] == pytest.approx(float(expected[b]), rel=1e-4)
    assert prof.order == sorted(prof.scores, key=prof.scores.get)


def test_random_order_is_a_seeded_permutation(stories, stories_calib):
    view, _ = stories
    a = random_order(view, stories_calib, seed=1, steps=0, progress=False)
    b = random_order(view, stories_calib, seed=1, steps=0, progress=False)
    c = random_order(view, stories_calib, seed=2, steps=0, progress=False)
    assert a.order == b.order != c.order
    assert sorted(a.order) == sorted(x.name for x in view.blocks)


def test_profile_cli_writes_the_schema_and_curve_cli_plots_it(tmp_path):
    from rap.cli import app

    runner = CliRunner()
    paths = {}
    for method, extra in (("gsi", []), ("gsi", ["--racing", "--racing-first", "4"]), ("random", [])):
        out = tmp_path / f"{method}{len(paths)}.json"
        res = runner.invoke(app, ["profile", "stories260k", "--method", method, "--tokens", "2048", "--seq-len",
                                  "128", "--out", str(out), "--dtype", "fp32", "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        paths[out.stem] = out
    data = json.loads(paths["gsi0"].read_text())
    for key in ("model", "model_hash", "method", "calibration", "order", "ppl_after", "dense_ppl", "scores", "steps",
                "versions", "device"):
        assert key in data, key
    assert data["calibration"]["tokens"] == 2048 and data["calibration"]["seq_len"] == 128
    assert data["calibration"]["source"] == "wikitext-2/valid.txt"
    assert {"removed", "seconds", "block_forwards"} <= set(data["steps"][0])
    assert data["complete"] and len(data["order"]) == 10
    res = runner.invoke(app, ["curve", *map(str, paths.values()), "--seq-len", "128", "--tokens", "1024",
                              "--out", str(tmp_path / "curve"), "--dtype", "fp32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert {r["method"] for r in curve["rows"]} == {"gsi", "gsi-racing", "random"}
    assert [r["blocks_removed"] for r in curve["rows"] if r["method"] == "random"] == [0, 1, 2, 3, 4, 5]
    dense = {r["ppl"] for r in curve["rows"] if r["blocks_removed"] == 0}
    assert len(dense) == 1
    assert set(curve["ppl_at_25pct"]) == {"gsi", "gsi-racing", "random"}


def test_profile_cli_rejects_unknown_methods_in_one_line():
    from rap.cli import app

    res = CliRunner().invoke(app, ["profile", "stories260k", "--method", "magic"])
    assert res.exit_code != 0
    assert "unknown method" in str(res.exception) or "unknown method" in res.output
