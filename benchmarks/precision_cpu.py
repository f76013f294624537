"""Precision levels on the CPU: WikiText-2 perplexity and decode tok/s of rap's plans against dense.

Model: SmolLM2-135M (real weights, fp32 on the CPU). Plans: dense, FFN int8, all int8, all int4 at each
group size the model's shapes allow (hidden 576 takes g64; g128 does not divide 576, so it is reported
as not allowed, as `rap` refuses it). Perplexity: the first `--windows` non-overlapping 2,048-token
windows of the WikiText-2 raw test (rap ppl's method), through the transformers forward with every
quantized block's linear weights replaced in place by the torchao tensors rap's decoder runs
(`WeightResidency.apply`): Int8Tensor and, on the CPU, Int4OpaqueTensor (tinygemm's values, torchao's
CPU int4 kernel). Decode: rap's Decoder (step "exact", one torch thread), batch 1, a 128-token prompt + 64
new tokens, best of `--repeats`; these are CPU figures on a shared 2-core box, not GPU speed-ups.

    PYTHONPATH=src:. python3 -m benchmarks.precision_cpu --windows 4      # writes benchmarks/results/...
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.common import environment, print_table
from rap.data import WIKITEXT2_TEST, read_text
from rap.decode.decoder import Decoder
from rap.eval.perplexity import needs_bos, perplexity, token_windows
from rap.core.memory import MemoryModel
from rap.core.plan import Plan, PlanError as _PlanError  # noqa: N814
from rap.policy.precision import precision_rungs
from rap.serve.residency import WeightResidency
from rap.sources import load_view


def plans_for(view) -> list[tuple[str, str]]:
    L = view.num_layers
    out = [(name, plan.spec() or "dense") for name, plan in precision_rungs(L, view.shape)]
    out = [(n, s) for n, s in out if n != "int4"]
    for g in (64, 128):
        out.append((f"int4g{g}", f"*=int4g{g}"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma list of rungs to (re)measure; rows of the others in --out "
                    "are kept (one slow CPU run can be split)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = Path(args.out or f"benchmarks/results/precision-cpu-{date}.json")
    rows = []
    result = {**environment("cpu"), "kind": "precision-cpu", "model": args.model,
              "ppl_method": f"first {args.windows} non-overlapping {args.seq_len}-token windows of {WIKITEXT2_TEST}, "
                            "exp(mean token NLL), transformers forward with rap's quantized weights in place",
              "decode_method": "rap Decoder step=exact, batch 1, prompt 128 + 64 new, greedy, best of "
                               f"{args.repeats}, one torch thread (CPU figures on a shared box)",
              "rows": rows}
    if args.only and out.exists():
        keep = set(args.only.split(","))
        old = json.loads(out.read_text())
        rows += [r for r in old.get("rows", []) if r.get("rung") not in keep]
        result["earlier_commands"] = [*old.get("earlier_commands", []), old.get("command")]
    view, tok = load_view(args.model, dtype=torch.float32, device="cpu")
    windows = token_windows(read_text(WIKITEXT2_TEST), tok, args.seq_len, None,
                            bos=needs_bos(tok, view.config.model_type))[: args.windows]
    mem = MemoryModel.from_view(view)
    dense_bytes = mem.param_bytes(Plan.full(view.num_layers))
    prompt = windows[0, :128].tolist()
    residency = WeightResidency(view, mem)
    for rung, spec in plans_for(view):
        if args.only and rung not in args.only.split(","):
            continue
        row = {"model": args.model, "rung": rung, "plan": spec}
        try:
            plan = Plan.parse(None if spec == "dense" else spec, view.num_layers).validate(view.shape)
        except _PlanError as e:
            row["status"] = f"not allowed: {e}"
            rows.append(row)
            print(rung, row["status"])
            continue
        residency.apply(plan)
        assert residency.measured_resident_bytes() == mem.param_bytes(plan)
        t = time.perf_counter()
        with torch.no_grad():
            res = perplexity(view.model, windows, 1, progress=False)
        row.update(ppl=res.ppl, tokens=res.tokens, ppl_seconds=time.perf_counter() - t,
                   param_bytes=mem.param_bytes(plan), param_ratio=mem.param_bytes(plan) / dense_bytes)
        dec = Decoder(view)
        torch.set_num_threads(1)  # batch-1 GEMVs: OpenMP wake-ups on a busy 2-core box cost more than they give
        speeds = []
        for _ in range(args.repeats):
            g = dec.generate([prompt], 64, mask=plan)
            speeds.append(g.timing.tokens_per_s)
        torch.set_num_threads(args.threads)
        row["decode_tok_s"] = max(speeds)
        row["decode_tok_s_all"] = speeds
        rows.append(row)
        print(json.dumps(row))
        out.write_text(json.dumps(result, indent=2))
    residency.apply(Plan.full(view.num_layers))
    rows.sort(key=lambda r: [n for n, _ in plans_for(view)].index(r["rung"]))
    dense = next(r for r in rows if r["rung"] == "dtype")
    for r in rows:
        if "ppl" in r:
            r["ppl_ratio"] = r["ppl"] / dense["ppl"]
            r["decode_speed_ratio_cpu"] = r["decode_tok_s"] / dense["decode_tok_s"]
    print_table([r for r in rows if "ppl" in r],
                ["rung", "plan", "param_ratio", "ppl", "ppl_ratio", "decode_tok_s", "decode_speed_ratio_cpu"])
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
