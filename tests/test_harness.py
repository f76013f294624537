"""Zero-shot accuracy through lm-eval (rap.eval.harness, rap.eval.lm_eval_model.RapLM), checked against a
slow, obviously correct reference: one unpadded forward per (context, continuation)."""

import math
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from rap.core.mask import BlockMask  # noqa: E402
from rap.data import DATASETS, DataMissingError  # noqa: E402
from rap.errors import RapError, RequestError  # noqa: E402
from rap.eval import harness  # noqa: E402
from rap.eval.lm_eval_model import RapLM, parse_obqa_choices  # noqa: E402
from rap.sources import model_from_config  # noqa: E402

from conftest import tiny_config  # noqa: E402
from reference import zeroed_blocks  # noqa: E402


class CharTokenizer:
    """Characters -> ids below 97 (the tiny configs' vocab); enough for scoring tests of any family."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[3 + (ord(ch) % 90) for ch in text])


def encode_pair(tok, context, continuation):
    """lm-eval's rule, written out: trailing context spaces join the continuation; tokenize the whole once."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def naive_score(model, tok, context, continuation, bos=False):
    ctx, cont = encode_pair(tok, context, continuation)
    ctx = [tok.bos_token_id, *ctx] if bos else ctx  # Gemma: every context starts with BOS, as in lm-eval's HFLM
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


def loglikelihoods(lm, requests):
    return lm.loglikelihood([SimpleNamespace(args=r) for r in requests], disable_tqdm=True)


def test_raps_lm_eval_scores_equal_one_unpadded_forward_per_request(stories):
    view, tok = stories
    got = loglikelihoods(RapLM(view=view, tokenizer=tok, batch_size=3, progress=False), REQUESTS)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        want = naive_score(view.model, tok, ctx, cont)
        assert ll == pytest.approx(want[0], abs=1e-4) and greedy == want[1]


def test_scores_are_exact_for_every_family_under_a_block_mask_and_for_a_bare_model(tiny_view):
    """Against stock transformers with the dropped blocks zeroed; right padding stays exact for
    sliding-window layers too (Gemma 3's window of 4 is shorter than these requests)."""
    tok = CharTokenizer()
    bos = tiny_view.config.model_type.startswith("gemma")
    for m in (BlockMask.full(4), BlockMask.from_drop(4, ["attn.1", "ffn.2"])):
        got = loglikelihoods(RapLM(view=tiny_view, tokenizer=tok, mask=m, batch_size=4, progress=False), REQUESTS)
        with zeroed_blocks(tiny_view, m):
            want = [naive_score(tiny_view.model, tok, *r, bos=bos)[0] for r in REQUESTS]
        assert got[0][0] != got[1][0]
        assert [g for g, _ in got] == pytest.approx(want, abs=1e-4)
    bare = loglikelihoods(RapLM(hf_model=tiny_view.model, tokenizer=tok, progress=False), REQUESTS)
    assert [g for g, _ in bare] == pytest.approx([naive_score(tiny_view.model, tok, *r, bos=bos)[0]
                                                  for r in REQUESTS], abs=1e-4)


def test_accuracy_is_the_argmax_of_the_reference_scores_on_real_documents(stories):
    """PIQA and ARC-Easy's first (up to) 12 documents, from rap's data folders: acc and acc_norm from
    lm-eval equal the argmax of naive log-likelihoods (acc_norm: divided by the choice's length in characters)."""
    view, tok = stories
    mask = BlockMask.parse("ffn.3,attn.1", view.num_layers)
    for name in ("piqa", "arc_easy"):
        try:
            docs = harness.task_docs(name, limit=12)
        except DataMissingError:
            pytest.skip(f"{name} is not on this machine (`rap data fetch`)")
        got = harness.evaluate(view, tok, name, limit=12, mask=mask, progress=False)["tasks"][name]
        acc = acc_norm = 0
        with zeroed_blocks(view, mask):
            for d in docs:
                lls = [naive_score(view.model, tok, d["text"], " " + c)[0] for c in d["choices"]]
                acc += max(range(len(lls)), key=lls.__getitem__) == d["gold"]
                normed = [ll / len(c) for ll, c in zip(lls, d["choices"])]
                acc_norm += max(range(len(lls)), key=normed.__getitem__) == d["gold"]
        n = len(docs)
        assert (got["n"], got["acc"], got["acc_norm"]) == (n, acc / n, acc_norm / n), name
        assert got["chance"] == pytest.approx(sum(1 / len(d["choices"]) for d in docs) / n)


def test_openbookqa_choices_parse_into_four_texts():
    assert parse_obqa_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert") == \
        ["a marsh", "a tundra", "the plains", "a desert"]


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
    dense = harness.evaluate(view, tok, "all", limit=2, batch_size=4, root=tmp_path, progress=False)
    assert set(dense["tasks"]) == set(harness.TASKS) and dense["harness"].startswith("lm-eval 0.4")
    for name, r in dense["tasks"].items():
        assert r["n"] == 2 and set(harness.METRICS[name]) <= set(r) and 0.0 <= r["acc"] <= 1.0
    assert dense["tasks"]["arc_easy"]["chance"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    mask = BlockMask.from_drop(view.num_layers, ["ffn.0", "attn.2"])
    pruned = harness.evaluate(view, tok, "piqa,boolq,lambada_openai", limit=3, mask=mask, root=tmp_path,
                              progress=False)
    assert view.mask.is_full  # the mask is undone afterwards
    assert pruned["tasks"]["piqa"]["n"] == 3
    assert pruned["tasks"]["lambada_openai"]["ppl"] != dense["tasks"]["lambada_openai"]["ppl"]
    kept = harness.kept_fraction(pruned, dense)
    assert kept["tasks"] == ["piqa", "lambada_openai"] and set(kept["apart"]) == {"boolq"}  # BoolQ apart
    assert kept["kept"] == pytest.approx(kept["mean"] / kept["dense_mean"])
    assert kept["kept_above_chance"] == pytest.approx((kept["mean"] - kept["chance"]) /
                                                      (kept["dense_mean"] - kept["chance"]))


def test_winogrande_docs_fill_the_blank_as_lm_eval_does(tmp_path):
    write_tiny_data(tmp_path)
    doc = harness.task_docs("winogrande", root=tmp_path)[0]
    assert doc["choices"] == ["Tom gave Sue a gift because Tom", "Tom gave Sue a gift because Sue"]
    assert doc["text"] == 0  # lm-eval's partial scoring: the gold option's index is the "text"


def test_user_errors_are_one_line_rap_errors(stories, tmp_path):
    view, tok = stories
    with pytest.raises(RequestError, match="unknown task"):
        harness.parse_tasks("piqa,mmlu")
    with pytest.raises(RequestError, match="--limit"):
        harness.evaluate(view, tok, "piqa", limit=0, root=tmp_path)
    with pytest.raises(RapError, match="missing"):
        harness.evaluate(view, tok, "piqa", root=tmp_path)
    bare = model_from_config(tiny_config("llama"), dtype=torch.float32, device="cpu")
    with pytest.raises(RapError, match="BlockView"):
        harness.evaluate(bare, CharTokenizer(), "piqa", mask=BlockMask.full(4), root=tmp_path)


def test_real_data_files_parse_with_lm_eval_counts():
    """The full sets, where this machine has them ($RAP_DATA, `rap data fetch`, a checkout's shared/data)."""
    from conftest import user_data_folders

    counts = {"piqa": 1838, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270,
              "openbookqa": 500, "lambada_openai": 5153}
    checked = 0
    for name, n in counts.items():
        dataset = {"arc_easy": "arc", "arc_challenge": "arc"}.get(name, name)
        roots = [r for r in user_data_folders() if all((r / f).is_file() for f in DATASETS[dataset].files)]
        if roots:
            assert len(harness.task_docs(name, root=roots[0])) == n, (name, roots[0])
            checked += 1
    if not checked:
        pytest.skip("no full zero-shot set on this machine: `rap data fetch piqa` (or set RAP_DATA) gets one")


def test_the_above_chance_share_is_also_averaged_task_by_task_leaving_out_tasks_where_dense_guesses():
    def res(**accs):
        return {"tasks": {n: {"acc": a, "headline": "acc", "chance": 0.5} for n, a in accs.items()}}

    kept = harness.kept_fraction(res(piqa=0.6, arc_easy=0.7, winogrande=0.55), res(piqa=0.7, arc_easy=0.8, winogrande=0.5))
    per = kept["kept_above_chance_per_task"]
    assert per["piqa"] == pytest.approx(0.5) and per["arc_easy"] == pytest.approx(2 / 3)
    assert math.isnan(per["winogrande"])  # dense at chance: nothing to keep
    assert kept["kept_above_chance_task_mean"] == pytest.approx((0.5 + 2 / 3) / 2)
