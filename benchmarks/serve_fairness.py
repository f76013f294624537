"""Fairness of `rap serve` (issue 17): with one request of --prompts prompts running, how long does another
client's 4-token request take, against its baseline on the idle server?

    python -m benchmarks.serve_fairness                       # rap serve stories260k, 3,000 prompts
    python -m benchmarks.serve_fairness --prompts 300         # a quick look

Starts `rap serve MODEL` on loopback (--threads, --max-batch as given), measures the small request
(`"The dog"`, max_tokens 4, greedy) --baseline-n times on the idle server, then sends the big request
(--prompts copies of "Once upon a time", max_tokens 4, greedy; --max-prompts is raised to fit it) and,
while it runs, sends the small request --probe-n times one after another. Reported: baseline median, the
probes' median and max, their ratio to the baseline median (target: the median within 2x), whether every
probe came back before the big request finished, and how long the big request took. The target is checked
on the median: one probe's latency on a shared 2-core box is not the server's alone, so the max is
reported beside it. Writes $OUT/serve-fairness-<date>.json; exits 1 if the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import print_table, write_json
from benchmarks.server_load import free_port, start_server

SMALL = {"prompt": "The dog", "max_tokens": 4, "temperature": 0}


def start(model: str, port: int, args, log_path: Path) -> subprocess.Popen:
    return start_server(model, port, args.max_batch, args.threads, log_path,
                        extra=("--max-prompts", str(max(args.prompts, 4096))))


async def measure(url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as ac:
        async def small() -> tuple[float, str]:
            t0 = time.perf_counter()
            r = await ac.post("/v1/completions", json=SMALL)
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["choices"][0]["text"]

        await small()  # warm-up
        baseline = [(await small()) for _ in range(args.baseline_n)]
        big_body = {"prompt": ["Once upon a time"] * args.prompts, "max_tokens": 4, "temperature": 0}
        t_big = time.perf_counter()
        big = asyncio.create_task(ac.post("/v1/completions", json=big_body))
        await asyncio.sleep(args.probe_delay_s)
        probes, probes_before_big_done = [], 0
        for _ in range(args.probe_n):
            if big.done():
                break
            probes.append(await small())
            probes_before_big_done += not big.done()
        big_r = await big
        big_s = time.perf_counter() - t_big
    base_s = [t for t, _ in baseline]
    probe_s = [t for t, _ in probes]
    same_text = all(text == baseline[0][1] for _, text in baseline + probes)
    base_med = statistics.median(base_s)
    probe_med = statistics.median(probe_s) if probe_s else None
    return {"baseline_s": base_s, "probe_s": probe_s, "baseline_median_s": base_med,
            "probe_median_s": probe_med, "probe_max_s": max(probe_s) if probe_s else None,
            "median_ratio": probe_med / base_med if probe_s else None,
            "max_ratio": max(probe_s) / base_med if probe_s else None,
            "probes_answered_before_big_finished": probes_before_big_done,
            "big_status": big_r.status_code,
            "big_choices": len(big_r.json().get("choices", [])) if big_r.status_code == 200 else 0,
            "big_s": big_s, "small_text_unchanged": same_text}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="stories260k")
    p.add_argument("--prompts", type=int, default=3000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-n", type=int, default=9)
    p.add_argument("--probe-n", type=int, default=9)
    p.add_argument("--probe-delay-s", type=float, default=0.5, help="after the big request is sent")
    p.add_argument("--target-ratio", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    command = "python -m benchmarks.serve_fairness " + " ".join(argv if argv is not None else sys.argv[1:])
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"rap-serve-fairness-{os.getpid()}.log"
    load_start = os.getloadavg()
    proc = start(args.model, port, args, log_path)
    try:
        res = asyncio.run(measure(f"http://127.0.0.1:{port}", args))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    met = (res["median_ratio"] is not None and res["median_ratio"] <= args.target_ratio
           and res["big_status"] == 200 and res["big_choices"] == args.prompts and res["small_text_unchanged"])
    ms = lambda s: round(s * 1e3, 1) if s is not None else None  # noqa: E731
    print_table([{"prompts": args.prompts, "baseline_ms": ms(res["baseline_median_s"]),
                  "probe_median_ms": ms(res["probe_median_s"]), "probe_max_ms": ms(res["probe_max_s"]),
                  "median_ratio": res["median_ratio"], "max_ratio": res["max_ratio"],
                  "probes_before_big_done": f'{res["probes_answered_before_big_finished"]}/{len(res["probe_s"])}',
                  "big_s": round(res["big_s"], 1), "target_met": met}],
                ["prompts", "baseline_ms", "probe_median_ms", "probe_max_ms", "median_ratio", "max_ratio",
                 "probes_before_big_done", "big_s", "target_met"])
    write_json(f"serve-fairness-{datetime.date.today().isoformat()}.json",
               {"kind": "serve_fairness", "command": command, "model": args.model, "config": vars(args),
                "cpu_count": os.cpu_count(), "load_average_at_start": load_start,
                "load_average_at_end": os.getloadavg(), "target": f"probe median <= {args.target_ratio}x baseline",
                "target_met": met, **res})
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
