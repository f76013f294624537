"""rap on a Ray Serve cluster: N replicas, each one Engine inside its own budget, one budget for the cluster.

    rap cluster stories260k --replicas 2 --budget 64MiB            # starts a local Ray; http://127.0.0.1:8000/v1
    rap cluster MODEL --address auto --replicas 4 --gpus-per-replica 1   # joins a running Ray cluster

One Serve application of three deployments:

- ``RapReplica`` (N of them, or autoscaled by Ray Serve): runs ``server.create_app(Engine)`` in-process, so each
  replica is exactly the app ``rap serve`` runs (same routes, validation, batching, streaming). One Engine per
  replica; on GPU nodes each replica holds ``--gpus-per-replica`` GPUs (Ray's ``num_gpus``), on CPU each replica is
  one process. (Serve allows one FastAPI ``@serve.ingress`` per application: the front.)
- ``ClusterFront``: the ``@serve.ingress`` (FastAPI). It forwards every OpenAI route to a replica through a DeploymentHandle (Ray
  Serve's request router picks the replica: power of two choices over ongoing requests, bounded by
  ``max_ongoing_requests``), and answers ``/v1/budget``, ``/metrics`` and ``/health`` for the whole cluster.
  Serve's own proxy answers a request whose replica died with a plain-text 500; the front instead retries it
  on another replica when nothing was sent yet (a non-streamed response is sent only when complete), and
  otherwise ends the stream with an in-band JSON error event; with no replica left it answers 503 JSON with
  ``Retry-After``. ``ray.serve.llm`` uses the same router-in-front-of-servers shape.
- ``BudgetBoard`` (one): the cluster budget and each replica's last report. Replicas pull their share every
  ``report_interval_s`` and push their state (budget, last decision, resident bytes, queue, metrics text), so a
  replica that Ray restarts or the autoscaler adds picks up the cluster budget before it serves its first request.

The cluster budget rule (``assign_budgets``): a byte budget (``12GiB``) is a total, split over the live
replicas equally (``split="equal"``, the default) or in proportion to each replica's device memory
(``split="device"``); a share never exceeds the replica's device. A relative budget (``live``, ``live:1GiB``,
``50%``, ``0.5``) means the same on each replica, relative to its own device. ``{"replica": i, "budget": ...}``
sets one replica's budget (an override that a later cluster total clears). Ray's replica rank is the index ``i``;
a replica that replaces a dead one takes its rank and so its override.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time, in a
# replica that unpickled this module's classes, where string annotations do not resolve.
import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from rap.serve.budget import FixedBudget, budget_from_spec
from rap.errors import RapError, RequestError

log = logging.getLogger(__name__)

APP_NAME = "rap"
REPLICA_HEADER = "x-rap-replica"  # every forwarded response says which replica (rank) answered


# ==== configuration ==============================================================================
@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica builds: the same choices as `rap serve`."""

    model: str
    budget: str = "live"  # the cluster budget at start (see assign_budgets)
    split: Literal["equal", "device"] = "equal"
    dtype: str | None = None
    device: str | None = None  # None: cuda when the replica got a GPU, else cpu
    backend: str = "auto"
    profile: str | None = None
    policy: str | None = None
    max_batch: int = 32
    batch_window_s: float = 0.005
    max_tokens_limit: int | None = None
    device_total: str | None = None
    threads: int | None = None
    report_interval_s: float = 0.5


@dataclass(frozen=True)
class DeployConfig:
    """How Ray Serve runs the replicas (documented in `rap cluster --help` and the README)."""

    replicas: int = 2  # fixed count, unless autoscaling (min_replicas/max_replicas) is set
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 32  # per replica; at most this many requests are inside one replica at once
    gpus_per_replica: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    retries: int = 2  # re-sends of a request whose replica died before answering
    front_replicas: int = 1

    @property
    def autoscaling(self) -> dict | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        if high < max(low, 1):
            raise RapError(f"--max-replicas {high} is below --min-replicas {low}")
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(low, self.replicas), high),
                "target_ongoing_requests": self.target_ongoing_requests}


# ==== the cluster budget rule (pure, tested without Ray) ===========================================
def assign_budgets(spec: Any, replicas: dict[int, int], split: str = "equal",
                   overrides: dict[int, Any] | None = None) -> dict[int, Any]:
    """Each live replica's budget spec: {rank: spec} from the cluster spec and {rank: device_total_bytes}.

    A byte total is split (equal shares, or in proportion to device memory), each share capped at the
    replica's device; any other spec (live, a fraction) applies to every replica as is; overrides win.
    """
    overrides = overrides or {}
    source = budget_from_spec(spec)
    shares: dict[int, Any] = {}
    if isinstance(source, FixedBudget) and replicas:
        if split == "device":
            total_device = sum(replicas.values()) or 1
            for rank, device_bytes in replicas.items():
                shares[rank] = source.budget_bytes * device_bytes // total_device
        elif split == "equal":
            for rank in replicas:
                shares[rank] = source.budget_bytes // len(replicas)
        else:
            raise RequestError(f"split {split!r}: use equal or device")
        shares = {rank: max(1, min(share, replicas[rank] or share)) for rank, share in shares.items()}
    else:
        shares = {rank: spec for rank in replicas}
    for rank, value in overrides.items():
        if rank in replicas:
            shares[rank] = value
    return shares


# ==== the board ==================================================================================
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                  logging_config={"enable_access_log": False})  # replicas report every report_interval_s
class BudgetBoard:
    """The cluster budget and the replicas' last reports. Lost if its actor dies: Ray restarts it with the
    start-time budget and the replicas re-report within one interval."""

    def __init__(self, budget: str, split: str, stale_s: float):
        self.spec: Any = budget
        self.split = split
        self.overrides: dict[int, Any] = {}
        self.version = 1
        self.stale_s = stale_s
        self.reports: dict[str, dict] = {}  # replica_id -> last report (+ "time")

    def _live(self) -> list[dict]:
        now = time.monotonic()
        self.reports = {k: r for k, r in self.reports.items() if now - r["time"] < 10 * self.stale_s}
        live = [r for r in self.reports.values() if now - r["time"] < self.stale_s]
        by_rank: dict[int, dict] = {}
        for r in sorted(live, key=lambda r: r["time"]):  # a rank reused by a restarted replica: the newest
            by_rank[r["rank"]] = r
        return [by_rank[k] for k in sorted(by_rank)]

    def _assignments(self) -> dict[int, Any]:
        live = self._live()
        return assign_budgets(self.spec, {r["rank"]: r["device_total_bytes"] for r in live}, self.split,
                              self.overrides)

    def report(self, report: dict) -> dict:
        """A replica's state in, its budget spec out."""
        self.reports[report["replica_id"]] = {**report, "time": time.monotonic()}
        budget = self._assignments().get(report["rank"], self.spec)
        return {"version": self.version, "budget": budget}

    def leave(self, replica_id: str) -> None:
        self.reports.pop(replica_id, None)

    def set(self, budget: Any, replica: int | None, split: str | None) -> dict:
        try:
            budget_from_spec(budget)
        except RapError as e:
            return {"error": str(e)}
        if split is not None and split not in ("equal", "device"):
            return {"error": f"split {split!r}: use equal or device"}
        if replica is not None:
            ranks = [r["rank"] for r in self._live()]
            if replica not in ranks:
                return {"error": f"no live replica {replica}: GET /v1/budget lists replicas {ranks}"}
            self.overrides[replica] = budget
        else:
            self.spec, self.overrides = budget, {}
            if split is not None:
                self.split = split
        self.version += 1
        return {"version": self.version}

    def listing(self) -> dict:
        now = time.monotonic()
        assignments = self._assignments()
        replicas = []
        for r in self._live():
            row = {"replica": r["rank"], **{k: v for k, v in r.items() if k not in ("metrics", "time", "rank")}}
            row["assigned_budget"] = assignments.get(r["rank"])
            row["report_age_s"] = round(now - r["time"], 3)
            replicas.append(row)
        return {"cluster": {"budget": self.spec, "split": self.split, "overrides": self.overrides,
                            "version": self.version, "replicas_live": len(replicas)},
                "replicas": replicas}

    def metrics_texts(self) -> list[tuple[int, str]]:
        return [(r["rank"], r["metrics"]) for r in self._live()]


# ==== a replica ==================================================================================
@serve.deployment
class RapReplica:
    """One Engine behind `server.create_app`, reporting to the board.

    Not an `@serve.ingress` itself (Serve allows one FastAPI ingress per application, the front): the app
    runs in-process, its lifespan (the batcher) entered here, and `handle_http` drives it as ASGI."""

    async def __init__(self, config: ReplicaConfig, board):
        import torch

        from rap.sources import load_view
        from rap.serve.engine import Engine
        from rap.serve.budget import _device_total_bytes
        from rap.core.memory import parse_bytes

        self.config, self.board = config, board
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        rank = context.rank
        self.rank = int(getattr(rank, "rank", rank))
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        view, tok = load_view(config.model, dtype=config.dtype, device=device)
        device_total = parse_bytes(config.device_total) if config.device_total else None
        self.engine = Engine(view, tokenizer=tok, budget=FixedBudget(1 << 50), policy=config.policy,
                             profile=config.profile, backend=config.backend, max_batch=config.max_batch,
                             device_total_bytes=device_total)
        self.device_total_bytes = _device_total_bytes(self.engine.device, device_total)
        self.applied_version, self.applied_spec = 0, None
        self.ongoing = 0
        from rap.serve.server import create_app

        self.app = create_app(self.engine, model_name=self.engine.name, max_batch=config.max_batch,
                              batch_window_s=config.batch_window_s, max_tokens_limit=config.max_tokens_limit)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the batcher
        await self._report_once()  # the cluster budget, before the first request
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("replica %d (%s) serving %s on %s", self.rank, self.replica_id, view.name, self.engine.device)

    # ---- reporting -------------------------------------------------------------------------------
    def _report(self) -> dict:
        engine = self.engine
        info = engine.budget_info()
        last = engine.stats.last_step
        batcher = getattr(getattr(self.app, "state", None), "batcher", None)
        queued = batcher.queued_rows if batcher is not None else 0
        metrics = generate_latest(self.app.state.registry).decode() if self.app is not None else ""
        return {"replica_id": self.replica_id, "rank": self.rank, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()[:12], "device": str(engine.device),
                "device_total_bytes": self.device_total_bytes, "applied_version": self.applied_version,
                "budget_bytes": info["budget_bytes"], "source": info["source"],
                "resident_bytes": info["resident_bytes"], "resident_mask": info["resident_mask"],
                "dense_need_bytes": info["dense_need_bytes"], "smallest_need_bytes": info["smallest_need_bytes"],
                "last_decision": last.decision.to_dict() if last else None,
                "queued": queued, "ongoing": self.ongoing, "requests_served": engine.stats.requests_served,
                "metrics": metrics}

    async def _report_once(self) -> None:
        answer = await self.board.report.remote(self._report())
        # a new version, or the same one with a new share (a replica joined or left)
        if (answer["version"], answer["budget"]) != (self.applied_version, self.applied_spec):
            self.engine.set_budget(answer["budget"])  # read at the next batch; the running one keeps its decision
            self.applied_version, self.applied_spec = answer["version"], answer["budget"]
            await self.board.report.remote(self._report())  # acknowledge at once: PUT waits for it

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            try:
                await self._report_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the board restarting: keep serving on the last budget
                log.warning("replica %d: budget board unreachable", self.rank, exc_info=True)

    # ---- requests from the front -------------------------------------------------------------------
    async def handle_http(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """Run one HTTP request through this replica's app; yields ("start", status, headers), then ("body", bytes)."""
        messages: asyncio.Queue = asyncio.Queue()
        finished = object()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await messages.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put(finished)

        self.ongoing += 1
        task = asyncio.get_running_loop().create_task(run())
        try:
            while True:
                message = await messages.get()
                if message is finished:
                    break
                if message["type"] == "http.response.start":
                    out = [(k, v) for k, v in message.get("headers", [])] + [(REPLICA_HEADER.encode(),
                                                                             str(self.rank).encode())]
                    yield ("start", message["status"], out)
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield ("body", message["body"])
            await task
        finally:
            self.ongoing -= 1
            disconnected.set()
            if not task.done():
                task.cancel()

    async def __del__(self):
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        try:
            await self.board.leave.remote(self.replica_id)
        except Exception:
            pass
        await self._lifespan.__aexit__(None, None, None)


# ==== the front ==================================================================================
class ClusterBudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: str | int | float = Field(description="cluster total (12GiB, split) or per replica (live, 50%)")
    replica: int | None = Field(None, ge=0, description="set only this replica's budget (its rank)")
    split: Literal["equal", "device"] | None = None


def _retryable(error: BaseException) -> bool:
    if isinstance(error, (RayActorError, DeploymentUnavailableError)):
        return True
    if isinstance(error, RayTaskError):
        return isinstance(getattr(error, "cause", None), RayActorError)
    return False


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                   "code": "replica_unavailable"}}, status_code=503, headers={"Retry-After": "1"})


def relabel_metrics(texts: list[tuple[int, str]]) -> str:
    """Prometheus texts of several replicas -> one exposition with a `replica` label on every sample."""
    families: dict[str, Metric] = {}
    for rank, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "replica": str(rank)}, s.value, s.timestamp)

    class _Collector:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(_Collector())
    return generate_latest(registry).decode()


@serve.deployment
@serve.ingress()
class ClusterFront:
    """The cluster's HTTP face: forwards to replicas (retrying the dead), cluster budget and metrics."""

    def __init__(self, replicas, board, retries: int, ack_timeout_s: float = 10.0):
        self.replicas, self.board = replicas, board
        self.retries, self.ack_timeout_s = retries, ack_timeout_s
        self.registry = CollectorRegistry()
        self.retried = Counter("rap_cluster_retries", "requests re-sent because their replica died",
                               registry=self.registry)
        self.unavailable = Counter("rap_cluster_unavailable", "requests answered 503: no replica could take them",
                                   registry=self.registry)
        self.broken_streams = Counter("rap_cluster_broken_streams", "streams cut by a replica's death "
                                      "(ended with an in-band error)", registry=self.registry)

    def __serve_build_asgi_app__(self):
        from rap.serve.server import APIError, _install_error_handlers

        app = FastAPI(title="rap cluster", version="0.1")
        _install_error_handlers(app)

        @app.get("/health")
        async def health():
            listing = await self.board.listing.remote()
            live = listing["cluster"]["replicas_live"]
            return JSONResponse({"status": "ok" if live else "no_replicas", "replicas_live": live},
                                status_code=200 if live else 503)

        @app.get("/v1/budget")
        async def get_budget():
            return await self.board.listing.remote()

        @app.put("/v1/budget")
        async def put_budget(body: ClusterBudgetBody):
            answer = await self.board.set.remote(body.budget, body.replica, body.split)
            if "error" in answer:
                raise APIError(400, answer["error"], param="budget")
            deadline = time.monotonic() + self.ack_timeout_s
            while True:  # until every live replica applied it (each reports every report_interval_s)
                listing = await self.board.listing.remote()
                pending = [r["replica"] for r in listing["replicas"]
                           if r["applied_version"] < answer["version"]]
                if not pending or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            listing["pending_replicas"] = pending
            return listing

        @app.get("/metrics")
        async def metrics():
            texts = await self.board.metrics_texts.remote()
            text = relabel_metrics(texts) + generate_latest(self.registry).decode()
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        async def forward(path: str, request: HTTPRequest):
            return await self._forward(request)

        return app

    async def _forward(self, request: HTTPRequest) -> Response:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        args = (request.method, request.url.path, request.url.query.encode(), headers, body)
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried.inc()
                await asyncio.sleep(0.2 * attempt)
            stream = self.replicas.options(stream=True).handle_http.remote(*args)
            try:
                _, status, out_headers = await stream.__anext__()
                kept = {k.decode(): v.decode() for k, v in out_headers if k.lower() != b"content-length"}
                if not kept.get("content-type", "").startswith("text/event-stream"):
                    chunks = [chunk async for _, chunk in stream]  # complete before a byte leaves: retryable
                    return Response(b"".join(chunks), status_code=status, headers=kept)
            except StopAsyncIteration:
                log.error("a replica ended a response before it started")
                return _unavailable("the replica closed the request without an answer: retry")
            except BackPressureError as e:
                self.unavailable.inc()
                return _unavailable(f"every replica is at max_ongoing_requests and the queue is full: {e.message}")
            except Exception as e:
                if not _retryable(e):
                    raise
                log.warning("replica died under a request (attempt %d of %d): %s", attempt + 1, self.retries + 1,
                            type(e).__name__)
                continue
            return StreamingResponse(self._relay(stream), status_code=status, headers=kept)
        self.unavailable.inc()
        return _unavailable(f"the replica serving this request died and {self.retries} retries found no "
                            "replica: retry shortly (Ray is restarting it)")

    async def _relay(self, stream):
        import json

        try:
            async for _, chunk in stream:
                yield chunk
        except Exception as e:
            if not _retryable(e):
                raise
            self.broken_streams.inc()
            error = {"message": "the replica serving this stream died; retry the request", "type": "server_error",
                     "code": "replica_unavailable", "status": 503}
            yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
        finally:
            stream.cancel()


# ==== building and running =======================================================================
def build_application(config: ReplicaConfig, deploy: DeployConfig, gpus_available: float = 0.0):
    """The Serve application: ClusterFront -> RapReplica x N, both -> BudgetBoard."""
    budget_from_spec(config.budget)  # a bad --budget is one line now, not a replica crash loop
    gpus = deploy.gpus_per_replica if deploy.gpus_per_replica is not None else (1.0 if gpus_available else 0.0)
    board = BudgetBoard.bind(config.budget, config.split, max(2.0, 6 * config.report_interval_s))
    replica_options: dict = {"ray_actor_options": {"num_cpus": deploy.cpus_per_replica, "num_gpus": gpus},
                             "max_ongoing_requests": deploy.max_ongoing_requests,
                             "health_check_period_s": 2.0, "graceful_shutdown_timeout_s": 5.0}
    autoscaling = deploy.autoscaling
    if autoscaling is not None:
        replica_options["autoscaling_config"] = autoscaling
    else:
        replica_options["num_replicas"] = deploy.replicas
    replicas = RapReplica.options(**replica_options).bind(config, board)
    front = ClusterFront.options(num_replicas=deploy.front_replicas, ray_actor_options={"num_cpus": 0},
                                 max_ongoing_requests=10_000)
    return front.bind(replicas, board, deploy.retries)


def start_cluster(config: ReplicaConfig, deploy: DeployConfig, *, address: str | None = None,
                  host: str = "127.0.0.1", port: int = 8000, log_to_driver: bool = True) -> str:
    """Start a local Ray (or join `address`), deploy the application, return its URL once every replica is up."""
    if deploy.replicas < 1:
        raise RapError("--replicas must be at least 1")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
        else:
            most = deploy.max_replicas or deploy.replicas
            # "local": a new instance even where another Ray runs; logical CPUs enough for every replica
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(most * deploy.cpus_per_replica + 0.999)),
                     include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 << 20,
                     log_to_driver=log_to_driver)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config, deploy, gpus), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop_cluster() -> None:
    serve.shutdown()
    ray.shutdown()


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ReplicaConfig)]
