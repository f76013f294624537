"""Decode speed per precision level (issue 20, run 1): every block at the model dtype, at int8, at int4,
on rap's decoder (CUDA graphs, compiled blocks), against the bandwidth roofline and against torchao's own
`quantize_` + stock `generate` (the peer users have).

Models: the Llama-2-7B shape with RANDOM bf16 weights (timing and bytes only) and SmolLM2-135M with its
real weights. Grid: batch 1, 8, 32; prompt 512 + 128 new tokens (greedy). Levels: dtype, int8, and each
int4 group size the model's shapes allow (SmolLM2's hidden 576 takes g64, not g128).

Roofline per row: rows / ((weight bytes read per step + mean KV bytes attended per step) / measured
copy bandwidth), weight bytes = the memory model's parameter bytes of the plan on CUDA (tinygemm's
padded int4 storage is what its kernel reads; the embedding table counts only its B looked-up rows
when it is not tied to lm_head).

Each level runs on a fresh `Decoder` whose block weights are quantized from the resident bf16 copy
(`Decoder.block_weights`): the dense copy stays on the device beside the quantized one, so peak bytes
are not the plan's; that is the engine's residency job, measured separately. A check row per level
compares the quantized tensors' storage with the memory model's bytes and greedy tokens of SmolLM2
against a transformers model with quantized-then-dequantized weights (equal leading tokens: bf16
ties may part them late).

    PYTHONPATH=src:. python3 -m benchmarks.precision                       # GPU; $OUT/precision-<date>.json
    PYTHONPATH=src:. python3 -m benchmarks.precision --models smollm2-135m --batches 1
    PYTHONPATH=src:. python3 -m benchmarks.precision --smoke               # CPU, tiny random model
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import sys
import time
import traceback

import torch

from benchmarks.common import environment, out_dir, print_table, shape_config
from benchmarks.decode import copy_bandwidth, random_prompts, sync
from rap.decode.decoder import Decoder
from rap.core.memory import MemoryModel, format_bytes
from rap.core.model import BlockView
from rap.core.plan import Plan, PlanError, block_linears, int4_group_size
from rap.core.quant import fake_quantize, storage_bytes
from rap.sources import model_from_config

log = logging.getLogger("benchmarks.precision")
GOALS = {"int8": 1.6, "int4": 2.2}  # issue 20's batch-1 speed goals against bf16 (gpt-fast A100: 1.48x, 1.88x)


def build(name: str, device: str, dtype: torch.dtype) -> tuple[BlockView, object, bool]:
    if name == "smollm2-135m":
        from rap.sources import load_view

        view, tok = load_view("smollm2-135m", dtype=dtype, device=device)
        return view, tok, True
    cfg = shape_config("llama-2-7b") if name == "llama2-7b-shape" else shape_config("smoke-llama", intermediate_size=384)
    torch.manual_seed(0)
    model = model_from_config(cfg, dtype=dtype, device=device)
    model.generation_config.eos_token_id = None
    return BlockView(model, name=name), None, False


def levels_for(view: BlockView) -> list[str]:
    """dtype, int8, then every int4 group size (128, 64) that divides all in_features."""
    ins = {K for kind in ("attn", "ffn") for _, _, K in block_linears(kind, view.shape)}
    return ["dtype", "int8"] + [f"int4g{g}" for g in (128, 64) if all(K % g == 0 for K in ins)]


def weight_bytes_read(view: BlockView, mem: MemoryModel, plan: Plan, batch: int) -> int:
    total = mem.param_bytes(plan)
    embed, head = view.model.model.embed_tokens.weight, view.model.lm_head.weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    return total


def check_bytes(dec: Decoder, mem: MemoryModel, plan: Plan) -> dict:
    """Storage of the quantized tensors the decoder built vs the memory model, for every block."""
    attn, ffn = dec.block_weights(plan)
    bad = []
    for kind, blocks, fields in (("attn", attn, ("wqkv", "wq", "wk", "wv", "wo")), ("ffn", ffn, ("wgu", "wg", "wu", "wd"))):
        for i, w in enumerate(blocks):
            level = (plan.attn_levels if kind == "attn" else plan.ffn_levels)[i]
            if level in ("dtype", "drop"):
                continue
            fused = w.wqkv if kind == "attn" else w.wgu
            skip = ("wq", "wk", "wv") if kind == "attn" else ("wg", "wu")
            have = sum(storage_bytes(getattr(w, f)) for f in fields
                       if getattr(w, f) is not None and not (f in skip and fused is not None))
            e = mem.shape.dtype_bytes
            dense_linear = sum(N * K * e for _, N, K in block_linears(kind, mem.shape))
            want = mem.level_bytes(f"{kind}.{i}", level) - (mem.block_bytes[f"{kind}.{i}"] - dense_linear)
            if have != want:
                bad.append({"block": f"{kind}.{i}", "storage": have, "memory_model": want})
    return {"blocks_checked": sum(1 for _, lv in plan.items() if lv not in ("dtype", "drop")), "mismatches": bad}


@torch.no_grad()
def check_tokens(view: BlockView, tok, dec: Decoder, plan: Plan, new: int = 32) -> dict:
    """rap's greedy tokens under `plan` vs a transformers copy with fake-quantized weights."""
    ref = copy.deepcopy(view.model)
    rv = BlockView(ref)
    for name, level in plan.items():
        if level not in ("dtype", "drop"):
            for lin in rv.block_module(name).children():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(fake_quantize(lin.weight, level))
    texts = ["The capital of France is", "def fibonacci(n):"]
    rows = []
    for t in texts:
        ids = tok(t).input_ids
        x = torch.tensor([ids], device=view.device)
        want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                            pad_token_id=0)[0, len(ids):].tolist()
        got = dec.generate([ids], new, mask=plan).tokens[0]
        rows.append(next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want))))
    del ref, rv
    gc.collect()
    return {"equal_leading_tokens": rows, "of": new}


def rap_row(dec: Decoder, view, mem, plan: Plan, level: str, batch: int, prompt: int, new: int, bandwidth: float,
            repeats: int) -> dict:
    prompts = random_prompts(batch, prompt, view.shape.vocab_size)
    capture_ms = dec.prepare(plan, batch, prompt + new, prompt=prompt)
    best = None
    for _ in range(repeats):
        res = dec.generate(prompts, new, mask=plan)
        if best is None or res.timing.decode_ms < best.timing.decode_ms:
            best = res
    t = best.timing
    w = weight_bytes_read(view, mem, plan, batch)
    kv = batch * mem.kv_bytes_per_token(plan) * (prompt + (t.decode_steps + 1) / 2)
    roof = batch / ((w + kv) / bandwidth)
    return {"impl": "rap", "level": level, "batch": batch, "prompt": prompt, "new_tokens": new,
            "tok_s": t.tokens_per_s, "ms_per_token": t.ms_per_step, "prefill_ms": t.prefill_ms,
            "capture_ms": capture_ms, "weight_bytes_read": w, "kv_bytes_read_mean": int(kv), "roofline_tok_s": roof,
            "frac_of_roofline": t.tokens_per_s / roof, "param_bytes": mem.param_bytes(plan)}


def torchao_peer(model, level: str, device: str):
    """A deep copy quantized by torchao's quantize_ (block linears only), as a user would."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def blocks(module, fqn):
        return isinstance(module, torch.nn.Linear) and ".layers." in fqn

    q = copy.deepcopy(model)
    if level == "int8":
        quantize_(q, Int8WeightOnlyConfig(), filter_fn=blocks)
        return q, "Int8WeightOnlyConfig()"
    if level != "dtype":
        group = int4_group_size(level)
        fmt = "tile_packed_to_4d" if device == "cuda" else "plain"
        quantize_(q, Int4WeightOnlyConfig(group_size=group, int4_packing_format=fmt), filter_fn=blocks)
        return q, f"Int4WeightOnlyConfig(group_size={group}, int4_packing_format={fmt!r})"
    return q, "none (bf16)"


@torch.no_grad()
def stock_row(model, level: str, how: str, vocab: int, device: torch.device, batch: int, prompt: int,
              n1: int, n2: int) -> dict:
    """Stock generate (dynamic cache): decode ms/token from two lengths, so the prefill cancels out."""
    ids = torch.tensor(random_prompts(batch, prompt, vocab), device=device)

    def run(n):
        sync(device)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
        sync(device)
        return time.perf_counter() - t

    run(n1)
    t1, t2 = min(run(n1) for _ in range(2)), min(run(n2) for _ in range(2))
    ms = (t2 - t1) / (n2 - n1) * 1e3
    return {"impl": "torchao quantize_ + stock generate", "level": level, "config": how, "batch": batch,
            "prompt": prompt, "new_tokens": f"{n1}->{n2}", "tok_s": batch / (ms / 1e3), "ms_per_token": ms}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random model, tiny sizes")
    ap.add_argument("--models", default="llama2-7b-shape,smollm2-135m")
    ap.add_argument("--levels", default=None, help="comma list (default: dtype,int8 and the int4 group sizes allowed)")
    ap.add_argument("--batches", default=None, help="default 1,8,32")
    ap.add_argument("--prompt", type=int, default=None, help="default 512")
    ap.add_argument("--new", type=int, default=None, help="default 128")
    ap.add_argument("--stock-tokens", default=None, help="n1,n2 for the peer's stock generate (default 8,40)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="CUDA graphs without torch.compile'd blocks "
                    "(if compiling the torchao tensors fails)")
    ap.add_argument("--fuse", default="none", help="decoder fuse_projections: none | copy (quantized fused)")
    ap.add_argument("--max-seconds", type=float, default=560, help="skip what is left after this long")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    models = ["smoke-llama"] if args.smoke else args.models.split(",")
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,8,32")).split(",")]
    prompt = args.prompt or (32 if args.smoke else 512)
    new = args.new or (8 if args.smoke else 128)
    n1, n2 = [int(x) for x in (args.stock_tokens or ("2,4" if args.smoke else "8,40")).split(",")]
    date = datetime.date.today().isoformat()
    out_path = out_dir() / f"precision-{date}.json"
    bandwidth = copy_bandwidth(device, (2 << 30) if cuda else (64 << 20))
    result = {**environment(device), "kind": "precision-decode", "copy_bandwidth_bytes_per_s": bandwidth,
              "grid": {"batches": batches, "prompt": prompt, "new_tokens": new},
              "decoder": {"compile": not args.no_compile and cuda, "fuse_projections": args.fuse,
                          "graphs": cuda},
              "reproduce": "PYTHONPATH=src:. python3 -m benchmarks.precision " + " ".join(sys.argv[1:] if argv is None else argv),
              "notes": ["random weights for the 7B shape: timing and bytes only",
                        "each level's decoder keeps the bf16 copy beside the quantized one (peak bytes are not the plan's)"],
              "models": {}, "rows": []}
    rows = result["rows"]

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=2, default=str))

    print(f"{result['device']} | torch {result['versions'].get('torch')} | copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    for name in models:
        view, tok, real = build(name, str(device), dtype)
        mem = MemoryModel.from_view(view, on_cuda=cuda)
        levels = args.levels.split(",") if args.levels else levels_for(view)
        info = result["models"][name] = {"real_weights": real, "levels": levels, "checks": {},
                                         "dense_param_bytes": mem.param_bytes(Plan.full(view.num_layers))}
        print(f"{name}: {format_bytes(info['dense_param_bytes'])} params, levels {levels}")
        for level in levels:
            if time.perf_counter() - t_start > args.max_seconds:
                rows.append({"model": name, "level": level, "status": "skipped: --max-seconds"})
                continue
            try:
                plan = Plan.uniform(view.num_layers, level).validate(view.shape)
            except PlanError as e:
                rows.append({"model": name, "level": level, "status": f"not allowed: {e}"})
                continue
            dec = Decoder(view, step=None if cuda else "static", compile=False if args.no_compile else None,
                          fuse_projections=args.fuse)
            try:
                check = {"bytes": check_bytes(dec, mem, plan)}
                if real and tok is not None:
                    check["tokens"] = check_tokens(view, tok, dec, plan)
                info["checks"][level] = check
                print(f"  {level}: check {json.dumps(check)}")
                for b in batches:
                    if time.perf_counter() - t_start > args.max_seconds:
                        rows.append({"model": name, "level": level, "batch": b, "status": "skipped: --max-seconds"})
                        continue
                    row = {"model": name, **rap_row(dec, view, mem, plan, level, b, prompt, new, bandwidth, args.repeats)}
                    rows.append(row)
                    print(f"  rap {level} b{b}: {row['tok_s']:.1f} tok/s, {row['frac_of_roofline']:.0%} of roofline")
                    save()
            except Exception as e:
                traceback.print_exc()
                rows.append({"model": name, "level": level, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            dec.release()
            del dec
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if args.no_peer:
                continue
            try:
                q, how = torchao_peer(view.model, level, device.type)
                for b in batches:
                    if time.perf_counter() - t_start > args.max_seconds:
                        break
                    rows.append({"model": name, **stock_row(q, level, how, view.shape.vocab_size, device, b, prompt, n1, n2)})
                    save()
                del q
            except Exception as e:
                traceback.print_exc()
                rows.append({"model": name, "level": level, "impl": "torchao quantize_ + stock generate",
                             "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        # speed-up against dtype, per impl and batch
        for r in rows:
            if r.get("model") == name and "tok_s" in r:
                base = next((x for x in rows if x.get("model") == name and x.get("impl") == r["impl"]
                             and x.get("level") == "dtype" and x.get("batch") == r["batch"] and "tok_s" in x), None)
                r["speedup_vs_dtype"] = r["tok_s"] / base["tok_s"] if base else None
                kind = "int4" if r["level"].startswith("int4") else r["level"]
                if r["impl"] == "rap" and r["batch"] == 1 and kind in GOALS:
                    r["goal_speedup_b1"] = GOALS[kind]
        del view
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        save()
    print_table([r for r in rows if "tok_s" in r],
                ["model", "impl", "level", "batch", "tok_s", "speedup_vs_dtype", "frac_of_roofline", "capture_ms"])
    for r in rows:
        if "status" in r:
            print(f"{r.get('model')} {r.get('impl', 'rap')} {r['level']} b{r.get('batch', '-')}: {r['status']}")
    save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
