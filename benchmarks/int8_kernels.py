"""Weight-only int8 (and int4) matmul kernels on CUDA, side by side, to pick rap's int8 kernel by measurement.

Issue 15 asks for the int8 level's kernel to come from a maintained library, picked by measurement. In rap's
decoder on the H200, torchao's `Int8Tensor` decoded at 0.10x bf16 (its linear dequantizes the whole weight per call
and Inductor does not fuse it there). This script times, on the Llama-2-7B shape's four linears at M = 1, 8, 32:

* ``bf16``            `F.linear` on the dense weight (the baseline);
* ``torchao-int8``    `F.linear` on torchao's `Int8Tensor` (what rap uses today), eager;
* ``aten-int8pack``   PyTorch's own weight-only int8 kernel, `torch._weight_int8pack_mm(x, q, scale)`;
* ``compile-dequant`` gpt-fast's `F.linear(x, q.to(x.dtype)) * scale` under `torch.compile` (Inductor fuses the cast);
* ``gemlite-a16w8``   gemlite's Triton A16W8 kernel, if the wheel was carried;
* ``int4-tinygemm``   `torch._weight_int4pack_mm` at group 128 (the int4 level's kernel), for reference.

Each is timed as a CUDA graph of 20 calls (so launch overhead is not counted, as in rap's captured decoder),
median of 10 replays. It also reports each kernel's max relative error against bf16 on the same values.

    python3 -m benchmarks.int8_kernels                    # on the GPU; JSON under $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # Llama-2-7B: name -> (out_features N, in_features K), fused as rap's decoder fuses them
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
}


def time_graph(fn, calls: int = 20, replays: int = 10) -> float:
    """Median microseconds per call of `fn()` replayed as one CUDA graph of `calls` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 values and bf16 scales (the int8 level's scheme)."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-6)
    q = (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def candidates(w: torch.Tensor, x: torch.Tensor):
    """name -> zero-argument callable computing x @ w.T with that kernel (None where it cannot be built: why)."""
    q, scale = int8_rowwise(w)
    out = {"bf16": lambda: F.linear(x, w)}
    try:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow

        wt = Int8Tensor.from_hp(w, PerRow())
        out["torchao-int8"] = lambda: F.linear(x, wt)
    except Exception as e:  # noqa: BLE001 - a missing candidate is reported, not fatal
        out["torchao-int8"] = f"{type(e).__name__}: {e}"[:200]
    try:
        torch._weight_int8pack_mm(x, q, scale)
        out["aten-int8pack"] = lambda: torch._weight_int8pack_mm(x, q, scale)
    except Exception as e:  # noqa: BLE001
        out["aten-int8pack"] = f"{type(e).__name__}: {e}"[:200]
    try:
        fused = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s, mode="max-autotune-no-cudagraphs")
        fused(x, q, scale)
        out["compile-dequant"] = lambda: fused(x, q, scale)
    except Exception as e:  # noqa: BLE001
        out["compile-dequant"] = f"{type(e).__name__}: {e}"[:200]
    try:
        from gemlite.helper import A16W8_INT8

        gl = A16W8_INT8(device="cuda").from_weights(w.clone())
        gl(x)
        out["gemlite-a16w8"] = lambda: gl(x)
    except Exception as e:  # noqa: BLE001
        out["gemlite-a16w8"] = f"{type(e).__name__}: {e}"[:200]
    try:
        from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                           _quantize_affine_tinygemm)
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        blk = [1, 128]
        s4, z4 = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, blk, torch.int32, 0, 15, 1e-6,
                                                 w.dtype, w.dtype)
        v4 = _quantize_affine_tinygemm(w, blk, s4, z4, torch.int32, 0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack((v4[:, ::2] << 4 | v4[:, 1::2]).to(torch.uint8), 8)
        sz = pack_tinygemm_scales_and_zeros(s4.reshape(w.shape[0], -1), z4.reshape(w.shape[0], -1), w.dtype)
        out["int4-tinygemm"] = lambda: torch._weight_int4pack_mm(x, packed, 128, sz)
    except Exception as e:  # noqa: BLE001
        out["int4-tinygemm"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,8,32")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("int8_kernels: needs a CUDA device", file=sys.stderr)
        return 2
    from rap.provenance import environment

    torch.manual_seed(0)
    rows = []
    print(f"{'linear':8} {'M':>3} {'kernel':16} {'us':>8} {'GB/s':>7} {'vs bf16':>7} {'max rel err':>11}")
    for name, (N, K) in SHAPES.items():
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        for M in [int(m) for m in args.ms.split(",")]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            base = None
            for kernel, fn in candidates(w, x).items():
                if isinstance(fn, str):
                    rows.append({"linear": name, "M": M, "kernel": kernel, "error": fn})
                    continue
                try:
                    err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                    us = time_graph(fn)
                except Exception as e:  # noqa: BLE001
                    rows.append({"linear": name, "M": M, "kernel": kernel, "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                weight_bytes = N * K * {"bf16": 2, "int4-tinygemm": 0.5}.get(kernel, 1)
                base = us if kernel == "bf16" else base
                row = {"linear": name, "N": N, "K": K, "M": M, "kernel": kernel, "us": us,
                       "weight_GBps": weight_bytes / us / 1e3, "speedup_vs_bf16": base / us, "max_rel_err": err}
                rows.append(row)
                print(f"{name:8} {M:>3} {kernel:16} {us:8.1f} {row['weight_GBps']:7.0f} {base / us:7.2f} {err:11.2e}")
    for r in rows:
        if "error" in r and r["linear"] == "qkv" and r["M"] == 1:
            print(f"{r['kernel']}: not run: {r['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "int8-kernels.json"
    path.write_text(json.dumps({"rows": rows, **environment(), "command": " ".join(sys.argv)}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
