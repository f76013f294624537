"""The CLI as a user meets it: one clear line on bad input. Most tests run `rap` in process
(conftest.run_rap); the last ones start the installed command as a real process."""

import json
import subprocess
import sys

import pytest

from conftest import run_rap as rap


def rap_process(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "rap", *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_every_block_with_bytes():
    out = rap("info", "stories260k", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["blocks"] == 10 and len(info["blocks_detail"]) == 10
    assert info["kv_bytes_per_token"] == 5 * 2 * 4 * 8 * 4


def test_memory_beyond_the_context_says_the_model_cannot_serve_it():
    out = rap("memory", "stories260k", "--prompt", "100000")
    assert out.returncode == 0 and "cannot serve this request" in out.stdout


def test_memory_prints_a_breakdown_and_a_verdict():
    out = rap("memory", "stories260k", "--batch", "2", "--prompt", "64", "--new", "8", "--drop", "attn.1", "--budget", "1GiB")
    assert out.returncode == 0, out.stderr
    assert "KV cache" in out.stdout and "fits" in out.stdout


def test_ppl_of_the_bundled_model_on_wikitext(tmp_path):
    out = rap("ppl", "stories260k", "--seq-len", "256", "--max-tokens", "1024", "--out", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    row = result["rows"][0]
    assert 50 < row["ppl"] < 300 and row["tokens"] == 4 * 255
    assert "ppl stories260k" in row["command"] and row["device"] and result["kind"] == "ppl"  # provenance


@pytest.mark.parametrize("args, message", [
    (("info", "/no/such/model"), "not found"),
    (("memory", "stories260k", "--drop", "attn.7"), "out of range"),
    (("memory", "stories260k", "--drop", "blah"), "bad block name"),
    (("memory", "stories260k", "--batch", "0"), "positive"),
    (("memory", "stories260k", "--budget", "lots"), "cannot read"),
    (("ppl", "stories260k", "--file", "/no/such.txt"), "does not exist"),
    (("generate", "stories260k", "-p", "Once", "--kv-ratio", "0"), "--kv-ratio must be in (0, 1]"),
    (("generate", "stories260k", "-p", " "), "the prompt is empty"),
    (("generate", "stories260k", "-p", "Once", "--kv-ratio", "0.5", "--kv-press", "h2o"), "unknown KV press 'h2o'"),
    (("generate", "stories260k", "-p", "Once", "--kv-bits", "3"), "KV bits must be one of 16, 8, 4"),
    (("kv", "needle", "stories260k", "--presses", "h2o"), "unknown KV press 'h2o'"),
    (("kv", "needle", "stories260k", "--presses", "streaming"), "add --path hf"),
    (("kv", "needle", "stories260k", "--kv-bits", "3"), "KV bits must be one of 16, 8, 4"),
    (("kv", "needle", "stories260k", "--budgets", "1.5,0"), "budgets must be in (0, 1]"),
    (("kv", "leval", "stories260k", "--path", "hf", "--kv-bits", "8"), "decoder path only"),
    (("kv", "needle", "stories260k", "--path", "hf", "--presses", "h2o"), "h2o"),
])
def test_bad_input_exits_non_zero_with_one_line(args, message):
    out = rap(*args)
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.strip() and "it/s" not in l]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    out = rap("info", str(tmp_path))
    assert out.returncode == 2 and "not supported" in out.stderr and "llama" in out.stderr


@pytest.mark.parametrize("args, message", [
    (("info", "/no/such/model"), "not found"),
    (("memory", "stories260k", "--budget", "lots"), "cannot read"),
])
def test_the_installed_command_exits_2_with_one_line_on_stderr(args, message):
    out = rap_process(*args)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_the_installed_command_prints_json_on_stdout():
    out = rap_process("info", "stories260k", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["blocks"] == 10
