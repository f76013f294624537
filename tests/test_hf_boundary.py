"""rap touches transformers beyond its public loading API in one module only: `rap.core.hf`."""

import ast
from pathlib import Path

import pytest
import torch

import rap
from rap.errors import RapError
from rap.core.hf import CACHE_KWARG, cache_given_to_attention, cache_kwargs
from rap.core.model import SkippedAttention

SRC = Path(rap.__file__).parent
BOUNDARY = SRC / "core" / "hf.py"
# transformers internals that changed name or calling convention within the supported range (or are private)
INTERNAL_NAMES = {"past_key_values", "_attn_implementation", "sdpa_attention_forward", "create_causal_mask",
                  "create_sliding_window_causal_mask", "AttentionInterface", "AttentionMaskInterface"}


def _sources():
    return [p for p in SRC.rglob("*.py") if p != BOUNDARY]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_but_rap_hf_reaches_into_transformers_internals(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformers."):
            pytest.fail(f"{path.name}:{node.lineno} imports from {node.module}; go through rap.core.hf")
        names = {node.attr} if isinstance(node, ast.Attribute) else \
            {node.arg} if isinstance(node, ast.keyword) and node.arg else \
            {a.name for a in node.names} if isinstance(node, (ast.Import, ast.ImportFrom)) else set()
        assert not names & INTERNAL_NAMES, f"{path.name}:{node.lineno} uses {names & INTERNAL_NAMES}; go through rap.core.hf"


def test_the_cache_keyword_is_the_one_this_transformers_takes(stories):
    view, _ = stories
    ids = torch.tensor([[1, 2, 3]])
    out = view.model(input_ids=ids, use_cache=True, **cache_kwargs(None))
    assert CACHE_KWARG in ("cache", "past_key_values") and out.logits.shape[:2] == (1, 3)


def test_a_dropped_attention_block_that_finds_no_cache_keyword_raises():
    with pytest.raises(RapError, match="no cache keyword"):
        SkippedAttention(0)(torch.zeros(1, 2, 4), attention_mask=None)
    assert cache_given_to_attention({"cache": None}) is None
