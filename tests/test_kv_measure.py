"""The policy's KV penalty is measured on rap's decoder: teacher-forced continuation NLL through the
decoder's own compressed (and int8) cache equals the HF path's where both keep the same tokens."""

import pytest
import torch
import torch.nn.functional as F

from rap.decode.decoder import Decoder
from rap.errors import RequestError
from rap.policy.evaluator import KVPenalty, continuation_nll, measure_kv_penalty
from rap.policy.kv_measure import KVOption, decoder_continuation_nll

from conftest import STORY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def story(stories):
    view, tok = stories
    return view, torch.tensor([tok(STORY).input_ids])


def test_full_cache_decoder_nll_equals_one_forward_pass(story):
    view, ids = story
    P = ids.shape[1] - 10
    got = decoder_continuation_nll(Decoder(view), ids, P, [KVOption()])[KVOption()]
    with torch.no_grad():
        logits = view.model(input_ids=ids).logits[0, P - 1:-1].float()
    want = float(F.cross_entropy(logits, ids[0, P:], reduction="sum"))
    assert got == pytest.approx(want, rel=1e-4)


def test_decoder_adakv_nll_equals_the_hf_path_adakv_nll(story):
    view, ids = story
    P = ids.shape[1] - 8
    opt = KVOption(0.7, 16, "adakv")  # the same scorer and split keep the same tokens (test_decode_adakv)
    got = decoder_continuation_nll(Decoder(view), ids, P, [opt])[opt]
    want = continuation_nll(view.model, ids, P, [0.7])[0.7]
    assert got == pytest.approx(want, rel=1e-4)


def test_int8_and_compression_change_the_nll_and_the_penalty_table_has_both_bits(story):
    view, ids = story
    P = ids.shape[1] - 8
    opts = [KVOption(), KVOption(1.0, 8), KVOption(0.3, 16), KVOption(0.3, 8)]
    nll = decoder_continuation_nll(Decoder(view), ids, P, opts)
    assert nll[opts[1]] != nll[opts[0]] and abs(nll[opts[1]] - nll[opts[0]]) < 0.05 * nll[opts[0]]
    assert nll[opts[2]] != nll[opts[0]]
    stream = ids[0].repeat(3)
    pen = measure_kv_penalty(view, stream, [P], (1.0, 0.3), continuation=8, samples=1, kv_bits=(16, 8),
                             progress=False)
    assert "decoder" in pen.method and pen.bits == (16, 8)
    assert pen(1.0, P) == 0.0 and pen(0.3, P, 8) >= pen(0.3, P) >= 0.0
    assert KVPenalty.from_dict(pen.to_dict()) == pen
    with pytest.raises(ValueError, match="KV bits 4"):
        pen(0.3, P, 4)


def test_kv_option_outside_zero_one_is_one_line():
    with pytest.raises(RequestError, match=r"kv_ratio must be in \(0, 1\]"):
        KVOption(1.5)
