"""`decide` latency of the default level policy (rap.policy.solver) on CPU: p50 / p99 over random requests.

Two draws of `--n` (request, budget) pairs (batch 1-8, prompt 16-1024, 8-256 new tokens, budget U(0.3, 1.0)
of the request's dense need; seeded):

* cold: every request shape new to the solver (nothing memoised: its per-request byte terms are computed);
* warm: the same pairs again (the memo per (request shape, budget bucket) answers);
* bucketed: prompts rounded up to a multiple of 64 and new tokens to 32 (what a server's planning
  request does), fresh budgets: per-shape terms memoised, the plan looked up per budget bucket.

`gc.freeze()` runs after the policy is built, as in `rap serve` (`--no-gc-freeze` to see the collector's
pauses). Wall time (time.perf_counter) and this process's CPU time (time.process_time) are both reported: on a
shared machine the wall p99 measures the scheduler as much as the code.

    PYTHONPATH=src python -m benchmarks.decide_latency --n 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np


def draws(memory, n: int, seed: int, bucketed: bool = False):
    from rap.core.memory import Request

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b, p, t = int(rng.integers(1, 9)), int(rng.integers(16, 1025)), int(rng.integers(8, 257))
        if bucketed:
            p, t = -(-p // 64) * 64, -(-t // 32) * 32
        req = Request(batch=b, prompt=p, new_tokens=t)
        out.append((req, int(memory.dense_need(req) * rng.uniform(0.3, 1.0))))
    return out


def timed(policy, pairs) -> dict:
    from rap.errors import BudgetError

    wall, cpu = [], []
    for req, budget in pairs:
        w, c = time.perf_counter(), time.process_time()
        try:
            policy.decide(req, budget)
        except BudgetError:
            pass
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
    return {"n": len(pairs), "wall_p50_ms": pct(wall, 50), "wall_p99_ms": pct(wall, 99),
            "cpu_p50_ms": pct(cpu, 50), "cpu_p99_ms": pct(cpu, 99)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes-device", choices=("cpu", "cuda"), default="cpu",
                    help="the memory model the policy plans with: cuda counts allocator rounding and the compiled "
                         "decoder's buffers, as when rap serves on a GPU (decide itself always runs on the CPU)")
    ap.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                    help="gc.freeze() after the policy is built, as `rap serve` does (--no-gc-freeze: the collector "
                         "walks the policy's objects on its full passes, multi-ms pauses in the tail)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)

    from benchmarks.common import environment
    from rap.policy import DEFAULT_LEVEL_POLICY, bundled_level_profile, make_level_policy
    from rap.sources import planning_memory

    memory = planning_memory(args.model, args.dtype, on_cuda=args.bytes_device == "cuda")
    t = time.perf_counter()
    policy = make_level_policy(DEFAULT_LEVEL_POLICY, memory, bundled_level_profile(args.model))
    build_s = time.perf_counter() - t
    cold_pairs = draws(memory, args.n, args.seed)
    bucketed_pairs = draws(memory, args.n, args.seed + 1, bucketed=True)
    if args.gc_freeze:  # what `rap serve` does once its engine is built (rap.serve.server.serve)
        gc.freeze()
    rows = {"cold": timed(policy, cold_pairs), "warm": timed(policy, cold_pairs)}
    rows["bucketed"] = timed(policy, bucketed_pairs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for name, r in rows.items():
        print(f"{name:9s} n={r['n']}  wall p50 {r['wall_p50_ms']:.3f} ms  p99 {r['wall_p99_ms']:.3f} ms  |  "
              f"cpu p50 {r['cpu_p50_ms']:.3f} ms  p99 {r['cpu_p99_ms']:.3f} ms")
    print(f"policy {DEFAULT_LEVEL_POLICY} ({args.bytes_device} bytes), built in {build_s:.2f} s; load average {load}")
    suffix = "" if args.bytes_device == "cpu" else "-cudabytes"
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", "benchmarks/results")) / \
        f"decide-latency-{args.model}-cpu{suffix}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment("cpu"), "model": args.model, "dtype": args.dtype,
                               "policy": DEFAULT_LEVEL_POLICY, "bytes_device": args.bytes_device, "gc_freeze": args.gc_freeze, "build_seconds": build_s, "load_average_1min": load,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
