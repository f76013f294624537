"""Shared fixtures: the bundled real tiny Llama, tiny random-weight models of other families, and the data.

Every test reads its data from tests/data (small excerpts, see tests/data/SOURCES.md), whatever data folders
the machine has, so the suite passes in a fresh clone and gives the same results everywhere. A test that needs
a full set looks in the user's folders itself (`user_data_folders()`).
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
FIXTURE_DATA = Path(__file__).parent / "data"
USER_RAP_DATA = os.environ.get("RAP_DATA")  # as the user set it, before the fixtures take its place
os.environ["RAP_DATA"] = str(FIXTURE_DATA)


def user_data_folders() -> list[Path]:
    """The data folders rap would search without the fixtures ($RAP_DATA as set by the user, managed, checkout)."""
    from rap.data import checkout_dir, managed_dir

    return [p for p in (Path(USER_RAP_DATA) if USER_RAP_DATA else None, managed_dir(), checkout_dir())
            if p is not None and p.is_dir()]


@pytest.fixture(scope="session")
def stories():
    """(BlockView, tokenizer) of stories260k in float32 on CPU."""
    import transformers

    transformers.logging.set_verbosity_error()
    from rap.sources import load_view

    return load_view("stories260k", dtype=torch.float32, device="cpu")


# a stories260k prompt longer than the decoder's 32-token observation window (the KV tests' common prompt)
STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog. "
         "One day she saw a big red ball under a tree. She ran to the ball and picked it up. Her mom said")


@pytest.fixture(scope="module")
def story_ids(stories):
    ids = stories[1](STORY).input_ids
    assert len(ids) > 64  # longer than the observation window, so scores (not only recency) decide
    return ids


@pytest.fixture
def one_torch_thread():
    """On a 2-core box OpenMP's thread wake-ups make every batch-1 GEMV take ~5 ms; one thread is 1000x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model_type: str, **overrides):
    """A 4-layer random config of a supported family (unit tests only, never quality)."""
    from transformers import AutoConfig

    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gemma3_text":
        base.update(head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def tiny_view(request):
    from rap.core.model import BlockView
    from rap.sources import model_from_config

    torch.manual_seed(0)
    model = model_from_config(tiny_config(request.param), dtype=torch.float32, device="cpu")
    return BlockView(model, name=f"tiny-{request.param}")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_rap(*args) -> CliResult:
    """`rap ARGS` run in this process through typer's CliRunner: the same exit code and streams a user
    sees, without the ~4 s a subprocess pays to import torch and transformers. A few tests in
    test_cli.py still run the installed command as a real process."""
    from typer.testing import CliRunner

    from rap.cli import app

    argv = [str(a) for a in args]
    saved, sys.argv = sys.argv, ["rap", *argv]  # result files record the command as typed
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        sys.argv = saved
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)
