"""The needle / L-Eval / continuation evaluations build the prompts and scores they claim to."""

import json

import pytest
import torch

from rap.eval.leval import score_answer as leval_score
from rap.eval.needle import build_case, default_spec, score_answer
from rap.kv import AdaKV, Budget, SnapKV
from rap.kv.continuation import continuation_nll


@pytest.fixture
def haystack():
    """The needle defaults and a small haystack (tests/data; a WikiText-2 excerpt stands in for the essays)."""
    from rap.data import data_file

    return data_file("needle-haystack-paulgraham/PaulGrahamEssays")


def test_needle_case_fits_its_length_and_holds_the_needle_near_its_depth(stories, haystack):
    _, tok = stories
    needle = tok(default_spec().needle, add_special_tokens=False).input_ids
    for depth in (0.0, 0.5, 1.0):
        case = build_case(tok, 300, depth)
        ids = case.context_ids[0].tolist()
        assert len(ids) + case.question_ids.shape[1] == 300
        starts = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
        assert len(starts) == 1
        assert abs(starts[0] - depth * (len(ids) - len(needle))) <= 0.15 * len(ids)


def test_needle_answers_score_the_fraction_of_key_phrases(haystack):
    assert score_answer("Eat a sandwich in Dolores Park.") == 1.0
    assert score_answer("eat a sandwich") == 0.5
    assert score_answer("eat a burrito") == 0.0


def test_leval_exact_match_scoring_per_task_kind():
    assert leval_score("quality", "(B) because ...", "(B) Their subconscious knew") == 1.0
    assert leval_score("tpo", "The answer is C.", "A") == 0.0
    assert leval_score("coursera", "B, D", "BD") == 1.0 and leval_score("coursera", "B", "BD") == 0.0
    assert leval_score("sci_fi", "False. The document says", "False [fact: True]") == 1.0
    assert leval_score("topic_retrieval_longchat", "We discussed the role of art in society.",
                       "The role of art in society") == 1.0
    assert leval_score("gsm100", "so she makes 18 dollars. The answer is 18", "18") == 1.0


def test_continuation_nll_with_a_full_budget_equals_the_uncompressed_nll(stories):
    view, _ = stories
    ids = torch.randint(3, 500, (2, 90), generator=torch.Generator().manual_seed(0))
    ref = continuation_nll(view, ids, 60)
    got = continuation_nll(view, ids, 60, AdaKV(SnapKV(window_size=8)), Budget(kv_ratio=1.0))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_rap_kv_needle_prints_a_press_by_budget_table_and_writes_json_and_plot(tmp_path, haystack):
    from typer.testing import CliRunner

    from rap.cli import app

    result = CliRunner().invoke(app, ["kv", "needle", "stories260k", "--lengths", "160", "--depths", "0.5",
                                      "--budgets", "20", "--presses", "adakv", "--max-new", "4",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "adakv" in result.output and "20%" in result.output
    data = json.loads(next(tmp_path.glob("kv-needle-*.json")).read_text())
    assert set(data["summary"]) == {"full", "adakv"} and data["summary"]["adakv"].keys() == {"0.2"}
    assert data["device"] and data["command"] and next(tmp_path.glob("kv-needle-*.png")).stat().st_size > 0
