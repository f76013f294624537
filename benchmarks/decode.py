"""Decode speed: stock `generate` vs rap's Decoder, dense and masked, against the bandwidth roofline.

Model: a Llama-2-7B-shaped model with RANDOM bf16 weights built on the GPU (timing only: the
shape is what matters for bytes; tokens are meaningless). The roofline of a row is

    rows / ((weight bytes read per step + mean KV bytes read per step) / copy bandwidth)

where weight bytes = resident parameters under the mask (the embedding table counts only its B
looked-up rows unless it is tied to lm_head), KV bytes = rows x kept attention layers' KV per token
x the mean number of cached tokens a step attends to, and the copy bandwidth is measured here with a
large device-to-device copy (read + write bytes / time).

    PYTHONPATH=src:. python3 -m benchmarks.decode            # GPU; writes $OUT/decode-<date>.json
    PYTHONPATH=src:. python3 -m benchmarks.decode --smoke    # CPU, tiny model, a minute

Stock `generate` is slow, so its decode time per token is (t(n2 tokens) - t(n1 tokens)) / (n2 - n1)
over few tokens (prefill cancels out). rap's rows time `Decoder.generate` after its graph is captured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback

import torch

from benchmarks.common import environment, out_dir, print_table, shape_config
from rap.decode.decoder import Decoder, bucket_batch, bucket_length
from rap.errors import BudgetError
from rap.core.hf import cache_kwargs
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request, format_bytes
from rap.core.model import BlockView
from rap.sources import model_from_config



# ---- measurements ------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n * 2 / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def weight_bytes_read(view: BlockView, mask: BlockMask, batch: int) -> int:
    total = view.resident_param_bytes(mask)
    embed, head = view.model.model.embed_tokens.weight, view.model.lm_head.weight
    if embed.data_ptr() != head.data_ptr():  # a decode step reads B rows of the table, not all of it
        total -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    return total


def roofline(view, mem: MemoryModel, mask, batch, prompt, steps, bandwidth) -> dict:
    mean_tokens = prompt + (steps + 1) / 2  # step s attends to prompt + s + 1 cached tokens
    kv = batch * mem.kv_bytes_per_token(mask) * mean_tokens
    w = weight_bytes_read(view, mask, batch)
    return {"weight_bytes_read": w, "kv_bytes_read_mean": int(kv),
            "roofline_tok_s": batch / ((w + kv) / bandwidth)}


# ---- masks that drop a share of the block bytes ------------------------------------------------------
def mask_dropping(view: BlockView, fraction: float, first: str) -> BlockMask:
    """Drop blocks of kind `first` (then the other kind) from the deepest layers up (never layer 0)
    until the dropped share of all block bytes is as close as it gets to `fraction`."""
    L = view.num_layers
    order = [f"{first}.{i}" for i in range(L - 1, 0, -1)]
    other = "attn" if first == "ffn" else "ffn"
    order += [f"{other}.{i}" for i in range(L - 1, 0, -1)]
    total = sum(b.param_bytes for b in view.blocks)
    dropped, names = 0, []
    for name in order:
        b = view.block(name).param_bytes
        if abs(dropped + b - fraction * total) >= abs(dropped - fraction * total):
            if dropped >= fraction * total:
                break
            continue
        dropped += b
        names.append(name)
    return BlockMask.from_drop(L, names)


def mask_info(view: BlockView, mask: BlockMask, label: str) -> dict:
    total_blocks = sum(b.param_bytes for b in view.blocks)
    dropped = sum(b.param_bytes for b in view.blocks if not mask.keeps(b.name))
    dense = view.resident_param_bytes(BlockMask.full(view.num_layers))
    return {"mask": label, "dropped_blocks": len(mask.dropped),
            "dropped_attn": sum(1 for k in mask.keep_attn if not k), "dropped_ffn": sum(1 for k in mask.keep_ffn if not k),
            "dropped_block_bytes_fraction": dropped / total_blocks, "dropped_bytes_fraction": dropped / dense}


# ---- runners ----------------------------------------------------------------------------------------
def random_prompts(batch: int, prompt: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, prompt), generator=g).tolist()


@torch.no_grad()
def stock_row(view, mem, mask, label, batch, prompt, n1, n2, bandwidth, device, repeats=2,
              static_compiled: bool = False) -> dict:
    """Stock `generate`: dynamic cache (default), or a StaticCache, with which transformers compiles
    the forward itself (auto-compile, mode reduce-overhead) - the ecosystem's fast path."""
    ids = torch.tensor(random_prompts(batch, prompt, view.shape.vocab_size), device=device)
    attn = torch.ones_like(ids)
    cache = None
    if static_compiled:
        from rap.core.hf import StaticCache

        cache = StaticCache(config=view.model.config, max_cache_len=prompt + n2)

    def run(n):
        kwargs = {}
        if cache is not None:
            cache.reset()
            kwargs.update(cache_kwargs(cache))
        sync(device)
        t = time.perf_counter()
        view.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False,
                            pad_token_id=0, eos_token_id=None, **kwargs)
        sync(device)
        return time.perf_counter() - t

    reset_peak(device)
    t0 = time.perf_counter()
    with view.masked(mask):
        run(n2)  # warm-up at the longer length: the allocator (and any compile) must not be timed
        warm_s = time.perf_counter() - t0
        t1, t2 = min(run(n1) for _ in range(repeats)), min(run(n2) for _ in range(repeats))
    ms = (t2 - t1) / (n2 - n1) * 1e3
    impl = "stock generate (static cache, auto-compile)" if static_compiled else "stock generate"
    row = {"impl": impl, "batch": batch, "prompt": prompt, "new_tokens": f"{n1}->{n2}", "warmup_s": warm_s,
           **mask_info(view, mask, label), "ms_per_token": ms, "tok_s": batch / (ms / 1e3),
           "prefill_ms": None, "peak_bytes": peak_bytes(device)}
    row.update(roofline(view, mem, mask, batch, prompt, n2, bandwidth))
    row["frac_of_roofline"] = row["tok_s"] / row["roofline_tok_s"]
    return row


def rap_row(dec: Decoder, view, mem, mask, label, batch, prompt, new, bandwidth, device) -> dict:
    prompts = random_prompts(batch, prompt, view.shape.vocab_size)
    capture_ms = dec.prepare(mask, batch, prompt + new, prompt=prompt)  # capture (and replay once)
    reset_peak(device)
    res = dec.generate(prompts, new, mask=mask)
    t = res.timing
    row = {"impl": "rap", "batch": batch, "prompt": prompt, "new_tokens": new, **mask_info(view, mask, label),
           "ms_per_token": t.ms_per_step, "tok_s": t.tokens_per_s, "prefill_ms": t.prefill_ms,
           "capture_ms": capture_ms, "peak_bytes": peak_bytes(device), "kv_resident_bytes": dec.kv_resident_bytes,
           "cache_len": bucket_length(prompt + new), "batch_bucket": bucket_batch(batch)}
    row.update(roofline(view, mem, mask, batch, prompt, t.decode_steps, bandwidth))
    row["frac_of_roofline"] = row["tok_s"] / row["roofline_tok_s"]
    return row


@torch.no_grad()
def check_against_generate(device: torch.device, dtype: torch.dtype, new: int = 32) -> dict:
    """Real model, real prompts: rap's greedy tokens vs stock generate's (stories260k, bundled)."""
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=dtype, device=str(device))
    texts = ["Once upon a time", "The little dog ran to the park and saw", "Tom and his mom went to the"]
    prompts = [tok(t).input_ids for t in texts]
    dec = Decoder(view, step=None if device.type == "cuda" else "static", compile=False)
    out = {"model": "stories260k", "compiled": False, "dtype": str(dtype).replace("torch.", ""), "new_tokens": new, "rows": []}
    for mask in (BlockMask.full(5), BlockMask.from_drop(5, ["attn.2", "ffn.4"])):
        for batch in ([p] for p in prompts[:1]), [prompts]:
            for group in batch:
                P = max(len(p) for p in group)
                ids = torch.zeros(len(group), P, dtype=torch.long)
                am = torch.zeros_like(ids)
                for r, p in enumerate(group):
                    ids[r, P - len(p):], am[r, P - len(p):] = torch.tensor(p), 1
                with view.masked(mask):
                    ref = view.model.generate(input_ids=ids.to(device), attention_mask=am.to(device), max_new_tokens=new,
                                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, P:].tolist()
                ours = dec.generate(group, new, mask=mask, pad_token_id=0).tokens
                same = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, ref)]
                out["rows"].append({"mask": str(mask), "batch": len(group), "equal_leading_tokens": same,
                                    "all_equal": ours == ref})
    out["all_equal"] = all(r["all_equal"] for r in out["rows"])
    return out


def fits(mem: MemoryModel, mask, batch, prompt, new, device, extra: int = 0) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, ""
    need = mem.peak_bytes(mask, Request(batch, prompt, new)) + extra
    total = torch.cuda.get_device_properties(device).total_memory
    return need < 0.92 * total, f"memory model: {format_bytes(need)} needed, {format_bytes(total)} on the device"


# ---- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random model, small sizes")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32)")
    ap.add_argument("--prompts", default=None, help="comma list (default 512,4096)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per rap row (default 128)")
    ap.add_argument("--stock-tokens", default=None, help="n1,n2 for stock generate (default 2,10)")
    ap.add_argument("--stock-static", action="store_true",
                    help="also time generate with a StaticCache (transformers auto-compiles it), at the end")
    ap.add_argument("--allow-weight-copies", action="store_true",
                    help="let --explore pick fused projections (a weight copy); default: no copies")
    ap.add_argument("--fractions", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--explore", action="store_true", help="compare decoder variants first, pick the fastest")
    ap.add_argument("--compile", action="store_true", help="without --explore: compile the block functions")
    ap.add_argument("--attention", default="sdpa", help="without --explore: sdpa | matmul")
    ap.add_argument("--fuse", default="none", help="without --explore: none | copy | inplace (q/k/v, gate/up)")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=450, help="skip the grid rows left after this long")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # see tests/test_decode.py: OpenMP wake-ups dominate batch-1 GEMVs
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(x) for x in (args.batches or ("1,2" if args.smoke else "1,8,32")).split(",")]
    prompts = [int(x) for x in (args.prompts or ("32,96" if args.smoke else "512,4096")).split(",")]
    new = args.new or (8 if args.smoke else 128)
    n1, n2 = [int(x) for x in (args.stock_tokens or ("2,4" if args.smoke else "2,10")).split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    date = datetime.date.today().isoformat()
    out_path = out_dir() / f"decode-{date}.json"
    t_start = time.perf_counter()

    shape_name = "smoke-llama (random)" if args.smoke else "Llama-2-7B shape (random bf16 weights, timing only)"
    torch.manual_seed(0)
    t = time.perf_counter()
    model = model_from_config(shape_config("smoke-llama" if args.smoke else "llama-2-7b"),
                              dtype=dtype, device=str(device))
    model.generation_config.eos_token_id = None
    view = BlockView(model, name=shape_name)
    mem = MemoryModel.from_view(view)
    build_s = time.perf_counter() - t
    bandwidth = copy_bandwidth(device, (4 << 30) if device.type == "cuda" else (64 << 20))  # >= 4 GiB: far past L2
    s = view.shape
    header = {
        **environment(),
        "model": shape_name,
        "model_shape": {"layers": s.num_layers, "hidden": s.hidden_size, "heads": s.num_heads, "kv_heads": s.num_kv_heads,
                        "head_dim": s.head_dim, "ffn": s.intermediate_size, "vocab": s.vocab_size,
                        "dtype": str(dtype).replace("torch.", ""), "param_bytes": view.resident_param_bytes(),
                        "kv_bytes_per_token": mem.kv_bytes_per_token()},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_definition": "rows / ((resident weights read per step [embedding: only the looked-up rows] + "
                               "mean KV bytes attended per step) / measured device-to-device copy bandwidth)",
        "random_weights": True,
        "reproduce": "PYTHONPATH=src:. python3 -m benchmarks.decode " + " ".join(sys.argv[1:]),
    }
    print(f"{header['device']} | torch {header['versions']['torch']} | transformers {header['versions']['transformers']}")
    print(f"{shape_name}: {format_bytes(view.resident_param_bytes())} params, built in {build_s:.1f}s; "
          f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    rows: list[dict] = []
    variants: list[dict] = []
    result: dict = {**header, "rows": rows, "variants": variants}

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=2, default=str))

    dense = BlockMask.full(view.num_layers)
    masks = {"dense": dense}
    for f in fractions:
        masks[f"ffn-heavy {f:.0%}"] = mask_dropping(view, f, "ffn")
        masks[f"attn-heavy {f:.0%}"] = mask_dropping(view, f, "attn")
    b0, p0 = batches[0], prompts[0]

    # 0. correctness on a real model before any timing
    try:
        result["check_vs_generate"] = check_against_generate(device, dtype)
        print("check vs generate:", json.dumps(result["check_vs_generate"]["rows"]))
    except Exception as e:  # reported, not fatal: the timing rows still matter
        traceback.print_exc()
        result["check_vs_generate"] = {"error": f"{type(e).__name__}: {e}"}
    save()

    # 1. stock generate over the grid, first: nothing compiled yet, no compile workers busy on the CPU
    #    (stock generate is bound by Python on the CPU, so it must not share it)
    grid = []
    for b in batches:
        for p in prompts:
            names = list(masks) if (b, p) == (b0, p0) else ["dense", "ffn-heavy 20%", "attn-heavy 20%"]
            grid.append((b, p, [n for n in names if n in masks]))
    for b, p, _ in grid if not args.no_stock else []:
        if not fits(mem, dense, b, p, new, device)[0]:
            continue
        for name in ["dense"] + (["ffn-heavy 20%"] if (b, p) == (b0, p0) else []):
            try:
                rows.append(stock_row(view, mem, masks[name], name, b, p, n1, n2, bandwidth, device, repeats=3))
            except torch.OutOfMemoryError as e:
                rows.append({"impl": "stock generate", "batch": b, "prompt": p, "mask": name,
                             "skipped": f"out of memory: {str(e).splitlines()[0]}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print_row(rows[-1])
            save()

    # 2. variants of the decoder at (b0, p0) and (b0, longest prompt), dense; the fastest runs the rest
    config = dict(compile=args.compile, attention=args.attention, fuse_projections=args.fuse)
    if args.explore:
        tried = [dict(compile=False, attention="sdpa", fuse_projections="none"),
                 dict(compile=False, attention="matmul", fuse_projections="none"),
                 dict(compile=True, attention="sdpa", fuse_projections="none"),
                 dict(compile=True, attention="matmul", fuse_projections="none")]
        for cfg in tried + ["copy", "inplace"]:
            if time.perf_counter() - t_start > args.max_seconds / 2:
                print("exploration stopped: time budget")
                break
            if isinstance(cfg, str):  # fused projections on top of the best unfused so far
                best = min(variants[:len(tried)], key=lambda v: v["score_ms"])
                cfg = {**best["config"], "fuse_projections": cfg}
            try:
                t = time.perf_counter()
                dec = Decoder(view, step=None if device.type == "cuda" else "static", **cfg)
                first_ms = dec.prepare(dense, b0, p0 + new, prompt=p0)
                r1 = rap_row(dec, view, mem, dense, "dense", b0, p0, new, bandwidth, device)
                r2 = rap_row(dec, view, mem, dense, "dense", b0, prompts[-1], new, bandwidth, device)
                v = {"config": cfg, "first_capture_ms": first_ms, "extra_weight_bytes": dec.extra_weight_bytes,
                     f"ms_b{b0}_p{p0}": r1["ms_per_token"], f"ms_b{b0}_p{prompts[-1]}": r2["ms_per_token"],
                     f"frac_b{b0}_p{p0}": r1["frac_of_roofline"], f"frac_b{b0}_p{prompts[-1]}": r2["frac_of_roofline"],
                     "score_ms": r1["ms_per_token"] + r2["ms_per_token"], "seconds": time.perf_counter() - t}
            except Exception as e:  # a variant that fails is reported, not fatal
                traceback.print_exc()
                v = {"config": cfg, "error": f"{type(e).__name__}: {e}", "score_ms": float("inf")}
            variants.append(v)
            print("variant", json.dumps(v, default=str))
            del dec
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
        # rap exists to fit memory budgets: a weight copy is used only when asked for, and then only
        # if it is >= 2% faster than the same configuration without it
        pool = [v for v in variants if args.allow_weight_copies or v["config"]["fuse_projections"] != "copy"]
        best = min(pool, key=lambda v: v["score_ms"])
        config = best["config"]
        if config["fuse_projections"] != "none":
            plain = [v for v in variants if v["config"] == {**config, "fuse_projections": "none"}]
            if plain and best["score_ms"] > 0.98 * plain[0]["score_ms"]:
                config = plain[0]["config"]
    result["decoder_config"] = config
    print("decoder config:", config)

    # 3. rap over the grid
    dec = Decoder(view, step=None if device.type == "cuda" else "static", **config)
    for b, p, names in grid:
        if time.perf_counter() - t_start > args.max_seconds:
            rows.append({"impl": "both", "batch": b, "prompt": p, "mask": "-", "skipped": "time budget of the run"})
            print(f"skip batch {b} prompt {p}: time budget")
            continue
        ok, why = fits(mem, dense, b, p, new, device, extra=dec.extra_weight_bytes)
        if not ok:
            rows.append({"impl": "both", "batch": b, "prompt": p, "mask": "dense", "skipped": f"does not fit ({why})"})
            print(f"skip batch {b} prompt {p}: {why}")
            continue
        for name in names:
            try:
                rows.append(rap_row(dec, view, mem, masks[name], name, b, p, new, bandwidth, device))
            except (BudgetError, torch.OutOfMemoryError) as e:
                rows.append({"impl": "rap", "batch": b, "prompt": p, "mask": name,
                             "skipped": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            print_row(rows[-1])
            save()
        if (b, p) == (b0, p0):
            # switching back to masks whose graphs are cached: a dictionary lookup
            times = []
            for _ in range(5):
                for name in names:
                    t = time.perf_counter()
                    dec.prepare(masks[name], b, p + new, prompt=p)
                    times.append((time.perf_counter() - t) * 1e3)
            result["mask_switch_ms_cached"] = statistics.median(times)
            result["mask_switch_ms_cached_max"] = max(times)
        dec.release()
        gc.collect()

    # 4. headline
    def find(impl, b, p, name):
        return next((r for r in rows if r["impl"] == impl and r["batch"] == b and r["prompt"] == p
                     and r.get("mask") == name and "skipped" not in r), None)

    rd, sd = find("rap", b0, p0, "dense"), find("stock generate", b0, p0, "dense")
    mask_rows = [r for r in rows if r["impl"] == "rap" and r["batch"] == b0 and r["prompt"] == p0
                 and r["mask"] != "dense" and "skipped" not in r]
    result["headline"] = {
        "setting": f"batch {b0}, prompt {p0}, {new} new tokens, {shape_name}",
        "dense_b1_frac_of_roofline": rd and rd["frac_of_roofline"],
        "dense_b1_tok_s": rd and rd["tok_s"],
        "roofline_b1_tok_s": rd and rd["roofline_tok_s"],
        "stock_generate_b1_tok_s": sd and sd["tok_s"],
        "speedup_vs_generate_b1": (rd and sd) and rd["tok_s"] / sd["tok_s"],
        "mask_speedups": [{"mask": r["mask"], "dropped_bytes_fraction": r["dropped_bytes_fraction"],
                           "dropped_block_bytes_fraction": r["dropped_block_bytes_fraction"],
                           "speedup_vs_rap_dense": r["tok_s"] / rd["tok_s"],
                           "target": 0.9 / (1 - r["dropped_bytes_fraction"]),
                           "meets_target": r["tok_s"] / rd["tok_s"] >= 0.9 / (1 - r["dropped_bytes_fraction"])}
                          for r in mask_rows] if rd else [],
        "mask_switch_ms_cached": result.get("mask_switch_ms_cached"),
        "mask_capture_ms_new": statistics.median([r["capture_ms"] for r in mask_rows]) if mask_rows else None,
        "first_capture_ms": rd and rd["capture_ms"],
        "decoder_config": config,
        "compile_and_capture_ms_first_ever": next((v["first_capture_ms"] for v in variants
                                                   if v.get("config", {}).get("compile") and "error" not in v), None),
        "capture_ms_new_batch_bucket": [r["capture_ms"] for r in rows if r["impl"] == "rap" and r["mask"] == "dense"
                                        and "skipped" not in r and (r["batch"], r["prompt"]) != (b0, p0)],
    }
    for v in variants:
        if v.get("config", {}).get("fuse_projections") != "none" and "error" not in v:
            kind = v["config"]["fuse_projections"]
            result["headline"][f"dense_b1_frac_of_roofline_fused_{kind}"] = v[f"frac_b{b0}_p{p0}"]
            result["headline"][f"fused_{kind}_extra_weight_bytes"] = v["extra_weight_bytes"]
    for k in ("dense_b1_frac_of_roofline", "speedup_vs_generate_b1", "mask_speedups", "mask_switch_ms_cached",
              "mask_capture_ms_new"):
        result[k] = result["headline"][k]
    save()

    # 5. the ecosystem's fast path, last (its compile is slow and must not starve the grid)
    if args.stock_static and not args.no_stock:
        dec.release()
        del dec
        gc.collect()
        try:
            r = stock_row(view, mem, dense, "dense", b0, p0, 4, 36, bandwidth, device, static_compiled=True)
            rows.append(r)
            print_row(r)
            if rd:
                result["headline"]["stock_static_compiled_b1_tok_s"] = r["tok_s"]
                result["headline"]["speedup_vs_generate_static_compiled_b1"] = rd["tok_s"] / r["tok_s"]
        except Exception as e:  # reported, not fatal
            traceback.print_exc()
            rows.append({"impl": "stock generate (static cache, auto-compile)", "batch": b0, "prompt": p0,
                         "mask": "dense", "skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        save()
    print()
    print_table([r for r in rows if "skipped" not in r],
                ["impl", "batch", "prompt", "mask", "dropped_bytes_fraction", "ms_per_token", "tok_s",
                 "roofline_tok_s", "frac_of_roofline", "capture_ms", "peak_gib"])
    print(json.dumps(result["headline"], indent=2, default=str))
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.0f}s)")


def print_row(r: dict) -> None:
    if "skipped" in r:
        print(f"{r['impl']:>14} b{r['batch']} p{r['prompt']} {r.get('mask')}: skipped ({r['skipped']})")
        return
    peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "-"
    r["peak_gib"] = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None
    cap = f" capture {r['capture_ms']:.0f} ms" if r.get("capture_ms") is not None else ""
    print(f"{r['impl']:>14} b{r['batch']:<3} p{r['prompt']:<5} {r['mask']:<16} drop {r['dropped_bytes_fraction']:.3f} "
          f"{r['ms_per_token']:8.2f} ms/tok {r['tok_s']:9.1f} tok/s  roofline {r['roofline_tok_s']:9.1f}  "
          f"frac {r['frac_of_roofline']:.3f}  peak {peak}{cap}", flush=True)


if __name__ == "__main__":
    main()
