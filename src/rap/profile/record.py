"""Profile: a block-removal order and everything needed to trust and reuse it, as one JSON file.

Schema (docs/HELPERS.md; issue 7 reads it):
    model, model_hash, method, settings, calibration {source, tokens, windows, seq_len, seed, ids_sha256},
    order [first = least important], ppl_after [calibration PPL after each removal], dense_ppl,
    scores {block: score} (one-shot methods), steps [{removed, seconds, block_forwards, ...}],
    block_forward_unit, complete, versions, device, created.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rap.errors import RapError
from rap.core.model import BlockView

BLOCK_FORWARD_UNIT = "one block applied to the whole calibration set (block-window passes / windows)"


@dataclass
class Step:
    removed: str
    seconds: float
    block_forwards: float
    ppl: float  # calibration PPL after this removal
    candidates: dict[str, float] = field(default_factory=dict)  # candidate -> calibration PPL if removed
    windows: dict[str, int] = field(default_factory=dict)  # racing: windows each candidate was scored on
    argmin: str | None = None  # when following a given order: the block exact GSI would have removed


@dataclass
class Profile:
    model: str
    model_hash: str
    method: str
    calibration: dict
    num_layers: int
    dense_ppl: float | None = None
    order: list[str] = field(default_factory=list)
    ppl_after: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    complete: bool = False
    seconds: float = 0.0
    block_forwards: float = 0.0
    block_forward_unit: str = BLOCK_FORWARD_UNIT
    versions: dict = field(default_factory=dict)
    device: str = ""
    created: str = ""
    command: str = ""  # the command line that made it (filled on the first save)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return save_record(self, path)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        data = dict(data)
        data["steps"] = [Step(**s) for s in data.get("steps", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def load_profile(path: str | Path) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RapError(f"cannot read profile {path}: {e}") from None
    for key in ("model", "method", "order"):
        if key not in data:
            raise RapError(f"{path} is not a rap profile (no {key!r}); make one with `rap profile`")
    return Profile.from_dict(data)


def model_hash(view: BlockView) -> str:
    """sha256 of the config (as JSON) and of every parameter's name, dtype, shape and bytes.
    Computed once per view (profiling never changes weights; a 7B model takes seconds)."""
    cached = getattr(view, "_rap_model_hash", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(view.config.to_json_string(use_diff=False).encode())
    state = view.model.state_dict()
    # dropped blocks' weights count too (a user may have applied a mask to the HF model): their
    # entries come from the view's own modules under the names the full model's state_dict uses
    prefix = next(n for n, m in view.model.named_modules() if m is view.layers)
    for i in range(view.num_layers):
        for part, module in (("self_attn", view.attention_module(i)), ("mlp", view.mlp_module(i))):
            for name, t in module.state_dict().items():
                state[f"{prefix}.{i}.{part}.{name}"] = t
    for name, p in sorted(state.items()):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    view._rap_model_hash = h.hexdigest()
    return view._rap_model_hash


def environment(device: torch.device | str) -> tuple[dict, str]:
    """(software versions, device line); on CPU the line names the torch threads, which set the timings."""
    from rap import provenance

    device = torch.device(device)
    text = provenance.device_line(device)
    if device.type != "cuda":
        text += f", {torch.get_num_threads()} torch threads"
    return provenance.versions(), text


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ppl_from_nll(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if total_nll / tokens < 700 else float("inf")


def save_record(record, path: str | Path) -> Path:
    """Atomic write of a profile record (`.to_dict()`, `.command`): a killed run leaves the previous
    checkpoint, never half a file; the command line is filled on the first save."""
    from rap import provenance

    if not record.command:
        record.command = provenance.command_line()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=1, allow_nan=True))
    os.replace(tmp, path)
    return path
