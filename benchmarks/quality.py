"""Quality under a parameter budget: zero-shot accuracy and WikiText-2 perplexity, dense vs block-pruned.

For each budget (fraction of the dense model's parameter bytes, default 100/80/60/40%) two static masks:

- ``rap-order``: drop blocks in the order of a profile (``--profile``: GSI from ``rap profile``) until the
  resident parameters fit; without a profile, a one-shot ranking computed here (each block removed alone,
  calibration PPL on a slice of WikiText-2 *valid*; lowest increase goes first), saved as a profile JSON;
- ``shortgpt``: the static layer-removal baseline (ShortGPT, arXiv 2403.03853): whole layers (attention
  + FFN) ranked by Block Influence = 1 - cos(layer input, layer output) on the same calibration windows,
  lowest first, removed until the parameters fit.

Every row reports the zero-shot accuracies (lm-eval 0.4 through rap.eval.harness), the mean headline accuracy
(BoolQ apart), the share of dense accuracy kept above chance ((acc - chance) / (dense - chance)) with the raw
share beside it, BoolQ's accuracy and shares alone, and WikiText-2 *test* perplexity.

    python -m benchmarks.quality                         # SmolLM2-135M, CPU/GPU, writes $OUT/quality-<date>.json
    python -m benchmarks.quality --model PATH --limit 1000 --ppl-tokens 0   # GPU: all test tokens
    python -m benchmarks.quality --smoke                 # seconds: stories260k, 8 docs per task

Partial results are saved after every row; ``--resume FILE`` skips rows already in FILE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.common import environment, out_dir, print_table
from rap.data import WIKITEXT2_TEST, WIKITEXT2_VALID, read_text
from rap.eval import harness
from rap.eval.perplexity import needs_bos, perplexity, token_windows
from rap.core.mask import BlockMask
from rap.core.model import BlockView

log = logging.getLogger("benchmarks.quality")
DEFAULT_BUDGETS = (1.0, 0.8, 0.6, 0.4)
COLUMNS = ["method", "budget", "param_ratio", "blocks_dropped", "mean_headline", "quality_kept_above_chance",
           "quality_kept", "boolq", "boolq_kept_above_chance", "wikitext2_ppl"]


# ---- orders ------------------------------------------------------------------------------------------
def calibration_windows(view: BlockView, tok, windows: int, seq_len: int) -> torch.Tensor:
    bos = needs_bos(tok, view.config.model_type)
    return token_windows(read_text(WIKITEXT2_VALID), tok, seq_len, windows * seq_len, bos=bos)[:windows]


def oneshot_profile(view: BlockView, tok, calib: torch.Tensor, batch_size: int = 8) -> dict:
    """Each block removed alone; order = ascending calibration PPL. Profile JSON schema (docs/HELPERS.md)."""
    from benchmarks.common import environment as env

    t0 = time.perf_counter()
    dense = perplexity(view.model, calib, batch_size, progress=False).ppl
    scores, steps = {}, []
    for b in view.blocks:
        t = time.perf_counter()
        with view.masked(BlockMask.from_drop(view.num_layers, [b.name])):
            scores[b.name] = perplexity(view.model, calib, batch_size, progress=False).ppl
        steps.append({"removed": b.name, "seconds": time.perf_counter() - t, "block_forwards": view.num_layers * 2})
        log.info("one-shot %s: calibration ppl %.3f", b.name, scores[b.name])
    order = sorted(scores, key=lambda n: (scores[n], n))
    e = env()
    return {"model": view.name, "model_hash": None, "method": "oneshot-ppl",
            "calibration": {"source": WIKITEXT2_VALID, "tokens": int(calib.numel()), "windows": int(calib.shape[0]),
                            "seq_len": int(calib.shape[1])},
            "num_layers": view.num_layers, "order": order, "ppl_after": [], "dense_ppl": dense, "scores": scores,
            "steps": steps, "complete": True, "seconds": time.perf_counter() - t0,
            "versions": e["versions"], "device": e["device"], "created": e["date"],
            "note": "computed by benchmarks/quality.py because no profile was given; "
                    "ppl_after is empty (one-shot: blocks scored alone, not sequentially)"}


@torch.no_grad()
def block_influence(view: BlockView, calib: torch.Tensor, batch_size: int = 8) -> dict[int, float]:
    """ShortGPT's BI per layer: 1 - mean cosine similarity of each token's hidden state in and out."""
    sums = [0.0] * view.num_layers
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(view.layers):
        def hook(module, args, kwargs, output, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[i] = (h_in, h_out)
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    device = view.device
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            view.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            for i, (h_in, h_out) in captured.items():
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                sums[i] += float(cos.sum())
            count += ids.numel()
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
    return {i: 1.0 - s / count for i, s in enumerate(sums)}


def shortgpt_order(bi: dict[int, float]) -> list[int]:
    return sorted(bi, key=lambda i: (bi[i], i))


# ---- budgets -> masks --------------------------------------------------------------------------------
def mask_for_budget(view: BlockView, order: list[str], budget_ratio: float) -> BlockMask:
    """Drop blocks in `order` until resident parameter bytes <= budget_ratio * dense bytes."""
    limit = budget_ratio * view.resident_param_bytes(BlockMask.full(view.num_layers))
    for count in range(len(order) + 1):
        mask = BlockMask.from_order(view.num_layers, order, count)
        if view.resident_param_bytes(mask) <= limit:
            return mask
    raise ValueError(f"no mask fits {budget_ratio:.0%} of the dense parameters (embeddings alone exceed it)")


def layer_mask_for_budget(view: BlockView, layer_order: list[int], budget_ratio: float) -> BlockMask:
    order = [name for i in layer_order for name in (f"attn.{i}", f"ffn.{i}")]
    limit = budget_ratio * view.resident_param_bytes(BlockMask.full(view.num_layers))
    for layers in range(len(layer_order) + 1):
        mask = BlockMask.from_order(view.num_layers, order, 2 * layers)
        if view.resident_param_bytes(mask) <= limit:
            return mask
    raise ValueError(f"no layer removal fits {budget_ratio:.0%}")


# ---- one row -----------------------------------------------------------------------------------------
def evaluate_mask(view: BlockView, tok, mask: BlockMask, args, test_windows: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    zs = harness.evaluate(view, tok, args.tasks, limit=args.limit, batch_size=args.batch_size, mask=mask,
                          progress=False)
    t1 = time.perf_counter()
    with view.masked(mask):
        ppl = perplexity(view.model, test_windows, args.ppl_batch_size, progress=False)
    return {"zeroshot": zs, "wikitext2_ppl": ppl.ppl, "ppl_tokens": ppl.tokens,
            "seconds": {"zeroshot": t1 - t0, "ppl": time.perf_counter() - t1}}


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("rap-order", "o-"), ("shortgpt", "s--")):
        pts = sorted((r["param_ratio"], r["mean_headline"], r["wikitext2_ppl"]) for r in rows
                     if r["method"] in (method, "dense"))
        if len(pts) < 2:
            continue
        label = next((r["order"] for r in rows if r["method"] == method), method)
        ax1.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=label)
        ax2.plot([p[0] * 100 for p in pts], [p[2] for p in pts], style, label=label)
    chance = next((r["mean_chance"] for r in rows), None)
    if chance is not None:
        ax1.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax1.set_xlabel("resident parameters, % of dense")
    ax1.set_ylabel("mean zero-shot accuracy")
    ax2.set_xlabel("resident parameters, % of dense")
    ax2.set_ylabel("WikiText-2 test PPL (log)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """The evaluation protocol's options (zero-shot docs, PPL tokens, calibration windows): every
    quality benchmark takes the same ones, so their rows compare."""
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=200, help="documents per task (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="WikiText-2 test tokens (0 = all)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--ppl-batch-size", type=int, default=1)
    parser.add_argument("--calib-windows", type=int, default=8, help="WikiText-2 valid calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="stories260k, 8 docs/task, tiny PPL: seconds")


def apply_smoke(args: argparse.Namespace) -> None:
    """--smoke: the same code paths on stories260k with tiny sizes."""
    args.model, args.limit, args.ppl_tokens, args.seq_len = "stories260k", 8, 512, 128
    args.calib_windows, args.calib_seq_len = 2, 64


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="known name, HF folder or .gguf")
    parser.add_argument("--profile", default=None, help="profile JSON (its `order`); default: one-shot PPL ranking")
    parser.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS))
    add_protocol_args(parser)
    parser.add_argument("--methods", default="rap-order,shortgpt")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--resume", default=None, help="a partial quality JSON: rows in it are not rerun")
    parser.add_argument("--name", default=None, help="output file name (default quality-<date>.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    args.limit = args.limit or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from rap.cli import load_view_for_cli

    view, tok = load_view_for_cli(args.model, dtype=args.dtype, device=args.device)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    date = datetime.date.today().isoformat()
    path = out_dir() / (args.name or f"quality-{date}.json")
    done = {}
    if args.resume and Path(args.resume).is_file():
        prev = json.loads(Path(args.resume).read_text())
        done = {(r["method"], r["budget"]): r for r in prev.get("rows", [])}
        print(f"resuming: {len(done)} rows from {args.resume}")

    calib = calibration_windows(view, tok, args.calib_windows, args.calib_seq_len)
    ppl_bos = needs_bos(tok, view.config.model_type)
    test_windows = token_windows(read_text(WIKITEXT2_TEST), tok, args.seq_len, args.ppl_tokens or None, bos=ppl_bos)
    profile_path = args.profile
    if profile_path:
        profile = json.loads(Path(profile_path).read_text())
    elif args.resume and Path(args.resume).is_file() and json.loads(Path(args.resume).read_text()).get("profile"):
        profile = json.loads(Path(args.resume).read_text())["profile"]
        profile_path = "(from --resume)"
    else:
        print(f"no --profile: ranking {len(view.blocks)} blocks one at a time on {calib.numel()} calibration tokens")
        profile = oneshot_profile(view, tok, calib)
        profile_path = str(out_dir() / f"quality-profile-oneshot-{date}.json")
        Path(profile_path).write_text(json.dumps(profile, indent=1))
    order_name = profile.get("method", "profile")
    bi = block_influence(view, calib)
    layer_order = shortgpt_order(bi)
    dense_bytes = view.resident_param_bytes(BlockMask.full(view.num_layers))

    plan = [("dense", 1.0, BlockMask.full(view.num_layers))]
    for b in budgets:
        if b >= 1.0:
            continue
        if "rap-order" in methods:
            plan.append(("rap-order", b, mask_for_budget(view, list(profile["order"]), b)))
        if "shortgpt" in methods:
            plan.append(("shortgpt", b, layer_mask_for_budget(view, layer_order, b)))

    rows: list[dict] = []
    dense_zs = None
    payload = {}
    for method, budget, mask in plan:
        key = (method, budget)
        if key in done:
            row = done[key]
        else:
            print(f"evaluating {method} @ {budget:.0%}: drops {len(mask.dropped)} blocks")
            res = evaluate_mask(view, tok, mask, args, test_windows)
            zs = res.pop("zeroshot")
            row = {"method": method, "order": {"dense": "dense", "rap-order": order_name, "shortgpt": "shortgpt-bi"}[method],
                   "budget": budget, "param_bytes": view.resident_param_bytes(mask),
                   "param_ratio": view.resident_param_bytes(mask) / dense_bytes,
                   "dropped": list(mask.dropped), "blocks_dropped": len(mask.dropped),
                   "mean_headline": zs["mean_headline"], "mean_acc": zs["mean_acc"], "mean_chance": zs["mean_chance"],
                   "tasks": zs["tasks"], **res}
        if method == "dense":
            dense_zs = {"tasks": row["tasks"]}
        row.update(harness.share_columns(row["tasks"], dense_zs["tasks"] if dense_zs else None))
        rows.append(row)
        payload = {**environment(), "kind": "quality", "model": view.name, "dtype": str(view.dtype),
                   "limit_per_task": args.limit, "tasks": harness.parse_tasks(args.tasks),
                   "harness": harness.harness_version(), "mean_over": "every task but BoolQ (reported alone)",
                   "ppl": {"file": WIKITEXT2_TEST, "seq_len": args.seq_len, "tokens_cap": args.ppl_tokens or None},
                   "budget_unit": "fraction of dense resident parameter bytes (embeddings/norms always resident)",
                   "dense_param_bytes": dense_bytes, "profile_path": profile_path, "profile": profile,
                   "shortgpt_block_influence": bi, "calibration": {"source": WIKITEXT2_VALID,
                                                                   "tokens": int(calib.numel())},
                   "headline_metric": {n: harness.HEADLINE[n] for n in harness.parse_tasks(args.tasks)},
                   "rows": rows}
        path.write_text(json.dumps(payload, indent=1))
        print_table([row], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    at80 = next((r for r in rows if r["method"] == "rap-order" and abs(r["budget"] - 0.8) < 1e-9), None)
    payload["quality_kept_80pct"] = at80["quality_kept"] if at80 else None
    payload["quality_kept_above_chance_80pct"] = at80["quality_kept_above_chance"] if at80 else None
    path.write_text(json.dumps(payload, indent=1))
    title = (f"{view.name}: zero-shot ({'first ' + str(args.limit) if args.limit else 'all'} docs/task) and "
             f"WikiText-2 PPL vs parameter budget ({payload['device']})")
    png = plot(rows, path.with_suffix(".png"), title)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
