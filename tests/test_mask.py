import json

import pytest

from rap.errors import MaskError
from rap.core.mask import BlockMask


def test_masks_are_hashable_values():
    a = BlockMask.from_drop(4, ["attn.1", "ffn.3"])
    b = BlockMask.parse("ffn.3,attn.1", 4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.dropped == ("attn.1", "ffn.3")
    assert a.kept_attn_layers == (0, 2, 3)


def test_full_mask_drops_nothing():
    m = BlockMask.full(3)
    assert m.is_full and m.dropped == () and str(m) == "dense"


def test_mask_parses_from_json_file(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"drop": ["attn.0"]}))
    assert BlockMask.parse(str(f), 2).dropped == ("attn.0",)
    f.write_text(json.dumps({"keep_attn": [True, False], "keep_ffn": [False, True]}))
    assert BlockMask.parse(str(f), 2).dropped == ("ffn.0", "attn.1")


def test_mask_parses_count_and_fraction_with_a_profile():
    profile = {"order": ["ffn.3", "attn.2", "ffn.0", "attn.1"]}
    assert BlockMask.parse("2", 4, profile).dropped == ("attn.2", "ffn.3")
    # fraction of all 2L blocks: 0.25 * 8 = 2 -> the first two of the order
    assert set(BlockMask.parse("0.25", 4, profile).dropped) == {"ffn.3", "attn.2"}


@pytest.mark.parametrize("spec, message", [
    ("attn.9", "out of range"), ("mlp.1", "bad block name"), ("attn.x", "bad block name"),
    ("3", "needs a profile"), ("missing.json", "does not exist"),
])
def test_bad_mask_specs_give_one_line_errors(spec, message):
    with pytest.raises(MaskError, match=message) as e:
        BlockMask.parse(spec, 4)
    assert "\n" not in str(e.value)


def test_malformed_mask_json_is_a_mask_error(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        BlockMask.parse(str(f), 2)
