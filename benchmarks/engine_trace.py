"""Budget-trace replay through the Engine: does resident memory follow the budget, with no OOM?

The budget steps through fractions of the dense need of the largest batch (default 100% -> 40%
-> 70% -> 100%) while mixed batches (sizes batch/4..batch, prompts prompt/4..prompt tokens, new
tokens new/2..new) are served. For every batch it records the decision, the predicted peak, the
measured peak (torch.cuda.max_memory_allocated, GPU), the bytes allocated after the batch and
the throughput; per level it reports the steady throughput (the level's batches after its first)
relative to the dense level, and apart from it the first batch's seconds, which pay the switch.
Before the trace, one dense pass over the batch shapes compiles the decode step per batch bucket.

    python -m benchmarks.engine_trace --model smollm2-135m          # GPU: real model (bf16)
    python -m benchmarks.engine_trace --shape llama-2-7b            # GPU: 7B-shaped, RANDOM weights (timing/memory only)
    python -m benchmarks.engine_trace --smoke                       # CPU: stories260k, a few batches

Headline keys: oom_crashes (OOM errors that escaped the engine), max_resident_over_budget_bytes
(max over batches of measured peak - budget; predicted peak on CPU, where nothing is measured;
must be <= 0), steps. Writes $OUT/engine-trace-<date>-<model>.json and a plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import time

import torch

from benchmarks.common import out_dir, print_table, write_json
from rap.serve.engine import Engine, GenerationRequest, OutOfMemoryAfterRetry
from rap.serve.budget import FixedBudget
from rap.core.memory import Request, format_bytes

log = logging.getLogger("engine_trace")

PASSAGE_SEED = (
    "Once upon a time, there was a little boy named Sam. Sam had a small red boat. Every day he took the boat to the "
    "pond near his house. One sunny morning, Sam saw a duck on the water. The duck was sad because it had lost its "
    "way home. ")


class NumericTokenizer:
    """Stand-in tokenizer for random-weight shapes: ids in, ids out (timing runs only)."""

    padding_side = "left"
    pad_token = unk_token = "<0>"
    eos_token = eos_token_id = None  # random weights: run every row to max_new_tokens
    pad_token_id = 0
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) * 7 + i) % (self.vocab_size - 3) for i, c in enumerate(text)]
        return type("Enc", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def load(args):
    if args.shape:
        from benchmarks.memory_model import config_for
        from rap.core.model import BlockView
        from rap.sources import default_device, model_from_config

        device = args.device or default_device()
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        torch.manual_seed(0)
        model = model_from_config(config_for(args.shape), dtype=dtype, device=device)
        # eos id 0 never comes out of random weights often enough to matter; disable it anyway
        model.generation_config.eos_token_id = None
        view = BlockView(model, name=f"{args.shape} (random weights)")
        return view, NumericTokenizer(view.shape.vocab_size), "random weights: timing and memory only, no quality"
    from rap.cli import load_view_for_cli

    view, tok = load_view_for_cli(args.model, dtype=args.dtype, device=args.device)
    return view, tok, ""


def prompt_ids(engine: Engine, tokens: int, variant: int) -> list[int]:
    ids = engine.encode(PASSAGE_SEED * (1 + tokens // 40))
    start = (variant * 7) % max(1, len(ids) - tokens)
    return ids[start:start + tokens]


def batches_for_level(engine: Engine, args, level_index: int) -> list[list[GenerationRequest]]:
    sizes = [args.batch, max(1, args.batch // 4), max(1, args.batch // 2)]
    prompts = [args.prompt, max(8, args.prompt // 4), max(8, args.prompt // 2)]
    news = [args.new, max(4, args.new // 2)]
    out = []
    for b in range(args.batches_per_level):
        k = level_index * args.batches_per_level + b
        size = sizes[k % len(sizes)]
        out.append([GenerationRequest(prompt_ids=prompt_ids(engine, prompts[(k + j) % len(prompts)], k * 31 + j),
                                      max_new_tokens=news[(k + j) % len(news)], request_id=f"{k}.{j}")
                    for j in range(size)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="known name, HF folder or .gguf file")
    p.add_argument("--shape", default=None, help="instead of --model: a random-weight shape from benchmarks.memory_model")
    p.add_argument("--trace", default="1.0,0.4,0.7,1.0", help="budget levels, fractions of the dense need")
    p.add_argument("--batches-per-level", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="largest batch")
    p.add_argument("--prompt", type=int, default=256, help="longest prompt (tokens)")
    p.add_argument("--new", type=int, default=64, help="most new tokens")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto", help="auto | decoder | hf")
    p.add_argument("--stage-host", action="store_true",
                   help="make every block's pinned host copy at engine start (Engine(stage_host_copies=True))")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the first level cold (torch.compile of each batch bucket counts against dense)")
    p.add_argument("--smoke", action="store_true", help="CPU check: stories260k, 3 batches per level, small sizes")
    args = p.parse_args()
    if args.smoke:
        args.model, args.shape, args.device = "stories260k", None, args.device or "cpu"
        args.batches_per_level, args.batch, args.prompt, args.new = 3, 4, 48, 16
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    trace = [float(x) for x in args.trace.split(",")]

    view, tok, note = load(args)
    t_stage = time.perf_counter()
    engine = Engine(view, tokenizer=tok, budget=FixedBudget(1 << 50), backend=args.backend,
                    stage_host_copies=args.stage_host)
    engine_start_seconds = time.perf_counter() - t_stage
    on_cuda = engine.device.type == "cuda"
    reference = engine.planning_request(Request(args.batch, args.prompt, args.new))
    dense_need = engine.dense_need_bytes(reference)
    print(f"{view.name} on {engine.device} ({view.dtype}), backend {engine.backend.name}; dense need "
          f"{format_bytes(dense_need)} for batch {reference.batch} x {reference.total_tokens} tokens; "
          f"smallest {format_bytes(engine.smallest_need_bytes(reference))}")

    if not args.no_warmup:
        # one-time costs (compiling the decode step for each batch bucket) would otherwise land in the
        # first, dense level and inflate every later level's speed-up; graphs per mask stay in the trace
        engine.set_budget(FixedBudget(dense_need))
        for batch in batches_for_level(engine, args, 0):
            engine.generate(batch)
        engine.release_buffers()

    rows, oom_crashes, step = [], 0, 0
    t_start = time.perf_counter()
    for level_index, level in enumerate(trace):
        budget = int(level * dense_need)
        engine.set_budget(FixedBudget(budget))
        for batch in batches_for_level(engine, args, level_index):
            try:
                results = engine.generate(batch)
            except torch.OutOfMemoryError as e:  # must never happen: the engine catches and retries
                oom_crashes += 1
                log.error("OOM escaped the engine: %s", str(e).splitlines()[0])
                continue
            served = [r for r in results if r.ok]
            info = served[0].step if served else None
            steps_run = {id(r.step): r.step for r in served}.values()  # a batch may have been split
            allocated = torch.cuda.memory_allocated(engine.device) if on_cuda else None
            reserved = torch.cuda.memory_reserved(engine.device) if on_cuda else None
            measured = max((s.measured_peak_bytes for s in steps_run if s.measured_peak_bytes is not None),
                           default=None)
            predicted = max((s.predicted_peak_bytes for s in steps_run), default=0)
            tokens, seconds = sum(s.generated_tokens for s in steps_run), sum(s.seconds for s in steps_run)
            rows.append({
                "step": step, "level_ratio": level, "budget_bytes": budget, "batch": len(batch),
                "prompt_max": max(len(r.prompt_ids) for r in batch), "new_max": max(r.max_new_tokens for r in batch),
                "decision": ("dense" if info.decision.mask.is_full else
                             f"-{len(info.decision.mask.dropped)} blocks") if info else "rejected",
                "mask": str(info.decision.mask) if info else None,
                "dropped_ffn": sum(n.startswith("ffn") for n in info.decision.mask.dropped) if info else None,
                "dropped_attn": sum(n.startswith("attn") for n in info.decision.mask.dropped) if info else None,
                "predicted_peak_bytes": predicted, "measured_peak_bytes": measured,
                "allocated_after_bytes": allocated, "reserved_after_bytes": reserved,
                "resident_param_bytes": engine.residency.resident_bytes(),
                "moved_blocks": sum(len(s.dropped_blocks) + len(s.restored_blocks) for s in steps_run),
                "engine_batches": len(steps_run), "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else 0.0,
                "rejected_budget": sum(isinstance(r.error, Exception) and not isinstance(r.error, OutOfMemoryAfterRetry)
                                       for r in results if not r.ok),
                "rejected_oom": sum(isinstance(r.error, OutOfMemoryAfterRetry) for r in results),
                "oom_retry": any(s.oom_retry for s in steps_run),
            })
            step += 1
    wall = time.perf_counter() - t_start

    over = [(r["measured_peak_bytes"] if r["measured_peak_bytes"] is not None else r["predicted_peak_bytes"])
            - r["budget_bytes"] for r in rows if r["tokens"]]
    over_alloc = [r["allocated_after_bytes"] - r["budget_bytes"] for r in rows if r["allocated_after_bytes"] is not None]
    over_reserved = [r["reserved_after_bytes"] - r["budget_bytes"] for r in rows if r["reserved_after_bytes"] is not None]
    levels = []
    dense_tps = None
    for level_index, level in enumerate(trace):
        lr = [r for r in rows[level_index * args.batches_per_level:(level_index + 1) * args.batches_per_level]
              if r["tokens"]]
        # the level's first batch pays the switch (weights moved, a graph captured for the new mask, and
        # on a block's first drop its pinned host copy): reported apart from the steady rate
        steady = lr[1:] or lr
        secs = sum(r["seconds"] for r in steady)
        tps = sum(r["tokens"] for r in steady) / secs if secs else 0.0
        if dense_tps is None and level >= 1.0:
            dense_tps = tps
        levels.append({"level_ratio": level, "budget_bytes": int(level * dense_need), "batches": len(lr),
                       "tokens_per_s": tps, "tokens_per_s_vs_dense": tps / dense_tps if dense_tps else None,
                       "switch_batch_seconds": lr[0]["seconds"] if lr else None,
                       "switch_batch_moved_blocks": lr[0]["moved_blocks"] if lr else None,
                       "mean_dropped_blocks": sum(r["dropped_ffn"] + r["dropped_attn"] for r in lr) / max(1, len(lr)),
                       "max_resident_param_bytes": max((r["resident_param_bytes"] for r in lr), default=0),
                       "max_measured_peak_bytes": max((r["measured_peak_bytes"] or 0 for r in lr), default=0),
                       "max_predicted_peak_bytes": max((r["predicted_peak_bytes"] for r in lr), default=0)})
    print_table(rows, ["step", "level_ratio", "batch", "decision", "predicted_peak_bytes", "measured_peak_bytes",
                       "allocated_after_bytes", "budget_bytes", "tokens_per_s"])
    print()
    print_table(levels, ["level_ratio", "budget_bytes", "mean_dropped_blocks", "max_resident_param_bytes",
                         "max_measured_peak_bytes", "tokens_per_s", "tokens_per_s_vs_dense", "switch_batch_seconds"])
    headline = {
        "oom_crashes": oom_crashes,
        "max_resident_over_budget_bytes": max(over) if over else None,
        "max_resident_over_budget_source": "measured max_memory_allocated" if on_cuda else
                                           "predicted (CPU: no allocator statistics)",
        "max_allocated_after_batch_over_budget_bytes": max(over_alloc) if over_alloc else None,
        # the caching allocator's reserve (includes CUDA-graph pools and cached free blocks): context only
        "max_reserved_after_batch_over_budget_bytes": max(over_reserved) if over_reserved else None,
        "budget_violations": sum(1 for v in over if v > 0),
        "steps": len(rows),
        "oom_events_caught": engine.stats.oom_events, "oom_failures": engine.stats.oom_failures,
        "requests_rejected": engine.stats.requests_rejected,
        "correction_ratio": engine.correction_ratio,
    }
    print("\n" + "  ".join(f"{k}={v}" for k, v in headline.items()))
    date = datetime.date.today().isoformat()
    slug = (args.shape or args.model).replace("/", "_").replace(".", "_").split("_gguf")[0][-40:]
    name = f"engine-trace-{date}-{slug}" + ("-staged" if args.stage_host else "") + ("-smoke" if args.smoke else "")
    payload = {**headline, "model": view.name, "note": note, "backend": engine.backend.name,
               "dtype": str(view.dtype), "trace": trace, "dense_need_bytes": dense_need,
               "reference_request": reference.__dict__, "wall_seconds": wall, "engine_start_seconds": engine_start_seconds,
               "host_bytes_after": engine.residency.host_bytes(),
               "overhead_bytes": engine.overhead_bytes, "levels": levels, "rows": rows,
               "args": vars(args)}
    write_json(f"{name}.json", payload)
    plot(rows, trace, dense_need, f"{view.name} on {engine.device}", out_dir() / f"{name}.png")


def plot(rows: list[dict], trace: list[float], dense_need: int, title: str, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    mib = 2**20
    x = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.step(x, [r["budget_bytes"] / mib for r in rows], where="mid", color="black", label="budget")
    ax1.plot(x, [r["predicted_peak_bytes"] / mib for r in rows], "o-", color="tab:orange", label="predicted peak")
    if any(r["measured_peak_bytes"] is not None for r in rows):
        ax1.plot(x, [(r["measured_peak_bytes"] or 0) / mib for r in rows], "x--", color="tab:red",
                 label="measured peak")
        ax1.plot(x, [(r["allocated_after_bytes"] or 0) / mib for r in rows], "^-", color="tab:cyan",
                 label="allocated after batch")
    ax1.plot(x, [r["resident_param_bytes"] / mib for r in rows], "s-", color="tab:blue", label="resident weights")
    ax1.axhline(dense_need / mib, ls=":", color="gray", label="dense need")
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("MiB")
    ax1.legend(fontsize=7, loc="lower left")
    ax1.set_title(f"engine trace: {title}, budget " + " -> ".join(f"{t:.0%}" for t in trace), fontsize=10)
    ax2.plot(x, [r["tokens_per_s"] for r in rows], "o-", color="tab:purple")
    ax2.set_ylabel("tokens/s (batch)")
    ax2.set_xlabel("batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
