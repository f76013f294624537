"""Decode speed of two rap source trees in one run: old vs new `Decoder`, alternating, as a ratio.

    PYTHONPATH=src:. python3 -m benchmarks.decode_ab --old /tmp/old/src --new src [--model smollm2-135m]

Each round runs one child process per tree (same model, dtype, prompt, mask, step kind), in
alternating order, so drift in the machine's load hits both; a child times `Decoder.generate` for
`--tokens` new tokens after one warm-up call and prints ms per decode step. The table reports the
median per tree and new / old (< 1 is faster), by wall time and by the child's process CPU time
(less sensitive to other load on a shared box). Writes the rows as JSON to --json if given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from rap.sources import load_view
from rap.decode.decoder import Decoder
from rap.core.mask import BlockMask
model, step, tokens, dtype, drop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
view, tok = load_view(model, dtype=dtype, device="cpu")
mask = BlockMask.from_drop(view.num_layers, [d for d in drop.split(",") if d])
dec = Decoder(view, step=step)
ids = [tok("Once upon a time, there was a little girl named Lily. She loved to").input_ids]
dec.generate(ids, 4, mask=mask)
c0 = time.process_time()
out = dec.generate(ids, tokens, mask=mask)
cpu = (time.process_time() - c0) * 1e3 / max(1, out.timing.decode_steps + 1)  # prefill counted as one step
print(json.dumps({"ms_per_step": out.timing.ms_per_step, "prefill_ms": out.timing.prefill_ms,
                  "cpu_ms_per_call_step": cpu}))
"""


def run_child(src: str, args, step: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, args.model, step, str(args.tokens), args.dtype, args.drop],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="src folder of the old tree")
    p.add_argument("--new", default="src", help="src folder of the new tree")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", default="exact,static", help="Decoder step kinds to time")
    p.add_argument("--drop", default="", help="blocks to drop, e.g. attn.3,ffn.7")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for step in args.steps.split(","):
        times, cpu = {"old": [], "new": []}, {"old": [], "new": []}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for which in order:
                got = run_child(getattr(args, which), args, step)
                times[which].append(got["ms_per_step"])
                cpu[which].append(got["cpu_ms_per_call_step"])
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append({"step": step, "model": args.model, "dtype": args.dtype, "drop": args.drop,
                     "tokens": args.tokens, "rounds": args.rounds, "old_ms_per_step": old, "new_ms_per_step": new,
                     "new_over_old": new / old, "old_runs": times["old"], "new_runs": times["new"],
                     # process CPU time per step (prefill as one step): less sensitive to other load on the box
                     "cpu_new_over_old": statistics.median(cpu["new"]) / statistics.median(cpu["old"]),
                     "old_cpu_runs": cpu["old"], "new_cpu_runs": cpu["new"]})
    print(f"{'step':8s} {'old ms/step':>12s} {'new ms/step':>12s} {'new/old':>8s} {'cpu new/old':>12s}")
    for r in rows:
        print(f"{r['step']:8s} {r['old_ms_per_step']:12.2f} {r['new_ms_per_step']:12.2f} {r['new_over_old']:8.3f} "
              f"{r['cpu_new_over_old']:12.3f}")
    import platform

    import torch

    meta = {"device": f"CPU ({platform.processor() or platform.machine()}), 1 thread", "torch": torch.__version__,
            "command": " ".join(sys.argv)}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "decode_ab", **meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
