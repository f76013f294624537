"""Load test of `rap cluster` (Ray Serve, N replicas) against one `rap serve` replica, in the same run.

    python -m benchmarks.cluster_load                               # 2,000 requests, concurrency 32, SmolLM2-135M
    python -m benchmarks.cluster_load --model stories260k           # the bundled tiny model (a busy 2-core box)
    python -m benchmarks.cluster_load --smoke                       # 120 requests, stories260k
    python -m benchmarks.cluster_load --max-tokens 4 --policy drop     # SmolLM2-135M, short requests, drops only (CPU)

Both phases send the same closed-loop stream (--concurrency requests always in flight; completions and chat,
a quarter streamed, 8-32 new tokens or --max-tokens, greedy and seeded sampling) and change the budget every --budget-every-s
seconds (cycling 100% -> 60% -> 80% of the dense need of one replica's reference batch; the cluster gets that
per replica as a total, PUT /v1/budget). Phase 1: one `rap serve` process. Phase 2: `rap cluster` with
--replicas replicas on a local Ray; once --kill-at of the requests are answered, one replica is killed
(SIGKILL); Ray restarts it.

Reported: errors by kind (status and error code; "lost" = no HTTP answer at all), p50/p99 latency of the
answered requests, requests per replica (the x-rap-replica header), what the kill cost (requests that got a
503 or a cut stream, retries the front made, seconds until the replacement served, throughput in the 10 s
after the kill vs before) and the cluster/single throughput ratio. Writes $OUT/cluster-load-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import print_table, write_json
from benchmarks.server_load import free_port, good_request, percentile, start_server

FRACTIONS = [1.0, 0.6, 0.8]


async def send(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    t0 = time.perf_counter()
    out: dict = {"stream": body["stream"], "kind": "lost"}
    try:
        if body["stream"]:
            async with client.stream("POST", path, json=body) as r:
                out["status"], out["replica"] = r.status_code, r.headers.get("x-rap-replica")
                if r.status_code != 200:
                    out["kind"] = _error_kind(r.status_code, await r.aread())
                else:
                    out["kind"] = "stream_without_done"
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            out["kind"] = "ok" if out["kind"] == "stream_without_done" else out["kind"]
                            break
                        if line.startswith("data: ") and '"error"' in line:
                            error = json.loads(line[6:]).get("error", {})
                            out["kind"] = f"stream_error_{error.get('code')}"
        else:
            r = await client.post(path, json=body)
            out["status"], out["replica"] = r.status_code, r.headers.get("x-rap-replica")
            out["kind"] = "ok" if r.status_code == 200 and r.json()["choices"] else _error_kind(r.status_code, r.content)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out["kind"], out["error"] = "lost", f"{type(e).__name__}: {e}"[:200]
    out["ms"] = (time.perf_counter() - t0) * 1e3
    return out


def _error_kind(status: int, content: bytes) -> str:
    try:
        code = json.loads(content)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        code = "not_json"
    return f"http_{status}_{code}"


async def run_phase(url: str, args, share_bytes: int, replicas: int, on_progress=None) -> dict:
    """The closed-loop request stream against `url`; budget changes every args.budget_every_s seconds."""
    rng = random.Random(0)
    plan = [good_request(i, rng) for i in range(args.requests)]
    if args.max_tokens is not None:  # short requests: a bounded run of a real model on a busy CPU
        plan = [(path, {**body, "max_tokens": args.max_tokens}) for path, body in plan]
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    results: list[dict] = []
    budget_log: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        done = asyncio.Event()

        async def worker() -> None:
            while not queue.empty():
                path, body = queue.get_nowait()
                res = await send(client, path, body)
                res["t_s"] = time.perf_counter() - t0
                results.append(res)
                if on_progress is not None:
                    await on_progress(len(results), res["t_s"])

        async def budgets() -> None:
            k = 0
            while not done.is_set():
                total = int(FRACTIONS[k % len(FRACTIONS)] * share_bytes) * replicas
                t = time.perf_counter() - t0
                try:
                    r = await client.put("/v1/budget", json={"budget": total})
                    pending = r.json().get("pending_replicas") if r.status_code == 200 else None
                    budget_log.append({"t_s": round(t, 2), "budget_bytes": total, "status": r.status_code,
                                       "put_ms": round((time.perf_counter() - t0 - t) * 1e3, 1),
                                       "pending_replicas": pending})
                except httpx.HTTPError as e:
                    budget_log.append({"t_s": round(t, 2), "budget_bytes": total, "error": type(e).__name__})
                k += 1
                try:
                    await asyncio.wait_for(done.wait(), args.budget_every_s)
                except asyncio.TimeoutError:
                    pass

        budget_task = asyncio.create_task(budgets())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        done.set()
        await budget_task
        await client.put("/v1/budget", json={"budget": share_bytes * replicas})
    return summarize(results, wall) | {"budget_changes": budget_log, "results": results}


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r["ms"] for r in results if r["kind"] == "ok"]
    return {"requests": len(results), "answered_ok": len(ok), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 2) if wall else None,
            "errors_by_kind": dict(Counter(r["kind"] for r in results if r["kind"] != "ok")),
            "lost": sum(r["kind"] == "lost" for r in results),
            "p50_ms": percentile(ok, 0.5), "p99_ms": percentile(ok, 0.99),
            "requests_per_replica": dict(Counter(str(r.get("replica")) for r in results if r["kind"] == "ok"))}


def dense_share(url: str) -> int:
    info = httpx.get(f"{url}/v1/budget", params={"batch": 4, "prompt": 16, "new_tokens": 32}, timeout=30).json()
    return int(info["dense_need_bytes"])


def metric(text: str, name: str) -> float:
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kill-at", type=float, default=0.3, help="kill a replica once this share is answered")
    p.add_argument("--budget-every-s", type=float, default=10.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (and of the single server)")
    p.add_argument("--max-tokens", type=int, default=None, help="every request's max_tokens (default: 8-32)")
    p.add_argument("--policy", default=None, help="rap serve --policy of every server (e.g. drop: drop blocks "
                                                  "only; on CPU the int8/int4 levels of the default are slow)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--smoke", action="store_true", help="120 requests of stories260k")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.requests = "stories260k", 120
    stamp = datetime.date.today().isoformat()
    command = "python -m benchmarks.cluster_load " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, payload = [], {"kind": "cluster_load", "command": command, "model": args.model,
                         "config": vars(args), "cpu_count": os.cpu_count(),
                         "load_average_at_start": os.getloadavg()}

    # ---- phase 1: one `rap serve` ------------------------------------------------------------------
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / "rap-cluster-load-single.log"
    proc = start_server(args.model, port, args.max_batch, args.threads, log_path, args.policy)
    try:
        url = f"http://127.0.0.1:{port}"
        share = dense_share(url)
        single = asyncio.run(run_phase(url, args, share, 1))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    payload["single"] = {k: v for k, v in single.items() if k != "results"}
    rows.append({"setup": "rap serve x1", **{k: payload["single"][k] for k in
                 ("requests", "answered_ok", "lost", "requests_per_s", "p50_ms", "p99_ms")}})
    write_json(f"cluster-load-{stamp}.json", {**payload, "partial": "phase 1 only (the cluster phase runs next)"})

    # ---- phase 2: the cluster, one replica killed ------------------------------------------------------
    from rap.serve.cluster import DeployConfig, ReplicaConfig, start_cluster, stop_cluster

    t_start = time.perf_counter()
    url = start_cluster(ReplicaConfig(args.model, budget=str(share * args.replicas), threads=args.threads,
                                      max_batch=args.max_batch, policy=args.policy),
                        DeployConfig(replicas=args.replicas, max_ongoing_requests=args.max_batch),
                        port=free_port(), log_to_driver=False)
    startup_s = time.perf_counter() - t_start
    kill: dict = {}

    async def on_progress(n: int, t_s: float) -> None:
        if kill or n < args.kill_at * args.requests:
            return
        kill["at_request"] = n  # claimed: the other workers return above
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            victim = (await c.get("/v1/budget")).json()["replicas"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.perf_counter()
        kill.update({"replica": victim["replica"], "pid": victim["pid"], "t_s": t_s,
                     "victim_ongoing_at_last_report": victim["ongoing"], "victim_queued": victim["queued"],
                     "victim_report_age_s": victim["report_age_s"]})

        async def watch() -> None:  # when a replacement reports to the board
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                while True:
                    await asyncio.sleep(0.5)
                    rows_ = (await c.get("/v1/budget")).json()["replicas"]
                    if len(rows_) == args.replicas and victim["pid"] not in [r["pid"] for r in rows_]:
                        kill["replacement_live_s"] = round(time.perf_counter() - t_kill, 2)
                        return

        kill["_watch"] = asyncio.create_task(watch())

    try:
        cluster = asyncio.run(run_phase_with_watch(url, args, share, on_progress, kill))
        metrics_text = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        stop_cluster()
    results = cluster.pop("results")
    kill.pop("_watch", None)
    if kill:
        t = kill["t_s"]
        before = sum(1 for r in results if r["kind"] == "ok" and t - 10 <= r["t_s"] < t)
        after = sum(1 for r in results if r["kind"] == "ok" and t <= r["t_s"] < t + 10)
        kill.update({"requests_503_or_cut": sum(1 for r in results if r["kind"] != "ok" and r["t_s"] >= t),
                     "ok_in_10s_before": before, "ok_in_10s_after": after,
                     "throughput_after_vs_before_ratio": round(after / before, 3) if before else None})
    kill["front_retries"] = metric(metrics_text, "rap_cluster_retries_total")
    kill["front_broken_streams"] = metric(metrics_text, "rap_cluster_broken_streams_total")
    around = [{k: r.get(k) for k in ("t_s", "ms", "kind", "replica", "stream")} for r in results
              if kill and kill["t_s"] - 2 <= r["t_s"] <= kill["t_s"] + 15]
    payload["cluster"] = {**cluster, "startup_s": round(startup_s, 1), "kill": kill,
                          "answers_from_2s_before_to_15s_after_the_kill": around}
    payload["throughput_cluster_vs_single_ratio"] = (round(cluster["requests_per_s"] / single["requests_per_s"], 3)
                                                     if single["requests_per_s"] else None)
    rows.append({"setup": f"rap cluster x{args.replicas} (1 killed)", **{k: cluster[k] for k in
                 ("requests", "answered_ok", "lost", "requests_per_s", "p50_ms", "p99_ms")}})
    payload["load_average_at_end"] = os.getloadavg()
    print_table(rows, ["setup", "requests", "answered_ok", "lost", "requests_per_s", "p50_ms", "p99_ms"])
    print("errors by kind: single", payload["single"]["errors_by_kind"], "cluster", cluster["errors_by_kind"])
    print("requests per replica:", cluster["requests_per_replica"])
    print("kill:", {k: v for k, v in kill.items()})
    print("throughput cluster/single:", payload["throughput_cluster_vs_single_ratio"])
    write_json(f"cluster-load-{stamp}.json", payload)


async def run_phase_with_watch(url, args, share, on_progress, kill) -> dict:
    out = await run_phase(url, args, share, args.replicas, on_progress)
    watch = kill.get("_watch")
    if watch is not None and not watch.done():
        try:
            await asyncio.wait_for(watch, 120)
        except asyncio.TimeoutError:
            kill["replacement_live_s"] = None
    return out


if __name__ == "__main__":
    main()
