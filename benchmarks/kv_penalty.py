"""The policy's KV penalty as it is now measured: on rap's decoder (Ada-KV, 16-bit and int8 KV), beside the
HF path's Ada-KV (the comparison), on WikiText-2 test spans.

Prints both tables (added log-PPL per continuation token, by prompt length x keep ratio) and writes
kv-penalty-<model>-<date>.json with provenance. The int8 row at keep 1 is what int8 KV alone costs.

    PYTHONPATH=src python benchmarks/kv_penalty.py --prompts 256,1024 --continuation 32 --samples 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default="256,1024")
    ap.add_argument("--ratios", default="1,0.5,0.25,0.1")
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF-path comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rap import provenance
    from rap.data import data_file
    from rap.policy.evaluator import measure_kv_penalty
    from rap.sources import load_view

    view, tok = load_view(args.model, dtype=torch.float32, device=args.device)
    text = data_file("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    prompts = [int(x) for x in args.prompts.split(",")]
    need = args.samples * (max(prompts) + args.continuation)
    stream = tok(text[: need * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
    ratios = [float(x) for x in args.ratios.split(",")]
    t0 = time.time()
    dec = measure_kv_penalty(view, stream, prompts, ratios, args.continuation, args.samples, progress=False,
                             kv_bits=(16, 8))
    t_dec = time.time() - t0
    hf = None if args.no_hf else measure_kv_penalty(view.model, stream, prompts, ratios, args.continuation,
                                                     args.samples, progress=False)
    rows = {"decoder 16-bit": dec.table, "decoder int8": dec.int8_table}
    if hf is not None:
        rows["hf path 16-bit"] = hf.table
    print(f"added log-PPL per token on {args.model} ({args.samples} x {args.continuation} tokens per prompt length)")
    print("setting          prompt  " + "  ".join(f"r={r:<6g}" for r in dec.ratios))
    for name, table in rows.items():
        for P, row in zip(prompts, table):
            print(f"{name:<16} {P:>6}  " + "  ".join(f"{v:<8.4f}" for v in row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kv-penalty-{args.model}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({**provenance.environment(view.device), "model": args.model,
                                "command": " ".join(["python", "benchmarks/kv_penalty.py", *(argv or sys.argv[1:])]),
                                "data": "wikitext-2-raw/wiki.test.raw", "decoder": dec.to_dict(),
                                "hf_path": None if hf is None else hf.to_dict(), "seconds_decoder": t_dec,
                                "seconds": time.time() - t0}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
