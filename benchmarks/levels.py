"""Precision levels x block drops: each policy's plan per budget, scored by MEASURED held-out perplexity.

Budgets are fractions of the dense need (`MemoryModel.dense_need`) of one request (batch 1, prompt
512, 128 new tokens; KV keep ratio 1: KV compression is not part of this comparison). Policies:

* solver         rap.policy.solver (multiple-choice knapsack over the level profile's single-move costs)
* solver-marginal the solver on the greedy pass's re-measured rises where it has them (interactions)
* solver-greedy-drops  drops in the greedy pass's order (re-measured rises), levels of the rest by the knapsack
* greedy-profile the longest prefix of the level profile's greedy moves that fits
* drop-only      today's default (`rap.policy.DEFAULT_POLICY`, the mask ladder over the GSI profile)
* int8-only / int4-only   the solver with only that level (plus dtype): a single-knob curve
* int8-then-drop every block int8, then the default drop policy on the int8 memory model
* precision-ladder        rap.policy.precision's fixed rungs (dtype, ffn-int8, int8, int4, int4+drops)
* rl             the MaskablePPO agent on the joint action (rap.policy.level_rl; `--agent`, from
                 benchmarks/level_agent.py), when its file exists

Quality: WikiText-2 *test* perplexity of each chosen plan (calibration was WikiText-2 valid),
measured with rap.core.forward and rap.core.quant.fake_quantize (the int8/int4 kernels' values, dequantized),
`--windows` windows of `--seq-len` tokens (the target setting is the full test set at 2,048:
`--windows 0`). Writes levels-<date>.json and .png under $OUT (default benchmarks/results).

    # target setting (GPU, minutes):
    PYTHONPATH=src python -m benchmarks.levels --profile $OUT/levels-smollm2-135m.json --windows 0 \\
        --seq-len 2048 --device cuda --dtype bf16 --bytes-device cuda
    # CPU, bounded (what the CPU row in the report used):
    PYTHONPATH=src python -m benchmarks.levels --profile src/rap/assets/profiles/smollm2-135m-levels.json \\
        --windows 1 --seq-len 512 --budgets 0.4,0.5,0.7,1.0
    python -m benchmarks.levels --smoke      # stories260k, makes its own level profile
"""

from __future__ import annotations

import argparse
import datetime
import os
import json
import math
import time
from pathlib import Path

import numpy as np

TARGETS = {0.7: 1.02, 0.5: 1.10, 0.4: 1.6}


def build_policies(view, memory, level_prof, gsi_prof: dict, request, agent_path=None):
    """name -> pick(budget) -> Plan | None: rap.policy.library's generators (the knapsack and its variants, the
    single knobs, the greedy profile, drop-only), the library policy (rap's default when the profile has a
    library) and the RL agent; plus the policy rap decides with (the library, else the knapsack: its decide latency)."""
    from rap.policy.library import LibrarySolver, generators
    from rap.policy.solver import make_solver

    knapsack = make_solver(memory, level_prof)
    picks = generators(memory, level_prof, request, gsi_prof, knapsack=knapsack)
    default = knapsack
    if level_prof.library:
        default = library = LibrarySolver(knapsack, level_prof.library, level_prof.dense_nll)
        picks["library"] = lambda b: library.decide(request, b).mask
    if agent_path is not None and Path(agent_path).exists():  # the RL agent on the joint action (level_rl)
        from rap.policy.level_rl import LevelAgentPolicy, load_level_agent

        actor, record = load_level_agent(agent_path)
        if record.get("model") in (None, view.name):  # an agent is trained for one model's blocks
            agent = LevelAgentPolicy(knapsack, actor)
            picks["rl"] = lambda b: agent.decide(request, b).mask
    return picks, default


def decide_p99_ms(solver, memory, seed: int = 0, n: int = 500) -> float:
    from rap.core.memory import Request

    rng = np.random.default_rng(seed)
    times = []
    for _ in range(n):
        req = Request(batch=int(rng.integers(1, 9)), prompt=int(rng.integers(16, 1024)),
                      new_tokens=int(rng.integers(8, 256)))
        budget = int(memory.dense_need(req) * rng.uniform(0.3, 1.0))
        t = time.perf_counter()
        try:
            solver.decide(req, budget)
        except Exception:  # BudgetError on hopeless draws is part of the timing too
            pass
        times.append(time.perf_counter() - t)
    return float(np.percentile(times[50:], 99) * 1e3)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sorted({r["policy"] for r in rows}):
        pts = sorted((r["param_bytes_ratio"], r["ppl"]) for r in rows if r["policy"] == name and r["ppl"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, lw=2.5 if name in ("solver", "library") else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("parameter bytes / dense parameter bytes")
    ax.set_ylabel("held-out perplexity (WikiText-2 test)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", help="level profile JSON (rap profile MODEL --method levels)")
    ap.add_argument("--gsi-profile", help="drop-only order (default: the bundled profile of the model)")
    ap.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--windows", type=int, default=8, help="test windows (0 = the whole test set)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--bytes-device", default=None, help="cpu | cuda memory model (default: the model's device)")
    ap.add_argument("--smoke", action="store_true", help="stories260k, its own small level profile")
    ap.add_argument("--agent", default="benchmarks/results/level-agent-smollm2-135m-2026-12-02.zip",
                    help="the RL agent (benchmarks/level_agent.py) for policy 'rl' (skipped when the file is absent)")
    ap.add_argument("--policies", default=None, help="comma-separated subset of the policies (default: all)")
    ap.add_argument("--reuse", action="append", default=[],
                    help="a previous levels-*.json: its measured plans are not measured again when its eval "
                         "settings (file, windows, seq_len, dtype) are these (rows say 'reused')")
    args = ap.parse_args(argv)

    from benchmarks.common import environment, print_table
    from rap.data import WIKITEXT2_TEST, read_text
    from rap.eval.perplexity import needs_bos, token_windows
    from rap.core.memory import MemoryModel, Request
    from rap.core.plan import Plan
    from rap.profile.levels import LevelRunner, level_profile, load_level_profile, plan_nll
    from rap.sources import load_view

    if args.smoke:
        args.model, args.seq_len, args.windows = "stories260k", 256, 2
    view, tok = load_view(args.model, dtype=args.dtype, device=args.device)
    if args.profile:
        lp = load_level_profile(args.profile)
    else:
        from rap.profile import load_calibration

        cal = load_calibration(tok, view.config.model_type, tokens=2048, seq_len=min(256, args.seq_len))
        lp = level_profile(view, cal, steps=None, remeasure=3, progress=False)
        from rap.policy.library import build_library, selection_windows

        build_library(view, selection_windows(tok, view.config.model_type, lp, 2048), lp, progress=False)
    gsi_path = args.gsi_profile or Path(__import__("rap").__file__).parent / "assets" / "profiles" / f"{args.model}.json"
    gsi_prof = json.loads(Path(gsi_path).read_text())
    on_cuda = (args.bytes_device or view.device.type) == "cuda"
    memory = MemoryModel.from_view(view, on_cuda=on_cuda)
    request = Request(batch=1, prompt=min(512, args.seq_len), new_tokens=128)
    dense_need = memory.dense_need(request)
    policies, deciding = build_policies(view, memory, lp, gsi_prof, request, args.agent)
    default = "library" if "library" in policies else "solver"  # what rap decides with for this profile
    if args.policies:
        wanted = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in policies]
        if unknown:
            raise SystemExit(f"unknown policies {unknown}; known: {', '.join(policies)}")
        policies = {k: policies[k] for k in wanted}

    windows = token_windows(read_text(WIKITEXT2_TEST), tok, args.seq_len, None,
                            bos=needs_bos(tok, view.config.model_type))
    if args.windows:
        windows = windows[:args.windows]
    windows = windows.to(view.device)
    runner = LevelRunner(view)
    cache: dict = {}
    reused: dict = {}
    eval_key = (WIKITEXT2_TEST, int(windows.shape[0]), args.seq_len, str(view.dtype).replace("torch.", ""))
    for path in args.reuse:
        old = json.loads(Path(path).read_text())
        e = old.get("eval", {})
        if (e.get("file"), e.get("windows"), e.get("seq_len"), e.get("dtype")) != eval_key or old.get("model") != args.model:
            raise SystemExit(f"--reuse {path}: its eval settings {e} are not this run's {eval_key}")
        for r in old["rows"]:
            if r.get("ppl") and r.get("plan"):
                reused[Plan.parse(r["plan"], view.num_layers)] = (math.log(r["ppl"]), path)
    dense_param = memory.param_bytes(Plan.full(view.num_layers))

    def measure(plan):
        if plan not in cache:
            if plan in reused:
                cache[plan] = reused[plan][0]
            else:
                cache[plan] = plan_nll(runner, windows, plan, batch=4 if view.device.type == "cuda" else 1)
        return cache[plan]

    t0 = time.perf_counter()
    dense_nll = measure(Plan.full(view.num_layers))
    rows = []
    for frac in [float(x) for x in args.budgets.split(",")]:
        budget = int(frac * dense_need)
        for name, pick in policies.items():
            try:
                plan = pick(budget)
            except Exception as e:  # BudgetError: nothing this policy knows fits
                plan, err = None, f"{type(e).__name__}: {e}"
            else:
                err = None if plan is not None else "no plan of this knob fits"
            row = {"policy": name, "budget_ratio": frac, "budget_bytes": budget}
            if plan is None:
                rows.append({**row, "ppl": None, "ppl_ratio": None, "error": err})
                continue
            nll = measure(plan)
            rows.append({**row, "plan": plan.spec() or "*=dtype", "counts": plan.counts(),
                         "param_bytes_ratio": memory.param_bytes(plan) / dense_param,
                         "peak_bytes": memory.peak_bytes(plan, request), "fits": memory.fits(budget, plan, request),
                         "ppl": math.exp(nll), "ppl_ratio": math.exp(nll - dense_nll),
                         **({"reused": reused[plan][1]} if plan in reused else {})})
            print(f"{frac:.2f} {name:16s} ppl {math.exp(nll):9.3f} ({math.exp(nll - dense_nll):.3f}x) {plan.counts()}",
                  flush=True)
        partial = Path(os.environ.get("OUT") or "benchmarks/results") / f"levels-{args.model}-partial.json"
        partial.parent.mkdir(parents=True, exist_ok=True)  # a long run can be read (and --reuse'd) as it goes
        partial.write_text(json.dumps({"model": args.model, "dense_ppl": math.exp(dense_nll), "rows": rows,
                                       "eval": {"file": WIKITEXT2_TEST, "windows": int(windows.shape[0]),
                                                "seq_len": args.seq_len,
                                                "dtype": str(view.dtype).replace("torch.", "")}}, indent=1))
    seconds = time.perf_counter() - t0
    p99 = decide_p99_ms(deciding, memory)
    ratio = {(r["budget_ratio"], r["policy"]): r["ppl_ratio"] for r in rows if r["ppl_ratio"]}
    targets = {}
    for frac, limit in TARGETS.items():
        got = ratio.get((frac, default))
        if got:
            targets[f"{frac:.0%}"] = {"limit": limit, "policy": default, "ppl_ratio": got, "met": got <= limit}
    # issue 15's frontier: the default at or below every single-knob curve at every budget (where the knob fits)
    knobs = ("drop-only", "int8-only", "int4-only", "int8-then-drop")
    frontier = {}
    for frac in sorted({r["budget_ratio"] for r in rows}):
        ours = ratio.get((frac, default))
        above = {k: ratio[(frac, k)] for k in knobs if (frac, k) in ratio and ours is not None and ours > ratio[(frac, k)]}
        anything = any(r["ppl_ratio"] for r in rows if r["budget_ratio"] == frac)
        frontier[f"{frac:.2f}"] = {"policy": default, "ppl_ratio": ours, "knobs_below": above,
                                   "met": (ours is not None and not above) if anything else None}  # None: nothing fits
    rl_gap = {}
    for frac in sorted({r["budget_ratio"] for r in rows}):
        got = {r["policy"]: r["ppl_ratio"] for r in rows if r["budget_ratio"] == frac and r["ppl_ratio"]}
        for base in ("solver", default):
            if "rl" in got and base in got:
                rl_gap.setdefault(base, {})[f"{frac:.2f}"] = got["rl"] / got[base]
    wins = {}
    for frac in sorted({r["budget_ratio"] for r in rows}):
        here = [r for r in rows if r["budget_ratio"] == frac and r["ppl"]]
        if here:
            wins[f"{frac:.2f}"] = min(here, key=lambda r: r["ppl"])["policy"]
    print_table([r for r in rows], ["budget_ratio", "policy", "ppl", "ppl_ratio", "param_bytes_ratio", "fits"])
    print(f"dense ppl {math.exp(dense_nll):.3f}; targets {targets}; best per budget {wins}; "
          f"{default} decide p99 {p99:.3f} ms (CPU)")
    print("frontier (default at or below every single knob): "
          + ", ".join(f"{k} " + ("nothing fits" if v["met"] is None else "met" if v["met"] else f"MISSED {v['knobs_below']}")
                     for k, v in frontier.items()))
    env = environment(view.device)
    device = env["device"]
    date = datetime.date.today().isoformat()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"levels-{args.model}-{view.device.type}-{date}"
    payload = {**env, "model": args.model,
               "eval": {"file": WIKITEXT2_TEST, "windows": int(windows.shape[0]), "seq_len": args.seq_len,
                        "dtype": str(view.dtype).replace("torch.", ""),
                        "how": "rap.core.forward with rap.core.quant.fake_quantize values (not the int8/int4 kernels)"},
               "request": {"batch": request.batch, "prompt": request.prompt, "new_tokens": request.new_tokens},
               "memory_model_device": "cuda" if on_cuda else "cpu", "dense_need_bytes": dense_need,
               "level_profile": {"path": args.profile, "calibration": lp.calibration, "device": lp.device},
               "dense_ppl": math.exp(dense_nll), "rows": rows, "targets": targets, "default_policy": default, "frontier": frontier,
               "best_per_budget": wins, "rl_ppl_over": rl_gap, "decide_p99_ms": {default: p99}, "seconds": seconds, "reused_from": args.reuse}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(rows, out / f"{stem}.png", f"{args.model}: held-out PPL ({int(windows.shape[0])} x {args.seq_len} test tokens) "
         f"vs parameter bytes, {device}")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
