"""Plan: a level per block (dtype / int8 / int4 / drop) as an immutable value, parsed from specs and files."""

import json

import pytest

from rap.errors import MaskError, RapError
from rap.core.mask import BlockMask
from rap.core.plan import Plan, PlanError, parse_level


def test_plan_is_a_hashable_value_that_extends_block_mask():
    a = Plan.parse("ffn.3=int4,attn.1=drop,ffn.*=int8", 4)
    b = Plan.parse("attn.1=drop, ffn.*=int8, ffn.3=int4g128", 4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert isinstance(a, BlockMask) and a.dropped == ("attn.1",) and a.kept_attn_layers == (0, 2, 3)
    assert a.ffn_levels == ("int8", "int8", "int8", "int4g128") and a.attn_levels[0] == "dtype"
    assert a != Plan.parse("ffn.*=int8,attn.1=drop", 4)  # levels are part of the value


def test_named_blocks_win_over_wildcards_whatever_the_order():
    plan = Plan.parse("ffn.3=int4g64,ffn.*=int8,*=int8,attn.0=drop", 4)
    assert plan.level("ffn.3") == "int4g64" and plan.level("attn.0") == "drop" and plan.level("attn.2") == "int8"


def test_drop_keeps_working_and_combines_with_plan():
    assert Plan.parse(None, 3, drop="attn.0,ffn.2") == Plan.of(BlockMask.from_drop(3, ["attn.0", "ffn.2"]))
    plan = Plan.parse("*=int8", 3, drop="ffn.1")
    assert plan.level("ffn.1") == "drop" and plan.level("ffn.0") == "int8"
    assert Plan.of(BlockMask.full(3)).mask == BlockMask.full(3) and not Plan.full(3).is_quantized


def test_plan_parses_from_json_and_text_files(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"levels": {"ffn.*": "int8", "attn.1": "int4g64"}}))
    assert Plan.parse(str(f), 2).level("attn.1") == "int4g64"
    f.write_text(json.dumps(Plan.parse("attn.0=drop,ffn.1=int4", 2).to_dict()))
    assert Plan.parse(str(f), 2) == Plan.parse("attn.0=drop,ffn.1=int4", 2)
    t = tmp_path / "plan.txt"
    t.write_text("# comment\nffn.*=int8\nattn.1=drop\n")
    assert Plan.parse(str(t), 2) == Plan.parse("ffn.*=int8,attn.1=drop", 2)


def test_spec_round_trips():
    for spec in ("ffn.3=int4,attn.1=drop,ffn.*=int8", "attn.*=int4g64", "ffn.0=drop"):
        plan = Plan.parse(spec, 4)
        assert Plan.parse(plan.spec() or None, 4) == plan


def test_drop_and_restore_keep_the_other_levels():
    plan = Plan.parse("*=int8", 2).drop("ffn.0")
    assert plan.level("ffn.0") == "drop" and plan.level("attn.0") == "int8"
    assert plan.restore("ffn.0").level("ffn.0") == "dtype" and plan.restore("ffn.0").level("attn.1") == "int8"


@pytest.mark.parametrize("spec, words", [
    ("ffn.1=int3", "unknown level"), ("ffn.1=int4g48", "group size 48"), ("attn.9=int8", "out of range"),
    ("ffn.1", "block=level"), ("nofile.json", "neither"), ("mlp.1=int8", "bad block name")])
def test_bad_specs_get_one_clear_line(spec, words):
    with pytest.raises(PlanError) as e:
        Plan.parse(spec, 4)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, (MaskError, RapError))


def test_group_size_must_divide_every_in_features(stories):
    view, _ = stories  # stories260k: hidden 64, intermediate 172
    Plan.parse("attn.*=int4g64,ffn.*=int8", view.num_layers).validate(view.shape)
    with pytest.raises(PlanError, match="does not divide down_proj's in_features 172"):
        Plan.parse("ffn.2=int4g32", view.num_layers).validate(view.shape)


def test_level_aliases():
    assert parse_level("INT4:64") == "int4g64" and parse_level("int4") == "int4g128"
    assert parse_level("dense") == "dtype" and parse_level("dropped") == "drop"
