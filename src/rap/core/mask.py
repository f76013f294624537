"""BlockMask: which of a model's 2L blocks (attn.i, ffn.i) run.

A mask is a value: immutable, hashable, cheap to pass around and to use as a dictionary key
(the decode path caches one captured graph per mask, the policy memoises scores per mask).
It knows nothing about weights; `rap.core.model.BlockView.apply` turns it into a forward pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rap.errors import MaskError

_NAME = re.compile(r"^(attn|ffn)\.(\d+)$")


def block_name(kind: str, layer: int) -> str:
    return f"{kind}.{layer}"


def parse_block_name(name: str, num_layers: int) -> tuple[str, int]:
    """'ffn.7' -> ('ffn', 7), with a one-line error for anything else."""
    m = _NAME.match(name.strip())
    if not m:
        raise MaskError(f"bad block name {name!r}: use attn.<i> or ffn.<i>, e.g. attn.3,ffn.7")
    kind, layer = m.group(1), int(m.group(2))
    if layer >= num_layers:
        raise MaskError(f"block {name!r} is out of range: the model has layers 0..{num_layers - 1}")
    return kind, layer


@dataclass(frozen=True)
class BlockMask:
    """keep_attn[i] / keep_ffn[i]: does layer i's attention / FFN block run."""

    keep_attn: tuple[bool, ...]
    keep_ffn: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.keep_attn) != len(self.keep_ffn):
            raise MaskError("a mask needs one attn and one ffn flag per layer")
        object.__setattr__(self, "keep_attn", tuple(bool(b) for b in self.keep_attn))
        object.__setattr__(self, "keep_ffn", tuple(bool(b) for b in self.keep_ffn))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, num_layers: int) -> "BlockMask":
        return cls((True,) * num_layers, (True,) * num_layers)

    @classmethod
    def from_drop(cls, num_layers: int, names: Iterable[str]) -> "BlockMask":
        attn, ffn = [True] * num_layers, [True] * num_layers
        for name in names:
            if not name.strip():
                continue
            kind, layer = parse_block_name(name, num_layers)
            (attn if kind == "attn" else ffn)[layer] = False
        return cls(tuple(attn), tuple(ffn))

    @classmethod
    def from_order(cls, num_layers: int, order: Sequence[str], count: int) -> "BlockMask":
        """Drop the first `count` blocks of a removal order (a profile's `order`)."""
        if not 0 <= count <= len(order):
            raise MaskError(f"cannot drop {count} blocks: the profile orders {len(order)}")
        return cls.from_drop(num_layers, order[:count])

    @classmethod
    def from_dict(cls, data: dict, num_layers: int) -> "BlockMask":
        if "drop" in data:
            return cls.from_drop(num_layers, data["drop"])
        if "keep_attn" in data and "keep_ffn" in data:
            mask = cls(tuple(data["keep_attn"]), tuple(data["keep_ffn"]))
            if mask.num_layers != num_layers:
                raise MaskError(f"mask has {mask.num_layers} layers, the model has {num_layers}")
            return mask
        raise MaskError('a mask JSON needs "drop": [names] or "keep_attn"/"keep_ffn" lists')

    @classmethod
    def parse(cls, spec: str | None, num_layers: int, profile: dict | None = None) -> "BlockMask":
        """Parse what users type after --drop / --mask.

        - ``attn.3,ffn.7``: named blocks;
        - ``6`` or ``0.2`` (with a profile): the first 6 blocks, or 20% of the 2L blocks, of its order;
        - ``path/to/mask.json``: ``{"drop": [...]}`` or ``{"keep_attn": [...], "keep_ffn": [...]}``.
        """
        if spec is None or not spec.strip():
            return cls.full(num_layers)
        spec = spec.strip()
        if spec.endswith(".json"):
            path = Path(spec)
            if not path.is_file():
                raise MaskError(f"mask file {spec} does not exist")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise MaskError(f"mask file {spec} is not valid JSON: {e.msg} (line {e.lineno})") from None
            return cls.from_dict(data, num_layers)
        if re.fullmatch(r"\d+(\.\d*)?|\.\d+", spec):
            if profile is None:
                raise MaskError(f"--drop {spec} needs a profile (--profile profile.json) to know which blocks go first")
            order = list(profile["order"])
            value = float(spec)
            count = int(value) if value >= 1 or spec.isdigit() else round(value * 2 * num_layers)
            return cls.from_order(num_layers, order, count)
        return cls.from_drop(num_layers, spec.split(","))

    # ---- views ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keep_attn)

    def keeps(self, name: str) -> bool:
        kind, layer = parse_block_name(name, self.num_layers)
        return (self.keep_attn if kind == "attn" else self.keep_ffn)[layer]

    @property
    def dropped(self) -> tuple[str, ...]:
        """Dropped block names in layer order: attn.0, ffn.0, attn.1, ..."""
        out = []
        for i in range(self.num_layers):
            if not self.keep_attn[i]:
                out.append(block_name("attn", i))
            if not self.keep_ffn[i]:
                out.append(block_name("ffn", i))
        return tuple(out)

    @property
    def kept_attn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.keep_attn) if k)

    @property
    def kept_ffn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.keep_ffn) if k)

    @property
    def is_full(self) -> bool:
        return all(self.keep_attn) and all(self.keep_ffn)

    def drop(self, *names: str) -> "BlockMask":
        return BlockMask.from_drop(self.num_layers, (*self.dropped, *names))

    def restore(self, *names: str) -> "BlockMask":
        gone = set(self.dropped) - set(names)
        return BlockMask.from_drop(self.num_layers, sorted(gone))

    def to_dict(self) -> dict:
        return {"drop": list(self.dropped), "num_layers": self.num_layers}

    def __str__(self) -> str:
        return "dense" if self.is_full else "-" + ",-".join(self.dropped)
