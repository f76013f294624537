"""Level profile: what each block costs at each precision level, alone and in a greedy sequence.

Generalizes GSI from "drop a block" to "move a block to a lower level" (dtype -> int8 -> int4gG -> drop):

1. Single moves: for every block b and every lower level L its shape allows, the calibration NLL
   rise when b alone moves to L (every other block at the model's dtype). This is the table the
   multiple-choice knapsack (`rap.policy.solver`) works from.
2. Greedy sequential pass over joint actions: start dense; each step takes the move (b, L), L below
   b's current level, with the smallest measured NLL rise per byte freed, then re-measures, as GSI
   does. "Re-measures" is lazy: every step re-measures the `remeasure` moves whose last measured
   rise per byte is smallest (stale values from earlier plans rank them) and takes the best of
   those fresh values; `remeasure=None` re-measures every move every step (exact, ~10x slower).

Quantized values: rap.core.quant's `fake_quantize` (the values the torchao kernels hold, dequantized
to the model dtype) run on rap.core.forward's own layer functions (`attn_block`, `ffn_block`); not the
int8/int4 kernels themselves, which would give the same values up to matmul rounding.
Prefix reuse as in GSI: the stream entering every block under the current plan is cached
(`[windows, seq, hidden]` per block, on the device), so a move of block p runs blocks p.. only.

Bytes freed are the memory model's exact per-level bytes (`MemoryModel.level_bytes`) for the
device type given (`bytes_device`, default: the model's): int4 on CUDA pads in_features to 1024
(tinygemm), so int4 frees little on SmolLM2's 576-wide projections there; both tables are saved.

The GPU run the lead makes (H200, bf16 weights and activations, log-softmax and NLL sums in fp32;
32 x 2048 = 65,536 WikiText-2 valid tokens; estimated 2-3 minutes for SmolLM2-135M: ~55k block passes
over the calibration set, 16 windows per call; checkpointed after every move, so a rerun of the same
command resumes):

    PYTHONPATH=src python -m rap profile smollm2-135m --method levels --tokens 65536 --seq-len 2048 \\
        --dtype bf16 --device cuda --batch-windows 16 --remeasure 8 --bytes-device cuda \\
        --out ${OUT:-benchmarks/results}/levels-smollm2-135m.json

(int4 needs bf16 on CUDA: tinygemm's values are computed from bf16 weights, as the kernels hold them.)

On CPU (what ships until the GPU one arrives; fp32, 8 x 512 = 4,096 tokens):

    PYTHONPATH=src python -m rap profile smollm2-135m --method levels --tokens 4096 --seq-len 512 \\
        --device cpu --remeasure 6 --out src/rap/assets/profiles/smollm2-135m-levels.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rap.errors import RapError
from rap.core.model import BlockView
from rap.core.plan import DROP, DTYPE, INT8, Plan
from rap.profile.calibration import Calibration
from rap.profile.record import environment, model_hash, now, ppl_from_nll, save_record

log = logging.getLogger(__name__)

LEVEL_PROFILE_METHOD = "levels"


def ladder(int4_group: int = 64) -> tuple[str, ...]:
    """The levels a block can move down through, most bytes first."""
    return (DTYPE, INT8, f"int4g{int4_group}", DROP)


@dataclass
class LevelStep:
    block: str
    level: str  # the level it moved to
    from_level: str
    nll: float  # calibration mean NLL per token after the move
    ppl: float
    bytes_freed: int  # by this move
    total_bytes_freed: int  # since dense
    remeasured: int  # moves measured this step
    seconds: float


@dataclass
class LevelProfile:
    """The JSON file: single-move table, greedy order, bytes, and how it was made."""

    model: str
    model_hash: str
    calibration: dict
    num_layers: int
    levels: list[str]
    method: str = LEVEL_PROFILE_METHOD
    dense_nll: float | None = None  # mean NLL per scored token
    dense_ppl: float | None = None
    single: dict = field(default_factory=dict)  # block -> level -> mean NLL rise (vs dense) when moved alone
    bytes: dict = field(default_factory=dict)  # device type -> block -> level -> bytes
    bytes_device: str = "cpu"  # which table the greedy pass ranked by
    # the embedding / lm_head: {"single": {"int8": mean NLL rise from dense}, "bytes": {device: {level: bytes}}};
    # measured like a block's single move, not part of the greedy order (a policy adds it as one more choice)
    head: dict = field(default_factory=dict)
    # plans measured together on the calibration windows (rap.policy.library.build_library): the policy
    # picks among them by measured NLL; {"plans": [{"plan", "nll", "source"}], "fractions", ...}
    library: dict = field(default_factory=dict)
    steps: list[LevelStep] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    complete: bool = False
    seconds: float = 0.0
    block_forwards: float = 0.0  # one block over the whole calibration set
    versions: dict = field(default_factory=dict)
    device: str = ""
    created: str = ""
    command: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LevelProfile":
        data = dict(data)
        data["steps"] = [LevelStep(**s) for s in data.get("steps", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> Path:
        return save_record(self, path)

    def plan_after(self, steps: int) -> Plan:
        """The plan after the first `steps` greedy moves."""
        levels = {}
        for s in self.steps[:steps]:
            levels[s.block] = s.level
        return Plan.full(self.num_layers).with_levels(levels)


def load_level_profile(path: str | Path) -> LevelProfile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RapError(f"cannot read level profile {path}: {e}") from None
    if data.get("method") != LEVEL_PROFILE_METHOD or "single" not in data:
        raise RapError(f"{path} is not a level profile; make one with `rap profile MODEL --method levels`")
    return LevelProfile.from_dict(data)


# ---- running blocks at a level ------------------------------------------------------------------
class LevelRunner:
    """rap.core.forward's blocks with their linear weights replaced by `fake_quantize`d copies.

    The quantized copies are made once per (block, level) and kept (the model's size again per level).
    """

    def __init__(self, view: BlockView):
        from rap.core.forward import forward_for

        self.view = view
        self.fwd = forward_for(view)
        self.blocks = [b.name for b in view.blocks]
        self._weights: dict[tuple[str, str], object] = {}
        self.block_window_passes = 0

    def weights(self, name: str, level: str):
        kind, i = name.split(".")
        base = (self.fwd.attn if kind == "attn" else self.fwd.ffn)[int(i)]
        if level == DTYPE:
            return base
        key = (name, level)
        if key not in self._weights:
            from rap.core.quant import fake_quantize

            fields = ("wq", "wk", "wv", "wo") if kind == "attn" else ("wg", "wu", "wd")
            new = {f: fake_quantize(getattr(base, f), level) for f in fields}
            if kind == "ffn" and getattr(base, "wgu", None) is not None:
                new["wgu"] = torch.cat([new["wg"], new["wu"]])
            if kind == "attn" and getattr(base, "wqkv", None) is not None:
                new["wqkv"] = torch.cat([new["wq"], new["wk"], new["wv"]])
            self._weights[key] = dataclasses.replace(base, **new)
        return self._weights[key]

    @torch.no_grad()
    def run(self, name: str, level: str, x: torch.Tensor, rows) -> torch.Tensor:
        """Block `name` at `level` on a stream [B, S, hidden] (a dropped block returns x)."""
        if level == DROP:
            return x
        from rap.core.layers import ffn_block
        from rap.core.forward import attn_block

        self.block_window_passes += x.shape[0]
        w = self.weights(name, level)
        if name.startswith("attn"):
            win = w.window if w.window is not None and w.window < x.shape[1] else None
            return attn_block(x, w, rows.cos[w.rope], rows.sin[w.rope], rows.masks[win])
        return ffn_block(x, w)

    @torch.no_grad()
    def nll_sum(self, x: torch.Tensor, ids: torch.Tensor, rows_per_call: int = 4, head: str = DTYPE) -> float:
        from rap.core.layers import lm_logits
        from rap.eval.perplexity import window_nll

        ids, args = ids.to(x.device), self.fwd.head_at(head).args
        return float(sum(window_nll(lm_logits(x[i:i + rows_per_call], *args), ids[i:i + rows_per_call]).double().sum()
                         for i in range(0, x.shape[0], rows_per_call)))


class Streams:
    """The current plan's stream entering every block (H[p], p = 0..2L; H[2L] leaves the last one),
    for all windows, kept on the model's device; `refresh(p)` recomputes H[p+1..] after block p moved."""

    def __init__(self, runner: LevelRunner, windows: torch.Tensor, levels: list[str], batch_windows: int,
                 head: str = DTYPE):
        self.runner, self.windows, self.levels, self.bw, self.head = runner, windows, levels, batch_windows, head
        n = len(runner.blocks)
        self.H: list[torch.Tensor | None] = [None] * (n + 1)
        embed = runner.fwd.head_at(head).embed
        x = torch.cat([embed(windows[i:i + batch_windows].to(runner.fwd.device))
                       for i in range(0, len(windows), batch_windows)])
        self.H[0] = x
        self.rows = runner.fwd._rows(windows.shape[1], None, None)
        self.refresh(0)

    def refresh(self, p: int) -> None:
        """Recompute H[p+1..] (block p's level changed; H[0..p] still hold)."""
        for q in range(p, len(self.runner.blocks)):
            self.H[q + 1] = self._apply(q, self.levels[q], self.H[q])

    def _apply(self, q: int, level: str, x: torch.Tensor) -> torch.Tensor:
        if level == DROP:
            return x
        name = self.runner.blocks[q]
        return torch.cat([self.runner.run(name, level, x[i:i + self.bw], self.rows) for i in range(0, len(x), self.bw)])

    @torch.no_grad()
    def nll_if(self, p: int, level: str) -> float:
        """Summed calibration NLL if block p were at `level` (the rest at the current plan)."""
        total = 0.0
        for i in range(0, len(self.windows), self.bw):
            x = self.H[p][i:i + self.bw]
            x = self.runner.run(self.runner.blocks[p], level, x, self.rows)
            for q in range(p + 1, len(self.runner.blocks)):
                x = self.runner.run(self.runner.blocks[q], self.levels[q], x, self.rows)
            total += self.runner.nll_sum(x, self.windows[i:i + self.bw], head=self.head)
        return total

    def current_nll(self) -> float:
        end = self.H[-1]
        return sum(self.runner.nll_sum(end[i:i + self.bw], self.windows[i:i + self.bw], head=self.head)
                   for i in range(0, len(end), self.bw))


def plan_nll(runner: LevelRunner, windows: torch.Tensor, plan: Plan, batch: int = 1) -> float:
    """Mean next-token NLL of `windows` under `plan` (its levels by fake_quantize on rap.core.forward)."""
    total = 0.0
    for i in range(0, len(windows), batch):
        s = Streams(runner, windows[i:i + batch], [lv for _, lv in plan.items()], batch, head=plan.head_level)
        total += s.current_nll()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def allowed_levels(view: BlockView, int4_group: int = 64) -> dict[str, list[str]]:
    """block -> the ladder's levels its shape allows (int4 only where the group divides every in_features)."""
    from rap.core.memory import MemoryModel

    table = MemoryModel.from_view(view, on_cuda=False).block_level_bytes()
    return {name: [lv for lv in ladder(int4_group) if lv in table[name]] for name in table}


def bytes_tables(view: BlockView, levels: dict[str, list[str]]) -> dict[str, dict[str, dict[str, int]]]:
    from rap.core.memory import MemoryModel

    out = {}
    for device, on_cuda in (("cpu", False), ("cuda", True)):
        mm = MemoryModel(view.shape, view.base_bytes, {b.name: b.param_bytes for b in view.blocks}, on_cuda=on_cuda,
                         cublas_workspace_bytes=0, l2_cache_bytes=0)
        out[device] = {name: {lv: mm.level_bytes(name, lv) for lv in lvs} for name, lvs in levels.items()}
    return out


def level_profile(view: BlockView, calib: Calibration, *, int4_group: int = 64, steps: int | None = None,
                  remeasure: int | None = 12, batch_windows: int = 8, bytes_device: str | None = None,
                  checkpoint: str | Path | None = None, resume: bool = True, progress: bool = True,
                  name: str | None = None) -> LevelProfile:
    """Single-move table, then `steps` greedy moves (default: until every block is dropped).

    Checkpointed after the table and after every move; a matching incomplete checkpoint is resumed.
    """
    runner = LevelRunner(view)
    blocks = runner.blocks
    allowed = allowed_levels(view, int4_group)
    order = ladder(int4_group)
    bytes_device = bytes_device or ("cuda" if view.device.type == "cuda" else "cpu")
    tables = bytes_tables(view, allowed)
    nbytes = tables[bytes_device]
    settings = {"int4_group": int4_group, "remeasure": remeasure, "batch_windows": batch_windows,
                "dtype": str(view.dtype).replace("torch.", ""),
                "quantized_values": "rap.core.quant.fake_quantize on rap.core.forward (not the int8/int4 kernels)"}
    versions, device_text = environment(view.device)
    prof = LevelProfile(model=name or view.name, model_hash=model_hash(view), calibration=calib.describe(),
                        num_layers=view.num_layers, levels=list(order), bytes=tables, bytes_device=bytes_device,
                        settings=settings, versions=versions, device=device_text, created=now())
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        old = load_level_profile(checkpoint)
        if (old.model_hash == prof.model_hash and old.calibration.get("ids_sha256") == calib.sha256
                and old.settings.get("int4_group") == int4_group and old.bytes_device == bytes_device):
            if old.complete and old.head:
                return old
            prof = old  # incomplete, or complete but made before the head was measured: only that is added
            log.info("resuming %s: %d single moves, %d greedy steps", checkpoint,
                     sum(len(v) for v in old.single.values()), len(old.steps))
    tokens = calib.scored_tokens
    windows = calib.windows.to(view.device)
    moves = [(p, lv) for p, b in enumerate(blocks) for lv in allowed[b] if lv != DTYPE]
    max_steps = sum(len(v) - 1 for v in allowed.values())  # at most one move per level a block can go down
    total_steps = max_steps if steps is None else min(steps, max_steps)
    L = len(blocks)
    work = sum(L - p for p, _ in moves) + (total_steps * (remeasure or len(moves)) * L // 2)
    bar = tqdm(total=work, disable=not progress, desc=f"levels {prof.model}", unit="blk", dynamic_ncols=True)
    t0 = time.perf_counter()
    passes0 = runner.block_window_passes

    def account() -> None:
        nonlocal t0, passes0
        prof.seconds += time.perf_counter() - t0
        prof.block_forwards += (runner.block_window_passes - passes0) / calib.num_windows
        t0, passes0 = time.perf_counter(), runner.block_window_passes

    # replay the greedy steps done so far
    levels = [DTYPE] * L
    for s in prof.steps:
        levels[blocks.index(s.block)] = s.level
    streams = Streams(runner, windows, levels, batch_windows)
    cur = streams.current_nll()
    if prof.dense_nll is None:
        prof.dense_nll = cur / tokens if not prof.steps else prof.dense_nll
        prof.dense_ppl = ppl_from_nll(prof.dense_nll * tokens, tokens)

    # 1. single moves (from dense: a fresh Streams if greedy steps were replayed)
    if sum(len(v) for v in prof.single.values()) < len(moves):
        dense = streams if not prof.steps else Streams(runner, windows, [DTYPE] * L, batch_windows)
        for p, lv in moves:
            b = blocks[p]
            if lv in prof.single.get(b, {}):
                continue
            prof.single.setdefault(b, {})[lv] = dense.nll_if(p, lv) / tokens - prof.dense_nll
            bar.update(L - p)
            if lv == DROP:
                account()
                if checkpoint is not None:
                    prof.save(checkpoint)
        del dense
    else:
        bar.update(sum(L - p for p, _ in moves))
    if "int8" not in prof.head.get("single", {}):
        from rap.core.memory import MemoryModel

        head = Streams(runner, windows, [DTYPE] * L, batch_windows, head="int8")
        prof.head = {"single": {"int8": head.current_nll() / tokens - prof.dense_nll},
                     "bytes": {dev: {lv: MemoryModel.from_view(view, on_cuda=dev == "cuda").head_bytes(lv)
                                     for lv in (DTYPE, "int8")} for dev in ("cpu", "cuda")}}
        del head
        if checkpoint is not None:
            prof.save(checkpoint)

    # 2. greedy sequential pass; `stale[(p, lv)]`: last measured rise per byte (plan of that time)
    def ratio(p: int, lv: str, rise: float) -> float:
        freed = nbytes[blocks[p]][levels[p]] - nbytes[blocks[p]][lv]
        return rise / freed if freed > 0 else float("inf")

    stale = {(p, lv): ratio(p, lv, prof.single[blocks[p]][lv]) for p, lv in moves}
    cur_mean = cur / tokens
    freed_total = sum(nbytes[b][DTYPE] - nbytes[b][levels[i]] for i, b in enumerate(blocks))
    for step in range(len(prof.steps), 0 if prof.complete else total_steps):
        t_step = time.perf_counter()
        cands = [(p, lv) for p, lv in moves if order.index(lv) > order.index(levels[p])
                 and nbytes[blocks[p]][levels[p]] > nbytes[blocks[p]][lv]]
        if not cands:
            break
        cands.sort(key=lambda m: (stale[m], m))
        fresh = {}
        for p, lv in cands[:remeasure] if remeasure else cands:
            rise = streams.nll_if(p, lv) / tokens - cur_mean
            fresh[(p, lv)] = rise
            stale[(p, lv)] = ratio(p, lv, rise)
            bar.update(L - p)
        p, lv = min(fresh, key=lambda m: (stale[m], m))
        freed = nbytes[blocks[p]][levels[p]] - nbytes[blocks[p]][lv]
        prev = levels[p]
        levels[p] = lv
        streams.refresh(p)
        cur_mean += fresh[(p, lv)]
        freed_total += freed
        account()
        prof.steps.append(LevelStep(block=blocks[p], level=lv, from_level=prev, nll=cur_mean,
                                    ppl=ppl_from_nll(cur_mean * tokens, tokens), bytes_freed=freed,
                                    total_bytes_freed=freed_total, remeasured=len(fresh),
                                    seconds=round(time.perf_counter() - t_step, 3)))
        prof.complete = step + 1 == total_steps
        if checkpoint is not None:
            prof.save(checkpoint)
        bar.set_postfix_str(f"{blocks[p]}={lv} ppl {prof.steps[-1].ppl:.2f}", refresh=False)
    bar.close()
    account()
    prof.complete = True
    if checkpoint is not None:
        prof.save(checkpoint)
    return prof
