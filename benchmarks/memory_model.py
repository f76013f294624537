"""Does the memory model predict the real peak? Predicted vs torch.cuda.max_memory_allocated.

For each (model shape, mask, batch, prompt, new tokens) this runs a generate path with weights
resident, a static KV cache for prompt + new tokens in the kept attention blocks only, prefill with
SDPA keeping last-position logits, then sampled decode steps (fp32 softmax + top-p):

* `--path decoder` (default): rap's own fast path, `rap.decode.decoder.Decoder` (CUDA graph per mask), the
  one the engine serves with; its cache is sized for the bucketed batch and length it allocates;
* `--path hf`: transformers' forward with a `StaticCache`, for comparison (its SDPA call gets a
  materialised mask, and PyTorch's backend choice then varies with the shape).

Model weights are random (shape is what matters for bytes). As the engine serves a mask, the
blocks it drops leave the device first (`rap.serve.residency.WeightResidency`, host copies), so the
resident parameters are what `MemoryModel.param_bytes(mask)` counts.

    python -m benchmarks.memory_model            # on the GPU; writes $OUT/memory-model-<date>.json
    python -m benchmarks.memory_model --smoke    # CPU: runs the loop, predicts, no measurement
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch

from rap.core.hf import StaticCache

from benchmarks.common import print_table, shape_config, write_json
from rap.serve.residency import WeightResidency
from rap.core.hf import cache_kwargs
from rap.core.mask import BlockMask
from rap.core.memory import MemoryModel, Request
from rap.core.model import BlockView
from rap.sources import model_from_config

def config_for(name: str):
    return shape_config(name)


def masks_for(view: BlockView) -> dict[str, BlockMask]:
    L = view.num_layers
    return {
        "dense": BlockMask.full(L),
        "drop-25%-ffn": BlockMask.from_drop(L, [f"ffn.{i}" for i in range(L - L // 4, L)]),
        "drop-half-attn": BlockMask.from_drop(L, [f"attn.{i}" for i in range(0, L, 2)]),
        "mixed": BlockMask.from_drop(L, ["attn.0", "attn.3", f"ffn.{L - 1}", f"ffn.{L - 2}", f"attn.{L - 1}"]),
    }


def decoder_request(req: Request) -> Request:
    """The request the Decoder actually allocates for (batch bucket, length rounded to its quantum)."""
    from rap.decode.workspace import planning_request

    return planning_request(req)


@torch.no_grad()
def run_decoder_path(view: BlockView, mask: BlockMask, req: Request, device: str) -> None:
    from rap.decode.decoder import Decoder

    prompts = torch.randint(10, view.shape.vocab_size, (req.batch, req.prompt)).tolist()
    decoder = Decoder(view)
    decoder.generate(prompts, req.new_tokens, mask=mask, temperature=1.0, top_p=0.9, seed=0)
    decoder.release()


@torch.no_grad()
def run_generate_path(view: BlockView, mask: BlockMask, req: Request, device: str) -> None:
    model = view.model
    ids = torch.randint(10, view.shape.vocab_size, (req.batch, req.prompt), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with view.masked(mask):
        cache = StaticCache(config=model.config, max_cache_len=req.total_tokens)
        logits = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
        for _ in range(req.new_tokens):
            probs = torch.softmax(logits[:, -1].float(), dim=-1)
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < 0.9
            sorted_p = sorted_p * keep
            nxt = sorted_i.gather(-1, torch.multinomial(sorted_p, 1, generator=gen))
            del probs, sorted_p, sorted_i, keep
            logits = model(input_ids=nxt, **cache_kwargs(cache), use_cache=True).logits
        del cache, logits


PLAN = [  # (shape, mask, batch, prompt, new)
    ("smollm2-135m", "dense", 1, 128, 32), ("smollm2-135m", "dense", 8, 1024, 32),
    ("smollm2-135m", "dense", 32, 2048, 16), ("smollm2-135m", "drop-25%-ffn", 4, 8192, 16),
    ("smollm2-135m", "drop-half-attn", 16, 4096, 16), ("smollm2-135m", "mixed", 32, 512, 32),
    ("smollm2-135m", "dense", 1, 8000, 16),
    ("qwen3-0.6b", "dense", 1, 256, 16), ("qwen3-0.6b", "drop-half-attn", 8, 2048, 16),
    ("qwen3-0.6b", "mixed", 16, 1024, 16),
    ("llama-2-7b", "dense", 1, 128, 16), ("llama-2-7b", "drop-25%-ffn", 4, 2048, 16),
    ("llama-2-7b", "drop-half-attn", 8, 4000, 8), ("llama-2-7b", "mixed", 16, 1024, 8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny plan, no measurement")
    parser.add_argument("--path", choices=["decoder", "hf"], default="decoder", help="which generate path to measure")
    parser.add_argument("--explain", action="store_true",
                        help="GPU: record allocation history and attribute the bytes alive at each peak")
    args = parser.parse_args()
    run = run_decoder_path if args.path == "decoder" else run_generate_path
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    plan = PLAN if device == "cuda" else [("smollm2-135m", m, 1, 32, 4) for m in ("dense", "mixed")]
    rows, views, residency, view = [], {}, {}, None
    for shape, mask_name, batch, prompt, new in plan:
        if shape not in views:
            # the previous model must be gone before the next is measured (WeightResidency's hooks make
            # a reference cycle, so only the collector frees it: drop every reference first)
            view = None
            views.clear()
            residency.clear()
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            views[shape] = BlockView(model_from_config(config_for(shape), dtype=dtype, device=device), name=shape)
            residency[shape] = WeightResidency(views[shape])
        view = views[shape]
        mask, req = masks_for(view)[mask_name], Request(batch, prompt, new)
        residency[shape].apply(mask)  # dropped blocks leave the device, as in the engine
        residency[shape].synchronize()
        planned = decoder_request(req) if args.path == "decoder" else req
        predicted = MemoryModel.from_view(view).breakdown(mask, planned)
        measured = baseline = explained = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated()  # weights (and anything an earlier row left)
            if args.explain:
                from benchmarks._memdiag import explain_peak, print_explain

                explained = explain_peak(lambda: run(view, mask, req, device))
                measured = explained["measured_peak_bytes"]
            else:
                torch.cuda.reset_peak_memory_stats()
                run(view, mask, req, device)
                torch.cuda.synchronize()
                measured = torch.cuda.max_memory_allocated()
        else:
            run(view, mask, req, device)
        row = {"config": f"{shape} {mask_name} b={batch} p={prompt} n={new}", "shape": shape, "mask": mask_name,
               "batch": batch, "prompt": prompt, "new_tokens": new, "path": args.path,
               "planned_request": {"batch": planned.batch, "prompt": planned.prompt, "new_tokens": planned.new_tokens},
               "predicted_bytes": predicted.total_bytes, "measured_bytes": measured,
               "rel_error": None if measured is None else (predicted.total_bytes - measured) / measured,
               "predicted": predicted.to_dict(), "baseline_bytes": baseline,
               "resident_param_bytes": residency[shape].resident_bytes()}
        if explained is not None:
            row["explain"] = explained
        rows.append(row)
        print_table([row], ["config", "predicted_bytes", "measured_bytes", "rel_error"])
        if explained is not None:
            print_explain(explained)
    errors = [abs(r["rel_error"]) for r in rows if r["rel_error"] is not None]
    summary = {"max_abs_rel_error": max(errors) if errors else None, "configs": len(rows),
               "weights": "random (shape only; bytes do not depend on values)"}
    print_table(rows, ["config", "predicted_bytes", "measured_bytes", "rel_error"])
    print(summary)
    date = datetime.date.today().isoformat()
    write_json(f"memory-model-{args.path}-{date}.json", {**summary, "rows": rows})


if __name__ == "__main__":
    main()
