"""HTTP API on top of Engine: OpenAI-compatible completions and chat, a run-time budget, metrics.

    app = create_app(Engine("stories260k", budget="live"))
    uvicorn.run(app, port=8000)            # or: rap serve stories260k --budget live --port 8000

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET/PUT /v1/budget, GET /metrics (Prometheus), GET /health.

Requests that arrive together are batched: one asyncio task collects whatever is queued (waiting
`batch_window_s` after the first arrival) and hands the batch to the engine on a single worker
thread, so the event loop keeps accepting and validating requests while a batch generates.
A request the engine cannot serve gets a JSON error; nothing a client sends stops the server.

Why this module is long (~1,050 lines): the request schemas (which make the OpenAPI spec document
every accepted field and error) and the routes that validate, batch, stream and cancel them are one
API; the schemas could move to a module of their own, which is still to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Sequence

from fastapi import FastAPI, Query, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rap.serve.engine import SEED_RANGE, Engine, EngineFailure, GenerationRequest, GenerationResult, check_text
from rap.errors import BudgetError, ModelNotFoundError, RapError, RequestError
from rap.core.memory import Request
from rap.serve.scoring import MAX_TOP_LOGPROBS, TokenScore, score

log = logging.getLogger(__name__)


# ==== limits (documented in the README; flags of `rap serve`) ==================================
MAX_BODY_BYTES = 8 * 2**20  # a request body above this gets 413 before it is read
MAX_PROMPTS = 4096  # prompts x n per request; above it, 400 (a batch of them is split fairly anyway)
MAX_N = 128
DRAIN_S = 10.0  # SIGTERM: in-flight requests get this long, then the rest are cancelled
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


# ==== request bodies (unknown fields are errors) ================================================
# Fields rap accepts in the schema only with their neutral value (so a client sending the default
# works); anything else is a 400 that says rap does not support it.
UNSUPPORTED = {"presence_penalty": "only 0", "frequency_penalty": "only 0", "logit_bias": "only {}",
               "suffix": 'only ""', "tools": "no tool calling: only []", "tool_choice": 'only "none"',
               "response_format": 'no constrained decoding: only {"type": "text"}'}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"] = Field(description="only text parts")
    text: str


class ResponseFormat(_Strict):
    type: Literal["text"]


Seed = Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1])]
Zero = Annotated[float, Field(ge=0.0, le=0.0)]


class RapOptions(_Strict):
    """rap's extension of the request body: `"rap": {"kv_press": "adakv"}`."""

    kv_press: str | None = Field(None, description="KV press when the policy keeps < 1 of the prompt's cache: "
                                                   "adakv (default), snapkv, pyramidkv or ada-pyramidkv")


class _Sampling(_Strict):
    model: str | None = None
    rap: RapOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="below 1e-5: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt (seeded: choice i uses seed + i); "
                                                  "streaming needs n=1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the text ends before the first one generated")
    seed: Seed | None = Field(None, description="each row samples from its own generator")
    user: str | None = None
    presence_penalty: Zero = Field(0.0, description="not supported: only 0")
    frequency_penalty: Zero = Field(0.0, description="not supported: only 0")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="not supported")

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class _Message(_Strict):
    content: str | list[TextPart] = Field(description="text, or a list of text parts")
    name: str | None = None


class InstructionMessage(_Message):
    role: Literal["system", "developer", "user"] = Field(description="developer is read as system")


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


ChatMessage = Annotated[InstructionMessage | AssistantMessage, Field(discriminator="role")]


def request_bodies(vocab_size: int = 2**31 - 1, max_context: int = 2**31 - 1, max_prompts: int = MAX_PROMPTS):
    """The completion and chat bodies with this model's limits in their schema (token ids below the
    vocabulary, max_tokens within the context, prompts per request), so the OpenAPI spec says what
    the server accepts."""
    TokenId = Annotated[int, Field(ge=0, lt=vocab_size)]
    TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=max_context)]
    Text = Annotated[str, Field(min_length=1)]

    class CompletionBody(_Sampling):
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=max_prompts)] | TokenIds | \
            Annotated[list[TokenIds], Field(min_length=1, max_length=max_prompts)] = Field(
                description="text, a list of texts, token ids, or a list of token-id lists")
        max_tokens: int | None = Field(16, ge=0, lt=max_context, description="0 with echo: score the prompt only")
        echo: bool = Field(False, description="return the prompt before the completion (and its logprobs)")
        logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="log-probabilities of each token and of the top N alternatives")
        suffix: Annotated[str, Field(max_length=0)] | None = Field(None, description="not supported")

    class ChatBody(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1, lt=max_context)
        max_completion_tokens: int | None = Field(None, ge=1, lt=max_context)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")
        tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description="not supported")
        tool_choice: Literal["none"] | None = Field(None, description="not supported")
        parallel_tool_calls: bool | None = None
        response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')

    return CompletionBody, ChatBody


CompletionBody, ChatBody = request_bodies()


_UNIT = "([kKmMgGtT][iI]?[bB]?|[bB])?"
_BUDGET_PATTERN = (rf"^(live(:[0-9]+(\.[0-9]+)?{_UNIT})?|(100|[1-9][0-9]?)%|0?\.[0-9]*[1-9][0-9]*"
                   rf"|[1-9][0-9]{{0,18}}(\.[0-9]+)?{_UNIT})$")


def _whole_number(value: Any) -> Any:
    """JSON Schema's integer includes 6e9 and 1024.0: take them as the ints they are (not booleans)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class BudgetBody(_Strict):
    # 2**53 bytes (8 PiB): above it a JSON validator working in doubles cannot tell the bound apart
    budget: Annotated[int, Field(ge=1, le=2**53), BeforeValidator(_whole_number)] | Annotated[float, Field(ge=1e-9, le=1.0)] | \
        Annotated[str, Field(min_length=1, max_length=64, pattern=_BUDGET_PATTERN)] = Field(
            description="whole bytes | a fraction of the device in (0, 1] | 6GiB | 50% | live | live:1GiB")


# ==== response bodies (documentation: the OpenAPI spec lists every status and its body) ========
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class CompletionResponse(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    rap: dict[str, Any] | None = None


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatResponse(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    rap: dict[str, Any] | None = None


class ModelCard(_Open):
    id: str
    object: str
    created: int
    owned_by: str
    max_context: int


class ModelList(_Open):
    object: str
    data: list[ModelCard]


class Health(_Open):
    status: str
    model: str


def _errors(*statuses: int) -> dict:
    text = {400: "invalid request (the message names the field)", 404: "unknown model",
            413: "request body too large", 500: "internal error", 503: "over the memory budget, or shutting down",
            "4XX": "any other client error (a body that does not match the schema is a 400)"}
    return {s: {"model": ErrorResponse, "description": text[s]} for s in (*statuses, "4XX")}


_SSE = {"text/event-stream": {"schema": {
    "type": "object", "description": "one server-sent event (stream: true): data is a JSON chunk, or [DONE] last",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"]}}}


# ==== errors as JSON =============================================================================
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                    headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _rap_error_status(error: Exception) -> tuple[int, str, str]:
    if isinstance(error, BudgetError):
        return 503, "insufficient_budget", "budget_exceeded"
    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, EngineFailure):
        return 500, "server_error", "internal_error"
    if isinstance(error, RequestError):
        return 400, "invalid_request_error", "invalid_request"
    if isinstance(error, RapError):
        return 400, "invalid_request_error", "rap_error"
    return 500, "server_error", "internal_error"


def _api_error(error: Exception, param: str | None = None) -> APIError:
    status, type_, code = _rap_error_status(error)
    return APIError(status, str(error), type_, code, param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RapError)
    async def rap_error(request: HTTPRequest, exc: RapError):
        status, type_, code = _rap_error_status(exc)
        return _error_response(status, str(exc), type_, code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
        first = [str(x) for x in (errors[0].get("loc", ()) if errors else ()) if x != "body"]
        if first and first[0] in UNSUPPORTED:
            return _error_response(400, f"{first[0]} is not supported by rap ({UNSUPPORTED[first[0]]}): leave it out",
                                   "invalid_request_error", "unsupported_parameter", first[0])
        parts = []
        for e in errors[:8]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
            parts.append(f"{loc or 'body'}: {msg}")
        message = "; ".join(parts).encode("utf-8", "replace").decode("utf-8")  # no lone surrogates echoed back
        return _error_response(400, message, "invalid_request_error", "invalid_body", ".".join(first) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route matched
            methods = set()
            for route in app.router.routes:
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= set(route.methods)
            headers["Allow"] = ", ".join(sorted(methods))
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 at once, from its Content-Length before a
    byte of it is kept, or as soon as a chunked body passes the limit, so a huge upload costs the
    server neither memory nor event-loop time (and /health answers meanwhile).

    The 413's status line and headers go out at once; the rest of an upload already on its way is
    read and discarded (up to `drain_bytes`) before the response ends, because a client that is
    still sending (most HTTP clients read only after sending) would otherwise see a connection
    reset instead of the 413. A client that waits for `100 Continue` gets the whole 413 at once."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 64 * 2**20):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            drain = not waits and length.isdigit() and int(length) <= self.drain_bytes
            return await self._reject(send, receive if drain else None)
        seen, over, replaced = 0, False, False

        async def counted_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # the app sees an end of body; its answer is replaced below
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": message.get("more_body", False)}
            return message

        async def guarded_send(message):
            nonlocal replaced
            if not over:
                return await send(message)
            if not replaced and message["type"] == "http.response.start":
                replaced = True
                await self._reject(send, receive)

        await self.app(scope, counted_receive, guarded_send)
        if over and not replaced:
            await self._reject(send, receive)

    async def _reject(self, send, receive=None):
        body = json.dumps({"error": {"message": f"the request body is over this server's limit of {self.max_bytes} "
                                                f"bytes (rap serve --max-body-bytes)", "type": "invalid_request_error",
                                     "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        drained = 0
        while receive is not None and drained <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": body})


# ==== batching ===================================================================================
class Batcher:
    """Collects queued rows into batches and runs them on the engine's one worker thread.

    Fair: each HTTP request's rows form one job, and a batch takes rows from the jobs in turn, so a
    request of 3,000 prompts is spread over many batches and a small request that arrives meanwhile
    runs in the next one instead of waiting for all of them (see `_take`). Rows whose client is gone (their
    `cancel` is set) are dropped before they run. While idle it keeps the resident weights within
    the budget (a budget that drops between requests frees memory within `idle_check_s`)."""

    def __init__(self, engine: Engine, max_batch: int, window_s: float, batch_sizes: Histogram | None = None,
                 idle_check_s: float = 0.25):
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.batch_sizes = batch_sizes
        self.idle_check_s = idle_check_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rap-engine")
        self.jobs: deque[deque] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.busy = False
        self.last_short_only = False

    async def start(self) -> None:
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self.engine.cancel_all.set()  # the running batch stops at its next step
        if self.task is not None:
            self.task.cancel()
        for job in self.jobs:
            for _, f in job:
                if not f.done():
                    f.cancel()
        self.jobs.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit_many(self, requests: Sequence[GenerationRequest]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        job = deque((r, loop.create_future()) for r in requests)
        futures = [f for _, f in job]
        self.jobs.append(job)
        self.wake.set()
        return futures

    def submit(self, request: GenerationRequest) -> asyncio.Future:
        return self.submit_many([request])[0]

    @property
    def queued_rows(self) -> int:
        return sum(len(j) for j in self.jobs)

    async def run_blocking(self, fn, *args):
        """Run `fn` on the engine thread (between batches), e.g. a budget change."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _take(self) -> list:
        """The next batch: rows from the jobs in turn. While a long job (more rows than a batch) waits
        beside short ones, every other batch holds the short jobs' rows only, so a small request that
        arrives during a long one's batch runs next in a batch of its own size (a batch of 32 costs
        about twice a batch of 1 on a CPU) and the long job still gets at least every other batch."""
        short = deque(j for j in self.jobs if len(j) <= self.max_batch)
        short_only = not self.last_short_only and 0 < len(short) < len(self.jobs)
        self.last_short_only = short_only
        ring = short if short_only else self.jobs
        batch = []
        while ring and len(batch) < self.max_batch:
            job = ring.popleft()
            r, f = job.popleft()
            if not f.done() and not r.cancelled:
                batch.append((r, f))
            elif not f.done():
                f.set_result(GenerationResult(r.request_id, finish_reason="cancelled"))
            if job:
                ring.append(job)  # round robin: its next row waits for the other jobs' rows
        if short_only:
            self.jobs = deque([*ring, *(j for j in self.jobs if len(j) > self.max_batch)])
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.jobs:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.idle_check_s)
                except asyncio.TimeoutError:
                    try:
                        await loop.run_in_executor(self.executor, self.engine.fit_resident_to_budget)
                    except Exception:  # a failing budget reading must not stop the server
                        log.exception("could not fit the resident weights to the budget")
                    continue
                if self.window_s > 0:
                    await asyncio.sleep(self.window_s)
            batch = self._take()
            if not batch:
                continue
            if self.batch_sizes is not None:
                self.batch_sizes.observe(len(batch))
            self.busy = True
            try:
                results = await loop.run_in_executor(self.executor, self.engine.generate, [r for r, _ in batch])
            except Exception as e:  # a bug, not a user error: fail this batch, keep the loop alive
                log.exception("engine failed on a batch of %d", len(batch))
                results = [GenerationResult(r.request_id, finish_reason="error",
                                            error=EngineFailure(f"internal error: {type(e).__name__}: {e}"))
                           for r, _ in batch]
            finally:
                self.busy = False
            for (_, f), result in zip(batch, results):
                if not f.done():
                    f.set_result(result)


# ==== metrics ====================================================================================
class EngineCollector:
    """Prometheus view of Engine.stats, read at scrape time (no double bookkeeping)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        last = s.last_step
        counters = [
            ("rap_batches", "batches the engine ran", s.steps),
            ("rap_requests_served", "requests answered with generated text", s.requests_served),
            ("rap_generated_tokens", "tokens generated", s.generated_tokens),
            ("rap_oom_events", "out-of-memory errors caught (each retried once, smaller)", s.oom_events),
            ("rap_oom_failures", "out-of-memory errors that persisted after the retry", s.oom_failures),
            ("rap_backend_fallbacks", "requests served by the fallback backend after the primary failed on them "
                                      "(each logged; the primary stays in use)", s.backend_fallbacks),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        rejected = CounterMetricFamily("rap_requests_rejected", "requests the engine rejected", labels=["reason"])
        for reason in ("invalid", "budget", "oom", "internal"):
            rejected.add_metric([reason], s.rejected_by_reason.get(reason, 0))
        yield rejected
        decisions = CounterMetricFamily("rap_decisions", "batches per decision (blocks dropped, KV keep ratio)",
                                        labels=["dropped_blocks", "kv_ratio"])
        for (dropped, kv_ratio), n in sorted(s.decisions.items()):
            decisions.add_metric([str(dropped), f"{kv_ratio:g}"], n)
        yield decisions
        backend = GaugeMetricFamily("rap_backend", "the engine's primary generation backend (1)", labels=["name"])
        backend.add_metric([self.engine.backend.name], 1)
        yield backend
        try:
            budget = self.engine.read_budget()
        except Exception:  # a user-supplied budget callable failing must not break scraping
            budget = float("nan")
        gauges = [
            ("rap_budget_bytes", "current memory budget reading", budget),
            ("rap_resident_bytes", "parameter bytes resident on the device", self.engine.residency.resident_bytes()),
            ("rap_host_offloaded_bytes", "block weights held in (pinned) host memory", self.engine.residency.host_bytes()),
            ("rap_correction_ratio", "worst measured/predicted peak ratio (budgets are divided by it)",
             self.engine.correction_ratio),
            ("rap_tokens_per_second", "throughput of the last batch", last.tokens_per_s if last else 0.0),
            ("rap_predicted_peak_bytes", "memory model's peak for the last batch", last.predicted_peak_bytes if last else 0),
            ("rap_measured_peak_bytes", "measured peak of the last batch (GPU; NaN on CPU)",
             float("nan") if last is None or last.measured_peak_bytes is None else last.measured_peak_bytes),
            ("rap_dropped_blocks", "blocks dropped by the last decision", len(last.decision.mask.dropped) if last else 0),
            ("rap_kv_ratio", "KV keep ratio of the last decision", last.decision.kv_ratio if last else 1.0),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


# ==== the app ====================================================================================
def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _meta(result: GenerationResult) -> dict | None:
    step = result.step
    if step is None:
        return None
    return {"decision": step.decision.to_dict(), "budget_bytes": step.budget_bytes,
            "predicted_peak_bytes": step.predicted_peak_bytes, "measured_peak_bytes": step.measured_peak_bytes,
            "resident_bytes": step.resident_bytes, "seconds": step.seconds, "batch": step.batch,
            "tokens_per_s": step.tokens_per_s, "backend": step.backend, "oom_retry": step.oom_retry}


class _Metrics:
    """ASGI middleware counting requests by route and status (pure ASGI: it neither buffers
    streams nor hides a client's disconnect from the route)."""

    def __init__(self, app, counter: Counter, latency: Histogram):
        self.app, self.counter, self.latency = app, counter, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.latency.labels(route).observe(time.perf_counter() - t0)
            await send(message)

        path = scope.get("path", "")
        route = path if path.startswith(("/v1/", "/metrics", "/health")) and len(path) < 64 else "other"
        if route.startswith("/v1/models/"):
            route = "/v1/models/{id}"
        try:
            await self.app(scope, receive, tracked)
        finally:
            self.counter.labels(route, str(status[0])).inc()


def create_app(engine: Engine, *, model_name: str | None = None, max_batch: int | None = None,
               batch_window_s: float = 0.005, max_tokens_limit: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_prompts: int = MAX_PROMPTS) -> FastAPI:
    """A FastAPI app serving `engine`. The engine is used from one worker thread only; tokenizing
    runs on a small pool of others, so the event loop only parses, routes and streams."""
    model_id = model_name or engine.name
    CompletionBody, ChatBody = request_bodies(engine.view.shape.vocab_size, engine.max_context, max_prompts)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    http_requests = Counter("rap_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    latency = Histogram("rap_request_latency_seconds", "time to the response's first byte", ["route"],
                        registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    batch_sizes = Histogram("rap_batch_size", "requests per engine batch", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batcher = Batcher(engine, max_batch or engine.max_batch, batch_window_s, batch_sizes)
    # several threads: a small request's tokenizing must not queue behind a 3,000-prompt one's
    tokenize_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rap-tokenize")
    created = int(time.time())
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()

        def warm_policy() -> None:  # a policy's first decision may load its tables (seconds): not on a request
            try:
                engine.decide(engine.planning_request(Request(1, 1, 1)))
            except RapError:
                pass

        await batcher.run_blocking(warm_policy)
        yield
        state["draining"] = True
        await batcher.stop()
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rap", version="0.1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat for a causal LM served inside a live memory "
                              "budget (RAP block pruning). Every error body is {\"error\": {message, type, param, "
                              "code}}.")
    app.state.engine, app.state.batcher, app.state.registry, app.state.serving = engine, batcher, registry, state
    _install_error_handlers(app)
    app.add_middleware(_Metrics, counter=http_requests, latency=latency)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # ---- helpers ---------------------------------------------------------------------------------
    def check_open() -> None:
        if state["draining"]:
            raise APIError(503, "the server is shutting down: retry on another replica", "server_error",
                           "shutting_down")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists {model_id!r}",
                           code="model_not_found", param="model")

    def check_sampling(body: _Sampling) -> None:
        if body.stream and body.n > 1:
            raise APIError(400, "streaming supports n=1", param="n")

    def rows_for(prompts: list, max_tokens: int, body: _Sampling) -> list[GenerationRequest]:
        """Validated rows (tokenized; runs on the tokenizer thread), n per prompt."""
        press = body.rap.kv_press if body.rap is not None else None
        if press is not None:
            from rap.kv.decode_cache import layout_for

            try:
                press = layout_for(press).press
            except RapError as e:
                raise APIError(400, str(e), param="rap.kv_press") from None
        base = []
        for p in prompts:
            r = GenerationRequest(prompt=p if isinstance(p, str) else None,
                                  prompt_ids=None if isinstance(p, str) else list(p),
                                  max_new_tokens=max(1, max_tokens), temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=body.stops, request_id=uuid.uuid4().hex[:12], kv_press=press)
            try:
                ids = engine.validate(r)
            except RapError as e:
                raise _api_error(e, "prompt") from None
            r.prompt, r.prompt_ids = None, ids
            base.append(r)
        longest = max(base, key=lambda r: len(r.prompt_ids))
        check_request(len(longest.prompt_ids), max(1, max_tokens))
        rows = []
        for r in base:
            for i in range(body.n):
                seed = None if r.seed is None else (r.seed + i if r.seed + i < SEED_RANGE[1] else r.seed - i)
                rows.append(dataclasses.replace(r, seed=seed, request_id=uuid.uuid4().hex[:12],
                                                cancel=threading.Event()))
        return rows

    def check_request(prompt_tokens: int, max_tokens: int) -> None:
        if max_tokens_limit is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        if prompt_tokens + max_tokens > engine.max_context:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {engine.max_context} tokens: shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="prompt")
        try:
            engine.check_admissible(Request(1, prompt_tokens, max_tokens))
        except BudgetError as e:
            raise _api_error(e) from None

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def raise_for(result: GenerationResult) -> None:
        if result.error is not None:
            raise _api_error(result.error)

    async def wait_all(http: HTTPRequest, rows: list[GenerationRequest]) -> list[GenerationResult]:
        """The rows' results; a client that disconnects meanwhile cancels its rows (they stop within
        one decode step, or are never run if still queued)."""
        futures = batcher.submit_many(rows)
        pending = set(futures)
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
                if pending and await http.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed")
        except asyncio.CancelledError:
            if not state["draining"]:
                raise
            # the shutdown drain ran out: answer 503 (retry elsewhere) rather than a bare 500
            raise APIError(503, "the server shut down before this request finished: retry", "server_error",
                           "shutting_down") from None
        finally:
            if pending:
                for r in rows:
                    r.cancel.set()
        results = [f.result() for f in futures]
        for r in results:
            raise_for(r)
        return results

    def usage(prompt_tokens: int, results: list[GenerationResult]) -> dict:
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def token_text(t: int) -> str:
        return engine.tokenizer.decode([t])

    async def scores_for(seqs: list[list[int]], top_k: int) -> list[list[TokenScore]]:
        try:
            return await batcher.run_blocking(score, engine, seqs, top_k)
        except RapError as e:
            raise _api_error(e) from None

    def completion_logprobs(scores: list[TokenScore], k: int, offset0: int = 0) -> dict:
        tokens = [token_text(s.token_id) for s in scores]
        offsets, at = [], offset0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
                "top_logprobs": [None if s.logprob is None else {token_text(i): lp for i, lp in s.top[:k]}
                                 for s in scores],
                "text_offset": offsets}

    def chat_logprobs(scores: list[TokenScore], k: int) -> dict:
        def entry(t: int, lp: float) -> dict:
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top[:k]]}
                            for s in scores]}

    def stream(http: HTTPRequest, request: GenerationRequest, body: _Sampling, chat: bool) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        done = object()
        request.on_token = lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)
        future = batcher.submit(request)
        future.add_done_callback(lambda f: tokens.put_nowait(done))
        rid = ("chatcmpl-" if chat else "cmpl-") + request.request_id
        obj = "chat.completion.chunk" if chat else "text_completion"
        hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may be half-generated

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [choice]}

        async def events():
            try:
                if chat:
                    yield _sse(chunk(None, None, role=True))
                ids: list[int] = []
                sent, stopped = "", False
                while True:
                    item = await tokens.get()
                    if item is done:
                        break
                    if stopped:
                        continue
                    ids.append(item)
                    text = engine.decode(ids)
                    if text.endswith("\ufffd"):  # half of a multi-byte character
                        continue
                    cut = [text.index(s) for s in request.stop if s and s in text]
                    if cut:
                        text, stopped = text[: min(cut)], True
                    ready = text if stopped else text[: max(len(sent), len(text) - hold)]
                    if len(ready) > len(sent):
                        yield _sse(chunk(ready[len(sent):], None))
                        sent = ready
                result: GenerationResult = future.result()
                if result.error is not None:
                    status, type_, code = _rap_error_status(result.error)
                    yield _sse({"error": {"message": str(result.error), "type": type_, "code": code,
                                          "status": status}})
                    yield _sse("[DONE]")
                    return
                if result.text.startswith(sent) and len(result.text) > len(sent):
                    yield _sse(chunk(result.text[len(sent):], None))
                final = chunk(None, result.finish_reason)
                final["rap"] = _meta(result)
                yield _sse(final)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
                                "choices": [], "usage": usage(result.prompt_tokens, [result])})
                yield _sse("[DONE]")
            finally:  # the client went away (or the stream ended): stop its row at the next step
                request.cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    completion_responses = {200: {"model": CompletionResponse, "content": _SSE,
                                  "description": "the completion (JSON), or server-sent events with stream: true"},
                            **_errors(400, 404, 413, 500, 503)}
    chat_responses = {200: {"model": ChatResponse, "content": _SSE,
                            "description": "the chat completion (JSON), or server-sent events with stream: true"},
                      **_errors(400, 404, 413, 500, 503)}

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses=_errors(500))
    async def health():
        return {"status": "draining" if state["draining"] else "ok", "model": model_id}

    def card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "rap",
                "max_context": engine.max_context}

    @app.get("/v1/models", response_model=ModelList, responses=_errors(500))
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=_errors(404, 500))
    async def model_card(model: str):
        check_model(model)
        return card()

    def route(path: str, responses: dict, body_model: type):
        """app.post with this app's body model: annotations are strings here (postponed), which FastAPI
        would resolve to the module-level defaults, not to this model's limits."""
        def register(fn):
            fn.__annotations__.update(body=body_model, http=HTTPRequest)
            return app.post(path, responses=responses)(fn)
        return register

    @route("/v1/completions", completion_responses, CompletionBody)
    async def completions(body, http):
        check_open()
        check_model(body.model)
        check_sampling(body)
        p = body.prompt
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        if len(prompts) * body.n > max_prompts:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is over this server's limit of {max_prompts} "
                                f"rows per request (rap serve --max-prompts): split the request", param="prompt")
        if body.stream and (len(prompts) != 1 or body.logprobs is not None or body.echo):
            raise APIError(400, "streaming supports one prompt, without logprobs or echo", param="stream")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        rows = await off_loop(rows_for, prompts, max_tokens, body)
        if body.stream:
            return stream(http, rows[0], body, chat=False)
        results = (await wait_all(http, rows) if max_tokens > 0 else
                   [GenerationResult(r.request_id, prompt_tokens=len(r.prompt_ids)) for r in rows])
        choices = []
        want_scores = body.logprobs is not None or body.echo
        scores = None
        if want_scores:
            k = body.logprobs or 0
            scores = await scores_for([list(r.prompt_ids) + list(res.token_ids) for r, res in zip(rows, results)], k)
        for i, (r, res) in enumerate(zip(rows, results)):
            text = res.text
            prompt_text = ""
            if body.echo:
                prompt_text = engine.decode(r.prompt_ids) if not isinstance(prompts[i // body.n], str) \
                    else prompts[i // body.n]
                text = prompt_text + text
            logprobs = None
            if body.logprobs is not None:
                row_scores = scores[i] if body.echo else scores[i][len(r.prompt_ids):]
                logprobs = completion_logprobs(row_scores, body.logprobs)
            choices.append({"index": i, "text": text, "finish_reason": res.finish_reason, "logprobs": logprobs})
        prompt_tokens = sum(len(r.prompt_ids) for r in rows[:: body.n])
        return {"id": "cmpl-" + rows[0].request_id, "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": choices, "usage": usage(prompt_tokens, results),
                "rap": _meta(results[0])}

    def chat_messages(body: ChatBody) -> list[dict]:
        out = []
        for i, m in enumerate(body.messages):
            where = f"messages.{i}.content"
            if m.content is None:
                text = ""
            elif isinstance(m.content, str):
                text = m.content
            else:
                text = "".join(part.text for part in m.content)
            try:
                check_text(text, where)
            except RapError as e:
                raise _api_error(e, where) from None
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out

    def chat_rows(messages: list[dict], body: ChatBody) -> list[GenerationRequest]:
        ids = engine.encode_chat(messages)
        default = min(128, max(1, engine.max_context - len(ids)))
        max_tokens = body.max_completion_tokens or body.max_tokens or default
        return rows_for([ids], max_tokens, body)

    @route("/v1/chat/completions", chat_responses, ChatBody)
    async def chat_completions(body, http):
        check_open()
        check_model(body.model)
        check_sampling(body)
        messages = chat_messages(body)
        if body.stream and body.logprobs:
            raise APIError(400, "streaming supports logprobs: false", param="stream")
        rows = await off_loop(chat_rows, messages, body)
        if body.stream:
            return stream(http, rows[0], body, chat=True)
        results = await wait_all(http, rows)
        scores = None
        if body.logprobs:
            scores = await scores_for([list(r.prompt_ids) + list(res.token_ids) for r, res in zip(rows, results)],
                                      body.top_logprobs or 0)
        choices = []
        for i, (r, res) in enumerate(zip(rows, results)):
            lp = chat_logprobs(scores[i][len(r.prompt_ids):], body.top_logprobs or 0) if scores else None
            choices.append({"index": i, "message": {"role": "assistant", "content": res.text},
                            "finish_reason": res.finish_reason, "logprobs": lp})
        return {"id": "chatcmpl-" + rows[0].request_id, "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": choices, "usage": usage(len(rows[0].prompt_ids), results),
                "rap": _meta(results[0])}

    @app.get("/v1/budget", responses=_errors(400, 500))
    async def get_budget(batch: int = Query(1, ge=1, le=4096), prompt: int = Query(64, ge=1, le=2**24),
                         new_tokens: int = Query(64, ge=1, le=2**24)) -> dict[str, Any]:
        """The budget now, plus the dense and smallest needs of a reference request (query params)."""
        try:
            reference = Request(batch, prompt, new_tokens)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        return engine.budget_info(reference)

    @app.put("/v1/budget", responses=_errors(400, 413, 500))
    async def put_budget(body: BudgetBody) -> dict[str, Any]:
        try:
            engine.set_budget(body.budget)  # read at the next batch; the running one keeps its decision
        except RapError as e:
            raise APIError(400, str(e), param="budget") from None
        log.info("budget set to %s", engine.budget_source.describe())
        if not batcher.busy and not batcher.jobs:  # idle: shrink the weights now, not at the next request
            await batcher.run_blocking(engine.fit_resident_to_budget)
        return engine.budget_info()

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ==== running it =================================================================================
def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str, drain_s: float):
    """uvicorn whose exit signal (SIGTERM, SIGINT) first stops admitting: new requests get 503 while
    in-flight ones drain for up to `drain_s`, then uvicorn cancels what is left and the app's
    shutdown cancels the engine's running rows (they stop at their next step), so the process exits
    within the drain plus one decode step."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state = getattr(app.state, "serving", None)
            if state is not None and not state["draining"]:
                log.warning("signal %s: not admitting new requests; draining for up to %.1f s", sig, drain_s)
                state["draining"] = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_s)
    return DrainingServer(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          drain_s: float = DRAIN_S) -> None:
    """Run `app` in this thread until SIGTERM/SIGINT (then a bounded drain; see `_uvicorn_server`).

    Everything built so far (the model, the policy's plans and tables) lives as long as the server:
    `gc.freeze()` keeps the cyclic collector from walking it again on every full pass, which would
    otherwise put multi-millisecond pauses into `decide` (benchmarks/decide_latency.py measures both)."""
    import gc

    gc.freeze()
    _uvicorn_server(app, host, port, log_level, drain_s).run()


class ServerThread:
    """uvicorn in a background thread (tests, demos, notebooks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_s: float = DRAIN_S):
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = _uvicorn_server(app, host, port, log_level, drain_s)
        self.thread = threading.Thread(target=self.server.run, name="rap-uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
