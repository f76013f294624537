"""Issue 21 runs 1-2: decode step time of rap's decoder under KV compression against the full cache, and its
cache bytes against the memory model.

Grid: shapes (Llama-2-7B, Qwen2.5-7B; random weights, bf16) x contexts (8k, 16k, 32k) x batch (1, 8) x
settings: full cache, uniform SnapKV, Ada-KV and int8 + Ada-KV at keep 10% / 20%, and int8 at 100%. The
whole decode step is timed (embedding -> every layer -> lm_head -> sampling bookkeeping, one CUDA
graph replay per step), from `Decoder.generate`'s own timing over `--new` tokens.

Prefill is synthetic: each kept layer gets random keys / values (and random window queries, scaled
per query head from 0.25x to 4x so that heads differ in how peaked their attention is and Ada-KV's
split over heads is uneven, as on real models) written through the decoder's own `keep_prompt` /
`keep_prompt_flat`, so token selection, the cache layout and every decode step are the decoder's real
code; only the prefill's layer math (irrelevant to the decode step's time) is skipped, which keeps
the whole grid within minutes. The per-head length spread each row got is reported (max / mean).

Bytes: `kv_tensor_bytes` (the decoder's cache tensors) against `model_exact_bytes` (the memory model
without allocator rounding: must be equal) and `model_cuda_bytes` (with the caching allocator's
rounding) against `allocated_bytes` (torch.cuda.memory_allocated freed by releasing the caches).

    python benchmarks/kv_decode_gpu.py                 # H200: the whole grid (~4 min), JSON under $OUT
    python benchmarks/kv_decode_gpu.py --smoke         # CPU: a tiny shape, every code path
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run as a script from the checkout

from benchmarks.common import print_table, shape_config, write_json  # noqa: E402


def synthetic_prefill(dec, seed: int = 0):
    """A stand-in for `Decoder._prefill`: random K/V per kept layer through the decoder's own keep functions."""
    import rap.decode.decoder as decode

    def prefill(ws, mask, ids, pad, plan=None):
        n, P = ids.shape
        g = torch.Generator(dec.device).manual_seed(seed)
        s = dec.view.shape
        W = plan.scorer.window if plan is not None else 1
        scale = torch.logspace(-2, 2, s.num_heads, base=2.0, device=dec.device, dtype=dec.dtype)[None, :, None, None]
        for i in mask.kept_attn_layers:
            a, cache = dec.attn[i], ws.kv[i]
            k = torch.randn(n, s.num_kv_heads, P, s.head_dim, device=dec.device, dtype=dec.dtype, generator=g)
            v = torch.randn(n, s.num_kv_heads, P, s.head_dim, device=dec.device, dtype=dec.dtype, generator=g)
            q = torch.randn(n, s.num_heads, min(W, P), s.head_dim, device=dec.device, dtype=dec.dtype,
                            generator=g) * scale
            if isinstance(cache, decode.FlatLayerCache):
                decode.keep_prompt_flat(q, k, v, cache, decode.replace(plan, r0=0), a.scaling)
            elif plan is None:
                kc, vc = cache
                kc[:n, :, :P], vc[:n, :, :P] = k, v
            else:
                decode.keep_prompt(q, k, v, *cache, plan, a.scaling)
            del q, k, v
        return torch.randn(n, s.vocab_size, device=dec.device, generator=g)

    return prefill


def run_row(dec, mem, mask, label, batch, context, new, ratio, press, bits, device):
    from rap.serve.backends import DecoderBackend
    from rap.kv.decode_cache import FlatLayerCache, KVLayout
    from rap.core.memory import MemoryModel, Request
    import rap.decode.decoder as decode

    V = dec.view.shape.vocab_size
    prompts = [[(7 * j + r) % (V - 3) + 3 for j in range(context)] for r in range(batch)]
    dec.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    kw = dict(kv_ratio=ratio, kv_press=press, kv_bits=bits)
    dec.generate(prompts, new, mask=mask, **kw)  # capture (and compile) outside the timed call
    gen = dec.generate(prompts, new, mask=mask, **kw)
    planned = DecoderBackend(dec.view, type(dec), decode).planning_request(Request(batch, context, new))
    layout = KVLayout(press or "adakv", bits)
    exact = MemoryModel.from_view(dec.view, on_cuda=False, kv_length_quantum=decode.LENGTH_QUANTUM)
    row = {"shape": label, "context": context, "batch": batch, "setting": f"{press or 'full'}-{bits}bit",
           "keep": ratio, "ms_per_step": gen.timing.ms_per_step, "tokens_per_s": gen.timing.tokens_per_s,
           "kv_tensor_bytes": dec.kv_resident_bytes,
           "model_exact_bytes": exact.kv_bytes(planned, mask, ratio, layout),
           "model_cuda_bytes": mem.kv_bytes(planned, mask, ratio, layout)}
    spreads = [float(c.lengths[:batch * c.kv_heads].float().max() / c.lengths[:batch * c.kv_heads].float().mean())
               for ws in dec._workspaces.values() for c in ws.kv.values() if isinstance(c, FlatLayerCache)]
    row["head_spread_max_over_mean"] = max(spreads) if spreads else 1.0
    row["bytes_equal"] = row["kv_tensor_bytes"] == row["model_exact_bytes"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        dec.release()
        row["allocated_bytes"] = held - torch.cuda.memory_allocated(device)
        row["held_vs_before_bytes"] = held - before
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, small sizes")
    ap.add_argument("--shapes", default=None, help="default llama-2-7b,qwen2.5-7b")
    ap.add_argument("--contexts", default=None, help="default 8192,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--keeps", default="0.1,0.2")
    ap.add_argument("--new", type=int, default=None, help="timed decode tokens (default 64; smoke 8)")
    ap.add_argument("--max-seconds", type=float, default=230, help="skip the rows left after this long")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the block functions (the serving default on CUDA; it recompiles the dense "
                         "attention per cache length, which does not fit the grid in 4 minutes)")
    args = ap.parse_args(argv)
    import rap.decode.decoder as decode
    from rap.core.mask import BlockMask
    from rap.core.memory import MemoryModel, Request
    from rap.core.model import BlockView
    from rap.sources import model_from_config

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (args.shapes or ("smoke-llama" if args.smoke else "llama-2-7b,qwen2.5-7b")).split(",")
    contexts = [int(c) for c in (args.contexts or ("256,512" if args.smoke else "8192,16384,32768")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]
    new = args.new or (8 if args.smoke else 64)
    settings = [(1.0, None, 16), (1.0, None, 8)]
    for k in keeps:
        settings += [(k, "snapkv", 16), (k, "adakv", 16), (k, "adakv", 8)]
    rows, skipped, t0 = [], [], time.time()
    for label in shapes:
        cfg = shape_config(label, max_position_embeddings=max(contexts) + new + 64)
        view = BlockView(model_from_config(cfg, dtype=dtype, device=str(device)))
        mask = BlockMask.full(view.num_layers)
        mem = MemoryModel.from_view(view, kv_length_quantum=decode.LENGTH_QUANTUM)
        step = "graph" if device.type == "cuda" else "static"
        dec = decode.Decoder(view, step=step, compile=args.compile and device.type == "cuda")
        dec._prefill = synthetic_prefill(dec)
        for context in contexts:
            for batch in batches:
                for ratio, press, bits in settings:
                    name = f"{label} {context} x{batch} {press or 'full'} {ratio:g} {bits}bit"
                    if time.time() - t0 > args.max_seconds:
                        skipped.append(f"{name}: out of time")
                        continue
                    if device.type == "cuda":
                        from rap.kv.decode_cache import KVLayout

                        req = Request(batch, context, new)
                        need = mem.kv_bytes(req, mask, ratio, KVLayout(press or "adakv", bits)) + \
                            2 * mem.prefill_activation_bytes(req, mask)
                        free = torch.cuda.mem_get_info(device)[0]
                        if need > 0.9 * free:
                            skipped.append(f"{name}: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} free")
                            continue
                    try:
                        rows.append(run_row(dec, mem, mask, label, batch, context, new, ratio, press, bits, device))
                    except torch.OutOfMemoryError:
                        skipped.append(f"{name}: out of memory")
                        dec.release()
                    print(f"[{time.time() - t0:6.1f} s] {name}", file=sys.stderr, flush=True)
        full = {(r["context"], r["batch"]): r["ms_per_step"] for r in rows
                if r["shape"] == label and r["setting"] == "full-16bit"}
        for r in rows:
            if r["shape"] == label and (r["context"], r["batch"]) in full:
                r["speedup_vs_full"] = full[(r["context"], r["batch"])] / r["ms_per_step"]
        dec.release()
        del dec, view
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["shape", "context", "batch", "setting", "keep", "ms_per_step", "speedup_vs_full",
                       "head_spread_max_over_mean", "kv_tensor_bytes", "model_exact_bytes", "bytes_equal",
                       "model_cuda_bytes", "allocated_bytes"])
    for s in skipped:
        print("skipped:", s)
    bad = [r for r in rows if not r["bytes_equal"]]
    print(f"bytes: {len(rows) - len(bad)}/{len(rows)} rows measured == memory model")
    write_json(f"kv-decode-{'smoke' if args.smoke else device.type}.json",
               {"what": "decode step time under KV compression vs full cache; cache bytes vs memory model",
                "new_tokens": new, "prefill": "synthetic K/V through the decoder's own keep functions",
                "compiled_block_functions": bool(args.compile),
                "rows": rows, "skipped": skipped, "seconds": time.time() - t0})
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
