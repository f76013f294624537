"""Zero-shot harness: lm-eval's prompts and scoring, checked against a one-request-at-a-time reference."""

import json
import math

import pytest
import torch

from rap.data import DATASETS
from rap.errors import RapError, RequestError
from rap.eval import zeroshot as zs
from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.sources import model_from_config

from conftest import tiny_config
from reference import zeroed_blocks


class CharTokenizer:
    """Characters -> ids below 97 (the tiny configs' vocab); enough for scoring tests of any family."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [3 + (ord(ch) % 90) for ch in text]
        return Out()


@torch.no_grad()
def naive_score(model, tok, context, continuation):
    """Obviously correct: one unpadded forward over context + continuation, no packing."""
    ctx, cont = zs.encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


REQUESTS = [("Question: where is the dog?\nAnswer:", " in the park"),
            ("Question: where is the dog?\nAnswer:", " under a very large table in the kitchen"),
            ("Question: where is the dog?\nAnswer:", " x"),
            ("Tom had a ", "red ball"),  # trailing space moves to the continuation
            ("Lily saw a big", " tree"), ("Lily saw a big", " tree"),  # duplicate request
            ("Once", " upon a time there was a girl named Lily who liked to play outside")]


@pytest.mark.parametrize("pack", [True, False])
def test_batched_scores_equal_one_request_at_a_time(stories, pack):
    view, tok = stories
    got = zs.score_requests(view, tok, REQUESTS, batch_size=3, pack=pack)  # rap's forward
    for (ctx, cont), score in zip(REQUESTS, got):
        ll, greedy = naive_score(view.model, tok, ctx, cont)
        assert score.loglik == pytest.approx(ll, abs=1e-4)
        assert score.greedy == greedy


@pytest.mark.parametrize("pack", [True, False])
def test_scoring_is_exact_for_every_family_and_under_a_block_mask(tiny_view, pack):
    """rap's forward against stock transformers with the dropped blocks zeroed; packed rows stay
    exact for sliding-window layers too (Gemma 3's window of 4 is shorter than these requests)."""
    tok = CharTokenizer()
    mask = BlockMask.from_drop(4, ["attn.1", "ffn.2"])
    for m in (BlockMask.full(4), mask):
        got = zs.score_requests(tiny_view, tok, REQUESTS, batch_size=4, pack=pack, mask=m)
        with zeroed_blocks(tiny_view, m):
            for (ctx, cont), score in zip(REQUESTS, got):
                assert score.loglik == pytest.approx(naive_score(tiny_view.model, tok, ctx, cont)[0], abs=1e-4)


def test_left_truncation_keeps_the_continuation(stories):
    view, tok = stories
    ctx, cont = "one two three four five six seven eight nine ten", " eleven twelve"
    short = zs.score_requests(view.model, tok, [(ctx, cont)], max_length=12)[0]
    c, t = zs.encode_pair(tok, ctx, cont)
    full = (c + t)[-13:]
    ids = torch.tensor([full[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(view.model(input_ids=ids).logits, -1)[0, -len(t):]
    assert short.loglik == pytest.approx(float(lp.gather(-1, torch.tensor(t)[:, None]).sum()), abs=1e-4)
    assert short.tokens == len(t)


def test_encode_pair_moves_trailing_context_spaces_into_the_continuation(stories):
    _, tok = stories
    assert zs.encode_pair(tok, "Tom had a ", "red ball") == zs.encode_pair(tok, "Tom had a", " red ball")


def test_hellaswag_preprocessing_matches_lm_eval():
    assert zs.hellaswag_preprocess(" How to cook [title] Boil water. [step] Add  salt ") == \
        "How to cook. Boil water. Add salt"


def test_winogrande_partial_scoring_fills_the_blank_and_scores_the_rest():
    doc = zs.winogrande_doc("Sarah helped Maria because _ was kind.", "Sarah", "Maria", "2")
    assert doc.contexts == ("Sarah helped Maria because Sarah", "Sarah helped Maria because Maria")
    assert doc.continuations == (" was kind.", " was kind.")
    assert doc.gold == 1


def test_openbookqa_choices_parse_into_four_texts():
    assert zs.parse_obqa_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert") == \
        ["a marsh", "a tundra", "the plains", "a desert"]


def test_lambada_target_is_the_last_word_with_a_space():
    doc = zs.lambada_doc("he looked at the old man and said hello")
    assert doc.contexts == ("he looked at the old man and said",)
    assert doc.continuations == (" hello",)


def test_acc_norm_divides_by_choice_length_in_characters():
    doc = zs.Doc.shared_context("Q:", ["a", "bbbbbbbbbb"], gold=1)
    scores = [[zs.Score(-2.0, False, 1), zs.Score(-10.0, False, 3)]]
    res = zs.metrics_from_scores(zs.TASKS["piqa"], [doc], scores)
    assert res.metrics == {"acc": 0.0, "acc_norm": 1.0}  # -2/1 < -10/10
    assert res.chance == 0.5


def test_lambada_accuracy_counts_greedy_matches_and_reports_perplexity():
    docs = [zs.lambada_doc("a b"), zs.lambada_doc("c d")]
    res = zs.metrics_from_scores(zs.TASKS["lambada_openai"], docs,
                                 [[zs.Score(-1.0, True, 1)], [zs.Score(-3.0, False, 1)]])
    assert res.metrics["acc"] == 0.5
    assert res.metrics["ppl"] == pytest.approx(math.exp(2.0))


def write_tiny_data(root):
    """Two or three documents per task in the same formats as shared/data."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
        {"goal": "To dry hands", "sol1": "use water", "sol2": "use a towel"},
        {"goal": "To see at night", "sol1": "turn on a lamp", "sol2": "close the eyes"}]) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    (root / "hellaswag").mkdir()
    (root / "hellaswag" / "hellaswag_val.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"activity_label": "Cooking", "ctx_a": "A man boils water.", "ctx_b": "he", "label": 1,
         "endings": ["flies away.", "adds pasta.", "sings [title] loudly.", "runs."]},
        {"activity_label": "Dog", "ctx_a": "The dog sees a ball.", "ctx_b": "it", "label": 0,
         "endings": ["runs to the ball.", "reads.", "cooks.", "drives."]}]) + "\n")
    (root / "winogrande").mkdir()
    (root / "winogrande" / "dev_noqid.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"sentence": "Tom gave Sue a gift because _ was kind.", "option1": "Tom", "option2": "Sue", "answer": "1"},
        {"sentence": "The ball broke the window because _ was hard.", "option1": "ball", "option2": "window",
         "answer": "1"}]) + "\n")
    (root / "arc").mkdir()
    for name in ("ARC-Easy-Test.olmo.jsonl", "ARC-Challenge-Test.olmo.jsonl"):
        (root / "arc" / name).write_text("\n".join(json.dumps(r) for r in [
            {"id": "1", "question": "What do plants need?", "choices": ["light", "rocks", "metal"], "gold": 0},
            {"id": "2", "question": "What is ice?", "choices": ["gas", "solid water", "fire", "sand", "air"],
             "gold": 1}]) + "\n")
    (root / "boolq").mkdir()
    (root / "boolq" / "boolq_validation.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"question": "is the sky blue", "answer": True, "passage": "The sky is blue on a clear day."},
        {"question": "is fire cold", "answer": False, "passage": "Fire is hot."}]) + "\n")
    (root / "openbookqa").mkdir()
    (root / "openbookqa" / "test.tsv").write_text(
        "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
        "1\tThe sun is a\t(A) star (B) planet (C) moon (D) rock\tThe sun is a (A) star ...\tA\n"
        "2\tWater boils when\t(A) frozen (B) heated (C) dry (D) still\tWater boils when ...\tB\n")
    (root / "lambada_openai").mkdir()
    (root / "lambada_openai" / "lambada_test.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [
        "Once upon a time there was a little girl named Lily", "The dog ran to the park"]) + "\n")


def test_every_task_loads_its_file_format_and_scores_under_a_mask(stories, tmp_path):
    write_tiny_data(tmp_path)
    view, tok = stories
    dense = zs.evaluate(view, tok, "all", limit=2, batch_size=4, root=tmp_path, progress=False)
    assert set(dense["tasks"]) == set(zs.TASKS)
    for name, r in dense["tasks"].items():
        assert r["n"] == 2
        assert set(zs.TASKS[name].metrics) <= set(r)
        assert 0.0 <= r["acc"] <= 1.0
    assert dense["tasks"]["arc_easy"]["chance"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    mask = BlockMask.from_drop(view.num_layers, ["ffn.0", "attn.2"])
    pruned = zs.evaluate(view, tok, "piqa,lambada_openai", limit=3, mask=mask, root=tmp_path, progress=False)
    assert view.mask.is_full  # the mask is undone afterwards
    assert pruned["tasks"]["piqa"]["n"] == 3
    assert pruned["tasks"]["lambada_openai"]["ppl"] != dense["tasks"]["lambada_openai"]["ppl"]
    kept = zs.kept_fraction(pruned, dense)
    assert kept["tasks"] == ["piqa", "lambada_openai"]
    assert kept["kept"] == pytest.approx(kept["mean"] / kept["dense_mean"])


def test_user_errors_are_one_line_rap_errors(stories, tmp_path):
    view, tok = stories
    with pytest.raises(RequestError, match="unknown task"):
        zs.parse_tasks("piqa,mmlu")
    with pytest.raises(RequestError, match="--limit"):
        zs.load_docs("piqa", limit=0, root=tmp_path)
    with pytest.raises(RapError, match="missing"):
        zs.load_docs("piqa", root=tmp_path)
    bare = model_from_config(tiny_config("llama"), dtype=torch.float32, device="cpu")
    with pytest.raises(RequestError, match="BlockView"):
        zs.evaluate(bare, CharTokenizer(), "piqa", mask=BlockMask.full(4), root=tmp_path)


def test_real_data_files_parse_with_lm_eval_counts():
    """The full sets, where this machine has them ($RAP_DATA, `rap data fetch`, a checkout's shared/data)."""
    from conftest import user_data_folders

    counts = {"piqa": 1838, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270,
              "openbookqa": 500, "lambada_openai": 5153}
    checked = 0
    for name, n in counts.items():
        task = zs.DATASET_OF_TASK.get(name, name)
        roots = [r for r in user_data_folders() if all((r / f).is_file() for f in DATASETS[task].files)]
        if roots:
            assert len(zs.load_docs(name, root=roots[0])) == n, (name, roots[0])
            checked += 1
    if not checked:
        pytest.skip("no full zero-shot set on this machine: `rap data fetch piqa` (or set RAP_DATA) gets one")
