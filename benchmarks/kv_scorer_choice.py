"""Choose the SnapKV scorer's defaults: needle-token retention under Ada-KV, per scorer setting.

Bounded on purpose (CPU): one decoder prefill per needle case; inside it, every kept attention
layer scores its prompt with every candidate `SnapKVScorer`, splits the budget by Ada-KV and
records which share of the needle's tokens each (layer, KV head) keeps. Retention is a proxy for
retrieval (a needle that is evicted everywhere cannot be answered); the chosen default is then
checked on real answers by `rap kv needle`-style runs (benchmarks/kv_needle_decoder.py).

    PYTHONPATH=src python benchmarks/kv_scorer_choice.py --lengths 1024,2048 --depths 7 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", type=int, default=7)
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import rap.decode.decoder as decode
    import rap.decode.prefill as prefill
    from rap.eval.needle import build_case, default_spec
    from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer, adaptive_keep
    from rap.sources import load_view

    view, tok = load_view(args.model, dtype=torch.float32, device="cpu")
    spec = default_spec()
    needle = tok(spec.needle, add_special_tokens=False).input_ids
    budgets = [float(b) for b in args.budgets.split(",")]
    configs = [SnapKVScorer(w, p, k, g) for w, p, k, g in itertools.product((16, 32, 64), ("max", "avg"), (5, 7),
                                                                            ("mean", "max"))]
    tally = {(c, b): [] for c in configs for b in budgets}
    state = {}
    real = prefill.keep_prompt_flat  # what the prefill calls

    def probe(q, k, v, cache, plan, scaling):
        P = k.shape[2]
        lo, hi = state["needle"]
        for c in configs:
            scores = c(q, k, scaling, plan.pad)
            for b in budgets:
                kept = torch.tensor([max(1, int(-(-b * P // 1)))])
                keep = adaptive_keep(scores, kept)
                tally[(c, b)].append(float(keep[0, :, lo:hi].float().mean()))
        return real(q, k, v, cache, plan, scaling)

    prefill.keep_prompt_flat = probe
    dec = decode.Decoder(view)
    t0 = time.time()
    depths = [i / (args.depths - 1) for i in range(args.depths)]
    cases = 0
    for n in [int(x) for x in args.lengths.split(",")]:
        for d in depths:
            case = build_case(tok, n, d, spec)
            ids = case.context_ids[0].tolist() + case.question_ids[0].tolist()
            start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
            state["needle"] = (start, start + len(needle))
            dec.generate([ids], 1, kv_ratio=0.5)
            cases += 1
            print(f"length {n} depth {d:.2f} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = [{"window": c.window, "pool": c.pool, "kernel": c.kernel, "group": c.group, "budget": b,
             "needle_retention": sum(v) / len(v)} for (c, b), v in tally.items()]
    mean = {c: sum(r["needle_retention"] for r in rows if (r["window"], r["pool"], r["kernel"], r["group"]) ==
                   (c.window, c.pool, c.kernel, c.group)) / len(budgets) for c in configs}
    ranked = sorted(mean.items(), key=lambda kv: -kv[1])
    print(f"{'scorer':<44} " + " ".join(f"{b:>6.0%}" for b in budgets) + "   mean")
    for c, m in ranked:
        cells = [next(r["needle_retention"] for r in rows if r["budget"] == b and (r["window"], r["pool"], r["kernel"],
                                                                               r["group"]) == (c.window, c.pool, c.kernel,
                                                                                               c.group)) for b in budgets]
        print(f"{c.describe():<44} " + " ".join(f"{x:6.3f}" for x in cells) + f" {m:6.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kv-scorer-choice-{args.model}-{datetime.date.today().isoformat()}.json"
    import transformers

    path.write_text(json.dumps({
        "what": "share of the needle's tokens kept by Ada-KV, averaged over layers, KV heads and cases",
        "model": args.model, "cases": cases, "lengths": args.lengths, "depths": depths, "budgets": budgets,
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread, shared",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(["python", "benchmarks/kv_scorer_choice.py"] + (argv or sys.argv[1:])),
        "default_at_run": DEFAULT_SCORER.describe(), "best": ranked[0][0].describe(),
        "seconds": time.time() - t0, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
