"""Quantization peer: torchao int8 / int4 weight-only vs rap's block masks at the same byte budget.

What users pick instead of pruning under a memory budget is weight-only quantization. This script
quantizes the decoder blocks' Linear weights of SmolLM2-135M with torchao (embeddings, norms and the tied
lm_head stay bf16) and compares, at the same parameter bytes:

- ``dense``: bf16 (fp32 compute on CPU; bytes are counted as bf16 everywhere);
- ``int8-wo``: `Int8WeightOnlyConfig` (per-row scales);
- ``int4-wo``: on CUDA `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (tinygemm kernel) when
  the shapes allow it, else `IntxWeightOnlyConfig(int4, PerGroup)` (stores int4 values unpacked in int8 and
  dequantizes per matmul: its quality is int4's, its speed and stored bytes are not an int4 kernel's);
- ``rap@int8-bytes`` / ``rap@int4-bytes``: the profile-order block mask with the same parameter bytes;
- ``int8-wo + rap@80%``: rap on top of int8 weights (a quantized model's blocks are still blocks).

Bytes: `deploy_param_bytes` counts bf16 for unquantized tensors and, for quantized weights, the quantized
values at their bit width plus scales (bf16) and zero points (int8); `stored_param_bytes` is what the
tensors really occupy here. Quality: WikiText-2 test PPL (a token cap on CPU) and zero-shot PIQA + ARC-Easy
(lm-eval 0.4 through rap.eval.harness; BoolQ apart, shares of dense accuracy above chance and raw). Speed: stock `model.generate` greedy decode tokens/s (batch 1) for every
row, the same harness for all; on CUDA also a random-weight Llama-2-7B shape, where decode is
memory-bound (`--speed-shape`). torchao is imported lazily; if it cannot run, the JSON says why.

    python -m benchmarks.quant_peer --model PATH                  # GPU (carry the torchao wheel)
    python -m benchmarks.quant_peer --smoke                       # CPU, seconds, stories260k

torchao 0.18.0 (`pip install rap-runtime[quant]`) needs torch >= 2.11: it imports and runs int8 weight-only on
CPU with torch 2.13 (its CUDA .so files fail to load there, with a warning), and matches the GPU machine's
torch 2.11. Keep it out of a shared venv (`pip install --target DIR` + PYTHONPATH): once installed,
transformers imports it on every model load and each import prints those warnings.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import math
import time
from pathlib import Path

import torch

from benchmarks.common import environment, out_dir, print_table
from rap.data import WIKITEXT2_TEST, read_text
from rap.eval import harness
from rap.eval.perplexity import needs_bos, perplexity, token_windows
from rap.core.mask import BlockMask
from rap.core.model import BlockView

log = logging.getLogger("benchmarks.quant_peer")


def torchao_status() -> tuple[object | None, str]:
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
    except Exception as e:  # ImportError, or a C-extension/torch mismatch raised at import
        return None, f"torchao unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    import torchao

    return torchao, f"torchao {torchao.__version__} imported (torch {torch.__version__})"


def block_linear_filter(module, fqn: str) -> bool:
    """Quantize Linear layers inside decoder layers only (lm_head is tied to the embedding in SmolLM2)."""
    return isinstance(module, torch.nn.Linear) and ".layers." in f".{fqn}"


def group_size_for(model, preferred: int = 128) -> int:
    sizes = [m.in_features for n, m in model.named_modules() if block_linear_filter(m, n)]
    g = preferred
    while g > 1 and any(k % g for k in sizes):
        g //= 2
    return g


def param_bytes(model, bits: dict[int, int] | None = None) -> tuple[int, int]:
    """(deploy bytes, stored bytes) of the model's parameters, tied tensors once (see module doc)."""
    deploy = stored = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.data if isinstance(p, torch.nn.Parameter) else p
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor:
            names = t.__tensor_flatten__()[0]
            inner = {n: getattr(t, n) for n in names}
            stored += sum(x.numel() * x.element_size() for x in inner.values())
            width = _bit_width(t)
            for n, x in inner.items():
                if n in ("qdata", "packed_weight", "int_data"):
                    deploy += math.ceil(t.numel() * width / 8)
                elif x.dtype in (torch.int8, torch.uint8):
                    deploy += x.numel()
                else:
                    deploy += x.numel() * 2
        else:
            stored += t.numel() * t.element_size()
            deploy += t.numel() * 2
    return deploy, stored


def _bit_width(t) -> int:
    target = getattr(t, "target_dtype", None) or getattr(t, "dtype_name", None)
    if target is not None and "4" in str(target):
        return 4
    if "Int4" in type(t).__name__:
        return 4
    return 8


def quantize(model, kind: str, device: str) -> tuple[object, str]:
    """A quantized deep copy of `model` and a description of the torchao config used."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    q = copy.deepcopy(model)
    if kind == "int8":
        quantize_(q, Int8WeightOnlyConfig(), filter_fn=block_linear_filter)
        return q, "Int8WeightOnlyConfig() (per-row scales)"
    group = group_size_for(q)
    if device.startswith("cuda") and q.dtype == torch.bfloat16:
        try:
            quantize_(q, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"),
                      filter_fn=block_linear_filter)
            with torch.no_grad():
                q(input_ids=torch.ones(1, 4, dtype=torch.long, device=device))
            return q, f"Int4WeightOnlyConfig(group_size={group}, tile_packed_to_4d) (tinygemm)"
        except Exception as e:
            log.warning("int4 tinygemm failed (%s); using IntxWeightOnlyConfig", str(e).splitlines()[0][:160])
            q = copy.deepcopy(model)
            why = f"tinygemm int4 failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
    else:
        why = "no tinygemm/mslk int4 kernel on CPU; "
    quantize_(q, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)),
              filter_fn=block_linear_filter)
    return q, why + f"IntxWeightOnlyConfig(int4, PerGroup({group})) (unpacked int8 storage, dequantize per matmul)"


@torch.no_grad()
def decode_speed(model, vocab: int, device: str, prompt: int, new: int) -> float:
    """Stock generate, batch 1, greedy: decode tokens/s from the difference of two lengths."""
    ids = torch.randint(10, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def run(n: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    n1 = max(2, new // 4)
    run(n1)
    t1, t2 = run(n1), run(new)
    return (new - n1) / (t2 - t1) if t2 > t1 else float("nan")


def evaluate(model_or_view, tok, mask, args, windows) -> dict:
    zs = harness.evaluate(model_or_view, tok, args.tasks, limit=args.limit, batch_size=args.batch_size,
                          mask=mask, progress=False)
    lm = model_or_view.model if isinstance(model_or_view, BlockView) else model_or_view
    if mask is not None:
        with model_or_view.masked(mask):
            ppl = perplexity(lm, windows, 1, progress=False).ppl
    else:
        ppl = perplexity(lm, windows, 1, progress=False).ppl
    out = {"wikitext2_ppl": ppl, "mean_headline": zs["mean_headline"]}
    for name, r in zs["tasks"].items():
        out[name] = r[r["headline"]]
    return {**out, "tasks": zs["tasks"]}


def speed_shape_rows(shape: str, device: str, args) -> list[dict]:
    """Random-weight 7B-shaped model: decode tok/s of bf16, int8-wo, int4-wo and rap masks of equal bytes."""
    from benchmarks.quality import mask_for_budget
    from benchmarks.run import build_view

    view, _ = build_view(shape, None, device, torch.bfloat16)
    dense_bytes, _ = param_bytes(view.model)
    rows = [{"model": shape, "weights": "random (timing only)", "method": "dense", "deploy_param_bytes": dense_bytes,
             "param_ratio": 1.0, "tokens_per_s": decode_speed(view.model, view.shape.vocab_size, device, 128, 64)}]
    order = [f"ffn.{i}" for i in reversed(range(view.num_layers))] + [f"attn.{i}" for i in reversed(range(view.num_layers))]
    for kind in ("int8", "int4"):
        row = {"model": shape, "weights": "random (timing only)", "method": f"{kind}-wo"}
        try:
            q, how = quantize(view.model, kind, device)  # a second copy on the device (2 x 13.5 GB fits)
            dep, stored = param_bytes(q)
            row.update(config=how, deploy_param_bytes=dep, stored_param_bytes=stored, param_ratio=dep / dense_bytes,
                       tokens_per_s=decode_speed(q, view.shape.vocab_size, device, 128, 64))
            del q
            gc.collect()
            torch.cuda.empty_cache()
            mask = mask_for_budget(view, order, row["param_ratio"])
            with view.masked(mask):
                rap_tps = decode_speed(view.model, view.shape.vocab_size, device, 128, 64)
            rows.append(row)
            row = {"model": shape, "weights": "random (timing only)", "method": f"rap@{kind}-bytes",
                   "deploy_param_bytes": view.resident_param_bytes(mask),
                   "param_ratio": view.resident_param_bytes(mask) / dense_bytes, "tokens_per_s": rap_tps,
                   "blocks_dropped": len(mask.dropped)}
        except Exception as e:
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    del view
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default=None, help="profile JSON (removal order); default: the one-shot "
                                                         "profile in benchmarks/results/ if present")
    parser.add_argument("--tasks", default="piqa,arc_easy")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="0 = the whole test set")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--speed-shape", default=None, help="random-weight shape for decode speed "
                                                            "(default on CUDA: llama-2-7b)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.smoke:
        args.model, args.limit, args.ppl_tokens, args.seq_len, args.tasks = "stories260k", 4, 256, 64, "piqa"
    args.limit = args.limit or None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    date = datetime.date.today().isoformat()
    path = out_dir() / (args.name or f"quant-{date}.json")
    ao, status = torchao_status()
    payload = {**environment(), "kind": "quant", "model": args.model, "torchao_status": status,
               "bytes_note": "deploy_param_bytes: bf16 for unquantized tensors; quantized weights at their bit "
                             "width + bf16 scales + int8 zero points", "rows": []}
    if ao is None:
        path.write_text(json.dumps(payload, indent=2))
        print(status)
        print(f"wrote {path}")
        return

    from benchmarks.quality import mask_for_budget
    from rap.cli import load_view_for_cli

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    view, tok = load_view_for_cli(args.model, dtype=dtype, device=device)
    profile = None
    prof_path = args.profile
    if prof_path is None:
        found = sorted(Path("benchmarks/results").glob("quality-profile-*.json"))
        prof_path = str(found[-1]) if found and not args.smoke else None
    if prof_path:
        profile = json.loads(Path(prof_path).read_text())
    order = list(profile["order"]) if profile and profile.get("num_layers", view.num_layers) == view.num_layers else \
        [f"ffn.{i}" for i in reversed(range(view.num_layers))] + [f"attn.{i}" for i in reversed(range(view.num_layers))]
    payload.update(profile_path=prof_path, order_source=profile.get("method") if profile else "engine default order",
                   limit_per_task=args.limit, tasks=harness.parse_tasks(args.tasks),
                   harness=harness.harness_version(), mean_over="every task but BoolQ (reported alone)",
                   ppl={"file": WIKITEXT2_TEST, "seq_len": args.seq_len, "tokens_cap": args.ppl_tokens or None})
    windows = token_windows(read_text(WIKITEXT2_TEST), tok, args.seq_len, args.ppl_tokens or None,
                            bos=needs_bos(tok, view.config.model_type))
    dense_bytes, _ = param_bytes(view.model)
    vocab = view.shape.vocab_size
    rows = payload["rows"]
    speed_new = 16 if args.smoke else 64

    def add(row: dict) -> None:
        if "tasks" in row and rows and "tasks" in rows[0]:  # shares of the dense row's accuracy
            row.update(harness.share_columns(row["tasks"], rows[0]["tasks"]))
        rows.append(row)
        path.write_text(json.dumps(payload, indent=2, default=str))
        print_table([row], ["method", "param_ratio", "wikitext2_ppl", "mean_headline", "quality_kept_above_chance",
                            "quality_kept", "boolq", "tokens_per_s", "status"])

    t = time.perf_counter()
    add({"method": "dense", "weights": str(dtype), "deploy_param_bytes": dense_bytes, "param_ratio": 1.0,
         **evaluate(view, tok, None, args, windows),
         "tokens_per_s": decode_speed(view.model, vocab, device, 64, speed_new)})
    for kind in ("int8", "int4"):
        try:
            q, how = quantize(view.model, kind, device)
        except Exception as e:
            add({"method": f"{kind}-wo", "status": f"quantize failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        dep, stored = param_bytes(q)
        ratio = dep / dense_bytes
        row = {"method": f"{kind}-wo", "config": how, "deploy_param_bytes": dep, "stored_param_bytes": stored,
               "param_ratio": ratio}
        try:
            row.update(evaluate(q, tok, None, args, windows))
            row["tokens_per_s"] = decode_speed(q, vocab, device, 64, speed_new)
        except Exception as e:
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        add(row)
        mask = mask_for_budget(view, order, ratio)
        add({"method": f"rap@{kind}-bytes", "deploy_param_bytes": view.resident_param_bytes(mask) * 2 //
             view.model.dtype.itemsize, "param_ratio": view.resident_param_bytes(mask) / view.resident_param_bytes(
                 BlockMask.full(view.num_layers)), "blocks_dropped": len(mask.dropped),
             **evaluate(view, tok, mask, args, windows),
             "tokens_per_s": _masked_speed(view, mask, vocab, device, speed_new)})
        if kind == "int8":  # rap on top of int8 weights: drop blocks of the quantized model
            try:
                qview = BlockView(q, name=f"{view.name}-int8")
                qmask = mask_for_budget(view, order, 0.8)  # 80% of the int8 model's blocks by the same order
                dep_kept = _masked_deploy_bytes(q, qview, qmask)
                add({"method": "int8-wo + rap@80%", "deploy_param_bytes": dep_kept, "param_ratio": dep_kept / dense_bytes,
                     "blocks_dropped": len(qmask.dropped), **evaluate(qview, tok, qmask, args, windows),
                     "tokens_per_s": _masked_speed(qview, qmask, vocab, device, speed_new)})
            except Exception as e:
                add({"method": "int8-wo + rap@80%", "status": f"failed: {type(e).__name__}: {str(e)[:200]}"})
        del q
        gc.collect()
    if device.startswith("cuda"):
        try:
            payload["speed_rows"] = speed_shape_rows(args.speed_shape or "llama-2-7b", device, args)
        except Exception as e:
            payload["speed_rows_status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    payload["seconds"] = time.perf_counter() - t
    path.write_text(json.dumps(payload, indent=2, default=str))
    print()
    print_table(rows, ["method", "param_ratio", "blocks_dropped", "wikitext2_ppl", "mean_headline",
                       "quality_kept_above_chance", "quality_kept", *payload["tasks"], "boolq_kept_above_chance",
                       "tokens_per_s", "status"])
    if payload.get("speed_rows"):
        print_table(payload["speed_rows"], ["model", "method", "param_ratio", "tokens_per_s", "status"])
    print(f"wrote {path}")


def _masked_speed(view: BlockView, mask: BlockMask, vocab: int, device: str, new: int) -> float:
    with view.masked(mask):
        return decode_speed(view.model, vocab, device, 64, new)


def _masked_deploy_bytes(model, view: BlockView, mask: BlockMask) -> int:
    """Deploy bytes of `model` with the blocks `mask` drops left out."""
    total, _ = param_bytes(model)
    for name in mask.dropped:
        dep, _ = param_bytes(view.block_module(name))
        total -= dep
    return total


if __name__ == "__main__":
    main()
