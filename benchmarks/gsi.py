"""GSI cost: exact vs the plain algorithm, racing vs exact, and GPU time on a 7B-shaped model.

    python benchmarks/gsi.py timing                 # GPU: Llama-2-7B shape, RANDOM weights (timing only)
    python benchmarks/gsi.py timing --smoke         # the same path on CPU with a tiny config
    python benchmarks/gsi.py compare --model smollm2-135m --tokens 512 --seq-len 256 --steps 3
    python benchmarks/gsi.py agreement EXACT.json RACING.json
    python benchmarks/gsi.py headline --compare C.json --agreement A.json --curve K.json [--gpu G.json]

Every mode prints one table and writes JSON (machine, date, versions, command) to $OUT (default ./out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, print_table, shape_config, write_json  # noqa: E402


def llama2_7b_config(smoke: bool):
    return shape_config("tiny-llama-4l" if smoke else "llama-2-7b")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _time_pieces(runner, h: torch.Tensor, ids: torch.Tensor, repeats: int = 3) -> dict:
    """Seconds per window for one attention block, one FFN block and the head (logits + NLL)."""
    out = {}
    for key, fn in (("attn", lambda: runner.run_block("attn.1", h)), ("ffn", lambda: runner.run_block("ffn.1", h)),
                    ("head", lambda: runner.window_nll(h, ids))):
        fn()
        _sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync()
        out[key] = (time.perf_counter() - t) / repeats / h.shape[0]
    return out


def timing(args) -> None:
    """Per-step time of exact and racing GSI on a Llama-2-7B-shaped model with random weights."""
    from rap.core.model import BlockView
    from rap.profile import Calibration, Racing, gsi
    from rap.profile.runner import BlockRunner
    from rap.sources import load_view, model_from_config

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    if args.model:
        view, _ = load_view(args.model, dtype="bf16", device=device)
        weights = f"{args.model} (real weights)"
    else:
        torch.manual_seed(0)
        config = llama2_7b_config(args.smoke)
        view = BlockView(model_from_config(config, dtype=dtype, device=device), name="llama-2-7b-shape-random")
        weights = "RANDOM weights (Llama-2-7B shape): timing only, the orders mean nothing"
    load_seconds = time.perf_counter() - t0
    windows, seq_len = (8, 64) if args.smoke else (args.windows, args.seq_len)
    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randint(0, view.shape.vocab_size, (windows, seq_len), generator=g),
                        "random token ids (timing only)", 0)
    runner = BlockRunner(view)
    b = min(args.batch_windows, windows)
    ids = calib.windows[:b].to(device)
    pieces = _time_pieces(runner, runner.embed(ids), ids)
    cache_bytes = int(args.cache_gib * 2**30) if args.cache_gib is not None else None
    common = dict(progress=True, batch_windows=args.batch_windows, cache_bytes=cache_bytes, predict=args.predict)

    rows, runs = [], {}
    deadline = t0 + args.time_limit
    for label, racing, steps in (("exact", None, args.exact_steps), ("racing", Racing(), args.racing_steps)):
        if steps <= 0 or time.perf_counter() > deadline:
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        prof = gsi(view, calib, steps=steps, racing=racing, **common)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        runs[label] = prof
        for i, s in enumerate(prof.steps):
            rows.append({"mode": label, "step": i + 1, "blocks_left": 2 * view.num_layers - i, "seconds": s.seconds,
                         "block_forwards": s.block_forwards, "removed": s.removed,
                         "peak_gib": None if peak is None else round(peak / 2**30, 1)})

    # Projection for a full GSI (all 2L blocks): exact work per step with m blocks left is
    # m(m-1)/2 candidate passes + (non-resident cache) m base passes + m heads; seconds per pass
    # and per head come from the measured first exact step, whose work is known exactly.
    n = 2 * view.num_layers
    W = calib.num_windows
    proj = {}
    if "exact" in runs:
        first = runs["exact"].steps[0]
        heads = n  # one head per candidate
        pass_share = first.block_forwards * W * (pieces["attn"] + pieces["ffn"]) / 2
        head_share = heads * W * pieces["head"]
        scale = first.seconds / (pass_share + head_share)  # measured vs microbenchmark (overheads)
        per_pass = (pieces["attn"] + pieces["ffn"]) / 2 * W * scale
        per_head = pieces["head"] * W * scale
        resident = runs["exact"].settings["resident_cache"]
        exact_total = sum((m * (m - 1) / 2 + (0 if resident else m)) * per_pass + m * per_head
                          for m in range(n, 0, -1))
        proj["projected_hours_exact"] = exact_total / 3600
        proj["projection_note"] = ("exact, no snapshot hits assumed (upper bound): sum over m=2L..1 of "
                                   "(m(m-1)/2 + m) block passes + m heads, at the measured first-step rate")
        if "racing" in runs:
            racing_fraction = sum(s.block_forwards for s in runs["racing"].steps) / sum(
                (n - i) * (n - i - 1) / 2 + (n - i) for i in range(len(runs["racing"].steps)))
            proj["racing_fraction_random_weights"] = racing_fraction
        if args.racing_ratio:
            proj["projected_hours_racing"] = proj["projected_hours_exact"] / args.racing_ratio
            proj["racing_note"] = (f"exact projection / {args.racing_ratio:.2f} = the racing block-forward ratio "
                                   "measured on a real model (random weights make every candidate nearly tied, "
                                   "so racing's elimination rate there says nothing)")
    print(f"{view.name}: {weights}; {W} windows x {seq_len} tokens on {device}")
    print_table(rows, ["mode", "step", "blocks_left", "seconds", "block_forwards", "peak_gib"])
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in proj.items()})
    write_json("gsi-gpu.json" if not args.smoke else "gsi-gpu-smoke.json", {
        "weights": weights, "model": view.name, "windows": W, "seq_len": seq_len, "dtype": "bf16",
        "load_seconds": load_seconds, "seconds_per_window": pieces, "rows": rows, **proj,
        "settings": {k: runs[k].settings for k in runs}})


def compare(args) -> None:
    """Naive (stock forward per candidate) vs exact GSI, one run, same model and data."""
    from rap.profile import gsi, load_calibration, naive_gsi
    from rap.sources import load_view

    if args.threads:
        torch.set_num_threads(args.threads)
    view, tok = load_view(args.model, dtype=args.dtype, device=args.device)
    calib = load_calibration(tok, view.config.model_type, args.calib, args.tokens, args.seq_len, 0)
    t = time.process_time()
    w = time.perf_counter()
    exact = gsi(view, calib, steps=args.steps, batch_windows=args.batch_windows, predict=args.predict)
    exact_cpu, exact_wall = time.process_time() - t, time.perf_counter() - w
    t = time.process_time()
    w = time.perf_counter()
    naive = naive_gsi(view, calib, steps=args.steps, batch_size=args.batch_windows)
    naive_cpu, naive_wall = time.process_time() - t, time.perf_counter() - w
    rel = max(abs(a - b) / a for a, b in zip(naive.ppl_after, exact.ppl_after))
    rows = [{"step": i + 1, "naive": n.removed, "exact": e.removed, "naive_ppl": n.ppl, "exact_ppl": e.ppl,
             "naive_blk": n.block_forwards, "exact_blk": e.block_forwards, "naive_s": n.seconds, "exact_s": e.seconds}
            for i, (n, e) in enumerate(zip(naive.steps, exact.steps))]
    print_table(rows, list(rows[0]))
    result = {
        "model": view.name, "calibration": calib.describe(), "steps": args.steps, "dtype": str(view.dtype)[6:],
        "same_order_as_naive": naive.order == exact.order, "max_relative_ppl_difference": rel,
        "block_forward_ratio": naive.block_forwards / exact.block_forwards,
        "wall_time_ratio": naive_wall / exact_wall, "cpu_time_ratio": naive_cpu / exact_cpu,
        "naive": {"block_forwards": naive.block_forwards, "wall_s": naive_wall, "cpu_s": naive_cpu,
                  "order": naive.order, "ppl_after": naive.ppl_after, "dense_ppl": naive.dense_ppl},
        "exact": {"block_forwards": exact.block_forwards, "wall_s": exact_wall, "cpu_s": exact_cpu,
                  "order": exact.order, "ppl_after": exact.ppl_after, "dense_ppl": exact.dense_ppl,
                  "settings": exact.settings},
        "rows": rows,
        "note": ("block forwards count every block applied to the calibration set (both sides include the dense "
                 "pass); wall time includes the LM head per candidate, which exact GSI cannot skip"),
    }
    print({k: result[k] for k in ("same_order_as_naive", "block_forward_ratio", "wall_time_ratio", "cpu_time_ratio",
                                  "max_relative_ppl_difference")})
    write_json(args.name, result)


def agreement(args) -> None:
    """Racing vs exact: the same prefix? block-forwards saved? And, with an audit profile made by
    gsi(follow=racing order), how often racing's pick was exact's argmin from the same state."""
    from rap.profile import load_profile

    exact, racing = load_profile(args.exact), load_profile(args.racing)
    if exact.calibration.get("ids_sha256") != racing.calibration.get("ids_sha256"):
        raise SystemExit("the two profiles used different calibration data")
    n = min(len(exact.order), len(racing.order))
    same_position = sum(a == b for a, b in zip(exact.order[:n], racing.order[:n]))
    prefix = next((i for i in range(n) if exact.order[i] != racing.order[i]), n)
    exact_bf = sum(s.block_forwards for s in exact.steps[:n])
    racing_bf = sum(s.block_forwards for s in racing.steps[:n])
    result = {"model": exact.model, "steps": n, "calibration": exact.calibration,
              "identical_prefix": prefix, "same_block_at_same_step": same_position / n,
              "same_set_removed": len(set(exact.order[:n]) & set(racing.order[:n])) / n,
              "racing_block_forward_ratio": exact_bf / racing_bf,
              "racing_wall_time_ratio": sum(s.seconds for s in exact.steps[:n]) / sum(s.seconds for s in racing.steps[:n]),
              "exact_order": exact.order[:n], "racing_order": racing.order[:n],
              "exact_ppl_after": exact.ppl_after[:n], "racing_ppl_after": racing.ppl_after[:n],
              "racing_settings": racing.settings.get("racing")}
    if args.audit:
        audit = load_profile(args.audit)
        picks = [(s.removed, s.argmin) for s in audit.steps[:n]]
        result["racing_agreement"] = sum(a == b for a, b in picks) / len(picks)
        result["audit"] = [{"step": i + 1, "racing": a, "exact_argmin": b,
                            "ppl_gap": audit.steps[i].candidates[a] / audit.steps[i].candidates[b] - 1}
                           for i, (a, b) in enumerate(picks)]
    else:
        result["racing_agreement"] = result["same_block_at_same_step"]
    print_table([{k: v for k, v in result.items() if isinstance(v, (int, float, str))}],
                ["steps", "identical_prefix", "same_block_at_same_step", "same_set_removed",
                 "racing_block_forward_ratio", "racing_agreement"])
    write_json(args.name, result)


def headline(args) -> None:
    comp = json.loads(Path(args.compare).read_text())
    agree = json.loads(Path(args.agreement).read_text())
    curves = [json.loads(Path(p).read_text()) for p in args.curve]
    gpu = json.loads(Path(args.gpu).read_text()) if args.gpu else None
    result = {
        "same_order_as_naive": comp["same_order_as_naive"],
        "block_forward_ratio": round(comp["block_forward_ratio"], 3),
        "wall_time_ratio": round(comp["wall_time_ratio"], 3),
        "racing_block_forward_ratio": round(agree["racing_block_forward_ratio"], 3),
        "racing_agreement": round(agree["racing_agreement"], 3),
        "projected_7b_hours_exact": None,
        "projected_7b_hours_racing": None,
        "ppl_at_25pct": {c["model"]: c["ppl_at_25pct"] for c in curves},
        "sources": {"compare": args.compare, "agreement": args.agreement, "curves": args.curve, "gpu": args.gpu},
        "details": {"compare": {k: comp[k] for k in ("model", "calibration", "steps", "dtype", "cpu_time_ratio",
                                                   "max_relative_ppl_difference")},
                    "agreement": {k: agree[k] for k in ("model", "steps", "identical_prefix", "same_set_removed",
                                                        "racing_wall_time_ratio")}},
    }
    if gpu:
        # Every GSI cost is a sum of (block, window) passes, so time scales linearly in windows: a run
        # measured at W windows projects to the 128 x 2048 by 128 / W.
        scale = args.target_windows / gpu["windows"]
        exact_h = gpu["projected_hours_exact"] * scale
        result["projected_7b_hours_exact"] = round(exact_h, 3)
        # Random weights leave racing nothing to eliminate (all candidates tie), so the racing
        # projection applies the block-forward saving measured on a real model (the agreement run).
        result["projected_7b_hours_racing"] = round(exact_h / agree["racing_block_forward_ratio"], 3)
        result["projection"] = {
            "measured_windows": gpu["windows"], "target_windows": args.target_windows, "seq_len": gpu["seq_len"],
            "measured_projected_hours_exact": gpu["projected_hours_exact"],
            "racing_fraction_on_random_weights": gpu.get("racing_fraction_random_weights"),
            "racing_saving_from": f"{agree['model']} racing vs exact ({agree['steps']} steps)",
            "how": "exact: the H100 per-step rate of the Llama-2-7B shape (random weights) over all 64 removal steps, "
                   "x target/measured windows; racing: exact / racing_block_forward_ratio of the real-model run"}
    else:
        result["note"] = ("projected_7b_hours_* are null until `python benchmarks/gsi.py timing` runs on the H100 "
                          "(Llama-2-7B shape, random weights, 128 x 2048 tokens)")
    if args.note:
        result["note"] = (result.get("note", "") + " " + args.note).strip()
    print(json.dumps({k: v for k, v in result.items() if k not in ("details", "sources")}, indent=1))
    path = Path(args.out)
    path.write_text(json.dumps({**environment(), **result}, indent=1))
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    t = sub.add_parser("timing", help="GPU per-step time, Llama-2-7B shape, random weights")
    t.add_argument("--smoke", action="store_true", help="tiny config on CPU (tests the script)")
    t.add_argument("--model", default=None, help="a real model (HF folder / .gguf) instead of random 7B weights")
    t.add_argument("--windows", type=int, default=128)
    t.add_argument("--seq-len", type=int, default=2048)
    t.add_argument("--batch-windows", type=int, default=16)
    t.add_argument("--exact-steps", type=int, default=1)
    t.add_argument("--racing-steps", type=int, default=1)
    t.add_argument("--predict", type=int, default=1)
    t.add_argument("--cache-gib", type=float, default=None, help="memory for cached streams (default: 70%% of free)")
    t.add_argument("--racing-ratio", type=float, default=None, help="racing block-forward ratio from a real model")
    t.add_argument("--time-limit", type=float, default=330, help="skip later runs after this many seconds")
    c = sub.add_parser("compare", help="naive vs exact GSI on a real model")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--calib", default=None)
    c.add_argument("--tokens", type=int, default=512)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--dtype", default="bf16")
    c.add_argument("--device", default=None)
    c.add_argument("--batch-windows", type=int, default=8)
    c.add_argument("--predict", type=int, default=2)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--name", default="gsi-compare.json")
    a = sub.add_parser("agreement", help="racing vs exact profiles")
    a.add_argument("exact")
    a.add_argument("racing")
    a.add_argument("--audit", default=None, help="profile from gsi(follow=racing order)")
    a.add_argument("--name", default="gsi-agreement.json")
    h = sub.add_parser("headline", help="assemble benchmarks/results/gsi-DATE.json")
    h.add_argument("--compare", required=True)
    h.add_argument("--agreement", required=True)
    h.add_argument("--curve", action="append", default=[])
    h.add_argument("--gpu", default=None)
    h.add_argument("--note", default=None)
    h.add_argument("--target-windows", type=int, default=128, help="calibration windows the 7B projection is for")
    h.add_argument("--out", default="benchmarks/results/gsi-2026-11-23.json")
    args = p.parse_args()
    if args.mode is None:
        args = p.parse_args(["timing", *sys.argv[1:]])
    {"timing": timing, "compare": compare, "agreement": agreement, "headline": headline}[args.mode](args)


if __name__ == "__main__":
    main()
