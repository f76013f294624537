"""Plan: a precision level for every block (attn.i, ffn.i): the model's dtype, int8, int4 or dropped.

A plan is a `BlockMask` that also says at which precision each kept block runs, so every user of a
mask (the memory model's KV terms, the decoder's loops, the residency) keeps working unchanged:
`plan.keep_attn[i]` is `plan.attn_levels[i] != "drop"`. Like a mask it is an immutable, hashable
value (the decoder caches one captured graph per plan).

Levels (canonical spellings):

* ``dtype``: the weights as loaded (bf16 / fp16 / fp32);
* ``int8``: weight-only int8, one symmetric scale per output channel (torchao `Int8Tensor` on CPU, gemlite on CUDA);
* ``int4g64`` / ``int4g128`` (and ``int4g32``): weight-only int4, asymmetric, one scale and one
  zero per group of 64 / 128 input features (tinygemm's layout: torchao `Int4TilePackedTo4dTensor`
  on CUDA, `Int4OpaqueTensor` on CPU); ``int4`` alone means ``int4g128`` (torchao's default);
* ``drop``: the block does not run and holds no bytes on the device.

Beside the blocks, ``head`` (the token embedding and the lm_head, one tensor when tied) is at ``dtype``
or ``int8`` (per-row scales: one per token, which serves the lookup and the lm_head's output channels
alike). It is the largest tensor of a small model (SmolLM2-135M: 21% of its bytes) and int8 costs it
little (WikiText-2 PPL 23.14 against 23.06 on 3 x 2,048 tokens), so it is a knob like any block's.
Only ``head=int8`` in a spec sets it; ``*`` wildcards mean the blocks.

Specs (what `--plan` takes): ``ffn.3=int4,attn.7=drop,ffn.*=int8``. Wildcards (``*``, ``attn.*``,
``ffn.*``) apply first, in the order given, then named blocks, so a named block always wins; blocks
the spec does not name stay at ``dtype``. A file holds either such a spec (any text file, commas
or newlines) or JSON: ``{"levels": {"ffn.3": "int4g64", "ffn.*": "int8"}}``, ``{"plan": "<spec>"}``
or ``{"attn_levels": [...], "ffn_levels": [...]}``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from rap.errors import MaskError
from rap.core.mask import BlockMask, block_name, parse_block_name

DTYPE, INT8, DROP = "dtype", "int8", "drop"
INT4_GROUP_SIZES = (32, 64, 128)  # what both int4 layouts (tinygemm CUDA, torchao's CPU opaque) accept
DEFAULT_INT4_GROUP = 128  # torchao's Int4WeightOnlyConfig default
LEVELS = (DTYPE, INT8, *(f"int4g{g}" for g in INT4_GROUP_SIZES), DROP)
_ALIASES = {"dense": DTYPE, "model": DTYPE, "fp": DTYPE, "keep": DTYPE, "int4": f"int4g{DEFAULT_INT4_GROUP}",
            "w8": INT8, "int8wo": INT8, "dropped": DROP, "skip": DROP}


class PlanError(MaskError):
    """A plan spec that does not parse, or a level that a block's shape does not allow."""


HEAD = "head"
HEAD_NAMES = (HEAD, "embed", "lm_head")
HEAD_LEVELS = (DTYPE, INT8)


@functools.lru_cache(maxsize=256)  # pure, and every Plan built parses one level per block: policies build many
def parse_level(text: str) -> str:
    """'int4' -> 'int4g128', 'INT4:64' / 'int4-g64' / 'int4g64' -> 'int4g64', 'drop', 'int8', 'dtype'."""
    t = str(text).strip().lower()
    t = _ALIASES.get(t, t)
    m = re.fullmatch(r"int4[:_\-]?g?(\d+)", t)
    if m:
        group = int(m.group(1))
        if group not in INT4_GROUP_SIZES:
            raise PlanError(f"int4 group size {group} is not supported: use one of "
                            f"{', '.join(map(str, INT4_GROUP_SIZES))} (e.g. int4g64)")
        t = f"int4g{group}"
    if t not in LEVELS:
        raise PlanError(f"unknown level {text!r}: use one of {', '.join(LEVELS)} (int4 = int4g{DEFAULT_INT4_GROUP})")
    return t


def parse_head_level(text: str) -> str:
    """The head's level: 'dtype' or 'int8' (int4 and drop are not offered for the embedding / lm_head)."""
    level = parse_level(text)
    if level not in HEAD_LEVELS:
        raise PlanError(f"head={text}: the embedding / lm_head runs at {' or '.join(HEAD_LEVELS)}")
    return level


def is_quantized(level: str) -> bool:
    return level == INT8 or level.startswith("int4")


def int4_group_size(level: str) -> int | None:
    """The group size of an int4 level, None for any other level."""
    return int(level[len("int4g"):]) if level.startswith("int4g") else None


def block_linears(kind: str, shape) -> list[tuple[str, int, int]]:
    """(projection, out_features, in_features) of one block's linear layers, for a `ModelShape`."""
    h, qw, kw = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if kind == "attn":
        return [("q_proj", qw, h), ("k_proj", kw, h), ("v_proj", kw, h), ("o_proj", h, qw)]
    return [("gate_proj", shape.intermediate_size, h), ("up_proj", shape.intermediate_size, h),
            ("down_proj", h, shape.intermediate_size)]


@dataclass(frozen=True)
class Plan(BlockMask):
    """attn_levels[i] / ffn_levels[i]: the level of layer i's attention / FFN block (see the module doc).

    Build with `Plan.from_levels`, `Plan.of(mask)`, `Plan.uniform` or `Plan.parse`; the keep flags
    are derived from the levels (a level given as empty tuples is derived from the keep flags).
    """

    attn_levels: tuple[str, ...] = ()
    ffn_levels: tuple[str, ...] = ()
    head_level: str = DTYPE

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "head_level", parse_head_level(self.head_level))
        n = len(self.keep_attn)
        for field, keep in (("attn_levels", self.keep_attn), ("ffn_levels", self.keep_ffn)):
            levels = getattr(self, field)
            if not levels:
                levels = tuple(DTYPE if k else DROP for k in keep)
            if len(levels) != n:
                raise PlanError(f"a plan needs one level per layer: {field} has {len(levels)}, the mask {n}")
            object.__setattr__(self, field, tuple(parse_level(v) for v in levels))
        object.__setattr__(self, "keep_attn", tuple(v != DROP for v in self.attn_levels))
        object.__setattr__(self, "keep_ffn", tuple(v != DROP for v in self.ffn_levels))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_levels(cls, attn_levels: Iterable[str], ffn_levels: Iterable[str], head: str = DTYPE) -> "Plan":
        attn, ffn = tuple(attn_levels), tuple(ffn_levels)
        if len(attn) != len(ffn):
            raise PlanError("a plan needs one attn and one ffn level per layer")
        return cls(tuple(v != DROP for v in attn), tuple(v != DROP for v in ffn), attn, ffn, head)

    @classmethod
    def of(cls, mask: BlockMask) -> "Plan":
        """A mask as a plan: kept blocks at the model's dtype (a plan is returned as it is)."""
        if isinstance(mask, Plan):
            return mask
        return cls(mask.keep_attn, mask.keep_ffn)

    @classmethod
    def uniform(cls, num_layers: int, level: str, drop: Iterable[str] = ()) -> "Plan":
        """Every block at `level`, the `drop` blocks dropped."""
        level = parse_level(level)
        plan = cls.from_levels((level,) * num_layers, (level,) * num_layers)
        return plan.with_levels({name: DROP for name in drop}) if drop else plan

    @classmethod
    def from_spec(cls, spec: str, num_layers: int, base: BlockMask | None = None) -> "Plan":
        """``ffn.3=int4,attn.*=int8`` over `base` (default: every block at dtype); wildcards first."""
        wild: list[tuple[str, str]] = []
        named: list[tuple[str, str]] = []
        head = None
        for item in re.split(r"[,\n]", spec):
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            if "=" not in item:
                raise PlanError(f"bad plan entry {item!r}: use block=level, e.g. ffn.3=int4,attn.*=int8")
            name, level = (s.strip() for s in item.split("=", 1))
            if name in HEAD_NAMES:
                head = parse_head_level(level)
                continue
            level = parse_level(level)
            if name in ("*", "all", "attn.*", "ffn.*"):
                wild.append((name, level))
            else:
                try:
                    parse_block_name(name, num_layers)
                except MaskError as e:
                    raise PlanError(str(e).replace("attn.3,ffn.7", "attn.3=int8,ffn.*=int4")) from None
                named.append((name, level))
        plan = cls.of(base) if base is not None else cls.full(num_layers)
        if plan.num_layers != num_layers:
            raise PlanError(f"the base mask has {plan.num_layers} layers, the model has {num_layers}")
        attn, ffn = list(plan.attn_levels), list(plan.ffn_levels)
        for name, level in wild:
            if name != "ffn.*":
                attn = [level] * num_layers
            if name != "attn.*":
                ffn = [level] * num_layers
        for name, level in named:
            kind, layer = parse_block_name(name, num_layers)
            (attn if kind == "attn" else ffn)[layer] = level
        return cls.from_levels(attn, ffn, plan.head_level if head is None else head)

    @classmethod
    def from_dict(cls, data: dict, num_layers: int) -> "Plan":
        if "attn_levels" in data and "ffn_levels" in data:
            plan = cls.from_levels(data["attn_levels"], data["ffn_levels"], data.get("head_level", DTYPE))
            if plan.num_layers != num_layers:
                raise PlanError(f"plan has {plan.num_layers} layers, the model has {num_layers}")
            return plan
        if "levels" in data and isinstance(data["levels"], dict):
            return cls.from_spec(",".join(f"{k}={v}" for k, v in data["levels"].items()), num_layers)
        if "plan" in data and isinstance(data["plan"], str):
            return cls.from_spec(data["plan"], num_layers)
        try:
            return cls.of(BlockMask.from_dict(data, num_layers))
        except MaskError:
            raise PlanError('a plan JSON needs "levels": {block: level}, "plan": "<spec>", '
                            '"attn_levels"/"ffn_levels" lists, or a mask\'s "drop" list') from None

    @classmethod
    def parse(cls, spec: str | None, num_layers: int, profile: dict | None = None,
              drop: str | None = None) -> "Plan":
        """What users type after --plan (a spec or a file), on top of --drop (parsed as `BlockMask.parse`)."""
        base = cls.of(BlockMask.parse(drop, num_layers, profile))
        if spec is None or not spec.strip():
            return base
        spec = spec.strip()
        if "=" not in spec:
            path = Path(spec)
            if not path.is_file():
                raise PlanError(f"--plan {spec!r} is neither block=level entries (e.g. ffn.*=int8) nor a file")
            text = path.read_text()
            if path.suffix == ".json" or text.lstrip().startswith("{"):
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PlanError(f"plan file {spec} is not valid JSON: {e.msg} (line {e.lineno})") from None
                plan = cls.from_dict(data, num_layers)
            else:
                plan = cls.from_spec(text, num_layers)
        else:
            plan = cls.from_spec(spec, num_layers)
        # --drop names blocks explicitly: it wins over a wildcard of --plan
        return plan if base.is_full else plan.with_levels({name: DROP for name in base.dropped})

    # ---- views ----------------------------------------------------------------------------
    def level(self, name: str) -> str:
        kind, layer = parse_block_name(name, self.num_layers)
        return (self.attn_levels if kind == "attn" else self.ffn_levels)[layer]

    def items(self) -> Iterator[tuple[str, str]]:
        """(block name, level) in layer order: attn.0, ffn.0, attn.1, ..."""
        for i in range(self.num_layers):
            yield block_name("attn", i), self.attn_levels[i]
            yield block_name("ffn", i), self.ffn_levels[i]

    @property
    def mask(self) -> BlockMask:
        """Which blocks run, without their precision."""
        return BlockMask(self.keep_attn, self.keep_ffn)

    @functools.cached_property  # asked for every memory term of every plan a policy weighs
    def is_quantized(self) -> bool:
        return self.head_level != DTYPE or any(is_quantized(v) for v in self.attn_levels + self.ffn_levels)

    @property
    def blocks_quantized(self) -> bool:
        """Whether any block (the head aside) is at int8 / int4."""
        return any(is_quantized(v) for v in self.attn_levels + self.ffn_levels)

    def with_head(self, level: str) -> "Plan":
        return Plan.from_levels(self.attn_levels, self.ffn_levels, level)

    def counts(self) -> dict[str, int]:
        """Blocks per level, in LEVELS order (levels with no block left out)."""
        seen = [v for _, v in self.items()]
        return {v: seen.count(v) for v in LEVELS if v in seen}

    def with_levels(self, levels: dict[str, str]) -> "Plan":
        attn, ffn, head = list(self.attn_levels), list(self.ffn_levels), self.head_level
        for name, level in levels.items():
            if name in HEAD_NAMES:
                head = level
                continue
            kind, layer = parse_block_name(name, self.num_layers)
            (attn if kind == "attn" else ffn)[layer] = parse_level(level)
        return Plan.from_levels(attn, ffn, head)

    def drop(self, *names: str) -> "Plan":
        return self.with_levels({name: DROP for name in names})

    def restore(self, *names: str) -> "Plan":
        """Dropped blocks among `names` come back at the model's dtype."""
        return self.with_levels({name: DTYPE for name in names if not self.keeps(name)})

    def validate(self, shape) -> "Plan":
        """Raise PlanError if a level does not fit a block's shape (a `ModelShape`): an int4 group size
        must divide the in_features of every projection of the block."""
        for name, level in self.items():
            group = int4_group_size(level)
            if group is None:
                continue
            kind = name.split(".")[0]
            for proj, _, in_features in block_linears(kind, shape):
                if in_features % group:
                    fits = [f"int4g{g}" for g in INT4_GROUP_SIZES if all(not K % g for _, _, K in block_linears(kind, shape))]
                    raise PlanError(f"{name}={level}: group size {group} does not divide {proj}'s in_features "
                                    f"{in_features}; use {' or '.join([*fits, 'int8'])} for this block")
        return self

    def to_dict(self) -> dict:
        return {"drop": list(self.dropped), "num_layers": self.num_layers,
                "attn_levels": list(self.attn_levels), "ffn_levels": list(self.ffn_levels), "head_level": self.head_level}

    def spec(self) -> str:
        """The shortest spec `from_spec` reads back to this plan (uniform kinds as wildcards)."""
        parts = []
        for kind, levels in (("attn", self.attn_levels), ("ffn", self.ffn_levels)):
            common = max(set(levels), key=lambda v: (levels.count(v), v == DTYPE))
            if common != DTYPE:
                parts.append(f"{kind}.*={common}")
            parts += [f"{kind}.{i}={v}" for i, v in enumerate(levels) if v != common]
        if self.head_level != DTYPE:
            parts.append(f"head={self.head_level}")
        return ",".join(parts)

    def __str__(self) -> str:
        if not self.is_quantized:
            return BlockMask.__str__(self)
        return self.spec()


def as_plan(mask: BlockMask | None, num_layers: int) -> Plan:
    """None -> the dense plan; a BlockMask -> its plan (kept blocks at dtype); a Plan -> itself."""
    return Plan.full(num_layers) if mask is None else Plan.of(mask)
