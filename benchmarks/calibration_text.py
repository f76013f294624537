"""Why WikiText-2 valid's `<unk>` markers are taken out of the calibration text (rap.profile.calibration).

The 60% plans of the H200 frontier run (levels-smollm2-135m-h200-cpubytes-library-2026-12-02.json: the plan
library's pick and int8-only's), scored as PPL ratio to dense on 8 x 2,048-token windows each of: WikiText-2
valid (the tokenized release, with `<unk>`), the same text with the markers out, and the raw test text. CPU,
fp32, rap.core.forward with fake-quantized values; ~11 minutes on one core.

    PYTHONPATH=src python -m benchmarks.calibration_text
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def main() -> None:
    import torch

    from benchmarks.common import environment
    from rap.core.plan import Plan
    from rap.data import WIKITEXT2_TEST, WIKITEXT2_VALID, read_text
    from rap.eval.perplexity import needs_bos, token_windows
    from rap.profile.levels import LevelRunner, plan_nll
    from rap.sources import load_view

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    view, tok = load_view("smollm2-135m")
    frontier = Path("benchmarks/results/levels-smollm2-135m-h200-cpubytes-library-2026-12-02.json")
    rows = json.loads(frontier.read_text())["rows"]
    plans = {r["policy"]: Plan.parse(r["plan"], view.num_layers) for r in rows
             if r["budget_ratio"] == 0.6 and r["policy"] in ("library", "int8-only")}
    plans["dense"] = Plan.full(view.num_layers)
    bos = needs_bos(tok, view.config.model_type)
    valid, test = read_text(WIKITEXT2_VALID), read_text(WIKITEXT2_TEST)
    sets = {"valid windows 64-71 (with <unk>)": token_windows(valid, tok, 2048, None, bos=bos)[64:72],
            "valid windows 0-7, <unk> removed": token_windows(valid.replace(" <unk>", ""), tok, 2048, None, bos=bos)[:8],
            "test windows 0-7": token_windows(test, tok, 2048, None, bos=bos)[:8],
            "test windows 70-77": token_windows(test, tok, 2048, None, bos=bos)[70:78]}
    runner, out = LevelRunner(view), {}
    for name, windows in sets.items():
        nll = {k: plan_nll(runner, windows, p) for k, p in plans.items()}
        out[name] = {k: math.exp(v - nll["dense"]) for k, v in nll.items() if k != "dense"}
        print(f"{name:36s} " + "  ".join(f"{k} {v:.4f}x" for k, v in out[name].items()), flush=True)
    dest = Path(os.environ.get("OUT", "benchmarks/results")) / "calibration-text-smollm2-135m-cpu.json"
    dest.write_text(json.dumps({**environment(torch.device("cpu")), "plans_from": str(frontier),
                                "plans": {k: p.spec() for k, p in plans.items()}, "ppl_ratio_to_dense": out}, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
