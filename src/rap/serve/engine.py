"""Engine: live budget -> decision -> weights resident -> generate.

For every batch of requests the engine

1. reads the memory budget from a *budget source* (fixed bytes, a fraction of the device, a live
   reading of free device memory minus a reserve, or any callable);
2. asks a *policy* for a decision, `policy.decide(request, budget_bytes)` -> `rap.policy.decision.Decision`
   (the one signature: the policy plans with the engine's memory model; a callable(request, budget_bytes)
   returning a Decision or a BlockMask also serves); the engine re-checks every decision against the
   memory model itself and never runs one that does not fit;
3. makes the resident weights match the decision (`WeightResidency`): dropped blocks leave the
   device for pinned host memory, kept blocks come back on a side CUDA stream, and each block's
   first forward waits only for its own copy, so reloading overlaps with the layers before it;
4. generates with a *backend* (rap.decode.decoder.Decoder, or Hugging Face `generate` under the block
   mask as the fallback) and returns per-request text with metadata: decision,
   predicted and measured memory, time. The decoder applies the decision's KV keep ratio
   (SnapKV, uniform per head; its buffers shrink as the memory model says) and streams tokens;
   HF `generate` keeps the whole cache, so under it a ratio < 1 is re-decided at 1.0.

A request whose smallest configuration cannot fit is rejected with `BudgetError` while the rest
of the batch is served. An out-of-memory error is caught, logged, and the batch is retried once
with a smaller decision; it never escapes `Engine.generate`.

Nothing here knows about HTTP, processes or threads beyond one lock: `rap.serve.server` (or a Ray Serve
deployment, one Engine per GPU) wraps an Engine without changing it.

Where the pieces live: budget sources in `rap.serve.budget`, backends in `rap.serve.backends`, `Decision` in
`rap.policy.decision`, the built-in greedy policy in `rap.policy.greedy`, weight residency in `rap.serve.residency`.
Why this module is long (~770 lines): what is left is one state machine, the batch loop (admit and
validate rows, decide, move weights, run, bisect failures, stream, cancel); its halves share the
engine's lock and counters, and split apart they would only call each other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from rap.errors import BudgetError, RapError, RequestError
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.core.model import BlockView
from rap.core.plan import Plan
from rap.serve.backends import GREEDY_TEMPERATURE, HFGenerateBackend, Sampling, make_backend
from rap.serve.budget import BudgetSource, LiveBudget, budget_from_spec
from rap.policy.decision import Decision
from rap.policy.greedy import GreedyPolicy, as_policy, default_removal_order, kv_layout_for_bits
from rap.serve.residency import WeightResidency

log = logging.getLogger(__name__)

GPU_HEADROOM_RATIO = 0.005  # default planning margin on CUDA (see Engine.__init__)
MAX_TEMPERATURE = 100.0  # beyond this a distribution is uniform to float precision; refuse, not NaN
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


# ==== requests and results ======================================================================
@dataclass
class GenerationRequest:
    """One prompt (text, or token ids) to complete. `on_token` is called from the engine's thread
    with each new token id as it is generated (for streaming)."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_token: Callable[[int], None] | None = None
    request_id: str = ""
    # set from any thread (a client gone, a deadline, shutdown): the row stops within one decode step
    cancel: threading.Event | None = None
    # the KV press when the policy keeps < 1 of the prompt's cache: "adakv" (default) or "snapkv"
    kv_press: str | None = None

    @property
    def sampling(self) -> Sampling:
        """How the batch samples (the seed is per row: `seed`, not part of the batch's sampling)."""
        t = float(self.temperature)
        return Sampling(0.0 if t < GREEDY_TEMPERATURE else t, float(self.top_p), None)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass(frozen=True)
class StepInfo:
    """What happened to one batch: the budget, the decision and the memory it took."""

    step: int
    batch: int
    prompt_tokens: int  # padded prompt length of the batch
    new_tokens: int  # the batch's max_new_tokens
    budget_bytes: int
    effective_budget_bytes: int  # the budget after headroom and learned correction
    decision: Decision
    predicted_peak_bytes: int
    measured_peak_bytes: int | None  # torch.cuda.max_memory_allocated over the batch (GPU only)
    resident_bytes: int  # parameter bytes on the device after the batch
    dropped_blocks: tuple[str, ...]  # moved off the device for this batch
    restored_blocks: tuple[str, ...]  # moved back for this batch
    seconds: float
    generated_tokens: int
    oom_retry: bool
    backend: str
    started_at: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decision"] = self.decision.to_dict()
        d["dropped_blocks"], d["restored_blocks"] = list(self.dropped_blocks), list(self.restored_blocks)
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    step: StepInfo | None = None
    error: RapError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class EngineStats:
    """Running totals (read by /metrics and benchmarks)."""

    steps: int = 0
    requests_served: int = 0
    requests_rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    oom_events: int = 0
    oom_failures: int = 0
    backend_fallbacks: int = 0  # single rows served by the fallback backend after the primary failed on them
    last_fallback: str | None = None
    decisions: Counter = field(default_factory=Counter)  # (dropped block count, kv_ratio) -> batches
    last_step: StepInfo | None = None


class OutOfMemoryAfterRetry(BudgetError):
    """The device ran out of memory, and again after shrinking."""


class EngineFailure(RapError):
    """A request failed inside the engine for a reason that is not its input (a bug): a server
    answers 500 for it alone."""


# ==== the engine ================================================================================
class Engine:
    """A model served inside a memory budget that may change between batches."""

    def __init__(self, model: str | Path | BlockView, budget: Any = None, policy: Any = None, *,
                 tokenizer=None, profile: dict | str | Path | None = None, device: str | None = None,
                 dtype: Any = None, backend: str = "auto", max_batch: int = 32, headroom_ratio: float | None = None,
                 device_total_bytes: int | None = None, oom_shrink_ratio: float = 0.75, calibrate: bool = True,
                 stage_host_copies: bool = False):
        if isinstance(model, BlockView):
            if tokenizer is None:
                raise RapError("Engine(view) needs the tokenizer too: Engine(view, tokenizer=tok)")
            self.view = model
        else:
            from rap.sources import load_view

            self.view, tokenizer = load_view(str(model), dtype=dtype, device=device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device = self.view.device
        self.device_total_bytes = device_total_bytes
        self.memory_model = MemoryModel.from_view(self.view)
        if profile is None:
            from rap.sources import bundled_policy

            profile = bundled_policy(self.view.name, self.view.num_layers)
            if profile is not None:
                log.info("using the profile shipped for %s: %s", self.view.name, profile)
        self.profile = profile
        self.policy = as_policy(policy, self.memory_model, profile, self.view.name)
        # what an idle budget drop decides with, built now (fitting its quality model takes seconds): the
        # shrink must land within a second of the drop
        getattr(self.policy, "drop_only", None)
        self.residency = WeightResidency(self.view, self.memory_model)
        if stage_host_copies:
            # True: dense copies only; a tuple of levels: also a staged quantized host copy per level
            levels = tuple(stage_host_copies) if isinstance(stage_host_copies, (tuple, list)) else ()
            log.info("staged pinned host copies of every block: %s",
                     format_bytes(self.residency.stage_host_copies(levels)))
        self.backend = make_backend(self.view, backend)
        self._fallback_backend = HFGenerateBackend()
        # a compressed cache is as long as the backend allocates it (the decoder rounds it up)
        self.memory_model.kv_length_quantum = getattr(self.backend, "kv_length_quantum", None)
        self.memory_model.window_bounded_kv = getattr(self.backend, "window_bounded_kv", True)
        # ... and laid out as the decoder's default press (Ada-KV: flat per-head segments) stores it
        self.memory_model.kv_layout = getattr(self.backend, "kv_layout", None)
        self.max_batch = max_batch
        # None: on the GPU, a margin of the memory model's worst measured error (0.13% over 14
        # configurations, some of them under-predicted: memory-model-decoder-h200-2026-12-02.json;
        # 0.39% before the prefill's FFN was counted tensor by tensor) rounded up, so the first batch,
        # before any correction is learned, stays inside the budget too; nothing on the CPU.
        if headroom_ratio is None:
            headroom_ratio = GPU_HEADROOM_RATIO if self.device.type == "cuda" else 0.0
        self.headroom_ratio = headroom_ratio
        self.oom_shrink_ratio = oom_shrink_ratio
        # What the memory model does not see, learned on the GPU: a fixed overhead (cuBLAS
        # workspace, RoPE tables...) measured once at start, and the worst measured/predicted
        # ratio of the rest. Budgets are planned net of both.
        self.overhead_bytes = 0
        self.correction_ratio = 1.0
        # Device bytes that are not the engine's: what was allocated at start beyond the weights
        # (another tenant of this process, leftovers). Everything above it and the resident weights
        # is the engine's own (KV buffers, CUDA-graph pools, compile caches), measured, not reported:
        # a backend knows its KV but not its graphs' private pools.
        self._foreign_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._foreign_bytes = torch.cuda.memory_allocated(self.device) - self.residency.resident_bytes()
        self.stats = EngineStats()
        self._lock = threading.RLock()
        self.cancel_all = threading.Event()  # shutdown: every running row stops at its next step
        self._eos_ids = self._find_eos_ids()
        self.set_budget(budget if budget is not None else LiveBudget(0, str(self.device), device_total_bytes))
        if calibrate and self.device.type == "cuda":
            self.calibrate()

    # ---- model facts ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.view.name

    @property
    def max_context(self) -> int:
        return self.view.shape.max_context

    def _find_eos_ids(self) -> tuple[int, ...]:
        ids = set()
        gen_eos = getattr(getattr(self.view.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return tuple(sorted(ids))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a chat, through the tokenizer's chat template when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- budget -----------------------------------------------------------------------------------
    def set_budget(self, budget: Any) -> BudgetSource:
        """Change where the budget comes from; takes effect at the next batch."""
        self.budget_source = budget_from_spec(budget, str(self.device), self.device_total_bytes)
        return self.budget_source

    def read_budget(self) -> int:
        return int(self.budget_source())

    def effective_budget(self, budget_bytes: int) -> int:
        """Budget the policy plans against: net of the measured overhead and headroom, divided by
        the learned correction (on CPU: the budget itself)."""
        net = (budget_bytes - self.overhead_bytes) * (1.0 - self.headroom_ratio) / self.correction_ratio
        return max(0, int(net))

    def need_bytes(self, predicted_bytes: int) -> int:
        """Device bytes a configuration the memory model puts at `predicted_bytes` really takes:
        the inverse of `effective_budget` (so need_bytes(p) <= b exactly when p fits b)."""
        scaled = math.ceil(predicted_bytes * self.correction_ratio / (1.0 - self.headroom_ratio))
        return scaled + self.overhead_bytes

    def dense_need_bytes(self, request: Request) -> int:
        return self.need_bytes(self.memory_model.dense_need(request))

    def smallest_need_bytes(self, request: Request) -> int:
        order = default_removal_order(self.view.num_layers)
        return self.need_bytes(self.memory_model.peak_bytes(BlockMask.from_drop(self.view.num_layers, order), request))

    def calibrate(self, prompt_tokens: int = 8, new_tokens: int = 4) -> int:
        """GPU: run one tiny dense batch and take what its measured peak exceeds the prediction by
        as a fixed overhead (cuBLAS workspace, tables, graph pools). Returns the overhead bytes."""
        with self._lock:
            full = BlockMask.full(self.view.num_layers)
            self.residency.apply(full)
            self.residency.synchronize()
            ids = [[min(5, self.view.shape.vocab_size - 1)] * prompt_tokens]
            planned = self.planning_request(Request(1, prompt_tokens, new_tokens))
            for _ in range(2):  # the first call also pays one-time allocations (graph capture)
                torch.cuda.synchronize(self.device)
                others = torch.cuda.memory_allocated(self.device) - self.residency.resident_bytes() - sum(
                    b.resident_extra_bytes() for b in self._backends())
                torch.cuda.reset_peak_memory_stats(self.device)
                self.backend.generate(self.view, ids, full, 1.0, Sampling(), new_tokens, self.tokenizer.pad_token_id,
                                      self._eos_ids)
                torch.cuda.synchronize(self.device)
                measured = torch.cuda.max_memory_allocated(self.device) - others
                self.overhead_bytes = max(self.overhead_bytes,
                                          measured - self.memory_model.peak_bytes(full, planned))
            log.info("calibrated: %s of device memory beyond the memory model", format_bytes(self.overhead_bytes))
            return self.overhead_bytes

    def planning_request(self, request: Request) -> Request:
        """The request as the backend will allocate for it (the fast decoder rounds batch and length)."""
        return self.backend.planning_request(request)

    def check_admissible(self, request: Request) -> None:
        """Raise BudgetError now if `request` cannot fit under the current budget even with every
        block dropped (lets a server answer before queueing; the batch re-checks)."""
        budget = self.read_budget()
        need = self.smallest_need_bytes(self.planning_request(request))
        if need > budget:
            raise BudgetError(
                f"{request.prompt} prompt + {request.new_tokens} new tokens need at least {format_bytes(need)} with every "
                f"block dropped, but the budget is {format_bytes(budget)}: shorten the prompt, lower max_tokens "
                f"or raise the budget")

    def decide(self, request: Request, budget_bytes: int | None = None) -> Decision:
        """The decision for `request` under `budget_bytes` (default: the current budget reading)."""
        budget = self.read_budget() if budget_bytes is None else budget_bytes
        return self._decide(request, self.effective_budget(budget))

    def _decide(self, request: Request, planning_bytes: int, backend=None, policy=None) -> Decision:
        backend = backend or self.backend
        decision = self._checked(policy or self.policy, request, planning_bytes)
        if (decision.kv_ratio < 1.0 or decision.kv_bits != 16) and not getattr(backend, "supports_kv_ratio", False):
            # This backend keeps the whole prompt cache: plan with what it will really hold.
            full_kv_bytes = self.memory_model.peak_bytes(decision.mask, request, 1.0)
            if full_kv_bytes <= planning_bytes:
                decision = Decision(decision.mask, 1.0, full_kv_bytes, decision.policy)
            else:
                log.info("backend %s cannot compress the KV cache; re-deciding with kv_ratio 1.0", backend.name)
                decision = GreedyPolicy(self.memory_model).decide(request, planning_bytes)
        if decision.predicted_peak_bytes > planning_bytes:
            raise BudgetError(
                f"policy {decision.policy} chose {decision.mask} needing {format_bytes(decision.predicted_peak_bytes)} "
                f"but the budget is {format_bytes(planning_bytes)}; nothing smaller was offered")
        return decision

    def _checked(self, policy: Any, request: Request, planning_bytes: int) -> Decision:
        """The policy's decision, its peak re-counted by the engine's memory model (whoever made it)."""
        decide = policy.decide if hasattr(policy, "decide") else policy
        raw = decide(request, planning_bytes)
        if isinstance(raw, BlockMask):
            raw = Decision(raw)
        name = raw.policy or getattr(policy, "name", None) or type(policy).__name__
        peak = self.memory_model.peak_bytes(raw.mask, request, raw.kv_ratio, kv_layout_for_bits(raw.kv_bits))
        return dataclasses.replace(raw, predicted_peak_bytes=peak, policy=str(name))

    # ---- serving ----------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest] | GenerationRequest) -> list[GenerationResult]:
        """Serve a batch of requests. Never raises for one bad or oversized request: its result
        carries the error (a RapError) and the others are served."""
        if isinstance(requests, GenerationRequest):
            requests = [requests]
        with self._lock:
            results: list[GenerationResult | None] = [None] * len(requests)
            groups: dict[tuple, list] = {}
            for i, r in enumerate(requests):
                try:
                    ids = self._validate(r)
                except RapError as e:
                    results[i] = self._reject(r, e, "invalid")
                    continue
                if r.cancelled:
                    results[i] = GenerationResult(r.request_id, prompt_tokens=len(ids), finish_reason="cancelled")
                    continue
                # Streaming needs per-token callbacks; a backend without them serves the batch at
                # the end, so streamed requests go to one that streams.
                backend = self.backend if (r.on_token is None or self.backend.streams) else self._fallback_backend
                # Seeds do not split batches: each row samples from its own generator.
                key = (r.sampling, id(backend), r.kv_press)
                groups.setdefault(key, [backend, []])[1].append((i, r, ids))
            for backend, items in groups.values():
                for start in range(0, len(items), self.max_batch):
                    for i, result in self._serve(items[start:start + self.max_batch], backend):
                        results[i] = result
            return results  # type: ignore[return-value]

    def complete(self, prompt: str, **kwargs) -> GenerationResult:
        """One prompt; raises the RapError instead of returning it."""
        result = self.generate(GenerationRequest(prompt=prompt, **kwargs))[0]
        if result.error is not None:
            raise result.error
        return result

    def validate(self, r: GenerationRequest) -> list[int]:
        """The request's prompt token ids, or a RequestError naming what is wrong with it (thread-safe:
        a server calls it off its event loop, before batching)."""
        return self._validate(r)

    def _validate(self, r: GenerationRequest) -> list[int]:
        """Every field checked against what the backends can do, so a bad one fails only its own
        request (before batching) and never reaches a kernel."""
        if r.prompt_ids is None and r.prompt is not None:
            if not isinstance(r.prompt, str):
                raise RequestError(f"a prompt must be text, got {type(r.prompt).__name__}")
            check_text(r.prompt, "the prompt")
        ids = list(r.prompt_ids) if r.prompt_ids is not None else (self.encode(r.prompt) if r.prompt else [])
        if not ids:
            raise RequestError("the prompt is empty: send at least one token of text")
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {r.max_new_tokens!r}")
        if len(ids) + r.max_new_tokens > self.max_context:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({r.max_new_tokens}) exceeds the model's "
                               f"context of {self.max_context} tokens: shorten the prompt or lower max_tokens")
        for name, value in (("temperature", r.temperature), ("top_p", r.top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= r.temperature <= MAX_TEMPERATURE or not 0 < r.top_p <= 1:
            raise RequestError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] and top_p in (0, 1]")
        if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)
                                   or not SEED_RANGE[0] <= r.seed < SEED_RANGE[1]):
            raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {r.seed!r}")
        if not isinstance(r.stop, (tuple, list)) or not all(isinstance(x, str) for x in r.stop):
            raise RequestError("stop must be a list of strings")
        for x in r.stop:
            check_text(x, "a stop string")
        vocab = self.view.shape.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if r.kv_press is not None:
            from rap.kv.decode_cache import layout_for

            layout_for(r.kv_press)  # one line for an unknown press
            windowed = getattr(self.backend, "windowed_layers", lambda: [])()
            if windowed:
                raise RequestError(f"kv_press {r.kv_press!r} cannot compress this model's sliding-window attention "
                                   f"layers {windowed}: send the request without kv_press")
            if not getattr(self.backend, "supports_kv_ratio", False):
                raise RequestError(f"kv_press {r.kv_press!r} needs rap's decoder; backend {self.backend.name} "
                                   "cannot compress the KV cache")
        return ids

    def _reject(self, r: GenerationRequest, error: RapError, reason: str) -> GenerationResult:
        self.stats.requests_rejected += 1
        self.stats.rejected_by_reason[reason] += 1
        log.info("rejected request %s (%s): %s", r.request_id or "-", reason, error)
        return GenerationResult(r.request_id, finish_reason="error", error=error)

    def _serve(self, items: list, backend) -> list[tuple[int, GenerationResult]]:
        budget = self.read_budget()
        request = Request(len(items), max(len(ids) for _, _, ids in items), max(r.max_new_tokens for _, r, _ in items))
        try:
            decision = self._decide(backend.planning_request(request), self.effective_budget(budget), backend)
        except BudgetError as e:
            if len(items) > 1:  # smaller batches may fit where the whole one does not
                half = len(items) // 2
                return self._serve(items[:half], backend) + self._serve(items[half:], backend)
            i, r, ids = items[0]
            error = BudgetError(f"prompt of {len(ids)} tokens + max_tokens {r.max_new_tokens} does not fit the memory "
                                f"budget ({e}): send a shorter prompt, fewer max_tokens or raise the budget")
            return [(i, self._reject(r, error, "budget"))]
        try:
            decision = self._for_press(decision, items[0][1].kv_press, backend.planning_request(request),
                                       self.effective_budget(budget), backend)
        except BudgetError as e:
            return [(i, self._reject(r, e, "budget")) for i, r, _ in items]
        return self._run(items, backend, request, decision, budget, retry=True)

    def _for_press(self, decision: Decision, press: str | None, planning: Request, limit: int, backend) -> Decision:
        """The decision with the press that serves it (the request's, else Ada-KV) when it keeps < 1 of the
        cache, its peak counted with that press's own layout: policies price KV with Ada-KV's flat cache, and
        uniform SnapKV's dense buffers (rounded to 64 tokens) or PyramidKV's per-layer lengths can need more.
        Over the budget, it is decided again under a budget lowered by the excess (up to four times)."""
        from rap.kv.decode_cache import KVLayout

        press = press or "adakv"
        planning_bytes = limit
        for _ in range(4):
            if decision.kv_ratio >= 1.0:
                return decision
            peak = self.memory_model.peak_bytes(decision.mask, planning, decision.kv_ratio,
                                                KVLayout(press, decision.kv_bits))
            if peak <= limit:
                return dataclasses.replace(decision, kv_press=press, predicted_peak_bytes=peak)
            planning_bytes -= peak - limit
            decision = self._decide(planning, planning_bytes, backend)
        raise BudgetError(f"no decision fits {format_bytes(limit)} with kv_press {press!r}'s cache layout")

    def _run(self, items: list, backend, request: Request, decision: Decision, budget: int, retry: bool):
        try:
            return self._execute(items, backend, request, decision, budget, oom_retry=not retry)
        except torch.OutOfMemoryError as e:
            return self._after_oom(e, items, backend, request, decision, budget, retry)
        except RapError as e:  # a backend refusing these rows (e.g. too many stop ids): theirs alone
            reason = "budget" if isinstance(e, BudgetError) else "invalid"
            return [(i, self._reject(r, e, reason)) for i, r, _ in items]
        except Exception as e:  # a bug (ours or a backend's): fail only the rows it belongs to
            return self._isolate_failure(items, backend, e)

    def _isolate_failure(self, items: list, backend, error: Exception) -> list[tuple[int, GenerationResult]]:
        """A batch failed with an unexpected error: bisect it so the rows that do not trigger it are
        served; a single failing row gets one try on the fallback backend (counted, logged, and for
        this row only: the next batch uses the primary backend again), then an error of its own."""
        if len(items) > 1:
            log.warning("backend %s failed on a batch of %d (%s: %s); retrying it in halves", backend.name,
                        len(items), type(error).__name__, error)
            half = len(items) // 2
            return self._serve(items[:half], backend) + self._serve(items[half:], backend)
        i, r, _ = items[0]
        if backend is not self._fallback_backend:
            self.stats.backend_fallbacks += 1
            self.stats.last_fallback = f"{backend.name} failed on request {r.request_id or '-'}: " \
                                       f"{type(error).__name__}: {error}"
            log.error("%s; serving that request with %s", self.stats.last_fallback, self._fallback_backend.name)
            return self._serve(items, self._fallback_backend)
        log.error("request %s failed on every backend", r.request_id or "-", exc_info=error)
        return [(i, self._reject(r, EngineFailure(f"internal error generating this request: "
                                                  f"{type(error).__name__}: {error}"), "internal"))]

    def _after_oom(self, e: Exception, items: list, backend, request: Request, decision: Decision, budget: int,
                   retry: bool):
        self.stats.oom_events += 1
        self._release_cached_memory()
        first_line = (str(e).splitlines() or ["out of memory"])[0]
        if not retry:
            self.stats.oom_failures += 1
            log.error("out of memory again after shrinking (%s); rejecting %d request(s)", first_line, len(items))
            error = OutOfMemoryAfterRetry(
                f"the device ran out of memory running {decision.mask} even after shrinking; "
                f"lower the budget or send smaller requests")
            return [(i, self._reject(r, error, "oom")) for i, r, _ in items]
        shrunk = int(min(self.effective_budget(budget), decision.predicted_peak_bytes) * self.oom_shrink_ratio)
        log.warning("out of memory running %s (predicted %s, budget %s): %s; retrying once within %s",
                    decision.mask, format_bytes(decision.predicted_peak_bytes), format_bytes(budget), first_line,
                    format_bytes(shrunk))
        try:
            smaller = self._decide(backend.planning_request(request), shrunk, backend)
        except BudgetError as be:
            return [(i, self._reject(r, be, "budget")) for i, r, _ in items]
        try:
            smaller = self._for_press(smaller, decision.kv_press, backend.planning_request(request), shrunk, backend)
        except BudgetError as be:
            return [(i, self._reject(r, be, "budget")) for i, r, _ in items]
        return self._run(items, backend, request, smaller, budget, retry=False)

    def _backends(self) -> list:
        return [self.backend] if self.backend is self._fallback_backend else [self.backend, self._fallback_backend]

    def _release_cached_memory(self) -> None:
        self._release_backend_buffers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _drop_weight_references(self) -> None:
        """Before a block changes precision: backends let go of the weight tensors they hold (the fast
        decoder's per-layer weights and graphs), so the old copy is freed the moment it is replaced."""
        for b in self._backends():
            getattr(b, "drop_weight_references", lambda: None)()

    def _execute(self, items: list, backend, request: Request, decision: Decision, budget: int, oom_retry: bool):
        t0 = time.perf_counter()
        started_at = time.time()
        transition = self.residency.transition_peak_bytes(decision.mask)
        if transition > self.residency.resident_bytes() and transition + self._held_bytes() > self.effective_budget(budget):
            self._release_backend_buffers()  # the decoder's KV buffers must not sit beside a precision change
            if transition > max(self.effective_budget(budget), self.residency.resident_bytes()):
                log.warning("moving to [%s] peaks at %s of parameters (one block's old and new copy side by side), "
                            "over the budget of %s", decision.mask, format_bytes(transition),
                            format_bytes(self.effective_budget(budget)))
        dropped, restored = self.residency.apply(decision.mask, before_change=self._drop_weight_references)
        if not isinstance(backend, HFGenerateBackend):
            # The fast decoder reads weights directly (no module forward, so no per-block wait
            # hooks) and may run them on its own streams: the copies must be complete first.
            self.residency.synchronize()
        for b in self._backends():
            b.on_weights_restored(restored)
        # Buffers a backend keeps between batches (the decoder's KV) come on top of the prediction
        # only when they belong to another shape; release them if together they would not fit.
        extra = self._held_bytes()
        if extra and decision.predicted_peak_bytes + extra > self.effective_budget(budget):
            self._release_backend_buffers()
            extra = 0
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            # the measured peak is this batch's: max_memory_allocated less the start-up `_foreign_bytes`
            torch.cuda.reset_peak_memory_stats(self.device)
        reqs = [r for _, r, _ in items]
        rows = [ids for _, _, ids in items]
        watch = any(r.on_token or r.stop or r.cancel for r in reqs) or self.cancel_all.is_set()
        streams = _RowDispatcher(reqs, self._eos_ids, self.decode, self.cancel_all) if watch else None
        new = self._backend_generate(backend, rows, decision, reqs[0].sampling, [r.seed for r in reqs],
                                     request.new_tokens, streams.on_step if streams else None)
        if on_cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        measured = torch.cuda.max_memory_allocated(self.device) - self._foreign_bytes if on_cuda else None
        if measured is not None and decision.predicted_peak_bytes > 0:
            # what this batch's own plan took: the buffers held from an earlier batch are not in it
            ratio = (measured - self.overhead_bytes - extra) / decision.predicted_peak_bytes
            if ratio > self.correction_ratio:
                log.info("measured peak %s exceeds predicted %s: planning with %.3fx from now on",
                         format_bytes(measured), format_bytes(decision.predicted_peak_bytes), ratio)
                self.correction_ratio = ratio
        outputs = []
        for row, r in enumerate(reqs):
            if streams is not None and streams.reason[row] is not None:  # finished by a stop, cancel or EOS
                ids, reason = list(new[row])[: streams.count[row]], streams.reason[row]
                text = streams.text[row] if streams.text[row] is not None else self.decode(ids)
            else:
                ids, reason = _cut(list(new[row]), r.max_new_tokens, self._eos_ids)
                text = self.decode(ids)
                text, reason = _apply_stops(text, r.stop, reason)
            outputs.append((ids, text, reason))
        generated = sum(len(ids) for ids, _, _ in outputs)
        self.stats.steps += 1
        info = StepInfo(
            step=self.stats.steps, batch=len(items), prompt_tokens=request.prompt, new_tokens=request.new_tokens,
            budget_bytes=budget, effective_budget_bytes=self.effective_budget(budget), decision=decision,
            predicted_peak_bytes=decision.predicted_peak_bytes, measured_peak_bytes=measured,
            resident_bytes=self.residency.resident_bytes(), dropped_blocks=tuple(dropped),
            restored_blocks=tuple(restored), seconds=seconds, generated_tokens=generated, oom_retry=oom_retry,
            backend=backend.name, started_at=started_at)
        self.stats.requests_served += len(items)
        self.stats.generated_tokens += generated
        self.stats.generate_seconds += seconds
        self.stats.decisions[(len(decision.mask.dropped), decision.kv_ratio)] += 1
        self.stats.last_step = info
        log.info("step %d: batch %d, budget %s, %s, predicted %s, measured %s, %.1f tok/s", info.step, info.batch,
                 format_bytes(budget), decision.mask, format_bytes(info.predicted_peak_bytes),
                 "-" if measured is None else format_bytes(measured), info.tokens_per_s)
        return [(i, GenerationResult(r.request_id, text, tuple(ids), len(ids_in), reason, info))
                for (i, r, ids_in), (ids, text, reason) in zip(items, outputs)]

    def fit_resident_to_budget(self) -> list[str]:
        """Between batches: move resident blocks down (to a lower precision, or off the device) until
        what stays fits the current budget with the smallest request (nothing is restored; the next
        batch decides as usual), and free the
        backends' buffers if the weights and buffers together exceed it. A budget exists because
        someone else needs the memory now, not at the next request. Returns the dropped blocks."""
        with self._lock:
            budget = self.read_budget()
            if self.need_bytes(self.residency.resident_bytes() + self._held_bytes()) <= budget:
                return []
            self._release_cached_memory()
            smallest = self.planning_request(Request(1, 1, 1))
            # Dropping frees a block at once (its weights go to host memory); quantizing takes a pass over
            # them. So while idle a precision policy's drop-only inner policy picks what goes; the next
            # batch re-decides with the full policy.
            policy = getattr(self.policy, "drop_only", None) or self.policy
            try:
                keep = self._decide(smallest, self.effective_budget(budget), policy=policy).mask
            except BudgetError:
                keep = BlockMask.from_drop(self.view.num_layers, default_removal_order(self.view.num_layers))
            # per block, the smaller of what is resident and what the decision runs (a level, or dropped):
            # only moves down, so nothing is restored while idle
            current, wanted = dict(self.residency.plan.items()), dict(Plan.of(keep).items())
            level_bytes = self.residency.memory.level_bytes
            target = Plan.of(BlockMask.full(self.view.num_layers)).with_levels(
                {name: min((current[name], wanted[name]), key=lambda lv: level_bytes(name, lv)) for name in current})
            dropped, _ = self.residency.apply(target)
            if dropped:
                log.info("budget %s below the resident weights: dropped %d block(s) while idle", format_bytes(budget),
                         len(dropped))
            return dropped

    def release_buffers(self) -> None:
        """Free what the backends keep between batches (KV buffers, captured graphs) and the
        allocator's cache: the next batch starts from the weights alone."""
        with self._lock:
            self._release_cached_memory()

    def _held_bytes(self) -> int:
        """Bytes kept between batches on top of the weights: what the backends report (their KV
        buffers) or, on the GPU, everything the engine holds now beyond the weights, if that is more."""
        reported = sum(b.resident_extra_bytes() for b in self._backends())
        if self.device.type != "cuda":
            return reported
        torch.cuda.synchronize(self.device)
        measured = torch.cuda.memory_allocated(self.device) - self._foreign_bytes - self.residency.resident_bytes()
        return max(reported, measured)

    def _release_backend_buffers(self) -> None:
        for b in self._backends():
            if hasattr(b, "release"):
                b.release()

    def _backend_generate(self, backend, prompts: list[list[int]], decision: Decision, sampling: Sampling,
                          seeds: list[int | None], max_new_tokens: int, on_step) -> list[list[int]]:
        """A backend's tokens for the batch. Any failure propagates: `_run` isolates the failing rows
        (nothing switches backends for good behind the user's back)."""
        press = {"kv_press": decision.kv_press} if decision.kv_press else {}
        if decision.kv_bits != 16:
            press["kv_bits"] = decision.kv_bits
        return backend.generate(self.view, prompts, decision.mask, decision.kv_ratio, sampling, max_new_tokens,
                                self.tokenizer.pad_token_id, self._eos_ids, on_step=on_step, seeds=seeds, **press)

    # ---- introspection ------------------------------------------------------------------------------
    def budget_info(self, reference: Request | None = None) -> dict:
        reference = reference or Request(1, 64, 64)
        planned = self.planning_request(reference)
        budget = self.read_budget()
        return {
            "budget_bytes": budget, "effective_budget_bytes": self.effective_budget(budget),
            "source": self.budget_source.describe(), "device": str(self.device),
            "resident_bytes": self.residency.resident_bytes(), "resident_mask": str(self.residency.mask),
            "dense_param_bytes": self.view.resident_param_bytes(BlockMask.full(self.view.num_layers)),
            "reference_request": dataclasses.asdict(reference),
            "dense_need_bytes": self.dense_need_bytes(planned),
            "smallest_need_bytes": self.smallest_need_bytes(planned),
            "backend": self.backend.name, "backend_fallbacks": self.stats.backend_fallbacks,
            "last_backend_fallback": self.stats.last_fallback,
            "correction_ratio": self.correction_ratio, "overhead_bytes": self.overhead_bytes,
        }


class _RowDispatcher:
    """Per-step token vectors [batch] -> per-request bookkeeping: `on_token` calls (streaming),
    stop strings matched on the incrementally decoded text, cancellation, EOS and each row's own
    max_new_tokens (the batch runs to the largest). `on_step` returns which rows are finished, so
    the backend stops computing them (and the whole batch once every row is)."""

    def __init__(self, requests: Sequence[GenerationRequest], eos_ids: Iterable[int],
                 decode: Callable[[Sequence[int]], str], cancel_all: threading.Event | None = None):
        self.requests = list(requests)
        self.eos = set(eos_ids)
        self.decode = decode
        self.cancel_all = cancel_all
        n = len(self.requests)
        self.count = [0] * n  # tokens really generated per row (a stop string's tokens included)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.reason: list[str | None] = [None] * n  # set when a row finishes
        self.text: list[str | None] = [None] * n  # the final text of a row a stop string finished

    def on_step(self, tokens: torch.Tensor) -> list[bool] | None:
        """Per-row bookkeeping of one step (a token id < 0: that row produced nothing this step).
        Returns every row's finished flag when one finished at this step, else None (nothing new)."""
        shut = self.cancel_all is not None and self.cancel_all.is_set()
        finished_before = sum(reason is not None for reason in self.reason)
        for row, token in enumerate(tokens.tolist()):
            r = self.requests[row]
            if self.reason[row] is not None or token < 0:
                continue
            if shut or r.cancelled:
                self.reason[row] = "cancelled"
                continue
            if token in self.eos:
                self.reason[row] = "stop"
                continue
            self.count[row] += 1
            self.ids[row].append(int(token))
            if r.stop:
                text = self.decode(self.ids[row])
                cut, reason = _apply_stops(text, r.stop, "length")
                if reason == "stop":
                    self.reason[row], self.text[row] = "stop", cut
            if r.on_token is not None:
                try:
                    r.on_token(int(token))
                except Exception as e:  # a gone listener must not fail the batch for the others
                    log.warning("on_token callback of request %s failed (%s); not streaming it further",
                                r.request_id or "-", e)
                    r.on_token = None
            if self.reason[row] is None and self.count[row] >= r.max_new_tokens:
                self.reason[row] = "length"
        finished = [reason is not None for reason in self.reason]
        return finished if sum(finished) > finished_before else None


def _apply_stops(text: str, stops: Sequence[str], reason: str) -> tuple[str, str]:
    """Text cut before the earliest stop string it contains (OpenAI: the stop is not returned)."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, reason)


def check_text(text: str, what: str) -> None:
    """Text that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800") is a client error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid Unicode ({e.reason} at position {e.start}): send UTF-8 text") from None


def _cut(ids: list[int], max_new_tokens: int, eos_ids: Sequence[int]) -> tuple[list[int], str]:
    """A row's own completion: up to its first EOS ("stop") or its max_new_tokens ("length")."""
    eos = set(eos_ids)
    for k, token in enumerate(ids[:max_new_tokens]):
        if token in eos:
            return ids[:k], "stop"
    return ids[:max_new_tokens], "length"


def dense_fraction_budget(engine: Engine, request: Request, fraction_ratio: float) -> int:
    """Bytes that are `fraction_ratio` of what `request` needs on the dense model (demo traces)."""
    return int(math.floor(fraction_ratio * engine.dense_need_bytes(request)))
