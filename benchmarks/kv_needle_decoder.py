"""Needle retrieval under KV compression on rap's decoder (and rap.kv's HF path), accuracy vs real KV bytes.

Settings: full cache, uniform SnapKV (decoder), Ada-KV (decoder), Ada-KV (HF path, rap.kv.compress),
int8 KV at 100%, int8 + Ada-KV. Three needles (the gkamradt default and two more), lengths x depths.
Writes benchmarks/results/kv-needle-decoder-<model>-<date>.json and .png (accuracy against mean KV
bytes, one line per press) and prints the table.

    PYTHONPATH=src python benchmarks/kv_needle_decoder.py --lengths 1024,2048 --depths 7 --budgets 0.05,0.1,0.2,0.5
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

NEEDLES = [
    None,  # the default: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    ("\nThe secret ingredient in Grandma Rosa's famous soup is smoked paprika.\n",
     "What is the secret ingredient in Grandma Rosa's famous soup?", ("smoked", "paprika")),
    ("\nThe password for the old lighthouse door is blue pelican.\n",
     "What is the password for the old lighthouse door?", ("blue", "pelican")),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", type=int, default=7)
    ap.add_argument("--needles", default="0,1,2", help="which of NEEDLES (indices)")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.5")
    ap.add_argument("--hf-budgets", default="0.1,0.2", help="budgets for rap.kv's HF-path Ada-KV ('' to skip)")
    ap.add_argument("--hf-lengths", default="1024", help="lengths for the HF path (it has no prefill replay)")
    ap.add_argument("--int8-budget", type=float, default=0.2)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--skip", default="", help="comma list of settings to leave out (full, int8, snapkv, adakv, "
                                               "int8+adakv)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rap import provenance
    from rap.decode.decoder import Decoder
    from rap.eval.needle import NeedleSpec, build_case, default_spec, score_answer
    from rap.eval.needle_decoder import KVSetting, run_needle_decoder
    from rap.kv import AdaKV, Budget, SnapKV, compress
    from rap.kv.report import table_text
    from rap.kv.scorer import DEFAULT_SCORER
    from rap.core.hf import cache_kwargs
    from rap.sources import load_view

    view, tok = load_view(args.model, dtype=torch.float32, device="cpu")
    needle_ids = [int(i) for i in args.needles.split(",")]
    specs = [default_spec() if NEEDLES[i] is None else NeedleSpec(*NEEDLES[i]) for i in needle_ids]
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [i / (args.depths - 1) for i in range(args.depths)]
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = [KVSetting("full"), KVSetting("int8", 1.0, None, 8)]
    settings += [KVSetting("snapkv", b, "snapkv") for b in budgets]
    settings += [KVSetting("adakv", b, "adakv") for b in budgets]
    settings.append(KVSetting("int8+adakv", args.int8_budget, "adakv", 8))
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    settings = [s for s in settings if s.name not in skip]
    t0 = time.time()
    dec = Decoder(view)
    rows = run_needle_decoder(dec, tok, settings, lengths, depths, specs, args.max_new)
    for r in rows:
        r["needle"] = needle_ids[r["needle"]]
    hf_budgets = [float(b) for b in args.hf_budgets.split(",") if b.strip()]
    hf_lengths = [int(x) for x in args.hf_lengths.split(",") if x.strip()]
    for spec_i, spec in enumerate(specs):
        for n in hf_lengths:
            for d in depths:
                case = build_case(tok, n, d, spec)
                ids = torch.cat([case.context_ids, case.question_ids], 1)
                for b in hf_budgets:
                    comp = compress(view, AdaKV(SnapKV()), ids, Budget(kv_ratio=b), reserve=args.max_new)
                    nbytes = comp.cache.nbytes
                    first = comp.next_logits.argmax(-1, keepdim=True)
                    out = view.model.generate(torch.cat([ids, first], 1), **cache_kwargs(comp.cache),
                                              max_new_tokens=args.max_new - 1, do_sample=False, temperature=None,
                                              top_p=None, top_k=None, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.eos_token_id)
                    new = [int(first)] + out[0, ids.shape[1] + 1:].tolist()
                    answer = tok.decode(new, skip_special_tokens=True)
                    rows.append({"press": "adakv (hf path)", "budget": b, "kv_bits": 16, "length": n, "depth": d,
                                 "needle": needle_ids[spec_i], "score": score_answer(answer, spec), "kv_bytes": nbytes,
                                 "prompt_tokens": ids.shape[1], "answer": answer.strip()[:160]})
    summary, kv = {}, {}
    for r in rows:
        summary.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r["score"])
        kv.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r["kv_bytes"])
    cases = {p: {b: len(v) for b, v in d.items()} for p, d in summary.items()}
    summary = {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in summary.items()}
    kv = {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in kv.items()}
    title = f"needle on {args.model} via rap's decoder, lengths {lengths}, {len(depths)} depths, {len(specs)} needles"
    print(table_text(summary, "{:.3f}", title))
    print(table_text({p: {b: v / 2**20 for b, v in d.items()} for p, d in kv.items()}, "{:.1f}", "mean KV MiB"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kv-needle-decoder-{args.model}-{datetime.date.today().isoformat()}{args.tag}"
    payload = {**provenance.environment(), "eval": "needle (decoder)", "model": args.model,
               "command": " ".join(["python", "benchmarks/kv_needle_decoder.py"] + (argv if argv is not None
                                                                                     else sys.argv[1:])),
               "machine_note": "1 torch thread on a 2-core machine shared with other jobs", "scorer": DEFAULT_SCORER.describe(),
               "lengths": lengths, "depths": depths, "needles": [s.needle.strip() for s in specs],
               "hf_path": {"budgets": hf_budgets, "lengths": hf_lengths}, "max_new_tokens": args.max_new,
               "summary": summary, "mean_kv_bytes": kv, "cases": cases, "seconds": time.time() - t0, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    plot(summary, kv, out / f"{stem}.png", title)
    print(f"wrote {out / stem}.json and .png")
    return 0


def plot(summary: dict, kv: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6))
    colors = plt.cm.tab20.colors  # more presses than the default cycle's 10 colours
    for i, (press, d) in enumerate(summary.items()):
        xs = sorted(d, key=lambda b: kv[press][b])
        ax.plot([kv[press][b] / 2**20 for b in xs], [d[b] for b in xs], marker="os^D"[i % 4], label=press,
                color=colors[(2 * i) % 20 + (i // 10) % 2], ls="--" if "kvpress" in press or "hf path" in press else "-")
        for b in xs:
            ax.annotate(f"{float(b):.0%}", (kv[press][b] / 2**20, d[b]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes held (MiB, mean over cases, measured)")
    ax.set_ylabel("needle accuracy")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
