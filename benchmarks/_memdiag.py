"""Memory diagnostics for the memory model (GPU): what is alive at the peak, and what single ops cost.

    PYTHONPATH=src:. python3 -m benchmarks._memdiag           # SDPA backends and sampler probes
    (benchmarks.memory_model --explain uses `explain_peak` on every configuration)

`explain_peak(fn)` runs fn with PyTorch's allocation history on, replays the trace to the moment of
the peak and groups the allocations alive then by the rap/benchmarks source line that made them
(plus the innermost Python frame), so every byte of a measured peak is attributed.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

MB = 1e6


def _site(frames: list[dict]) -> str:
    ours = next((f for f in frames if "/rap/" in f["filename"] or "benchmarks/" in f["filename"]), None)
    inner = next((f for f in frames if f["filename"].endswith(".py")), None)
    parts = []
    if ours is not None:
        parts.append(f"{os.path.basename(ours['filename'])}:{ours['line']} {ours['name']}")
    if inner is not None and inner is not ours:
        parts.append(f"<- {os.path.basename(inner['filename'])}:{inner['line']} {inner['name']}")
    return " ".join(parts) or "(no python frame)"


def explain_peak(fn, top: int = 12) -> dict:
    """Run fn() with allocation history; return the measured peak and the allocations alive at it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    dev = torch.cuda.current_device()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        start = len(torch.cuda.memory._snapshot()["device_traces"][dev])  # events of earlier rows, if kept
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated()
    trace = snap["device_traces"][dev][start:]
    live: dict[int, tuple[int, list]] = {}
    cur = best = baseline
    best_live: dict[int, tuple[int, list]] = {}
    best_i = -1
    for i, ev in enumerate(trace):
        act = ev["action"]
        if act == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            cur += ev["size"]
            if cur > best:
                best, best_i = cur, i
                best_live = dict(live)
        elif act == "free_completed":
            item = live.pop(ev["addr"], None)
            if item is not None:
                cur -= item[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in best_live.values():
        g = groups[_site(frames)]
        g[0] += size
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"baseline_bytes": baseline, "measured_peak_bytes": measured, "replayed_peak_bytes": best,
            "events": len(trace), "peak_event": best_i,
            "alive_at_peak": [{"site": k, "bytes": v[0], "count": v[1]} for k, v in ranked[:top]],
            "alive_at_peak_other_bytes": sum(v[0] for _, v in ranked[top:])}


def print_explain(ex: dict) -> None:
    print(f"  baseline {ex['baseline_bytes'] / MB:.1f} MB, peak {ex['measured_peak_bytes'] / MB:.1f} MB "
          f"(replayed {ex['replayed_peak_bytes'] / MB:.1f}), {ex['events']} events")
    for g in ex["alive_at_peak"]:
        print(f"    {g['bytes'] / MB:9.2f} MB  x{g['count']:<4d} {g['site']}")
    print(f"    {ex['alive_at_peak_other_bytes'] / MB:9.2f} MB  other")


def _peak_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def sdpa_probe() -> list[dict]:
    """Extra bytes of one causal prefill SDPA call per backend, q/k/v laid out as rap's prefill has them."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for B, H, Hkv, P, D in [(4, 32, 32, 2048, 128), (16, 32, 32, 1024, 128), (8, 32, 32, 4000, 128),
                            (8, 16, 8, 2048, 128), (4, 9, 3, 8192, 64), (1, 9, 3, 8000, 64)]:
        q = torch.randn(B, H, P, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, P, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, P, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        gqa = H != Hkv
        unit = B * P * H * D * 2
        for name, backends in [("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                               ("flash", [SDPBackend.FLASH_ATTENTION]),
                               ("efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
            def call(q=q, k=k, v=v, backends=backends, D=D, gqa=gqa):  # bound now: the loop rebinds them
                kw = dict(is_causal=True, scale=D ** -0.5, enable_gqa=gqa)
                if backends is None:
                    return F.scaled_dot_product_attention(q, k, v, **kw)
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, k, v, **kw)
            try:
                peak = _peak_of(call)
                rows.append({"shape": f"B{B} H{H}/{Hkv} P{P} D{D}", "backend": name, "extra_bytes": peak,
                             "in_q_units": peak / unit})
            except Exception as exc:  # backend not available for this shape
                rows.append({"shape": f"B{B} H{H}/{Hkv} P{P} D{D}", "backend": name, "error": str(exc)[:120]})
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def sampler_probe() -> list[dict]:
    """Extra bytes of rap's sampler (pick_tokens) over [B, V] fp32 logits, per element."""
    from rap.decode.sampling import pick_tokens

    rows = []
    for B, V in [(1, 49152), (8, 49152), (32, 49152), (1, 151936), (16, 151936), (8, 32000), (16, 32000)]:
        logits = torch.randn(B, V, device="cuda")
        noise = torch.rand(B, V, device="cuda")
        t, p = torch.ones((), device="cuda"), torch.full((), 0.9, device="cuda")
        peak = _peak_of(lambda logits=logits, noise=noise: pick_tokens(logits, t, p, noise))
        sort_peak = _peak_of(lambda logits=logits: (logits / t).sort(-1, descending=True))
        rows.append({"B": B, "V": V, "sampler_extra_per_elem": peak / (B * V),
                     "sort_extra_per_elem": sort_peak / (B * V)})
        del logits, noise
    return rows


def main() -> None:
    from benchmarks.common import print_table, write_json

    sd = sdpa_probe()
    print_table(sd, ["shape", "backend", "extra_bytes", "in_q_units", "error"])
    sp = sampler_probe()
    print_table(sp, ["B", "V", "sampler_extra_per_elem", "sort_extra_per_elem"])
    write_json("memdiag-probes.json", {"sdpa": sd, "sampler": sp})


if __name__ == "__main__":
    main()
