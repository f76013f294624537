"""Shared fixtures: the bundled real tiny Llama, and tiny random-weight models of other families."""

import os
import sys
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def stories():
    """(BlockView, tokenizer) of stories260k in float32 on CPU."""
    import transformers

    transformers.logging.set_verbosity_error()
    from rap.sources import load_view

    return load_view("stories260k", dtype=torch.float32, device="cpu")


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
    from rap.model import BlockView
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
