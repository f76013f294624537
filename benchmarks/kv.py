"""KV-cache compression on the GPU, in one command: correctness, memory, decode-attention speed, needle.

    python -m benchmarks.kv                        # GPU; random-weight SmolLM2-shaped model (timing/bytes only)
    python -m benchmarks.kv --model smollm2-135m   # + needle accuracy per press x budget on the real model
    python -m benchmarks.kv --smoke                # CPU: tiny sizes, runs every section end to end

Sections (each a list of rows in the JSON, printed as a table):
  correctness  varlen decode attention (Triton and the PyTorch reference) vs a float64 loop on the kept
               tokens, random per-head lengths, fp32 / bf16, one decode token and a 5-token chunk;
               plus one decode step of the model through a 100% compressed cache vs a DynamicCache;
  memory       a 32k-token prompt: cache bytes measured after compression vs budget x bytes per token,
               the memory model's KV term, and the dense cache that kvpress's AdaKVPress keeps (it only
               masks evicted keys at attention time, so its cache is the full DynamicCache: measured here
               as the DynamicCache after the same prefill; kvpress itself pins transformers<5.3 and is not run);
  latency      one layer's decode attention (batch 1 and 8, 8k-64k context): HF's SDPA path on the full
               dense cache vs our Triton kernel on Ada-KV-shaped per-head lengths at 100/20/10%, timed as
               CUDA-graph replays; plus one whole-model decode step (eager) at 32k;
  needle       (with --model) accuracy per press x budget, averaged over depths and lengths.
Writes $OUT/kv-<date>.json with headline keys cache_bytes_measured, cache_bytes_expected,
kvpress_adakv_cache_bytes, decode_attn_speedup_10pct_32k, needle_accuracy, and plots beside it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import time

import torch
import torch.nn.functional as F
from rap.core.hf import DynamicCache

from benchmarks.common import out_dir, print_table, shape_config, write_json
from rap.kv import AdaKV, Budget, PyramidKV, SnapKV, StreamingLLM, adaptive_keep_mask, compress
from rap.kv.attention import triton_available, varlen_attention_torch, varlen_attention_triton
from rap.kv.cache import FlatKV, cache_nbytes
from rap.core.hf import cache_kwargs
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView
from rap.sources import model_from_config

TINY = dict(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)


def kv_shape_config(smoke: bool, max_position_embeddings: int = 65536):
    """SmolLM2's shape with room for 32k contexts (random weights), or a tiny Llama for --smoke."""
    if smoke:
        return shape_config("tiny-llama", **TINY)
    return shape_config("smollm2-135m", max_position_embeddings=max_position_embeddings)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- correctness ----------------------------------------------------------------------------
def random_layout(B, H, D, lengths, dtype, device, slack=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    capacity = lengths + torch.randint(0, slack + 1, lengths.shape, generator=g)
    starts = torch.cumsum(capacity, 0) - capacity
    total = int(capacity.sum())
    keys = torch.randn(total, D, generator=g).to(dtype).to(device)
    values = torch.randn(total, D, generator=g).to(dtype).to(device)
    return FlatKV(keys, values, starts.to(device), lengths.to(device), int(lengths.max()), B, H)


def reference_float64(query, kv: FlatKV, scaling):
    B, Hq, q, D = query.shape
    g = Hq // kv.num_kv_heads
    out = torch.zeros(B, q, Hq, D, dtype=torch.float64, device=query.device)
    for b in range(B):
        for h in range(kv.num_kv_heads):
            k, v = kv.dense(b * kv.num_kv_heads + h)
            k, v = k.double(), v.double()
            n = k.shape[0]
            qs = query[b, h * g:(h + 1) * g].double()  # [g, q, D]
            s = torch.einsum("gqd,nd->gqn", qs, k) * scaling
            vis = torch.arange(n, device=k.device).view(1, 1, n) <= (n - q + torch.arange(q, device=k.device)).view(1, q, 1)
            s = s.masked_fill(~vis, float("-inf"))
            out[b, :, h * g:(h + 1) * g] = torch.einsum("gqn,nd->gqd", torch.softmax(s, -1), v).transpose(0, 1)
    return out


def rel_err(out, ref):
    diff = (out.double() - ref).norm(dim=-1)
    return (diff / ref.norm(dim=-1).clamp_min(1e-12)).max().item()


def correctness(device: str, smoke: bool) -> list[dict]:
    rows = []
    cases = [(1, 3, 3, 64, 1, 3277), (8, 3, 3, 64, 1, 3277), (2, 3, 3, 64, 5, 2000), (2, 2, 4, 128, 1, 1000),
             (1, 4, 1, 32, 1, 500)]
    if smoke:
        cases = [(1, 3, 3, 64, 1, 200), (2, 3, 3, 64, 5, 100)]
    for B, H, g, D, q, avg in cases:
        gen = torch.Generator().manual_seed(B + q + D)
        # Ada-KV-like skew: per-head lengths from the top-k-with-safeguard rule on skewed random scores
        scores = torch.rand(B, H, avg * 4, generator=gen) ** torch.linspace(0.5, 6, H).view(1, H, 1)
        lengths = adaptive_keep_mask(scores, avg, 0.2).sum(-1) + q
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
            kv = random_layout(B, H, D, lengths, dtype, device, seed=D)
            query = torch.randn(B, H * g, q, D, generator=gen).to(dtype).to(device)
            ref = reference_float64(query, kv, D ** -0.5)
            row = {"B": B, "kv_heads": H, "group": g, "head_dim": D, "q": q, "dtype": str(dtype).split(".")[-1],
                   "min_len": int(lengths.min()), "max_len": int(lengths.max()), "tol": tol,
                   "torch_rel_err": rel_err(varlen_attention_torch(query, kv, D ** -0.5), ref)}
            if device == "cuda" and triton_available():
                row["triton_rel_err"] = rel_err(varlen_attention_triton(query, kv, D ** -0.5), ref)
            row["pass"] = all(row[k] < tol for k in ("torch_rel_err", "triton_rel_err") if k in row)
            rows.append(row)
    return rows


@torch.no_grad()
def model_step_check(view: BlockView, device: str, T: int) -> dict:
    """One decode step's logits through a 100% compressed cache vs a DynamicCache, same random model."""
    ids = torch.randint(10, view.shape.vocab_size, (2, T), device=device)
    nxt = torch.randint(10, view.shape.vocab_size, (2, 1), device=device)
    dc = DynamicCache(config=view.model.config)
    view.model(ids, **cache_kwargs(dc), use_cache=True, logits_to_keep=1)
    ref = view.model(nxt, **cache_kwargs(dc), use_cache=True).logits.float()
    comp = compress(view, SnapKV(), ids, Budget(kv_ratio=1.0), reserve=1)
    got = view.model(nxt, **cache_kwargs(comp.cache), use_cache=True).logits.float()
    return {"prompt": T, "dtype": str(view.dtype).split(".")[-1],
            "max_abs_logit_diff": (got - ref).abs().max().item(), "ref_logit_scale": ref.abs().max().item(),
            "argmax_equal": bool((got.argmax(-1) == ref.argmax(-1)).all())}


# ---- memory ---------------------------------------------------------------------------------
@torch.no_grad()
def memory(view: BlockView, device: str, T: int, ratios: list[float], new_tokens: int) -> list[dict]:
    s = view.shape
    per_token_head = 2 * s.head_dim * s.dtype_bytes  # one key row + one value row
    mem = MemoryModel.from_view(view)
    mask = BlockMask.full(view.num_layers)
    ids = torch.randint(10, s.vocab_size, (1, T), device=device)
    rows = []

    def alloc() -> int:
        return torch.cuda.memory_allocated() if device == "cuda" else 0

    gc.collect()
    base = alloc()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    dc = DynamicCache(config=view.model.config)
    view.model(ids, **cache_kwargs(dc), use_cache=True, logits_to_keep=1)
    sync(device)
    dense = {"press": "none (DynamicCache)", "budget": 1.0, "prefill_s": time.perf_counter() - t0,
             "cache_bytes_measured": cache_nbytes(dc), "cache_bytes_expected": s.num_layers * T * s.num_kv_heads
             * per_token_head, "allocated_delta_bytes": alloc() - base,
             "peak_prefill_bytes": (torch.cuda.max_memory_allocated() - base) if device == "cuda" else None,
             "memory_model_kv_bytes": mem.kv_bytes(Request(1, T, 1), mask, 1.0) - s.num_layers * s.num_kv_heads
             * per_token_head}
    del dc
    gc.collect()
    rows.append(dense)
    for press in (AdaKV(SnapKV()), SnapKV(), PyramidKV(), StreamingLLM()):
        for r in ratios:
            gc.collect()
            base = alloc()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            comp = compress(view, press, ids, Budget(kv_ratio=r))
            sync(device)
            elapsed = time.perf_counter() - t0
            expected = sum(comp.layer_tokens.values()) * s.num_kv_heads * per_token_head
            row = {"press": press.name, "budget": r, "prefill_s": elapsed, "cache_bytes_measured": comp.cache.nbytes,
                   "cache_bytes_expected": expected, "allocated_delta_bytes": alloc() - base,
                   "peak_prefill_bytes": (torch.cuda.max_memory_allocated() - base) if device == "cuda" else None}
            lengths = torch.cat([layer.kept_lengths().reshape(-1) for layer in comp.cache.compressed_layers().values()])
            row["head_tokens_min"], row["head_tokens_max"] = int(lengths.min()), int(lengths.max())
            del comp
            gc.collect()
            # with a decode reserve the cache is what the memory model's KV term counts
            comp = compress(view, press, ids, Budget(kv_ratio=r), reserve=new_tokens)
            row["with_reserve_bytes"] = comp.cache.nbytes
            row["memory_model_kv_bytes"] = mem.kv_bytes(Request(1, T, new_tokens), mask, r)
            row["ratio_vs_dense"] = row["cache_bytes_measured"] / dense["cache_bytes_measured"]
            del comp
            gc.collect()
            rows.append(row)
    return rows


# ---- latency --------------------------------------------------------------------------------
def time_ms(fn, device: str, iters: int, graph: bool) -> float:
    for _ in range(3):
        fn()
    sync(device)
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


class _AttnStub(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def latency(config, device: str, contexts: list[int], batches: list[int], ratios: list[float],
            iters: int) -> list[dict]:
    from rap.core.hf import sdpa_attention

    H, Hq, D = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    stub = _AttnStub(Hq // H)
    scale = D ** -0.5
    fast = varlen_attention_triton if device == "cuda" and triton_available() else varlen_attention_torch
    rows = []
    for T in contexts:
        for B in batches:
            gen = torch.Generator(device=device).manual_seed(T + B)
            q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=gen)
            k = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
            v = torch.randn_like(k)
            # Full cache: transformers' own SDPA path, and plain SDPA under each backend in both GQA
            # forms (enable_gqa, or the group's query heads packed as query rows); the fastest is the baseline.
            baselines = {"hf_sdpa": lambda: sdpa_attention(stub, q, k, v, None, scaling=scale)}
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                packed = q.reshape(B, H, Hq // H, D)
                for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                    def gqa(be=backend):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

                    def pack(be=backend):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(packed, k, v, scale=scale)

                    baselines[f"{backend.name.lower()}_gqa"] = gqa
                    baselines[f"{backend.name.lower()}_packed"] = pack
            timings = {}
            for name, fn in baselines.items():
                try:
                    timings[name] = time_ms(fn, device, iters, True)
                except Exception as e:  # a backend that does not take this shape
                    timings[name] = None
                    print(f"  baseline {name} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            ok = {n: t for n, t in timings.items() if t is not None}
            best = min(ok, key=ok.get)
            full_ms = ok[best]
            row = {"context": T, "batch": B, "full_sdpa_ms": full_ms, "full_baseline": best,
                   "hf_sdpa_ms": timings.get("hf_sdpa"), "baselines_ms": timings,
                   "full_kv_bytes": 2 * k.numel() * k.element_size()}
            del k, v
            for r in ratios:
                tokens = max(1, math.ceil(r * T))
                scores = torch.rand(B, H, T, device=device, generator=gen) ** torch.linspace(0.5, 6, H,
                                                                                            device=device).view(1, H, 1)
                lengths = adaptive_keep_mask(scores, tokens, 0.2).sum(-1).cpu() if r < 1 else torch.full((B, H), T)
                del scores
                kv = random_layout(B, H, D, lengths, dtype, device, slack=0)
                ms = time_ms(lambda: fast(q, kv, scale), device, iters, True)
                key = f"{int(round(r * 100))}pct"
                row[f"ours_{key}_ms"] = ms
                row[f"speedup_{key}"] = full_ms / ms
                if r == 1.0:
                    full_ours = ms
                else:
                    row[f"speedup_{key}_vs_ours_full"] = full_ours / ms
                del kv
            rows.append(row)
            gc.collect()
    return rows


def _try_graph(fn, device: str, iters: int) -> float | None:
    """The step replayed as one CUDA graph (launch overhead removed), or None if it cannot be captured."""
    if device != "cuda":
        return None
    try:
        return time_ms(fn, device, iters, graph=True)
    except Exception as e:  # e.g. a host sync inside the forward
        print(f"  graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        torch.cuda.synchronize()
        return None


@torch.no_grad()
def decode_step(view: BlockView, device: str, T: int, batches: list[int], ratio: float, iters: int) -> list[dict]:
    """Whole-model decode step (eager HF forward, one token) with the full DynamicCache vs a compressed cache."""
    rows = []
    for B in batches:
        ids = torch.randint(10, view.shape.vocab_size, (B, T), device=device)
        nxt = torch.randint(10, view.shape.vocab_size, (B, 1), device=device)
        dc = DynamicCache(config=view.model.config)
        view.model(ids, **cache_kwargs(dc), use_cache=True, logits_to_keep=1)

        def step_dense():
            view.model(nxt, **cache_kwargs(dc), use_cache=True)
            dc.crop(-1)

        dense_ms = time_ms(step_dense, device, iters, graph=False)
        dense_graph_ms = _try_graph(step_dense, device, iters)
        del dc
        gc.collect()
        comp = compress(view, AdaKV(SnapKV()), ids, Budget(kv_ratio=ratio), reserve=8)

        def step_comp():
            view.model(nxt, **cache_kwargs(comp.cache), use_cache=True)
            comp.cache.crop(-1)

        comp_ms = time_ms(step_comp, device, iters, graph=False)
        comp_graph_ms = _try_graph(step_comp, device, iters)
        rows.append({"context": T, "batch": B, "budget": ratio, "dense_step_ms": dense_ms, "adakv_step_ms": comp_ms,
                     "speedup": dense_ms / comp_ms, "dense_step_graph_ms": dense_graph_ms,
                     "adakv_step_graph_ms": comp_graph_ms,
                     "speedup_graph": dense_graph_ms / comp_graph_ms if dense_graph_ms and comp_graph_ms else None})
        del comp
        gc.collect()
    return rows


# ---- needle ---------------------------------------------------------------------------------
def needle(model: str, device: str, budgets: list[float], lengths: list[int] | None, depths: list[float],
           presses: str, dtype: str | None) -> tuple[list[dict], dict, dict]:
    from rap.eval.needle import run_needle, summarize
    from rap.kv import make_press
    from rap.eval.needle import default_lengths
    from rap.sources import load_view

    view, tok = load_view(model, dtype=dtype, device=device)
    lens = lengths or default_lengths(view.shape.max_context)
    chosen = {"full": None, **{p: make_press(p) for p in presses.split(",")}}
    rows = run_needle(view, tok, chosen, budgets, lens, depths, max_new_tokens=32)
    return rows, summarize(rows), {"model": view.name, "lengths": lens, "depths": depths,
                                   "dtype": str(view.dtype)}


@torch.no_grad()
def kvpress_side_by_side(model: str | None, T: int, ratio: float) -> dict:
    """kvpress's AdaKVPress and ours on the same model and prompt, CPU, in an environment where
    kvpress imports (it pins transformers<5.3; see --kvpress). Measures what each cache holds."""
    import kvpress
    import transformers
    from kvpress import AdaKVPress, SnapKVPress

    if model:
        from rap.sources import load_view

        view, _ = load_view(model, dtype=torch.float32, device="cpu")
    else:
        torch.manual_seed(0)
        view = BlockView(model_from_config(kv_shape_config(False, 8192),
                                           dtype=torch.float32, device="cpu"), name="smollm2-shaped-random")
    ids = torch.randint(10, view.shape.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    dc = DynamicCache()
    press = AdaKVPress(SnapKVPress(compression_ratio=1.0 - ratio))
    with press(view.model):
        view.model(ids, **cache_kwargs(dc), use_cache=True, logits_to_keep=1)
    theirs = cache_nbytes(dc)
    attn = [view.attention_module(i) for i in range(view.num_layers)]
    masked = sum(len(m.masked_key_indices[0]) for m in attn if getattr(m, "masked_key_indices", None) is not None)
    for m in attn:
        m.masked_key_indices = None
    del dc
    comp = compress(view, AdaKV(SnapKV()), ids, Budget(kv_ratio=ratio))
    s = view.shape
    per_token_head = 2 * s.head_dim * s.dtype_bytes
    return {"model": view.name, "prompt_tokens": T, "kv_ratio": ratio, "kvpress_version": kvpress.__version__
            if hasattr(kvpress, "__version__") else "0.5.5", "transformers": transformers.__version__,
            "kvpress_adakv_cache_bytes": theirs, "kvpress_masked_entries": masked,
            "kvpress_masked_fraction": masked / (s.num_layers * s.num_kv_heads * T),
            "ours_adakv_cache_bytes": comp.cache.nbytes,
            "dense_cache_bytes": s.num_layers * s.num_kv_heads * T * per_token_head,
            "ours_expected_bytes": sum(comp.layer_tokens.values()) * s.num_kv_heads * per_token_head}


def plot_latency(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for B in sorted({r["batch"] for r in rows}):
        sub = [r for r in rows if r["batch"] == B]
        for key, style in (("speedup_10pct", "-o"), ("speedup_20pct", "--s")):
            if key in sub[0]:
                ax.plot([r["context"] for r in sub], [r[key] for r in sub], style, label=f"batch {B}, {key[8:]}")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode attention speedup vs full-cache SDPA")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="real model for the needle section: smollm2-135m, an HF folder or a .gguf")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run of every section")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: correctness,memory,latency,step,needle")
    ap.add_argument("--prompt", type=int, default=32768, help="prompt tokens for the memory section")
    ap.add_argument("--contexts", default="8192,16384,32768,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.4", help="needle budgets")
    ap.add_argument("--lengths", default=None, help="needle context lengths (default: 1k..8k up to the model's)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--presses", default="streaming,snapkv,pyramidkv,adakv")
    ap.add_argument("--dtype", default=None, help="needle model dtype (default bf16 on GPU)")
    ap.add_argument("--kvpress-json", default=None,
                    help="embed a --kvpress result (kvpress run in its own environment) in the headline JSON")
    ap.add_argument("--kvpress", action="store_true",
                    help="only: kvpress AdaKVPress vs ours on the same model/prompt, CPU (needs kvpress importable)")
    args = ap.parse_args()
    if args.kvpress:
        T = args.prompt if args.prompt != 32768 else 4096
        res = kvpress_side_by_side(args.model, T, 0.1)
        print(res)
        write_json(f"kv-kvpress-cpu-{datetime.date.today().isoformat()}.json", res)
        return
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    T = 512 if args.smoke else args.prompt
    contexts = [256, 1024] if args.smoke else [int(x) for x in args.contexts.split(",")]
    batches = [1, 2] if args.smoke else [int(x) for x in args.batches.split(",")]
    iters = 3 if args.smoke else 200
    result: dict = {"model_shape": "SmolLM2-135M config, random weights (timing and bytes only)" if not args.smoke
                    else "tiny random config (smoke)", "triton": triton_available(), "sections": {}}
    sec = result["sections"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    view = BlockView(model_from_config(kv_shape_config(args.smoke), dtype=dtype, device=device),
                     name="smollm2-shaped-random")

    if "correctness" not in skip:
        rows = correctness(device, args.smoke)
        print_table(rows, ["B", "kv_heads", "group", "head_dim", "q", "dtype", "min_len", "max_len",
                           "torch_rel_err", "triton_rel_err", "pass"])
        sec["correctness"] = rows
        step = model_step_check(view, device, 256 if args.smoke else 2048)
        print(step)
        sec["model_step_check"] = step
        result["correctness_pass"] = all(r["pass"] for r in rows)
    if "memory" not in skip:
        rows = memory(view, device, T, [0.1, 0.2], new_tokens=128)
        print_table(rows, ["press", "budget", "cache_bytes_measured", "cache_bytes_expected", "allocated_delta_bytes",
                           "with_reserve_bytes", "memory_model_kv_bytes", "head_tokens_min", "head_tokens_max",
                           "prefill_s"])
        sec["memory"] = rows
        ada = next(r for r in rows if r["press"] == "AdaKV(SnapKV)" and r["budget"] == 0.1)
        result.update(prompt_tokens=T, cache_bytes_measured=ada["cache_bytes_measured"],
                      cache_bytes_expected=ada["cache_bytes_expected"],
                      memory_model_kv_bytes_equal=all(r["with_reserve_bytes"] == r["memory_model_kv_bytes"]
                                                      for r in rows[1:]),
                      kvpress_adakv_cache_bytes=rows[0]["cache_bytes_measured"],
                      kvpress_adakv_cache_bytes_note="kvpress AdaKVPress keeps the whole DynamicCache (it masks "
                      "evicted keys at attention time): this is the DynamicCache measured after the same prefill; "
                      "kvpress was not run here (it pins transformers<5.3; see kvpress_measured_cpu)")
        if args.kvpress_json:
            import json
            from pathlib import Path

            result["kvpress_measured_cpu"] = json.loads(Path(args.kvpress_json).read_text())
    if "latency" not in skip:
        rows = latency(view.config, device, contexts, batches, [1.0, 0.2, 0.1], iters)
        print_table(rows, ["context", "batch", "full_baseline", "full_sdpa_ms", "hf_sdpa_ms", "ours_100pct_ms",
                           "ours_20pct_ms", "ours_10pct_ms", "speedup_20pct", "speedup_10pct",
                           "speedup_10pct_vs_ours_full"])
        sec["latency"] = rows
        at = {r["batch"]: r["speedup_10pct"] for r in rows if r["context"] == (32768 if not args.smoke else 1024)}
        result["decode_attn_speedup_10pct_32k"] = at.get(1)
        result["decode_attn_speedup_10pct_32k_by_batch"] = at
        plot_latency(rows, out_dir() / f"kv-latency-{datetime.date.today().isoformat()}.png")
    if "step" not in skip:
        rows = decode_step(view, device, T, batches, 0.1, 5 if args.smoke else 30)
        print_table(rows, ["context", "batch", "budget", "dense_step_ms", "adakv_step_ms", "speedup",
                           "dense_step_graph_ms", "adakv_step_graph_ms", "speedup_graph"])
        sec["decode_step"] = rows
    del view
    gc.collect()
    if args.model and "needle" not in skip:
        from rap.kv.report import plot_summary, table_text

        budgets = [float(x) for x in args.budgets.split(",")]
        depths = [float(x) for x in args.depths.split(",")]
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
        rows, summary, settings = needle(args.model, device, budgets, lengths, depths, args.presses, args.dtype)
        print(table_text(summary, "{:.3f}", f"needle accuracy, {settings['model']}"))
        sec["needle"] = {"settings": settings, "rows": rows}
        result["needle_accuracy"] = summary
        plot_summary(summary, out_dir() / f"kv-needle-{datetime.date.today().isoformat()}.png", "needle accuracy",
                     f"needle, {settings['model']}, lengths {settings['lengths']}")
    write_json(f"kv-{datetime.date.today().isoformat()}{'-smoke' if args.smoke else ''}.json", result)


if __name__ == "__main__":
    main()
