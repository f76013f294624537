"""Zero-shot at a fraction of the bytes: dense vs the default level policy's plan, 8 tasks x N documents.

The plan is what `rap.policy.make_level_policy(DEFAULT_LEVEL_POLICY, ...)` decides at `--budget` of the
dense need (batch 1, prompt 512, 128 new tokens; the memory model of the device the model runs on),
over the bundled level profile. Scoring: lm-eval through rap.eval.harness on
rap's forward; a Plan's int8 / int4 blocks run with their quantized values
(rap.core.quant.fake_quantize). Reports, over the tasks: the raw share (mean headline accuracy /
dense's) and the above-chance share ((acc - chance) / (dense - chance), per task, averaged), BoolQ apart
(pruned models drift to its majority answer). The JSON is rewritten after every task (partial results).

    nice -n 10 env PYTHONPATH=src OMP_NUM_THREADS=2 python -m benchmarks.zeroshot_levels --limit 500 \\
        --budget 0.5 --out benchmarks/results/zeroshot-levels-smollm2-135m-cpu-2026-12-02.json
    # the target setting on a GPU (minutes): add --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TASK_ORDER = ("piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "hellaswag", "lambada_openai", "boolq")


def shares(dense: dict, ours: dict, apart=("boolq",)) -> dict:
    """rap.eval.harness.kept_fraction over the tasks both scored (`apart` reported alone), {} before any."""
    from rap.eval.harness import kept_fraction
    from rap.errors import RapError

    try:
        return kept_fraction({"tasks": ours}, {"tasks": dense}, apart)
    except RapError:  # no task scored by both yet
        return {}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of the dense need")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tasks", default=",".join(TASK_ORDER))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--policy", default=None, help="level policy (default: rap.policy.DEFAULT_LEVEL_POLICY)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--bytes-device", default=None, help="cpu | cuda memory model the plan is made for "
                    "(default: the device the model runs on)")
    ap.add_argument("--plan-dtype", default=None, help="decide the plan for the dense need at this dtype (bf16: "
                    "the serving dtype; the CPU memory model from the config) while scoring in --dtype")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from benchmarks.common import environment
    from rap.core.memory import MemoryModel, Request
    from rap.eval.harness import evaluate
    from rap.policy import DEFAULT_LEVEL_POLICY, bundled_level_profile, make_level_policy
    from rap.sources import load_view

    view, tok = load_view(args.model, dtype=args.dtype, device=args.device)
    on_cuda = (args.bytes_device or view.device.type) == "cuda"
    if args.plan_dtype:
        from rap.sources import planning_memory

        if on_cuda:
            raise SystemExit("--plan-dtype plans with the CPU memory model; leave --bytes-device unset")
        memory = planning_memory(args.model, args.plan_dtype)
    else:
        memory = MemoryModel.from_view(view, on_cuda=on_cuda)
    request = Request(batch=1, prompt=512, new_tokens=128)
    policy_name = args.policy or DEFAULT_LEVEL_POLICY
    policy = make_level_policy(policy_name, memory, bundled_level_profile(args.model))
    budget = int(args.budget * memory.dense_need(request))
    decision = policy.decide(request, budget)
    plan = decision.mask
    from rap.core.plan import Plan

    dense_plan = Plan.full(view.num_layers)
    out = Path(args.out)
    payload = {**environment(view.device), "model": args.model, "limit": args.limit,
               "budget_ratio": args.budget, "policy": policy_name,
               "plan_dtype": args.plan_dtype or str(view.dtype).replace("torch.", ""), "memory_model_device": "cuda" if on_cuda else "cpu", "plan": plan.spec(), "counts": plan.counts(),
               "param_bytes_ratio": memory.param_bytes(plan) / memory.param_bytes(dense_plan),
               "scoring": "lm-eval (rap.eval.harness) on rap.core.forward; quantized blocks by rap.core.quant.fake_quantize",
               "dense": {}, "plan_results": {}, "seconds": {}}
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    for name in names:
        for label, p in (("dense", dense_plan), ("plan_results", plan)):
            t = time.perf_counter()
            r = evaluate(view, tok, [name], limit=args.limit, batch_size=args.batch_size, mask=p,
                         progress=False)["tasks"][name]
            payload[label][name] = r
            payload["seconds"][f"{label}:{name}"] = time.perf_counter() - t
            print(f"{name:16s} {label:12s} {r} ({time.perf_counter() - t:.0f} s)", flush=True)
        payload["summary"] = shares(payload["dense"], payload["plan_results"])  # BoolQ apart
        payload["complete"] = all(n in payload["plan_results"] for n in names)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload.get("summary"), indent=1))


if __name__ == "__main__":
    main()
