"""WeightResidency: each block's weights on the device at its plan level, the rest in pinned host memory.

A block moves between levels without a restart (`apply(plan)`):

* **down** (dtype -> int8 -> int4 -> drop): the bytes go at once. A quantized level is built on the
  device from the resident copy one projection at a time (or, with `stage_host_copies(levels)`, copied
  from a staged quantized host copy: no quantization work, no transient), and the old tensor's last
  reference goes as the new one is installed. Dropping sends nothing back: the dense host copy made
  before the block first left the dtype level is kept (weights never change during inference).
* **up** (drop -> int4 -> int8 -> dtype): from the pinned dense host copy (a quantized level from its
  staged copy, or quantized on the device from the dense copy, one projection at a time).

Order: every down move runs before any up move, the largest saving first; up moves run largest old
copy first, and every move but dtype -> quantized frees the old copy before the new one lands (the
dense host copy rebuilds any level). So the parameter bytes never exceed the larger of the start and
the end by more than one block's quantized copy plus one projection's quantization temporaries
(`transition_peak_bytes` predicts the peak; the engine checks it against the budget before moving). Resident bytes after a move equal the memory model's `level_bytes` to the
byte (`measured_resident_bytes`, tensor storage; `memory_allocated` on CUDA).

Blocks dropped or restored at the model's dtype keep their `nn.Parameter` objects (only `.data`
moves, so hooks and references stay valid); a quantized level replaces the linear's weight
Parameter (a torchao tensor cannot be a Parameter's `.data`), so whoever holds weight references
(rap.decode.decoder.Decoder) must drop them first: `apply(..., before_change=...)` calls it once before the
first such move. On CPU, host and device memory are one: dense copies are the original tensors (no
copy), quantized levels are real, and residency is tracked as on CUDA.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel
from rap.core.model import BlockView, same_tensor
from rap.core.plan import DROP, DTYPE, Plan, block_linears, is_quantized
from rap.core.quant import block_linear_modules, module_storage_bytes, quantize_weight, storage_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    name: str
    source: str  # level before
    target: str  # level after
    before_bytes: int  # block bytes on the device before / after (memory model)
    after_bytes: int
    transient_bytes: int  # beyond before + after while the move runs (e.g. quantization temporaries)

    @property
    def down(self) -> bool:
        return self.after_bytes < self.before_bytes


def quantize_transient_bytes(out_features: int, in_features: int) -> int:
    """Upper estimate of torchao's quantization temporaries for one [N, K] projection: two fp32
    copies of the matrix (the qparams' min / max and the scaled values). Not needed with staged copies."""
    return 2 * 4 * out_features * in_features


def _pinned(t: torch.Tensor) -> torch.Tensor:
    h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    h.copy_(t)
    return h


def _map_inner(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn to a torchao tensor's inner tensors (a plain tensor: to itself)."""
    if not hasattr(t, "__tensor_flatten__"):
        return fn(t)
    names, ctx = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({n: fn(getattr(t, n)) for n in names}, ctx, t.size(), t.stride())


class WeightResidency:
    """Keeps each block of a plan on the device at its level; dense originals wait in pinned host memory.

    Each block module gets a forward pre-hook that makes the compute stream wait for that block's
    pending host-to-device copy only, so layer 0 computes while layer 20 loads.
    """

    def __init__(self, view: BlockView, memory_model: MemoryModel | None = None):
        self.view = view
        self.device = view.device
        self.on_cuda = self.device.type == "cuda"
        self.memory = memory_model or MemoryModel.from_view(view)
        # The state lives on the view: a second residency (another Engine on the same model) must see
        # the levels the first one left and the dense copies it holds, or it could never move back up.
        state = view.__dict__.setdefault("_rap_residency", {
            "levels": {b.name: DTYPE for b in view.blocks},
            "host": {},  # block -> {param name: dense host copy}
            "staged": {},  # (block, level) -> {proj: host tensor}
            "head": DTYPE,  # the embedding / lm_head's level (dtype or int8)
            "head_host": None,  # {"embed": dense host copy, "lm": dense host copy or None when tied}
        })
        self._state = state
        self._host: dict[str, dict[str, torch.Tensor]] = state["host"]
        self._staged: dict[tuple[str, str], dict[str, torch.Tensor]] = state["staged"]
        self._pending: dict[str, torch.cuda.Event] = {}
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.moves = Counter()  # "dropped" / "restored" / "quantized" / "dequantized" block counts
        self.last_moves: list[Move] = []
        for b in view.blocks:
            view.block_module(b.name).register_forward_pre_hook(self._make_wait_hook(b.name))

    def _make_wait_hook(self, name: str):
        def wait_for_copy(module, args):
            event = self._pending.pop(name, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        return wait_for_copy

    # ---- views ----------------------------------------------------------------------------
    @property
    def levels(self) -> dict[str, str]:
        """{block: level}; replaced, never mutated: other threads (metrics, /v1/budget) read it while a
        batch runs."""
        return self._state["levels"]

    @levels.setter
    def levels(self, value: dict[str, str]) -> None:
        self._state["levels"] = value

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(n for n, lv in self.levels.items() if lv != DROP)

    @property
    def plan(self) -> Plan:
        L = self.view.num_layers
        return Plan.from_levels([self.levels[f"attn.{i}"] for i in range(L)],
                                [self.levels[f"ffn.{i}"] for i in range(L)], self._state["head"])

    @property
    def mask(self) -> BlockMask:
        """Which blocks are resident (at any level)."""
        return self.plan.mask

    def resident_bytes(self) -> int:
        """Parameter bytes on the device (memory model): the base plus each resident block at its level."""
        return self.memory.param_bytes(self.plan)

    def measured_resident_bytes(self) -> int:
        """The same, from the tensors' storage (what `resident_bytes` must equal)."""
        block_ids = {id(p) for n in self.levels for p in self.view.block_module(n).parameters()}
        base = sum(storage_bytes(p) for p in self.view.model.parameters() if id(p) not in block_ids)
        return base + sum(module_storage_bytes(self.view.block_module(n)) for n in self.resident)

    def host_bytes(self) -> int:
        """Pinned host bytes held for moves (dense originals and staged quantized copies; 0 on CPU)."""
        if not self.on_cuda:
            return 0
        dense = sum(t.numel() * t.element_size() for d in list(self._host.values()) for t in d.values())
        dense += sum(t.numel() * t.element_size() for t in (self._state["head_host"] or {}).values() if t is not None)
        return dense + sum(storage_bytes(t) for d in list(self._staged.values()) for t in d.values())

    # ---- planning ------------------------------------------------------------------------
    def moves_for(self, mask: BlockMask) -> list[Move]:
        """The moves `apply(mask)` makes, in the order it makes them."""
        target = Plan.of(mask)
        moves = []
        for name, level in target.items():
            source = self.levels[name]
            if source == level:
                continue
            transient = 0
            if is_quantized(level) and (name, level) not in self._staged:
                linears = block_linears(name.split(".")[0], self.memory.shape)
                e = self.memory.shape.dtype_bytes
                # one projection at a time: its temporaries, plus (if the source is not the dense
                # copy on the device) that projection's dense copy brought up to quantize from
                transient = max(quantize_transient_bytes(N, K) + (0 if source == DTYPE else N * K * e)
                                for _, N, K in linears)
            moves.append(Move(name, source, level, self.memory.level_bytes(name, source),
                              self.memory.level_bytes(name, level), transient))
        head = target.head_level
        if head != self._state["head"]:
            V, H = self.memory.shape.vocab_size, self.memory.shape.hidden_size
            moves.append(Move("head", self._state["head"], head, self.memory.head_bytes(self._state["head"]),
                              self.memory.head_bytes(head), quantize_transient_bytes(V, H) if is_quantized(head) else 0))
        down = sorted((m for m in moves if m.down), key=lambda m: m.after_bytes - m.before_bytes)
        up = sorted((m for m in moves if not m.down), key=lambda m: -m.before_bytes)
        return down + up

    def transition_peak_bytes(self, mask: BlockMask) -> int:
        """Peak parameter bytes on the device while `apply(mask)` runs (memory model). A block leaving
        the dtype level is quantized from its resident copy, so old and new sit side by side (plus the
        transient); a block leaving a quantized level or coming back from the host frees its old
        copy first (the dense host copy can always rebuild it), so only the transient comes on top."""
        total = self.resident_bytes()
        peak = total
        for m in self.moves_for(mask):
            side = m.after_bytes if m.source == DTYPE else m.after_bytes - m.before_bytes
            peak = max(peak, total + max(0, side) + m.transient_bytes)
            total += m.after_bytes - m.before_bytes
        return peak

    # ---- moves -----------------------------------------------------------------------------
    def apply(self, mask: BlockMask, before_change: Callable[[], None] | None = None) -> tuple[list[str], list[str]]:
        """Move every block to its level in `mask` (a Plan; a BlockMask keeps blocks at dtype).
        Returns (dropped, restored): blocks that left the device, and blocks whose device weights are
        new (back from the host or at a new level). A dense restore may still be in flight on return."""
        moves = self.moves_for(mask)
        self.last_moves = moves
        if before_change is not None and any(is_quantized(m.source) or is_quantized(m.target) for m in moves):
            before_change()
        dropped, restored = [], []
        for m in moves:
            self._move(m.name, m.source, m.target)
            (dropped if m.target == DROP else restored).append(m.name)
        if dropped and self.on_cuda:
            # Hand the freed blocks back to the driver, not just to this process's cache, so
            # another tenant (and a live budget reading free memory) sees them.
            torch.cuda.empty_cache()
        if moves:
            log.debug("residency: %s", ", ".join(f"{m.name} {m.source}->{m.target}" for m in moves))
        return dropped, restored

    def stage_host_copies(self, levels: tuple[str, ...] = ()) -> int:
        """Make every resident block's pinned dense host copy now rather than on its first move (pinning
        gigabytes takes seconds: a server that expects its budget to move pays it at start), and for
        each of `levels` a pinned quantized copy (quantized on the device once), so a later move to that
        level is one host-to-device copy. Returns the host bytes held."""
        for name in sorted(self.resident):
            self._host_copy(name)
            module = self.view.block_module(name)
            for level in levels:
                if (name, level) in self._staged or not is_quantized(level):
                    continue
                staged = {}
                for proj, lin in block_linear_modules(module):
                    source = lin.weight if self.levels[name] == DTYPE else self._host[name][f"{proj}.weight"].to(self.device)
                    q = quantize_weight(source, level, f"{name}.{proj}")
                    staged[proj] = _map_inner(q, _pinned) if self.on_cuda else q
                    del q, source
                self._staged[(name, level)] = staged
        return self.host_bytes()

    def _host_copy(self, name: str) -> dict[str, torch.Tensor]:
        """The block's dense parameters on the host (made once, while the block is resident at dtype)."""
        if name not in self._host:
            if self.levels[name] != DTYPE:
                raise RuntimeError(f"{name} has no dense host copy and is not resident at dtype")
            module = self.view.block_module(name)
            self._host[name] = {n: (_pinned(p.data) if self.on_cuda else p.data) for n, p in module.named_parameters()}
        return self._host[name]

    def _wait(self, name: str) -> None:
        event = self._pending.pop(name, None)
        if event is not None:
            event.synchronize()

    def _move_head(self, source: str, target: str) -> None:
        """The embedding (and an untied lm_head) to `target`: int8 is quantized on the device from the dense
        copy, which waits on the host (pinned on CUDA); back to dtype from that copy. A tied lm_head stays
        one Parameter with the embedding."""
        emb, out = self.view.model.get_input_embeddings(), self.view.model.get_output_embeddings()
        tied = same_tensor(out.weight, emb.weight)
        host = self._state["head_host"]
        if host is None:  # made once, while the head is at dtype
            keep = _pinned if self.on_cuda else (lambda t: t.data)
            host = self._state["head_host"] = {"embed": keep(emb.weight.data),
                                               "lm": None if tied else keep(out.weight.data)}
        if target == DTYPE:
            new_emb = nn.Parameter(host["embed"].to(self.device), requires_grad=False)
            new_out = new_emb if tied else nn.Parameter(host["lm"].to(self.device), requires_grad=False)
        else:
            new_emb = nn.Parameter(quantize_weight(emb.weight.data if source == DTYPE else host["embed"].to(self.device),
                                                   target, "head"), requires_grad=False)
            new_out = new_emb if tied else nn.Parameter(
                quantize_weight(out.weight.data if source == DTYPE else host["lm"].to(self.device), target, "head"),
                requires_grad=False)
        emb.weight = new_emb  # the old tensors' last references go
        out.weight = new_out
        self._state["head"] = target
        self.moves["quantized" if target != DTYPE else "dequantized"] += 1

    def _move(self, name: str, source: str, target: str) -> None:
        if name == "head":
            return self._move_head(source, target)
        module = self.view.block_module(name)
        self._wait(name)
        if source == DTYPE:
            self._host_copy(name)
        host = self._host[name]
        if target == DROP:
            self._to_host(module, host)
            self.moves["dropped"] += 1
        elif target == DTYPE:
            if source != DROP:
                self._to_host(module, host, linears_only=True)  # free the quantized copy before the dense one lands
            self._restore_dense(name, module, host, linears_only=source != DROP)
            self.moves["restored" if source == DROP else "dequantized"] += 1
        else:
            if source == DROP:
                self._restore_dense(name, module, host, linears_only=False, skip_linears=True)
                self._wait(name)
            elif source != DTYPE:
                self._to_host(module, host, linears_only=True)  # free the old level first (rebuilt from host)
            self._quantize(name, module, source, target, host)
            self.moves["restored" if source == DROP else "quantized"] += 1
        levels = dict(self.levels)
        levels[name] = target
        self.levels = levels

    def _to_host(self, module: nn.Module, host: dict[str, torch.Tensor], linears_only: bool = False) -> None:
        """The block's parameters (or only its linear weights) point at their dense host copies; the
        device tensors are released."""
        linear_weights = {f"{proj}.weight": lin for proj, lin in block_linear_modules(module)}
        for n, p in list(module.named_parameters()):
            if n in linear_weights and type(p) is not nn.Parameter:  # a quantized weight: a fresh Parameter
                linear_weights[n].weight = nn.Parameter(host[n], requires_grad=False)
            elif not linears_only or n in linear_weights:
                p.data = host[n]

    def _restore_dense(self, name: str, module: nn.Module, host: dict[str, torch.Tensor], linears_only: bool,
                       skip_linears: bool = False) -> None:
        linear_weights = {f"{proj}.weight": lin for proj, lin in block_linear_modules(module)}
        params = dict(module.named_parameters())
        todo = [n for n in params if (n in linear_weights or not linears_only) and not (skip_linears and n in linear_weights)]
        if not self.on_cuda:
            for n in todo:
                if n in linear_weights and type(params[n]) is not nn.Parameter:
                    linear_weights[n].weight = nn.Parameter(host[n], requires_grad=False)  # frees the quantized one
                else:
                    params[n].data = host[n]
            return
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # don't overwrite memory compute may still read
        with torch.cuda.stream(self._stream):
            for n in todo:
                d = host[n].to(self.device, non_blocking=True)
                d.record_stream(compute)  # allocated on the side stream, used on the compute stream
                if n in linear_weights and type(params[n]) is not nn.Parameter:
                    linear_weights[n].weight = nn.Parameter(d, requires_grad=False)  # frees the quantized one
                else:
                    params[n].data = d
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[name] = event

    def _quantize(self, name: str, module: nn.Module, source: str, target: str, host: dict[str, torch.Tensor]) -> None:
        staged = self._staged.get((name, target))
        for proj, lin in block_linear_modules(module):
            if staged is not None:
                new = _map_inner(staged[proj], lambda t: t.to(self.device, non_blocking=True)) if self.on_cuda \
                    else staged[proj]
            else:
                dense = lin.weight if source == DTYPE else host[f"{proj}.weight"].to(self.device)
                new = quantize_weight(dense, target, f"{name}.{proj}")
                del dense
            lin.weight = nn.Parameter(new, requires_grad=False)  # the old tensor's last reference goes

    def synchronize(self) -> None:
        for event in self._pending.values():
            event.synchronize()
        self._pending.clear()
