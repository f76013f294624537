"""Load test of `rap serve` from a second process: bounded rate, fixed concurrency, budget changes
mid-run and deliberate bad requests.

    python -m benchmarks.server_load                         # starts `rap serve stories260k` on loopback
    python -m benchmarks.server_load --url http://127.0.0.1:8000 --model NAME   # an already running server
    python -m benchmarks.server_load --smoke                 # 120 requests over 6 s

Requests are paced evenly over --duration (e.g. 2,000 over 60 s) with at most --concurrency in
flight. The mix: completions and chat, a quarter streamed (SSE), greedy and seeded sampling,
8-32 new tokens; every --bad-every-th request is deliberately bad (malformed JSON, unknown field,
empty prompt, negative max_tokens, too-long prompt, wrong types, n over the limit, bad chat role,
a seed over 2**64, a lone surrogate, a 9 MiB body, tools, a NaN budget) and must get a 4xx JSON
error; every --leave-every-th is a client that leaves (a stream closed after 2 chunks, a request
abandoned after 0.3 s), whose row the server must cancel while it keeps serving the others. The budget follows 100% -> 40% -> 70% -> 100% of a dense need
(PUT /v1/budget at each quarter); 100% is the dense need of a batch of --reference-batch (4)
of the longest requests, so larger batches drop blocks or are split. Every other outcome (5xx, 503 budget rejections, transport
errors, malformed responses, wrong status for a bad request) is an unexpected error.

Headline keys: requests, unexpected_errors (must be 0), bad_requests, bad_requests_4xx (must equal
bad_requests), p50_ms, p99_ms (good requests, full response). Writes $OUT/server-load-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import print_table, write_json

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park.", "One day, a big bear",
           "The sun was hot and", "Sam had a red ball. He", "Mom said, \"Let's bake a cake!\"", "In the forest,"]
BAD_KINDS = ["malformed_json", "unknown_field", "empty_prompt", "negative_max_tokens", "too_long_prompt",
             "wrong_type", "n_over_limit", "bad_chat_role", "empty_messages", "not_an_object", "huge_seed",
             "lone_surrogate", "oversize_body", "tools", "nan_budget"]
LEAVE_KINDS = ["stream_closed_after_2_chunks", "client_timeout_0.3s"]


def bad_request(kind: str, rng: random.Random) -> tuple[str, str]:
    """(path, raw body) of a deliberately invalid request."""
    c = "/v1/completions"
    bodies = {
        "malformed_json": (c, '{"prompt": "Once upon a time", "max_tokens": 8'),
        "unknown_field": (c, json.dumps({"prompt": "Hi", "max_tokens": 8, "best_of": 2})),
        "empty_prompt": (c, json.dumps({"prompt": "", "max_tokens": 8})),
        "negative_max_tokens": (c, json.dumps({"prompt": "Hi", "max_tokens": -rng.randint(1, 100)})),
        "too_long_prompt": (c, json.dumps({"prompt": "the cat sat on the mat " * 200, "max_tokens": 8})),
        "wrong_type": (c, json.dumps({"prompt": "Hi", "max_tokens": "eight"})),
        "n_over_limit": (c, json.dumps({"prompt": "Hi", "max_tokens": 8, "n": 1000})),
        "huge_seed": (c, json.dumps({"prompt": "Hi", "max_tokens": 8, "seed": 2**64 + rng.randint(0, 99)})),
        "lone_surrogate": (c, '{"prompt": "Once \\ud800 upon", "max_tokens": 8}'),
        "oversize_body": (c, json.dumps({"prompt": "a" * (9 * 2**20), "max_tokens": 1})),  # over the 8 MiB default
        "tools": ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "tools": [{"type": "function", "function": {"name": "f"}}]})),
        "nan_budget": ("PUT /v1/budget", '{"budget": NaN}'),
        "bad_chat_role": ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]})),
        "empty_messages": ("/v1/chat/completions", json.dumps({"messages": []})),
        "not_an_object": (c, json.dumps(["Once upon a time"])),
    }
    return bodies[kind]


def good_request(i: int, rng: random.Random) -> tuple[str, dict]:
    max_tokens = rng.choice([8, 12, 16, 24, 32])
    sampling = {"temperature": 0} if rng.random() < 0.6 else {"temperature": 0.8, "top_p": 0.95, "seed": i}
    stream = rng.random() < 0.25
    if rng.random() < 0.3:
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": max_tokens}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens}
        path = "/v1/completions"
    return path, {**body, **sampling, "stream": stream}


async def send_good(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    t0 = time.perf_counter()
    out = {"kind": "good", "path": path, "stream": body["stream"], "ok": False}
    try:
        if body["stream"]:
            first, done, text = None, False, ""
            async with client.stream("POST", path, json=body) as r:
                out["status"] = r.status_code
                if r.status_code != 200:
                    out["error"] = (await r.aread()).decode()[:200]
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        out["error"] = event["error"]["message"][:200]
                        return out
                    first = first or time.perf_counter()
                    if event["choices"]:
                        ch = event["choices"][0]
                        text += ch.get("text") or ch.get("delta", {}).get("content") or ""
                        if ch.get("rap"):
                            out["dropped"] = len(ch["rap"]["decision"]["dropped"])
                    if event.get("rap"):
                        out["dropped"] = len(event["rap"]["decision"]["dropped"])
                        out["batch"] = event["rap"]["batch"]
            out["ok"] = done
            out["ttft_ms"] = (first - t0) * 1e3 if first else None
            if not done:
                out["error"] = "stream ended without [DONE]"
        else:
            r = await client.post(path, json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                data = r.json()
                choice = data["choices"][0]
                ok = isinstance(choice.get("text", choice.get("message", {}).get("content")), str)
                out["ok"] = ok and data["usage"]["completion_tokens"] >= 0
                out["dropped"] = len(data["rap"]["decision"]["dropped"])
                out["batch"] = data["rap"]["batch"]
                out["tokens"] = data["usage"]["completion_tokens"]
            else:
                out["error"] = r.text[:200]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    out["ms"] = (time.perf_counter() - t0) * 1e3
    return out


async def send_bad(client: httpx.AsyncClient, kind: str, path: str, raw: str) -> dict:
    t0 = time.perf_counter()
    out = {"kind": "bad", "bad_kind": kind, "ok": False}
    try:
        method, path = path.split(" ", 1) if " " in path else ("POST", path)
        r = await client.request(method, path, content=raw, headers={"content-type": "application/json"})
        out["status"] = r.status_code
        out["ok"] = 400 <= r.status_code < 500 and "message" in r.json().get("error", {})
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    out["ms"] = (time.perf_counter() - t0) * 1e3
    return out


async def send_leaving(client: httpx.AsyncClient, kind: str) -> dict:
    """A client that goes away: a stream closed after 2 chunks, or a request given up after 0.3 s. The
    server must keep serving (its row is cancelled); ok = it behaved as a live server up to the leave."""
    t0 = time.perf_counter()
    out = {"kind": "leave", "leave_kind": kind, "ok": False}
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    try:
        if kind.startswith("stream"):
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                out["status"] = r.status_code
                chunks = 0
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: ")
                    if chunks == 2:
                        break
                out["ok"] = r.status_code == 200 and chunks == 2
        else:
            try:
                r = await client.post("/v1/completions", json=body, timeout=0.3)
                out["status"], out["ok"] = r.status_code, r.status_code == 200
            except httpx.TimeoutException:
                out["status"], out["ok"] = "timeout", True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    out["ms"] = (time.perf_counter() - t0) * 1e3
    return out


async def run_load(url: str, args, budget_plan: list[tuple[float, int]]) -> tuple[list[dict], list[dict], float]:
    rng = random.Random(0)
    plan = []
    for i in range(args.requests):
        if args.bad_every and i % args.bad_every == args.bad_every - 1:
            kind = BAD_KINDS[(i // args.bad_every) % len(BAD_KINDS)]
            plan.append(("bad", kind, *bad_request(kind, rng)))
        elif args.leave_every and i % args.leave_every == args.leave_every - 1:
            plan.append(("leave", LEAVE_KINDS[(i // args.leave_every) % len(LEAVE_KINDS)]))
        else:
            plan.append(("good", *good_request(i, rng)))
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    results: list[dict] = []
    budget_log: list[dict] = []
    sem = asyncio.Semaphore(args.concurrency)
    interval = args.duration / args.requests
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, item) -> None:
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
            async with sem:
                if item[0] == "bad":
                    res = await send_bad(client, item[1], item[2], item[3])
                elif item[0] == "leave":
                    res = await send_leaving(client, item[1])
                else:
                    res = await send_good(client, item[1], item[2])
            res["i"], res["t_s"] = i, time.perf_counter() - t0
            results.append(res)

        async def budgets() -> None:
            for at_s, budget in budget_plan:
                await asyncio.sleep(max(0.0, t0 + at_s - time.perf_counter()))
                r = await client.put("/v1/budget", json={"budget": budget})
                budget_log.append({"t_s": time.perf_counter() - t0, "budget_bytes": budget, "status": r.status_code})

        await asyncio.gather(budgets(), *(one(i, item) for i, item in enumerate(plan)))
        wall = time.perf_counter() - t0
    return sorted(results, key=lambda r: r["i"]), budget_log, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int | None, threads: int | None, log_path: Path,
                 policy: str | None = None, extra: tuple[str, ...] = ("--batch-window-ms", "5")) -> subprocess.Popen:
    """`rap serve MODEL` in a child process, returned once /health answers (180 s at most); None: rap serve's
    default for max_batch / threads / policy."""
    cmd = [sys.executable, "-m", "rap", "serve", model, "--port", str(port), "--budget", "1TiB", *extra] \
        + (["--max-batch", str(max_batch)] if max_batch else []) + (["--threads", str(threads)] if threads else []) \
        + (["--policy", policy] if policy else [])
    env = {**os.environ, "RAP_LOG": "WARNING", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not come up in 180 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260k")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--duration", type=float, default=60.0, help="seconds over which requests are started")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--bad-every", type=int, default=20, help="every N-th request is deliberately bad (0: none)")
    p.add_argument("--leave-every", type=int, default=25,
                   help="every N-th request is a client that leaves (closed stream, 0.3 s timeout; 0: none)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--trace", default="1.0,0.4,0.7,1.0", help="budget levels (fractions of the reference dense need)")
    p.add_argument("--reference-batch", type=int, default=4, help="batch size whose dense need is 100%%")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads of the started server (client and server share this machine's cores)")
    p.add_argument("--smoke", action="store_true", help="120 requests over 6 s")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.duration = 120, 6.0

    load_before = os.getloadavg()
    out_root = Path(os.environ.get("OUT", "out"))
    out_root.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        proc = start_server(args.model, port, args.max_batch, args.server_threads, out_root / "server-load-server.log")
        url = f"http://127.0.0.1:{port}"
    try:
        # 100% = the dense need of a batch of --reference-batch of the largest requests this test sends;
        # bigger batches then drop blocks (or are split) even at 100%, smaller ones run dense at 70%
        ref = httpx.get(f"{url}/v1/budget", params={"batch": args.reference_batch, "prompt": 48,
                                                    "new_tokens": 32}).json()
        levels = [float(x) for x in args.trace.split(",")]
        plan = [(args.duration * k / len(levels), int(level * ref["dense_need_bytes"])) for k, level in enumerate(levels)]
        print(f"server {url} ({ref['backend']}); dense need of a batch of {args.reference_batch}: {ref['dense_need_bytes']:,} B; "
              f"smallest {ref['smallest_need_bytes']:,} B; budget plan {[b for _, b in plan]}")
        results, budget_log, wall = asyncio.run(run_load(url, args, plan))
        health = httpx.get(f"{url}/health", timeout=10).status_code
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    good = [r for r in results if r["kind"] == "good"]
    bad = [r for r in results if r["kind"] == "bad"]
    leaving = [r for r in results if r["kind"] == "leave"]
    unexpected = [r for r in results if not r["ok"]]
    server_errors = [r for r in results if isinstance(r.get("status"), int) and r["status"] >= 500]

    def kind_of(r: dict) -> str:
        if r["kind"] == "good":
            return ("chat" if "chat" in r["path"] else "completion") + ("_stream" if r["stream"] else "")
        return r["kind"] + ":" + (r.get("bad_kind") or r.get("leave_kind"))

    by_kind = {}
    for r in results:
        by_kind.setdefault(kind_of(r), []).append(r)
    kinds = [{"kind": k, "n": len(rs), "ok": sum(r["ok"] for r in rs),
              "statuses": ",".join(sorted({str(r.get("status")) for r in rs})),
              "p50_ms": percentile([r["ms"] for r in rs if "ms" in r], 0.5),
              "p99_ms": percentile([r["ms"] for r in rs if "ms" in r], 0.99)} for k, rs in sorted(by_kind.items())]
    lat = [r["ms"] for r in good if r["ok"]]
    ttft = [r["ttft_ms"] for r in good if r.get("ttft_ms") is not None]
    phases = []
    for k, (at_s, budget) in enumerate(plan):
        end = plan[k + 1][0] if k + 1 < len(plan) else float("inf")
        # by completion time: the engine decides when it serves, not when the request was sent
        rows = [r for r in good if r["ok"] and at_s <= r["t_s"] < end and "dropped" in r]
        phases.append({"phase": k, "budget_bytes": budget, "level_ratio": levels[k], "served": len(rows),
                       "mean_dropped_blocks": statistics.mean(r["dropped"] for r in rows) if rows else None,
                       "max_dropped_blocks": max((r["dropped"] for r in rows), default=None),
                       "mean_batch": statistics.mean(r["batch"] for r in rows if "batch" in r) if rows else None,
                       "p50_ms": percentile([r["ms"] for r in rows], 0.5)})
    metric_lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                    if line and not line.startswith("#") and " " in line}
    headline = {
        "requests": len(results), "good_requests": len(good), "served_ok": len(lat),
        "unexpected_errors": len(unexpected), "server_errors_5xx": len(server_errors), "bad_requests": len(bad),
        "leaving_clients": len(leaving),
        "bad_requests_4xx": sum(1 for r in bad if r["ok"]),
        "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "max_ms": max(lat) if lat else None,
        "stream_ttft_p50_ms": percentile(ttft, 0.5), "stream_ttft_p99_ms": percentile(ttft, 0.99),
        "wall_seconds": wall, "requests_per_s": len(results) / wall,
        "server_alive_after": health == 200,
        # other processes on this machine compete with client and server (1-minute load averages)
        "load_average_before": round(load_before[0], 2), "load_average_after": round(os.getloadavg()[0], 2),
    }
    print_table(phases, ["phase", "level_ratio", "budget_bytes", "served", "mean_dropped_blocks", "max_dropped_blocks",
                         "mean_batch", "p50_ms"])
    print_table(kinds, ["kind", "n", "ok", "statuses", "p50_ms", "p99_ms"])
    print("\n" + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in headline.items()))
    if unexpected:
        print("unexpected (first 5):", json.dumps(unexpected[:5], indent=1))
    date = datetime.date.today().isoformat()
    write_json(f"server-load-{date}" + ("-smoke" if args.smoke else "") + ".json", {
        **headline, "model": args.model, "url": "loopback" if args.url is None else args.url,
        "command": " ".join(["python -m benchmarks.server_load", *sys.argv[1:]]),
        "setup": {"server_threads": args.server_threads if args.url is None else None, "requests": args.requests,
                  "duration_s": args.duration, "concurrency": args.concurrency,
                  "bad_every": args.bad_every, "leave_every": args.leave_every, "max_batch": args.max_batch, "trace": levels,
                  "reference_batch": args.reference_batch, "dense_need_bytes": ref["dense_need_bytes"]},
        "budget_changes": budget_log, "phases": phases, "by_kind": kinds,
        "bad_status_by_kind": {k: sorted({str(r.get("status")) for r in bad if r["bad_kind"] == k}) for k in BAD_KINDS},
        "server_metrics": {k: v for k, v in metric_lines.items() if k.startswith(("rap_batches", "rap_requests",
                                                                                   "rap_generated", "rap_oom",
                                                                                   "rap_decisions", "rap_batch_size_sum",
                                                                                   "rap_batch_size_count"))},
        "unexpected_samples": unexpected[:10],
    })


if __name__ == "__main__":
    main()
