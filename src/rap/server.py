"""HTTP API on top of Engine: OpenAI-compatible completions and chat, a run-time budget, metrics.

    app = create_app(Engine("stories260k", budget="live"))
    uvicorn.run(app, port=8000)            # or: rap serve stories260k --budget live --port 8000

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET/PUT /v1/budget, GET /metrics (Prometheus), GET /health.

Requests that arrive together are batched: one asyncio task collects whatever is queued (waiting
`batch_window_s` after the first arrival) and hands the batch to the engine on a single worker
thread, so the event loop keeps accepting and validating requests while a batch generates.
A request the engine cannot serve gets a JSON error; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationRequest, GenerationResult
from .errors import BudgetError, ModelNotFoundError, RapError, RequestError
from .memory import Request

log = logging.getLogger(__name__)


# ==== request bodies (unknown fields are errors) ================================================
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class RapOptions(_Strict):
    """rap's extension of the request body: `"rap": {"kv_press": "adakv"}`."""

    kv_press: str | None = Field(None, description="KV press when the policy keeps < 1 of the prompt's cache: "
                                                   "adakv (default) or snapkv")


class _Sampling(_Strict):
    model: str | None = None
    rap: RapOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class BudgetBody(_Strict):
    budget: str | int | float = Field(description="6GiB | bytes | 0.5 or 50% of the device | live | live:1GiB")


# ==== errors as JSON =============================================================================
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _rap_error_status(error: Exception) -> tuple[int, str, str]:
    if isinstance(error, BudgetError):
        return 503, "insufficient_budget", "budget_exceeded"
    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, RequestError):
        return 400, "invalid_request_error", "invalid_request"
    if isinstance(error, RapError):
        return 400, "invalid_request_error", "rap_error"
    return 500, "server_error", "internal_error"


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
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
            parts.append(f"{loc or 'body'}: {msg}")
        first = errors[0].get("loc", ()) if errors else ()
        return _error_response(422, "; ".join(parts), "invalid_request_error", "invalid_body",
                               ".".join(str(x) for x in first if x != "body") or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


# ==== batching ===================================================================================
class Batcher:
    """Collects queued requests into batches and runs them on the engine's one worker thread."""

    def __init__(self, engine: Engine, max_batch: int, window_s: float, batch_sizes: Histogram | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.batch_sizes = batch_sizes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rap-engine")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: GenerationRequest) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((request, future))
        return future

    async def run_blocking(self, fn, *args):
        """Run `fn` on the engine thread (between batches), e.g. a budget change."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.cancelled()]
            if not batch:
                continue
            if self.batch_sizes is not None:
                self.batch_sizes.observe(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.engine.generate, [r for r, _ in batch])
            except Exception as e:  # a bug, not a user error: fail this batch, keep the loop alive
                log.exception("engine failed on a batch of %d", len(batch))
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
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
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        rejected = CounterMetricFamily("rap_requests_rejected", "requests the engine rejected", labels=["reason"])
        for reason in ("invalid", "budget", "oom"):
            rejected.add_metric([reason], s.rejected_by_reason.get(reason, 0))
        yield rejected
        decisions = CounterMetricFamily("rap_decisions", "batches per decision (blocks dropped, KV keep ratio)",
                                        labels=["dropped_blocks", "kv_ratio"])
        for (dropped, kv_ratio), n in sorted(s.decisions.items()):
            decisions.add_metric([str(dropped), f"{kv_ratio:g}"], n)
        yield decisions
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


def create_app(engine: Engine, *, model_name: str | None = None, max_batch: int | None = None,
               batch_window_s: float = 0.005, max_tokens_limit: int | None = None) -> FastAPI:
    """A FastAPI app serving `engine`. The engine is used from one worker thread only."""
    model_id = model_name or engine.name
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    http_requests = Counter("rap_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    latency = Histogram("rap_request_latency_seconds", "time to the full response (to the first byte when streaming)",
                        ["route"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    batch_sizes = Histogram("rap_batch_size", "requests per engine batch", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batcher = Batcher(engine, max_batch or engine.max_batch, batch_window_s, batch_sizes)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rap", version="0.1", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.registry = engine, batcher, registry
    _install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: HTTPRequest, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path.startswith(("/v1/", "/metrics", "/health")) else "other"
        http_requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - t0)
        return response

    # ---- helpers ---------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists {model_id!r}",
                           code="model_not_found", param="model")

    def build_request(ids: list[int], max_tokens: int, body: _Sampling) -> GenerationRequest:
        if max_tokens_limit is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        if len(ids) + max_tokens > engine.max_context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                                f"of {engine.max_context} tokens: shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="prompt")
        try:
            engine.check_admissible(Request(1, len(ids), max_tokens))
        except BudgetError as e:
            status, type_, code = _rap_error_status(e)
            raise APIError(status, str(e), type_, code) from None
        press = body.rap.kv_press if body.rap is not None else None
        if press is not None:
            from .kv.decode_cache import layout_for

            try:
                press = layout_for(press).press
            except RapError as e:
                raise APIError(400, str(e), param="rap.kv_press") from None
        return GenerationRequest(prompt_ids=ids, max_new_tokens=max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, seed=body.seed, stop=body.stops,
                                 request_id=uuid.uuid4().hex[:12], kv_press=press)

    def raise_for(result: GenerationResult) -> None:
        if result.error is not None:
            status, type_, code = _rap_error_status(result.error)
            raise APIError(status, str(result.error), type_, code)

    async def wait_all(requests: list[GenerationRequest]) -> list[GenerationResult]:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for r in results:
            raise_for(r)
        return list(results)

    def usage(results: list[GenerationResult]) -> dict:
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(request: GenerationRequest, body: _Sampling, chat: bool) -> StreamingResponse:
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
            try:
                result: GenerationResult = future.result()
            except Exception as e:  # engine bug: report in-band, the connection is already 200
                result = GenerationResult(request.request_id, finish_reason="error", error=RapError(str(e)))
            if result.error is not None:
                status, type_, code = _rap_error_status(result.error)
                yield _sse({"error": {"message": str(result.error), "type": type_, "code": code, "status": status}})
                yield _sse("[DONE]")
                return
            if result.text.startswith(sent) and len(result.text) > len(sent):
                yield _sse(chunk(result.text[len(sent):], None))
            final = chunk(None, result.finish_reason)
            final["rap"] = _meta(result)
            yield _sse(final)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [],
                            "usage": usage([result])})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "rap",
                                            "max_context": engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise APIError(400, "the prompt is empty: send at least one character of text", param="prompt")
        if body.stream and len(prompts) != 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        max_tokens = body.max_tokens or 16
        requests = [build_request(engine.encode(p), max_tokens, body) for p in prompts]
        if body.stream:
            return stream(requests[0], body, chat=False)
        results = await wait_all(requests)
        return {"id": "cmpl-" + requests[0].request_id, "object": "text_completion", "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                            for i, r in enumerate(results)],
                "usage": usage(results), "rap": _meta(results[0])}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        check_model(body.model)
        if not any(m.content.strip() for m in body.messages):
            raise APIError(400, "every message is empty: send some text", param="messages")
        ids = engine.encode_chat([{"role": m.role, "content": m.content} for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or min(128, max(1, engine.max_context - len(ids)))
        request = build_request(ids, max_tokens, body)
        if body.stream:
            return stream(request, body, chat=True)
        (result,) = await wait_all([request])
        return {"id": "chatcmpl-" + request.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": usage([result]), "rap": _meta(result)}

    @app.get("/v1/budget")
    async def get_budget(batch: int = 1, prompt: int = 64, new_tokens: int = 64):
        """The budget now, plus the dense and smallest needs of a reference request (query params)."""
        try:
            reference = Request(batch, prompt, new_tokens)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        return engine.budget_info(reference)

    @app.put("/v1/budget")
    async def put_budget(body: BudgetBody):
        engine.set_budget(body.budget)  # read at the next batch; the running one keeps its decision
        log.info("budget set to %s", engine.budget_source.describe())
        return engine.budget_info()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ==== running it =================================================================================
class ServerThread:
    """uvicorn in a background thread (tests, demos, notebooks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
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
        self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
