"""The benchmark suite in one command: throughput and memory under budgets, the KV-heavy case, quality,
and the quantization peer. Runs the pieces that exist and writes $OUT/bench-<date>.json with the
headline keys of issue 9, each computed from measurements made in this run (or read from a named
result file), or null with the reason in `notes`.

    python -m benchmarks.run --suite gpu [--model SMOLLM2_DIR_OR_GGUF] [--profile gsi.json]   # H100, < 8 min
    python -m benchmarks.run --list         # every benchmark: device, rough time, output file (REGISTRY)
    python -m benchmarks.run --suite cpu      # SmolLM2 on CPU: throughput rows; quality from a result file
    python -m benchmarks.run --suite smoke    # CPU, seconds: every code path on tiny models

Sections (rows carry `section`):
- ``throughput``: KV-light request (batch 1, prompt 512, 128 new) at budgets 100/80/60/40% of the dense
  need (memory model: weights + KV + activations). Rows: rap (policy decision, dropped blocks moved off
  the device, rap.decode.decoder.Decoder), ShortGPT-style static layer removal that fits the same budget (same
  decoder), and stock `model.generate` (dense). 7B/8B shapes use random weights: timing only.
- ``kv-heavy``: batch 32 x prompt 4096 on the Llama-2-7B shape under a budget of 80% of the dense need,
  enforced with `torch.cuda.set_per_process_memory_fraction`: dense (does it run out of memory?), rap
  (does it serve within the budget?), and dense with a plain KV limit (prompts cut to what fits).
- ``quality``: benchmarks.quality on SmolLM2 (or the rows of `--quality-json`).
- ``quant``: benchmarks.quant_peer (torchao int8/int4 weight-only) when torchao imports.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmarks.common import SHAPES, environment, out_dir, print_table, shape_config
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView
from rap.decode.workspace import planning_request  # the engine's decoder backend plans with the same function

log = logging.getLogger("benchmarks.run")

BUDGETS = (1.0, 0.8, 0.6, 0.4)
GPU_GRID = ("llama-2-7b:8x4096", "llama-2-7b:32x512", "qwen2.5-7b:1x16384")  # batch / prompt sweep of issue 9
HEADLINE_KEYS = ("throughput_ratio_80pct_kv_light", "quality_kept_above_chance_80pct", "quality_kept_80pct",
                 "kv_heavy_dense_ooms", "kv_heavy_rap_served")


# ---- the declared suite: every benchmark in benchmarks/, with where it runs, how long, what it writes ------
@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: `command` run from the repository root (PYTHONPATH=src:.), on `device`, in about
    `minutes`, writing `output` (under $OUT, or benchmarks/results/ where $OUT is unset; <date> = YYYY-MM-DD)."""

    name: str
    command: str
    device: str  # "gpu", "cpu" or "cpu/gpu" (runs on either; GPU rows are the ones results quote)
    minutes: float
    output: str
    what: str


REGISTRY: tuple[Benchmark, ...] = (
    Benchmark("suite-gpu", "python -m benchmarks.run --suite gpu", "gpu", 8, "bench-<date>.json",
              "issue-9 suite: throughput/memory at 100/80/60/40% budgets, KV-heavy OOM case, quality, quant peer"),
    Benchmark("suite-cpu", "python -m benchmarks.run --suite cpu", "cpu", 10, "bench-<date>.json",
              "the suite's throughput rows on SmolLM2-135M, quality from a result file"),
    Benchmark("suite-smoke", "python -m benchmarks.run --suite smoke", "cpu", 1, "bench-<date>.json",
              "every code path of the suite on tiny models"),
    Benchmark("decode", "python -m benchmarks.decode --batches 1,8,32 --prompts 512 --new 128 --explore", "gpu", 4,
              "decode-<date>.json", "rap's decoder vs stock generate and the bandwidth roofline, mask switch cost"),
    Benchmark("decode-ab", "python -m benchmarks.decode_ab --old OLD/src --new src", "cpu/gpu", 3, "--json PATH (optional)",
              "decode speed of two source trees in one run, as a ratio (old vs new Decoder)"),
    Benchmark("memory-model", "python -m benchmarks.memory_model --path decoder", "gpu", 2,
              "memory-model-decoder-<date>.json", "memory model prediction vs torch.cuda.max_memory_allocated"),
    Benchmark("memdiag", "python -m benchmarks._memdiag", "gpu", 2, "memdiag-probes.json",
              "what is alive at a measured peak; SDPA backend and sampler probes (memory_model --explain uses it)"),
    Benchmark("engine-trace", "python -m benchmarks.engine_trace --shape llama-2-7b --batch 8 --prompt 512 --new 64",
              "gpu", 3, "engine-trace-<date>-<shape>.json + .png",
              "a budget trace through the Engine: resident memory follows the budget, no OOM"),
    Benchmark("precision", "python -m benchmarks.precision", "gpu", 5, "precision-<date>.json",
              "decode speed per precision level (dtype / int8 / int4) vs roofline and torchao + generate"),
    Benchmark("serve-fairness", "python -m benchmarks.serve_fairness", "cpu", 3, "serve-fairness-<date>.json",
              "a 4-token request's latency while one request of 3,000 prompts runs (rap serve, loopback)"),
    Benchmark("gpu-levels", "bash benchmarks/gpu_levels.sh", "gpu", 6, "levels-smollm2-135m-h200-{cpu,cuda}bytes-<date>.json",
              "the level profile and its plan library made on the GPU (resumed across calls), then the frontier on the full WikiText-2 test"),
    Benchmark("gpu-library-selection", "bash benchmarks/gpu_library_selection.sh", "gpu", 4,
              "smollm2-135m-levels-selection.json, levels-smollm2-135m-cuda-<date>.json",
              "the plan library measured on the selection split, then the frontier with CPU bytes (earlier plans reused)"),
    Benchmark("calibration-text", "python -m benchmarks.calibration_text", "cpu", 11,
              "calibration-text-smollm2-135m-cpu.json",
              "the 60% plans on valid windows with and without <unk>, and on test windows: why the markers go"),
    Benchmark("kv-int4-scales", "python benchmarks/kv_int4_scales.py --model smollm2-135m --prompt 1024", "cpu", 3,
              "--out FILE (rows printed)", "int4 KV: symmetric vs asymmetric scales by continuation NLL, int8 / 16-bit beside"),
    Benchmark("int8-kernels", "python -m benchmarks.int8_kernels", "gpu", 4, "int8-kernels.json",
              "weight-only int8 matmul kernels side by side (gemlite, torchao, aten, compiled dequant) on 7B linears"),
    Benchmark("precision-cpu", "python -m benchmarks.precision_cpu", "cpu", 10, "precision-cpu-<date>.json",
              "WikiText-2 PPL and decode tok/s of precision plans on SmolLM2-135M"),
    Benchmark("levels", "python -m benchmarks.levels", "cpu", 15, "levels-<model>-<device>-<date>.json + .png",
              "level policies (solver, ladder, int8/int4-only, drop-only) by measured held-out PPL per budget"),
    Benchmark("decide-latency", "python -m benchmarks.decide_latency --n 2000", "cpu", 1,
              "decide-latency-<model>-cpu-<date>.json",
              "decide p50 / p99 of the default level policy: cold, warm and bucketed request shapes"),
    Benchmark("level-agent", "python -m benchmarks.level_agent --out benchmarks/results/level-agent.zip", "cpu", 10,
              "level-agent-<model>-<date>.zip + .json",
              "the MaskablePPO agent on the joint action (levels + KV ratio): training, distance from the solver"),
    Benchmark("zeroshot-levels", "python -m benchmarks.zeroshot_levels --out zeroshot-levels.json", "cpu/gpu", 30,
              "zeroshot-levels-<model>-<device>-<date>.json",
              "8 zero-shot tasks: dense vs the default level policy's plan at 50% (above-chance and raw shares)"),
    Benchmark("gsi", "python benchmarks/gsi.py timing", "gpu", 3, "gsi-gpu.json",
              "GSI step cost on a 7B shape; `compare` / `agreement` subcommands: exact vs plain vs racing (CPU)"),
    Benchmark("policy", "python -m benchmarks.policy", "cpu", 20, "policy-<date>.json + .png",
              "runtime policies on held-out scenarios: quality, fit, decision latency"),
    Benchmark("quality", "python -m benchmarks.quality", "cpu/gpu", 10, "quality-<date>.json + .png",
              "zero-shot accuracy and WikiText-2 PPL under parameter budgets, dense vs pruned"),
    Benchmark("quant-peer", "python -m benchmarks.quant_peer", "cpu/gpu", 5, "quant-<date>.json",
              "torchao int8/int4 weight-only vs rap's block masks at the same bytes"),
    Benchmark("width-peer", "python -m benchmarks.width_peer", "cpu/gpu", 10, "width-peer-<date>.json",
              "torch-pruning FFN-width pruning at rap's parameter budgets"),
    Benchmark("kv", "python -m benchmarks.kv", "gpu", 4, "kv-<date>.json + kv-latency-<date>.png",
              "KV compression: cache bytes, varlen decode attention speed, needle"),
    Benchmark("kv-decode", "python benchmarks/kv_decode_gpu.py", "gpu", 4, "kv-decode-cuda.json",
              "decoder step time under SnapKV / Ada-KV / int8 KV vs the full cache; bytes vs memory model"),
    Benchmark("kv-needle-decoder", "python -m benchmarks.kv_needle_decoder", "cpu", 20,
              "kv-needle-decoder-<model>-<date>.json + .png", "needle retrieval vs real KV bytes per press"),
    Benchmark("kv-needle-eval", "python benchmarks/kv_needle_eval.py --part decoder|hf|merge [--eval leval]",
              "cpu/gpu", 180, "kv-needle-eval-<model>-<date>.json + .png (kv-leval-eval-... with --eval leval)",
              "issue 16: needle (63 cases) / L-Eval, decoder vs HF-path vs kvpress 0.5.5 presses, real KV bytes"),
    Benchmark("kv-penalty", "python benchmarks/kv_penalty.py", "cpu/gpu", 15, "kv-penalty-<model>-<date>.json",
              "the policy's KV penalty on rap's decoder (16-bit, int8) beside the HF path's"),
    Benchmark("kv-scorer-choice", "python benchmarks/kv_scorer_choice.py", "cpu", 10,
              "kv-scorer-choice-<model>-<date>.json", "needle-token retention per SnapKV scorer setting"),
    Benchmark("server-load", "python -m benchmarks.server_load", "cpu", 2, "server-load-<date>.json",
              "load test of rap serve: rate, concurrency, budget changes, bad requests"),
    Benchmark("cluster-load", "python -m benchmarks.cluster_load", "cpu", 5, "cluster-load-<date>.json",
              "rap cluster (Ray Serve, N replicas) vs one rap serve, with a replica killed"),
    Benchmark("lm-eval-serve", "python -m benchmarks.lm_eval_serve", "cpu", 3, "lm-eval-serve-<date>.json",
              "lm-eval through rap serve equals lm-eval with rap as the model"),
    Benchmark("gpu-h200", "bash benchmarks/gpu_h200.sh", "gpu", 10, "(the steps' files)",
              "one bounded device call: the GPU rows above, each under timeout (variables in benchmarks/GPU.md)"),
)


def print_registry() -> None:
    print_table([{"name": b.name, "device": b.device, "minutes": f"~{b.minutes:g}", "output": b.output,
                  "command": b.command} for b in REGISTRY], ["name", "device", "minutes", "output", "command"])


# ---- helpers ------------------------------------------------------------------------------------
def parse_grid_item(item: str) -> tuple[str, Request]:
    """'llama-2-7b:8x4096' -> (shape, Request(8, 4096, 128))."""
    try:
        shape, size = item.strip().split(":")
        batch, prompt = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--grid item {item!r}: expected SHAPE:BATCHxPROMPT, e.g. llama-2-7b:8x4096") from None
    if shape not in SHAPES:
        raise SystemExit(f"--grid item {item!r}: unknown shape; known: {', '.join(SHAPES)}")
    return shape, Request(batch, prompt, 128)


def row_key(r: dict) -> tuple:
    """What a row measured: a later measurement of the same key replaces it (throughput: per batch, prompt)."""
    sweep = (r.get("batch"), r.get("prompt")) if r["section"] == "throughput" else ()
    return (r["section"], r.get("model"), *sweep)


def replace_rows(rows: list[dict], new: list[dict]) -> None:
    """Append `new`, dropping earlier rows that measured the same key (`row_key`)."""
    replaced = {row_key(r) for r in new}
    rows[:] = [r for r in rows if row_key(r) not in replaced] + new


def merge_earlier(path: str, rows: list[dict], headline: dict, sources: dict, notes: dict) -> None:
    """Fold an earlier call of this suite into this one: GPU calls here are capped at 10 minutes, so the
    suite runs as several calls on one device; the last names every earlier call's JSON, in order. Each
    file contributes what it measured itself (rows without `merged_from`, headline keys without a
    "[measured by" source), tagged with its command; a later file's row replaces an earlier one's."""
    earlier = json.loads(Path(path).read_text())
    if earlier.get("kind") != "bench":
        raise SystemExit(f"--merge {path}: not a bench result (kind {earlier.get('kind')!r})")
    mine = environment()["device"]
    if earlier.get("device") != mine:
        raise SystemExit(f"--merge {path}: measured on {earlier.get('device')!r}, this run is on {mine!r}")
    command = earlier.get("command")
    replace_rows(rows, [{**r, "merged_from": path, "measured_by": command}
                        for r in earlier.get("rows", []) if "merged_from" not in r])
    for k in HEADLINE_KEYS:
        source = earlier.get("headline_sources", {}).get(k, "")
        if earlier.get(k) is not None and "[measured by " not in source:
            headline[k] = earlier[k]
            sources[k] = f"{source} [measured by {command}]"
            notes.pop(k, None)
    for k, v in earlier.get("notes", {}).items():
        if k.startswith("section:") and not v.startswith("not requested"):
            notes.setdefault(f"{path}:{k}", v)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(batch: int, prompt: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, prompt), generator=g).tolist()


def build_view(shape: str, model_path: str | None, device: str, dtype: torch.dtype) -> tuple[BlockView, bool]:
    """(view, real_weights)."""
    from rap.sources import load_view, model_from_config

    if shape == "smollm2-135m":
        view, _ = load_view(model_path or "smollm2-135m", dtype=dtype, device=device)
        return view, True
    torch.manual_seed(0)
    return BlockView(model_from_config(shape_config(shape), dtype=dtype, device=device), name=shape), False


def decide(view: BlockView, mem: MemoryModel, request: Request, budget_bytes: int, profile: dict | None):
    """The decision for this budget: the engine's greedy policy (fewest blocks dropped, in the profile's
    removal order, or the engine's default order without one, until the memory model says it fits).
    rap.policy's learned policies are not used here: they may measure quality on the model while
    deciding, which means nothing on random weights and costs GPU minutes; for timing, bytes matter."""
    from rap.policy.greedy import GreedyPolicy

    raw = GreedyPolicy(mem, profile["order"] if profile else None).decide(request, budget_bytes)
    return raw.mask, "greedy" + (" (profile order)" if profile else " (default order: FFN from the last layer)")


def shortgpt_mask(view: BlockView, mem: MemoryModel, request: Request, budget_bytes: int) -> BlockMask | None:
    """Static baseline: the fewest whole layers removed (last layers first, ShortGPT's typical pick without
    calibration data) so that the request fits the budget; None if even all layers do not fit."""
    L = view.num_layers
    for k in range(L):
        drop = [n for i in range(L - k, L) for n in (f"attn.{i}", f"ffn.{i}")]
        mask = BlockMask.from_drop(L, drop)
        if mem.fits(budget_bytes, mask, request):
            return mask
    return None


def time_decoder(view: BlockView, mask: BlockMask, request: Request, device: str, budget_bytes: int | None,
                 residency=None) -> dict:
    """Move dropped blocks off the device, then time rap.decode.decoder.Decoder (prefill + decode) and its peak."""
    from rap.decode.decoder import Decoder

    if residency is not None:
        residency.apply(mask)
        residency.synchronize()
    free_cuda()
    step = None if torch.device(device).type == "cuda" else "static"
    dec = Decoder(view, step=step, budget_bytes=budget_bytes)
    prompts = random_prompts(request.batch, request.prompt, view.shape.vocab_size)
    try:
        dec.prepare(mask, request.batch, request.total_tokens, prompt=request.prompt)
        # warm-up (allocator, kernels) in the same (batch bucket, cache length) workspace as the timed call,
        # so no second KV workspace is allocated and counted in the peak
        from rap.decode.decoder import bucket_length

        warm = 8 if bucket_length(request.prompt + 8) == bucket_length(request.total_tokens) else request.new_tokens
        dec.generate(prompts, min(warm, request.new_tokens), mask=mask)
        sync(device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res = dec.generate(prompts, request.new_tokens, mask=mask)
        sync(device)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        t = res.timing
        return {"tokens_per_s": t.tokens_per_s, "ms_per_token": t.ms_per_step, "prefill_ms": t.prefill_ms,
                "peak_bytes": peak, "resident_param_bytes": view.resident_param_bytes(mask)}
    finally:
        dec.release()
        del dec
        free_cuda()


def time_stock_generate(view: BlockView, request: Request, device: str) -> dict:
    """Stock `model.generate` (dense, dynamic cache, greedy): decode ms/token from two lengths."""
    ids = torch.tensor(random_prompts(request.batch, request.prompt, view.shape.vocab_size), device=device)
    n1, n2 = 8, max(16, request.new_tokens)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        view.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(n1)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t1, t2 = run(n1), run(n2)
    ms = (t2 - t1) / (n2 - n1) * 1e3
    return {"tokens_per_s": request.batch * 1e3 / ms if ms > 0 else None, "ms_per_token": ms,
            "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "resident_param_bytes": view.resident_param_bytes(BlockMask.full(view.num_layers))}


# ---- sections -----------------------------------------------------------------------------------------
def throughput_section(shape: str, args, profile: dict | None, request: Request) -> list[dict]:
    from rap.serve.residency import WeightResidency

    view, real = build_view(shape, args.model, args.device, args.dtype)
    weights = "real" if real else "random (timing only)"
    mem = MemoryModel.from_view(view, on_cuda=torch.device(args.device).type == "cuda")
    plan_req = planning_request(request)
    need = mem.dense_need(plan_req)
    residency = WeightResidency(view)
    prof = profile if (real and profile) else None
    rows, dense_tps = [], None
    base = {"section": "throughput", "model": shape, "weights": weights, "batch": request.batch,
            "prompt": request.prompt, "new_tokens": request.new_tokens, "dense_need_bytes": need}
    try:
        row = {**base, "method": "stock generate (dense)", "budget_ratio": 1.0, "budget_bytes": need}
        try:
            residency.apply(BlockMask.full(view.num_layers))
            row.update(time_stock_generate(view, request, args.device))
        except Exception as e:
            row["status"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print_table([row], ["model", "method", "budget_ratio", "tokens_per_s", "peak_bytes", "status"])
        for ratio in args.budgets:
            budget = int(ratio * need)
            candidates = []
            try:
                mask, policy = decide(view, mem, plan_req, budget, prof)
                candidates.append(("rap" if ratio < 1 else "dense (rap decoder)", mask, policy))
            except Exception as e:
                rows.append({**base, "method": "rap", "budget_ratio": ratio, "budget_bytes": budget,
                             "status": f"no decision: {e}"})
            if ratio < 1:
                sg = shortgpt_mask(view, mem, plan_req, budget)
                if sg is not None:
                    candidates.append(("shortgpt-static", sg, "last layers removed"))
            for method, mask, policy in candidates:
                row = {**base, "method": method, "policy": policy, "budget_ratio": ratio, "budget_bytes": budget,
                       "blocks_dropped": len(mask.dropped), "dropped": list(mask.dropped),
                       "predicted_peak_bytes": mem.peak_bytes(mask, plan_req)}
                try:
                    row.update(time_decoder(view, mask, request, args.device, budget, residency))
                    if method.startswith("dense"):
                        dense_tps = row["tokens_per_s"]
                    row["ratio_vs_dense"] = row["tokens_per_s"] / dense_tps if dense_tps else None
                    row["within_budget"] = row["peak_bytes"] <= budget if row.get("peak_bytes") else None
                except Exception as e:
                    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    free_cuda()
                rows.append(row)
                print_table([row], ["model", "method", "budget_ratio", "blocks_dropped", "tokens_per_s",
                                    "ratio_vs_dense", "peak_bytes", "budget_bytes", "within_budget", "status"])
        stock = rows[0].get("tokens_per_s")
        for r in rows:
            if stock and r.get("tokens_per_s"):
                r["ratio_vs_stock"] = r["tokens_per_s"] / stock
    finally:
        del residency, view
        free_cuda()
    return rows


def kv_heavy_section(shape: str, args, request: Request) -> tuple[list[dict], dict]:
    """Dense vs rap vs dense-with-a-KV-limit under one enforced budget (CUDA only)."""
    from rap.serve.residency import WeightResidency

    view, real = build_view(shape, args.model, args.device, args.dtype)
    mem = MemoryModel.from_view(view, on_cuda=True)
    plan_req = planning_request(request)
    need = mem.dense_need(plan_req)
    budget = int(args.kv_heavy_budget_ratio * need)
    total = torch.cuda.get_device_properties(0).total_memory
    base = {"section": "kv-heavy", "model": shape, "weights": "real" if real else "random (timing only)",
            "batch": request.batch, "prompt": request.prompt, "new_tokens": request.new_tokens,
            "budget_ratio": args.kv_heavy_budget_ratio, "budget_bytes": budget, "dense_need_bytes": need,
            "device_total_bytes": total}
    residency = WeightResidency(view)
    rows, summary = [], {}

    def attempt(method: str, mask: BlockMask, req: Request, extra: dict, stock: bool = False) -> dict:
        row = {**base, **extra, "method": method, "blocks_dropped": len(mask.dropped),
               "predicted_peak_bytes": mem.peak_bytes(mask, planning_request(req)), "prompt": req.prompt}
        residency.apply(mask)
        residency.synchronize()
        free_cuda()
        # the budget is enforced by the allocator: nothing may allocate past it (weights included)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        try:
            if stock:
                row.update(time_stock_generate(view, req, args.device))
            else:
                row.update(time_decoder(view, mask, req, args.device, None, None))
            row["served"], row["oom"] = True, False
            row["within_budget"] = row["peak_bytes"] <= budget
        except torch.OutOfMemoryError as e:
            row.update(served=False, oom=True, status=f"OutOfMemoryError: {str(e).splitlines()[0][:120]}")
        except Exception as e:  # e.g. the decoder refusing up front because the device lacks the memory
            row.update(served=False, oom=False, status=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            free_cuda()
        rows.append(row)
        print_table([row], ["model", "method", "prompt", "blocks_dropped", "served", "oom", "tokens_per_s",
                            "peak_bytes", "budget_bytes", "status"])
        return row

    try:
        full = BlockMask.full(view.num_layers)
        # what a user runs: the dense model with stock generate (dynamic cache)
        dense = attempt("dense (stock generate)", full, request, {}, stock=True)
        attempt("dense (rap decoder)", full, request, {})
        # KV dominates here, so the decision drops attention blocks (their KV goes with them) first
        L = view.num_layers
        order = [f"attn.{i}" for i in reversed(range(L))] + [f"ffn.{i}" for i in reversed(range(L))]
        from rap.policy.greedy import GreedyPolicy

        mask = GreedyPolicy(mem, order).decide(plan_req, budget).mask
        rap = attempt("rap", mask, request, {"policy": "greedy (attention from the last layer first)"})
        # plain KV limit: the dense model keeps every block and cuts prompts to the longest that fits
        fit = 0
        for p in range(request.prompt, 0, -64):
            if mem.fits(budget, full, planning_request(Request(request.batch, p, request.new_tokens))):
                fit = p
                break
        if fit:
            attempt("dense + KV limit (prompt cut)", full, Request(request.batch, fit, request.new_tokens),
                    {"prompt_kept_ratio": fit / request.prompt})
        summary = {"kv_heavy_dense_ooms": dense.get("oom"), "kv_heavy_rap_served": bool(
            rap.get("served") and rap.get("within_budget"))}
    finally:
        del residency, view
        free_cuda()
    return rows, summary


def quality_section(args, profile_path: str | None) -> tuple[dict | None, str | None]:
    """(quality JSON, its path) from running benchmarks.quality here, or from --quality-json."""
    if args.quality_json:
        found = [(p, json.loads(Path(p).read_text())) for p in sorted(glob.glob(args.quality_json))]
        found = [(p, d) for p, d in found if isinstance(d, dict) and d.get("kind") == "quality"]
        if not found:
            return None, f"--quality-json {args.quality_json} matches no quality result (kind 'quality')"
        return found[-1][1], found[-1][0]
    from benchmarks import quality

    argv = ["--name", f"quality-{args.date}.json", "--limit", str(args.quality_limit),
            "--ppl-tokens", str(args.quality_ppl_tokens)]
    if args.suite == "smoke":
        argv.append("--smoke")
    else:
        argv += ["--model", args.model or "smollm2-135m", "--batch-size", str(args.quality_batch_size),
                 "--calib-windows", str(args.calib_windows), "--calib-seq-len", "2048" if args.suite == "gpu" else "256"]
    if profile_path:
        argv += ["--profile", profile_path]
    quality.main(argv)
    path = out_dir() / f"quality-{args.date}.json"
    return json.loads(path.read_text()), str(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print every benchmark (REGISTRY) and exit")
    parser.add_argument("--suite", choices=("gpu", "cpu", "smoke"), default="gpu")
    parser.add_argument("--model", default=None, help="SmolLM2 folder or .gguf (default: rap's cached smollm2-135m)")
    parser.add_argument("--profile", default=None, help="GSI profile JSON for SmolLM2's removal order")
    parser.add_argument("--quality-json", default=None, help="use this quality result instead of measuring")
    parser.add_argument("--shapes", default=None, help="comma list of shapes for the throughput section ('none': only --grid)")
    parser.add_argument("--sections", default="throughput,kv-heavy,quality,quant")
    parser.add_argument("--max-minutes", type=float, default=7.5, help="skip sections that start after this")
    parser.add_argument("--kv-heavy-budget-ratio", type=float, default=0.8)
    parser.add_argument("--grid", default=None,
                        help="extra throughput rows, comma list of SHAPE:BATCHxPROMPT (gpu default: "
                             + ",".join(GPU_GRID) + "; 'none' for none)")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="bench JSONs of earlier calls of this suite on the same device, in order: each "
                             "contributes what it measured itself; a later measurement of a row or key wins")
    args = parser.parse_args(argv)
    if args.list:
        print_registry()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.date = datetime.date.today().isoformat()
    cuda = torch.cuda.is_available() and args.suite == "gpu"
    if args.suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs a CUDA device; use --suite cpu or smoke here")
    args.device = "cuda" if cuda else "cpu"
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.budgets = BUDGETS
    if args.suite == "gpu":
        shapes = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "smollm2-135m"]
        light, heavy = Request(1, 512, 128), Request(32, 4096, 16)
        args.quality_limit, args.quality_ppl_tokens, args.quality_batch_size, args.calib_windows = 500, 0, 64, 16
    elif args.suite == "cpu":
        shapes = ["smollm2-135m"]
        light, heavy = Request(1, 128, 16), None
        args.quality_json = args.quality_json or "benchmarks/results/quality-*.json"
    else:
        shapes = ["tiny-llama"]
        light, heavy = Request(1, 32, 8), None
        args.quality_limit, args.quality_ppl_tokens, args.quality_batch_size, args.calib_windows = 8, 512, 8, 2
    if args.shapes:
        shapes = [] if args.shapes == "none" else [s.strip() for s in args.shapes.split(",") if s.strip()]
    grid_spec = args.grid if args.grid is not None else (",".join(GPU_GRID) if args.suite == "gpu" else "none")
    grid = [] if grid_spec == "none" else [parse_grid_item(g) for g in grid_spec.split(",") if g.strip()]
    sections = [s.strip() for s in args.sections.split(",")]
    profile = json.loads(Path(args.profile).read_text()) if args.profile else None

    t0 = time.perf_counter()
    rows: list[dict] = []
    notes: dict[str, str] = {}
    headline: dict = {k: None for k in HEADLINE_KEYS}
    sources: dict[str, str] = {}

    def time_left() -> bool:
        return (time.perf_counter() - t0) / 60 < args.max_minutes

    def guarded(name: str, fn):
        if name not in sections:
            notes[f"section:{name}"] = "not requested (--sections)"
            return None
        if not time_left():
            notes[f"section:{name}"] = f"skipped: the run passed --max-minutes {args.max_minutes}"
            return None
        try:
            return fn()
        except Exception as e:
            notes[f"section:{name}"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
            free_cuda()
            return None

    for path in args.merge:
        merge_earlier(path, rows, headline, sources, notes)

    # 1. throughput under budgets (KV-light)
    for shape in shapes:
        got = guarded("throughput", lambda: throughput_section(shape, args, profile, light))
        replace_rows(rows, got or [])
    measured = {r["model"] for r in rows if r["section"] == "throughput"}
    primary = next((s for s in ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "smollm2-135m", "tiny-llama") if s in measured),
                   None)
    r80 = next((r for r in rows if r["section"] == "throughput" and r["model"] == primary and r["method"] == "rap"
                and abs(r["budget_ratio"] - 0.8) < 1e-9 and r.get("ratio_vs_dense")
                and (r["batch"], r["prompt"]) == (light.batch, light.prompt)), None)
    if r80:
        headline["throughput_ratio_80pct_kv_light"] = r80["ratio_vs_dense"]
        notes.pop("throughput_ratio_80pct_kv_light", None)
        sources["throughput_ratio_80pct_kv_light"] = (
            f"{primary} ({r80['weights']}), batch {light.batch} x prompt {light.prompt}, {light.new_tokens} new tokens: "
            f"rap decoder under the 80% decision vs the same decoder dense, same run"
            + (f" [measured by {r80['measured_by']}]" if "measured_by" in r80 else ""))
    elif headline["throughput_ratio_80pct_kv_light"] is None:
        notes["throughput_ratio_80pct_kv_light"] = ("no rap row at 80% was measured "
                                                    f"(see section notes; shapes {sorted(measured)})")

    # 2. KV-heavy under an enforced budget
    if heavy is None:
        notes["kv_heavy_dense_ooms"] = notes["kv_heavy_rap_served"] = (
            "needs a CUDA device: out-of-memory under an enforced budget is measured with the CUDA allocator")
    else:
        got = guarded("kv-heavy", lambda: kv_heavy_section("llama-2-7b", args, heavy))
        if got:
            replace_rows(rows, got[0])
            headline.update(got[1])
            for k in ("kv_heavy_dense_ooms", "kv_heavy_rap_served"):
                sources[k] = (f"llama-2-7b shape (random weights), batch {heavy.batch} x prompt {heavy.prompt}, "
                              f"budget {args.kv_heavy_budget_ratio:.0%} of the dense need, enforced by the allocator; "
                              "dense = stock generate (OutOfMemoryError counts), rap = decoder under the decision, "
                              "served = finished with measured peak <= budget")
        else:
            for k in ("kv_heavy_dense_ooms", "kv_heavy_rap_served"):
                if headline[k] is None:
                    notes.setdefault(k, "the kv-heavy section did not run (see section notes)")

    # the batch / prompt sweep comes after the headline sections, so a time cap cuts it first
    for shape, request in grid:
        got = guarded("throughput", lambda: throughput_section(shape, args, profile, request))
        replace_rows(rows, got or [])

    # 3. quality
    got = guarded("quality", lambda: quality_section(args, args.profile))
    if got and got[0]:
        q, qpath = got
        headline["quality_kept_80pct"] = q.get("quality_kept_80pct")
        headline["quality_kept_above_chance_80pct"] = q.get("quality_kept_above_chance_80pct")
        where = (f"{qpath}: {q.get('model')}, rap-order mask at 80% of parameter bytes, mean zero-shot headline "
                 f"accuracy (lm-eval, BoolQ apart, limit {q.get('limit_per_task')})")
        sources["quality_kept_80pct"] = where + " / dense"
        sources["quality_kept_above_chance_80pct"] = where + ": (acc - chance) / (dense - chance)"
        replace_rows(rows, [{"section": "quality", "model": q.get("model"), "method": r["method"],
                             "budget_ratio": r["budget"], "param_ratio": r["param_ratio"],
                             "mean_headline": r["mean_headline"],
                             "quality_kept_above_chance": r.get("quality_kept_above_chance"),
                             "quality_kept": r.get("quality_kept"), "boolq": r.get("boolq"),
                             "wikitext2_ppl": r.get("wikitext2_ppl")} for r in q.get("rows", [])])
    elif got and got[1]:
        notes["quality_kept_80pct"] = got[1]
    if headline["quality_kept_80pct"] is None:
        notes.setdefault("quality_kept_80pct", "quality section did not produce a rap-order row at 80%")

    # 4. quantization peer
    def quant():
        from benchmarks import quant_peer

        argv = ["--name", f"quant-{args.date}.json"]
        if args.suite == "smoke":
            argv.append("--smoke")
        else:
            argv += ["--model", args.model or "smollm2-135m"]
            if args.suite == "gpu":
                argv += ["--limit", "300", "--ppl-tokens", "0"]
        if args.profile:
            argv += ["--profile", args.profile]
        quant_peer.main(argv)
        return True

    guarded("quant", quant)

    for section in {r["section"] for r in rows}:  # merged rows cover a section this call did not run
        if notes.get(f"section:{section}", "").startswith("not requested"):
            del notes[f"section:{section}"]

    payload = {**environment(), "kind": "bench", "suite": args.suite, **headline,
               "headline_sources": sources, "notes": notes, "seconds": time.perf_counter() - t0,
               "requests": {"kv_light": light.__dict__, "kv_heavy": heavy.__dict__ if heavy else None},
               "rows": rows}
    path = out_dir() / f"bench-{args.date}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print()
    print_table([r for r in rows if r["section"] != "quality"],
                ["section", "model", "weights", "method", "budget_ratio", "batch", "prompt", "tokens_per_s",
                 "ratio_vs_dense", "peak_bytes", "budget_bytes", "within_budget", "status"])
    print(json.dumps({k: payload[k] for k in HEADLINE_KEYS}, indent=2))
    if notes:
        print("notes:", json.dumps(notes, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
