"""Runtime policies on held-out (budget, request) scenarios: quality, fit, decision latency.

For every policy (the trained RL agent, the ladder enumeration, gsi-order, knapsack, ffn-first,
attn-first, the oracle) and every held-out scenario: decide (timed), check the decision with
MemoryModel.fits, and score it on *held-out* data:

    PPL ratio = exp( y_test(mask) + kv_test(r, prompt) )

* y_test(mask): log(PPL(mask) / PPL(dense)) MEASURED on WikiText-2 *test* windows (each distinct
  mask run once; the calibration data the policies were trained on is WikiText-2 *valid*);
* kv_test(r, prompt): the KV-compression penalty MEASURED once on the dense model on WikiText-2
  test spans (rap.kv AdaKV(SnapKV()); continuation NLL with the compressed prompt cache vs the
  full cache), interpolated in log2(prompt) like the policies' own (calibration) table. That the
  two effects add up is checked on a few pruned masks (`kv_additivity` in the JSON).

Scenarios: budget uniform in 30-100% of the dense need (bf16 plan), batch 1-64, prompt 64..context,
new tokens 16-1024 (log-uniform), seed different from training. Draws where not even the empty mask
fits are rejected (counted in the JSON, and every policy is checked to raise BudgetError on them).
KV-heavy = batch >= 16 or prompt >= 4096 (the issue's definition).

    python -m benchmarks.policy --policy-file policy.zip                  # SmolLM2, CPU, ~hour on 2 cores
    python -m benchmarks.policy --smoke                                   # stories260k, a minute
Writes $OUT/policy-<date>.json (+ -scenarios.json, + .png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, out_dir, print_table
from rap.data import WIKITEXT2_TEST, WIKITEXT2_VALID, read_text
from rap.errors import BudgetError
from rap.eval.perplexity import needs_bos, token_windows
from rap.core.mask import BlockMask

log = logging.getLogger("benchmarks.policy")
POLICIES = ("rl", "ladder", "gsi-order", "knapsack", "ffn-first", "attn-first", "gsi-order/kv1", "oracle")


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    ratios = np.array([r["ppl_ratio"] for r in rows])
    return {"n": len(rows), "mean_ppl_ratio": float(ratios.mean()), "geomean_ppl_ratio": float(np.exp(np.log(ratios).mean())),
            "median_ppl_ratio": float(np.median(ratios)), "fit_fraction": float(np.mean([r["fits"] for r in rows])),
            "mean_predicted_ppl_ratio": float(np.mean([r["predicted_ppl_ratio"] for r in rows]))}


def heldout_scenarios(ctx, n: int, seed: int):
    from rap.policy.workload import Workload

    rng = np.random.default_rng(seed)
    wl, keep, rejected = Workload(), [], []
    while len(keep) < n:
        sc = wl.sample(rng, ctx.memory)
        (keep if sc.budget_bytes >= ctx.smallest_peak(sc.request) else rejected).append(sc)
    return keep, rejected


def make_policies(ctx, bundle, calib_evaluator, oracle_top_k: int):
    from rap.policy import make_policy
    from rap.policy.baselines import make_baseline
    from rap.policy.oracle import OraclePolicy

    pol = {name: make_policy(name, ctx, bundle) for name in ("rl", "ladder", "gsi-order", "knapsack", "ffn-first",
                                                               "attn-first")}
    pol["gsi-order/kv1"] = make_baseline("gsi-order", ctx, kv_ratios=(1.0,))
    pol["gsi-order/kv1"].name = "gsi-order/kv1"
    shown = [pol[n] for n in ("rl", "ladder", "gsi-order", "knapsack", "ffn-first", "attn-first")]
    pol["oracle"] = OraclePolicy(ctx, measured=calib_evaluator, candidates=shown, top_k=oracle_top_k)
    return pol


def plot(path: Path, per_scenario: list[dict], policies: list[str], L: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(policies), 3, figsize=(15, 4.2 * len(policies)), squeeze=False)
    for row, name in enumerate(policies):
        rs = [r for r in per_scenario if r["policy"] == name]
        frac = np.array([r["budget_fraction"] for r in rs])
        batch = np.array([r["batch"] for r in rs])
        kv_share = np.array([r["dense_kv_share"] for r in rs])
        ffn = np.array([r["kept_ffn"] for r in rs])
        attn = np.array([r["kept_attn"] for r in rs])
        kv = np.array([r["kv_ratio"] for r in rs])
        ax = axes[row, 0]
        sc = ax.scatter(frac, attn - ffn, c=kv_share, cmap="viridis", s=18, vmin=0, vmax=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("budget / dense need")
        ax.set_ylabel("attention kept - FFN kept (blocks)")
        ax.set_title(f"{name}: which kind is pruned (colour: KV share of dense need)")
        fig.colorbar(sc, ax=ax)
        ax = axes[row, 1]
        for y, label, marker in ((ffn, "FFN kept", "o"), (attn, "attention kept", "x")):
            ax.scatter(kv_share, y, s=16, marker=marker, label=label, alpha=0.7)
        ax.set_xlabel("KV cache share of the dense need (grows with batch x length)")
        ax.set_ylabel(f"blocks kept (of {L})")
        ax.legend()
        ax.set_title(f"{name}: blocks kept vs KV share")
        ax = axes[row, 2]
        sc = ax.scatter(batch, kv + np.random.default_rng(0).uniform(-0.015, 0.015, len(kv)), c=frac, cmap="plasma",
                        s=18, vmin=0.3, vmax=1.0)
        ax.set_xscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("KV keep ratio")
        ax.set_title(f"{name}: KV ratio vs batch (colour: budget fraction)")
        fig.colorbar(sc, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def kv_additivity(view, stream, masks: list[BlockMask], prompt: int, ratios, cont: int) -> list[dict]:
    """Penalty of KV compression with blocks dropped vs on the dense model (same span)."""
    from rap.policy.evaluator import continuation_nll

    ids = stream[: prompt + cont][None]
    out = []
    for mask in [BlockMask.full(view.num_layers), *masks]:
        with view.masked(mask):
            nll = continuation_nll(view.model, ids, prompt, (1.0, *ratios))
        out.append({"drop": list(mask.dropped), "penalty": {str(r): (nll[r] - nll[1.0]) / cont for r in ratios}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy-file", type=Path, help="trained bundle from rap train-policy")
    ap.add_argument("--scenarios", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2026, help="held-out scenario seed (training used 0..)")
    ap.add_argument("--test-seq", type=int, default=512)
    ap.add_argument("--test-tokens", type=int, default=1024)
    ap.add_argument("--kv-prompts", default="64,256,1024,4096")
    ap.add_argument("--kv-samples", type=int, default=2)
    ap.add_argument("--oracle-top-k", type=int, default=2)
    ap.add_argument("--oracle-scenarios", type=int, default=50,
                    help="the oracle decides only the first N scenarios (it runs the model to re-rank); "
                         "`compare` puts every policy side by side on that subset")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset to run")
    ap.add_argument("--cache", type=Path, help="held-out measurement cache (default $OUT/policy-test-cache.json)")
    ap.add_argument("--calib-cache", type=Path, help="calibration cache of the training run (oracle re-ranking)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--smoke", action="store_true", help="stories260k, tiny everything (tests the script)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    from rap.sources import planning_memory
    from rap.policy.evaluator import MeasuredEvaluator, measure_kv_penalty
    from rap.policy.rl import Bundle
    from rap.sources import load_view

    out = out_dir()
    if args.smoke:
        args.model, args.scenarios, args.test_seq, args.test_tokens = "stories260k", 24, 64, 128
        args.kv_prompts, args.kv_samples = "32,128", 1
    view, tok = load_view(args.model, dtype=torch.float32, device="cpu")
    if args.smoke and args.policy_file is None:
        args.policy_file = smoke_bundle(view, tok, out)
    bundle = Bundle.load(args.policy_file)
    memory = planning_memory(args.model, bundle.meta.get("memory_dtype", "bf16"))
    ctx = bundle.context(memory)
    bos = needs_bos(tok, view.config.model_type)
    cal = bundle.quality.calibration
    n_win, seq = cal["windows"]
    calib = token_windows(read_text(WIKITEXT2_VALID)[: cal.get("chars", 400_000)], tok, seq,
                          cal.get("max_tokens", n_win * seq), bos=bos)
    calib_ev = MeasuredEvaluator(view, calib, cache_path=args.calib_cache)
    test_text = read_text(WIKITEXT2_TEST)
    test = token_windows(test_text[:200_000], tok, args.test_seq, args.test_tokens, bos=bos)
    test_ev = MeasuredEvaluator(view, test, cache_path=args.cache or out / "policy-test-cache.json", label="test")
    test_stream = tok(test_text[200_000:], add_special_tokens=False, return_tensors="pt").input_ids[0]

    scenarios, rejected = heldout_scenarios(ctx, args.scenarios, args.seed)
    policies = make_policies(ctx, bundle, calib_ev, args.oracle_top_k)
    policies = {n: p for n, p in policies.items() if n in args.policies.split(",")}
    for sc in rejected[:10]:  # every policy must refuse what cannot fit, not return something that does not
        for name, p in policies.items():
            try:
                p.decide(sc.request, sc.budget_bytes)
                raise AssertionError(f"{name} returned a decision for an infeasible scenario")
            except BudgetError:
                pass

    decisions: dict[str, list] = {}
    timing: dict[str, list] = {}
    for name, p in policies.items():
        decisions[name], timing[name] = [], []
        repairs0 = ctx.repairs
        for sc in scenarios[: args.oracle_scenarios] if name == "oracle" else scenarios:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            d = p.decide(sc.request, sc.budget_bytes)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            decisions[name].append(d)
            timing[name].append(((t1 - t0) / 1e6, (c1 - c0) / 1e6))
        log.info("%s: %d decisions, %d repaired", name, len(scenarios), ctx.repairs - repairs0)
        timing[name + ":repairs"] = ctx.repairs - repairs0
    # latency again, after every cache is warm, for the fast policies (wall clock on a shared CPU is noisy)
    for name in [n for n in ("rl", "ladder", "gsi-order", "knapsack", "ffn-first", "attn-first") if n in policies]:
        again = []
        for sc in scenarios:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            policies[name].decide(sc.request, sc.budget_bytes)
            again.append(((time.perf_counter_ns() - t0) / 1e6, (time.thread_time_ns() - c0) / 1e6))
        timing[name] = again

    masks = sorted({d.mask for ds in decisions.values() for d in ds}, key=lambda m: len(m.dropped))
    log.info("%d distinct masks to measure on %d held-out tokens", len(masks), test_ev.tokens)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    for m in tqdm(masks, desc="held-out PPL"):
        test_ev.log_ratio(m)
    test_ev.save()
    measure_seconds = time.perf_counter() - t0
    prompts = [int(x) for x in args.kv_prompts.split(",")]
    kv_key = {"model": args.model, "prompts": prompts, "samples": args.kv_samples, "ratios": list(ctx.kv_ratios)}
    kv_cache = test_ev.cache_path.with_name(test_ev.cache_path.stem + "-kv.json")
    if kv_cache.is_file() and json.loads(kv_cache.read_text()).get("key") == kv_key:
        from rap.policy.evaluator import KVPenalty

        kv_test = KVPenalty.from_dict(json.loads(kv_cache.read_text())["penalty"])
    else:
        kv_test = measure_kv_penalty(view, test_stream, prompts, ctx.kv_ratios, 64 if not args.smoke else 16,
                                     args.kv_samples)
        kv_cache.write_text(json.dumps({"key": kv_key, "penalty": kv_test.to_dict()}))
    # additivity check on the most chosen pruned masks that keep attention
    counts: dict = {}
    for ds in decisions.values():
        for d in ds:
            if not d.mask.is_full and d.kept_attn > 0:
                counts[d.mask] = counts.get(d.mask, 0) + 1
    top = [m for m, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:3]]
    if "rl" not in policies or "oracle" not in policies:  # a partial run: fill the caches only
        print("partial run: held-out caches filled")
        return
    additivity = kv_additivity(view, test_stream[-20_000:], top, 1024 if not args.smoke else 96,
                               (0.25, 0.1), 64 if not args.smoke else 16)

    per_scenario, rows = [], []
    for name, ds in decisions.items():
        recs = []
        for sc, d, (wall, cpu) in zip(scenarios, ds, timing[name]):
            y = test_ev.log_ratio(d.mask) + kv_test(d.kv_ratio, sc.request.prompt)
            dense = ctx.memory.breakdown(ctx.full, sc.request)
            rec = {"policy": name, **sc.to_dict(), "kv_heavy": sc.kv_heavy, "kept_attn": d.kept_attn,
                   "kept_ffn": d.kept_ffn, "kv_ratio": d.kv_ratio, "drop": list(d.mask.dropped),
                   "fits": ctx.memory.fits(sc.budget_bytes, d.mask, sc.request, d.kv_ratio),
                   "peak_bytes": d.breakdown.total_bytes, "ppl_ratio": math.exp(y), "log_ratio": y,
                   "predicted_ppl_ratio": d.predicted_ppl_ratio, "ms": wall, "cpu_ms": cpu,
                   "dense_kv_share": dense.kv_bytes / dense.total_bytes}
            recs.append(rec)
        per_scenario += recs
        ms = np.array([r["ms"] for r in recs])
        cpu = np.array([r["cpu_ms"] for r in recs])
        rows.append({"policy": name, **summarize(recs),
                     "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99)),
                     "repairs": timing[name + ":repairs"], "distinct_masks": len({d.mask for d in ds}),
                     "kv_light": summarize([r for r in recs if not r["kv_heavy"]]),
                     "kv_heavy": summarize([r for r in recs if r["kv_heavy"]])})

    by = {r["policy"]: r for r in rows}
    n_sub = min(args.oracle_scenarios, len(scenarios))
    subset = {name: summarize([r for r in per_scenario if r["policy"] == name][:n_sub]) for name in by}
    if "rl" not in by or "oracle" not in by:
        print_table(rows, ["policy", "mean_ppl_ratio", "geomean_ppl_ratio", "fit_fraction", "p50_ms", "p99_ms"])
        return
    # the default must fit always and decide in < 1 ms (CPU time: wall clock here is shared-machine noise)
    deployable = [r for r in rows if r["policy"] != "oracle" and r["fit_fraction"] == 1.0]
    fast = [r for r in deployable if r["cpu_p99_ms"] < 1.0] or deployable
    best = min(fast, key=lambda r: r["mean_ppl_ratio"])
    compare = {
        "oracle_subset": {"scenarios": n_sub, "by_policy": subset},
        "rl_vs_oracle_mean_ppl_ratio_gap": subset["rl"]["mean_ppl_ratio"] / subset["oracle"]["mean_ppl_ratio"] - 1,
        "rl_vs_oracle_geomean_ppl_ratio_gap": subset["rl"]["geomean_ppl_ratio"] / subset["oracle"]["geomean_ppl_ratio"] - 1,
        "rl_within_2pct_of_oracle": subset["rl"]["mean_ppl_ratio"] <= 1.02 * subset["oracle"]["mean_ppl_ratio"],
        "rl_vs_ladder_geomean_ppl_ratio_gap": by["rl"]["geomean_ppl_ratio"] / by["ladder"]["geomean_ppl_ratio"] - 1,
        "kv_heavy_mean_ppl_ratio": {n: by[n]["kv_heavy"].get("mean_ppl_ratio") for n in by},
        "kv_heavy_geomean_ppl_ratio": {n: by[n]["kv_heavy"].get("geomean_ppl_ratio") for n in by},
        "rl_beats_gsi_order_on_kv_heavy": by["rl"]["kv_heavy"]["mean_ppl_ratio"] < by["gsi-order"]["kv_heavy"]["mean_ppl_ratio"],
        "rl_beats_knapsack_on_kv_heavy": by["rl"]["kv_heavy"]["mean_ppl_ratio"] < by["knapsack"]["kv_heavy"]["mean_ppl_ratio"],
        "best_deployable_policy": best["policy"],
    }
    print_table(rows, ["policy", "mean_ppl_ratio", "geomean_ppl_ratio", "fit_fraction", "p50_ms", "p99_ms",
                       "cpu_p99_ms", "distinct_masks"])
    print_table([{"policy": r["policy"], **{f"light_{k}": r["kv_light"].get(k) for k in ("n", "mean_ppl_ratio")},
                  **{f"heavy_{k}": r["kv_heavy"].get(k) for k in ("n", "mean_ppl_ratio")}} for r in rows],
                ["policy", "light_n", "light_mean_ppl_ratio", "heavy_n", "heavy_mean_ppl_ratio"])
    print(json.dumps(compare, indent=1))
    stem = f"policy-{args.date}" + ("-smoke" if args.smoke else "")
    png = out / f"{stem}.png"
    plot(png, per_scenario, [p for p in ("rl", best["policy"], "gsi-order") if p in by][:3]
         if best["policy"] != "rl" else ["rl", "gsi-order"], ctx.num_layers)
    payload = {
        **environment(), "model": args.model, "rows": rows, "compare": compare,
        "policy_file": str(args.policy_file), "training": bundle.meta.get("training", {}) and {
            k: bundle.meta["training"].get(k) for k in ("timesteps", "seconds", "seed", "config", "versions")},
        "heldout": {"scenarios": len(scenarios), "seed": args.seed, "rejected_infeasible_draws": len(rejected),
                    "kv_heavy": int(sum(sc.kv_heavy for sc in scenarios)),
                    "ppl_windows": list(test.shape), "ppl_tokens": test_ev.tokens, "ppl_source": WIKITEXT2_TEST,
                    "masks_measured": len(masks), "measure_seconds": round(measure_seconds, 1),
                    "kv_penalty_test": kv_test.to_dict(), "kv_additivity": additivity,
                    "memory_plan": f"{bundle.meta.get('memory_dtype', 'bf16')} parameters/KV, MemoryModel on CPU "
                                   "(no cuBLAS workspace term)"},
        "calibration": {**bundle.quality.calibration, "kv_penalty": bundle.quality.kv_penalty.to_dict(),
                        "surrogate_fit_rmse": bundle.quality.surrogate.fit_rmse,
                        "surrogate_cv_rmse": bundle.quality.surrogate.cv_rmse},
        "plot": png.name, "notes": [
            "ppl_ratio = exp(measured held-out log-PPL ratio of the mask + measured-once held-out KV penalty)",
            "p50_ms/p99_ms: wall clock per decide() on a 2-core CPU shared with other jobs; cpu_*: thread CPU time",
            "oracle: evaluation only (surrogate-guided evolutionary search + measured calibration re-ranking, "
            "shown every other policy's decision)",
            "gsi-order/kv1: gsi-order without KV compression (the paper's two-knob setting)"],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{stem}-scenarios.json").write_text(json.dumps(per_scenario, default=str))
    print(f"wrote {out / (stem + '.json')}, {png}")


def smoke_bundle(view, tok, out: Path) -> Path:
    """A tiny policy for stories260k, trained in seconds (smoke runs only)."""
    from rap.core.memory import MemoryModel
    from rap.policy.context import PolicyContext
    from rap.policy.evaluator import MeasuredEvaluator
    from rap.policy.train import TrainConfig, base_meta, prepare_quality, train_agent

    text = read_text(WIKITEXT2_VALID)[:20_000]
    ev = MeasuredEvaluator(view, token_windows(text, tok, 64, 128), label="smoke")
    recipe = {"chars": 20_000, "max_tokens": 128}
    L = view.num_layers
    names = [f"{k}.{i}" for i in range(L) for k in ("attn", "ffn")]
    scores = {n: ev.log_ratio(BlockMask.from_drop(L, [n])) for n in names}
    profile = {"order": sorted(names, key=scores.get), "scores": scores}
    stream = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    quality, ladder = prepare_quality(view, profile, ev, kv_stream=stream, design_count=20, ladder_step=1,
                                      kv_prompt_lens=(32, 128), kv_samples=1, kv_continuation=16, progress=False)
    quality.calibration.update(recipe)
    ctx = PolicyContext(MemoryModel.from_view(view), profile["order"], quality, scores, ladder=ladder)
    meta = base_meta("stories260k", L, profile, quality, ladder, "fp32")
    path = out / "policy-smoke.zip"
    train_agent(ctx, meta, path, TrainConfig(steps=2048, n_steps=256, batch_size=64), progress=False)
    return path


if __name__ == "__main__":
    main()
