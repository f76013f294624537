"""Width-pruning peer: structured FFN-channel pruning with torch-pruning at rap's parameter budgets.

rap removes whole blocks (an attention or FFN block of one layer). The usual alternative is width pruning
(LLM-Pruner, arXiv 2305.11627): keep every layer but make it narrower. This script prunes with the maintained
library for that, torch-pruning (`pip install rap-runtime[bench]`), the way its LLM example does
(examples/LLMs/prune_llm.py: `MetaPruner`, local pruning, the same ratio in every layer, `round_to=4`), and
evaluates every pruned model exactly like benchmarks/quality.py (its `evaluate_mask` on a plain BlockView of
the pruned model): zero-shot accuracy (lm-eval through rap.eval.harness, same tasks and headline metric; BoolQ apart) and WikiText-2
*test* perplexity (same windows), plus the share of dense accuracy kept above chance, the raw share beside it.

What is pruned: the FFN intermediate channels of every layer, coupled as torch-pruning's dependency graph
finds them (gate_proj and up_proj rows, down_proj columns). Hidden size, embeddings, norms and attention are
untouched. Attention heads are *not* pruned: with transformers 5.x Llama, torch-pruning 1.6.1 never finishes
building the groups rooted at q_proj/k_proj (its `_fix_dependency_graph_non_recursive` loops, the indices
growing through the `_ConcatIndexMapping` of RoPE's `rotate_half`; upstream issue VainF/Torch-Pruning#527).
`attention_groups_hang` below is that check; the JSON records its outcome.

Importance: torch-pruning's `GroupMagnitudeImportance(p=2)` (L2 of the coupled weights) and
`GroupTaylorImportance` (|w * dL/dw| with gradients summed over calibration windows of WikiText-2 *valid*).

Budgets: `--budget-of total` (default) is rap's unit in benchmarks/quality.py, a fraction of the dense
model's resident parameters (embeddings and norms included), so rows line up with its rap-order/shortgpt
rows at the same budget; `--budget-of blocks` is a fraction of the parameters inside the 2L blocks
(embeddings/norms are added on top). The FFN width is the widest multiple of `--round-to` that fits
(never over the budget, as rap's masks); the parameter count in every row is counted on the pruned model.

    python -m benchmarks.width_peer --limit 50 --ppl-tokens 4096     # SmolLM2-135M on CPU, writes $OUT/width-peer-<date>.json
    python -m benchmarks.width_peer --smoke                          # seconds: stories260k, 8 docs per task
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import multiprocessing
import time
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from benchmarks.common import environment, print_table, write_json
from benchmarks.quality import add_protocol_args, apply_smoke, calibration_windows, evaluate_mask
from rap.data import WIKITEXT2_TEST, WIKITEXT2_VALID, read_text
from rap.eval import harness
from rap.eval.perplexity import needs_bos, token_windows
from rap.core.mask import BlockMask
from rap.core.model import BlockView

log = logging.getLogger("benchmarks.width_peer")
DEFAULT_BUDGETS = (0.8, 0.6)
IMPORTANCES = ("magnitude", "taylor")
COLUMNS = ["method", "budget", "params", "param_ratio", "block_param_ratio", "ffn_channels", "mean_headline",
           "quality_kept_above_chance", "quality_kept", "boolq", "boolq_kept_above_chance", "wikitext2_ppl"]


# ---- counting ----------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Parameters of the model as it is now, tied tensors once (`parameters()` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def block_params(model: nn.Module) -> int:
    """Parameters inside the attention and FFN blocks of all layers (what rap's masks can drop)."""
    return sum(p.numel() for layer in model.model.layers for part in (layer.self_attn, layer.mlp)
               for p in part.parameters())


def ffn_params_per_channel(model: nn.Module) -> int:
    """Parameters one FFN intermediate channel costs across all layers: a gate row, an up row, a down column."""
    total = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        total += mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
        total += sum(int(m.bias is not None) for m in (mlp.gate_proj, mlp.up_proj))
    return total


def ffn_width(model: nn.Module) -> int:
    widths = {layer.mlp.gate_proj.out_features for layer in model.model.layers}
    if len(widths) != 1:
        raise ValueError(f"FFN widths differ between layers: {sorted(widths)}")
    return widths.pop()


def channels_for_budget(model: nn.Module, budget_ratio: float, budget_of: str = "total", round_to: int = 4) -> int:
    """The widest FFN (a multiple of `round_to`, the same in every layer) whose parameters fit the budget.

    `budget_of="total"`: budget_ratio * dense parameters (rap's unit); `"blocks"`: the non-block parameters
    plus budget_ratio * dense block parameters."""
    dense, width = count_params(model), ffn_width(model)
    if budget_of == "total":
        limit = budget_ratio * dense
    elif budget_of == "blocks":
        blocks = block_params(model)
        limit = dense - blocks + budget_ratio * blocks
    else:
        raise ValueError(f"budget_of must be 'total' or 'blocks', not {budget_of!r}")
    per_channel = ffn_params_per_channel(model)
    for keep in range(width - width % round_to if width % round_to else width, 0, -round_to):
        if dense - (width - keep) * per_channel <= limit + 0.5:
            return keep
    raise ValueError(f"no FFN width fits {budget_ratio:.0%} of the {budget_of} parameters: pruning FFN "
                     "channels alone cannot go that low (attention and embeddings are kept)")


# ---- pruning -----------------------------------------------------------------------------------------
def _ffn_roots(model: nn.Module) -> set[nn.Module]:
    return {m for layer in model.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)}


def _logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


def taylor_gradients(model: nn.Module, calib: torch.Tensor, batch_size: int = 2) -> float:
    """Sum dLoss/dw over the calibration windows into `.grad` of the FFN weights; returns the mean loss."""
    ffn = {id(p) for layer in model.model.layers for p in layer.mlp.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ffn)
        p.grad = None
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, calib.shape[0], batch_size):
        ids = calib[start:start + batch_size].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        total += float(loss.detach()) * ids.shape[0]
    return total / calib.shape[0]


def prune_ffn_width(model: nn.Module, keep_channels: int, importance: str = "magnitude",
                    calib: torch.Tensor | None = None, round_to: int = 4) -> dict:
    """Prune every layer's FFN to `keep_channels` intermediate channels in place with torch-pruning.

    `importance`: "magnitude" (L2 of the coupled weights) or "taylor" (needs `calib`, (windows, seq) token ids
    of held-out text). Returns what was done (seconds, calibration loss, channels per layer)."""
    import torch_pruning as tp

    width = ffn_width(model)
    if not 0 < keep_channels <= width:
        raise ValueError(f"keep_channels must be in 1..{width}, not {keep_channels}")
    t0 = time.perf_counter()
    info: dict = {"importance": importance, "ffn_channels_before": width}
    if importance == "magnitude":
        scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        if calib is None:
            raise ValueError("taylor importance needs calibration windows")
        scorer = tp.importance.GroupTaylorImportance(group_reduction="mean")
    else:
        raise ValueError(f"importance must be one of {IMPORTANCES}, not {importance!r}")
    roots = _ffn_roots(model)
    # Only gate/up are roots: every other Linear and the embedding are ignored, so no group prunes the hidden
    # size, and the attention groups (which hang with transformers 5.x, see module doc) are never built.
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m not in roots]
    # The RMSNorm weights are plain parameters to torch-pruning; naming their channel dim keeps it from guessing.
    wrapped = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) for p in m.parameters()}
    unwrapped = [(p, 0) for p in model.parameters() if id(p) not in wrapped]  # (param, dim) pairs
    # torch-pruning keeps int(width * (1 - ratio)) channels; the half channel makes that exactly keep_channels.
    ratio = max(0.0, (width - keep_channels - 0.5) / width)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=torch.ones(1, 8, dtype=torch.long, device=device), importance=scorer,
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
            unwrapped_parameters=unwrapped, output_transform=_logits)
        if importance == "taylor":
            info["calibration_loss"] = taylor_gradients(model, calib)
            info["calibration_tokens"] = int(calib.numel())
        groups = 0
        for group in pruner.step(interactive=True):
            group.prune()
            groups += 1
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    model.train(was_training)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    if any(w != keep_channels for w in widths) or any(
            layer.mlp.up_proj.out_features != keep_channels or layer.mlp.down_proj.in_features != keep_channels
            for layer in model.model.layers):
        raise RuntimeError(f"torch-pruning left FFN widths {sorted(set(widths))}, wanted {keep_channels}")
    model.config.intermediate_size = keep_channels
    for layer in model.model.layers:
        layer.mlp.intermediate_size = keep_channels
    info.update({"ffn_channels": keep_channels, "groups_pruned": groups, "round_to": round_to,
                 "seconds": time.perf_counter() - t0})
    return info


def attention_groups_hang(config, seconds: float = 20.0, layers: int = 2) -> dict:
    """Does torch-pruning build the head-pruning groups of this architecture within `seconds`? (The GQA setup
    of its LLM example: q/k/v in `num_heads`, `prune_num_heads=True`.) The check runs on a random-weight
    model of the same config cut to `layers` layers (graph structure only), in a spawned process that is
    killed when the time is up."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = min(layers, config.num_hidden_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()  # set once the child has imported torch and built the model: start the clock there
    proc = ctx.Process(target=_build_head_pruner, args=(config, ready), daemon=True)
    proc.start()
    deadline = time.perf_counter() + 300
    while not ready.wait(1.0) and proc.is_alive() and time.perf_counter() < deadline:
        pass
    t0 = time.perf_counter()
    proc.join(seconds)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    return {"hung": hung, "exitcode": None if hung else proc.exitcode, "waited_seconds": time.perf_counter() - t0,
            "layers": config.num_hidden_layers, "weights": "random (structure check only)"}


def _build_head_pruner(config, ready) -> None:  # pragma: no cover - runs in a child process
    import torch_pruning as tp

    from rap.sources import model_from_config

    model = model_from_config(config, dtype=torch.float32, device="cpu")
    ready.set()
    heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        heads.update({a.q_proj: config.num_attention_heads, a.k_proj: config.num_key_value_heads,
                      a.v_proj: config.num_key_value_heads})
    tp.pruner.MetaPruner(model, example_inputs=torch.ones(1, 8, dtype=torch.long),
                         importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.25,
                         ignored_layers=[model.lm_head], num_heads=heads, prune_num_heads=True,
                         prune_head_dims=False, head_pruning_ratio=0.25, round_to=4, output_transform=_logits)


def torch_pruning_version() -> str | None:
    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return None


# ---- the benchmark -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="known name or HF folder")
    parser.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS))
    parser.add_argument("--budget-of", choices=("total", "blocks"), default="total",
                        help="total: fraction of dense parameters (rap's unit in quality.py); blocks: of block params")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--round-to", type=int, default=4, help="FFN width multiple (torch-pruning's LLM example: 4)")
    add_protocol_args(parser)  # --calib-windows: the Taylor importance's windows here
    parser.add_argument("--head-check-seconds", type=float, default=20.0,
                        help="how long to let torch-pruning build attention-head groups (0: skip the check)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="output file name (default width-peer-<date>.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
        args.head_check_seconds = 3.0
        torch.set_num_threads(1)  # a 260K-parameter model: threads only add contention (10x slower on a busy box)
    args.limit = args.limit or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if torch_pruning_version() is None:
        raise SystemExit("torch-pruning is not installed: pip install 'rap-runtime[bench]'")
    from rap.cli import load_view_for_cli

    view, tok = load_view_for_cli(args.model, dtype=args.dtype, device=args.device)
    dense_model = view.model
    budgets = [float(b) for b in args.budgets.split(",")]
    importances = [m.strip() for m in args.importances.split(",") if m.strip()]
    name = args.name or f"width-peer-{datetime.date.today().isoformat()}.json"

    calib = calibration_windows(view, tok, args.calib_windows, args.calib_seq_len)
    test_windows = token_windows(read_text(WIKITEXT2_TEST), tok, args.seq_len, args.ppl_tokens or None,
                                 bos=needs_bos(tok, view.config.model_type))
    heads = attention_groups_hang(view.config, args.head_check_seconds) if args.head_check_seconds > 0 else None
    if heads is not None:
        print(f"torch-pruning attention-head groups: {'did not finish in' if heads['hung'] else 'built in'} "
              f"{heads['waited_seconds']:.0f} s")
    dense_params, dense_blocks = count_params(dense_model), block_params(dense_model)
    plan = [("dense", None, 1.0)] + [(f"tp-{imp}", imp, b) for imp in importances for b in budgets if b < 1.0]

    rows: list[dict] = []
    dense_zs = None
    for method, importance, budget in plan:
        if importance is None:
            model, prune_info = dense_model, {"ffn_channels": ffn_width(dense_model)}
        else:
            keep = channels_for_budget(dense_model, budget, args.budget_of, args.round_to)
            print(f"{method} @ {budget:.0%} of {args.budget_of} parameters: FFN {ffn_width(dense_model)} -> {keep}")
            model = copy.deepcopy(dense_model)
            prune_info = prune_ffn_width(model, keep, importance, calib, args.round_to)
        pruned_view = BlockView(model, name=view.name)
        res = evaluate_mask(pruned_view, tok, BlockMask.full(pruned_view.num_layers), args, test_windows)
        zs = res.pop("zeroshot")
        params = count_params(model)
        row = {"method": method, "importance": importance, "budget": budget, "budget_of": args.budget_of,
               "params": params, "param_ratio": params / dense_params,
               "block_param_ratio": block_params(model) / dense_blocks, "ffn_channels": prune_info["ffn_channels"],
               "prune": prune_info, "mean_headline": zs["mean_headline"], "mean_acc": zs["mean_acc"],
               "mean_chance": zs["mean_chance"], "tasks": zs["tasks"], **res}
        if method == "dense":
            dense_zs = {"tasks": row["tasks"]}
        row.update(harness.share_columns(row["tasks"], dense_zs["tasks"]))
        rows.append(row)
        if model is not dense_model:
            del model, pruned_view
        print_table([row], COLUMNS)
        payload = {
            "kind": "width-peer", "model": view.name, "dtype": str(view.dtype),
            "library": {"torch_pruning": torch_pruning_version(), "pruner": "MetaPruner(global_pruning=False)",
                        "example_followed": "VainF/Torch-Pruning examples/LLMs/prune_llm.py"},
            "pruned": "FFN intermediate channels (gate/up rows + down columns), same width in every layer; "
                      "attention, hidden size, embeddings and norms untouched",
            "attention_heads": {"pruned": False, "check": heads,
                                "why": "torch-pruning 1.6.1 does not finish building q/k head groups of a "
                                       "transformers 5.x Llama (RoPE concat loop; VainF/Torch-Pruning#527)"},
            "budget_of": args.budget_of,
            "budget_unit": {"total": "fraction of dense parameters, embeddings/norms included "
                                     "(= rap's unit in benchmarks/quality.py)",
                            "blocks": "fraction of dense block (attention + FFN) parameters"}[args.budget_of],
            "dense_params": dense_params, "dense_block_params": dense_blocks,
            "limit_per_task": args.limit, "tasks": harness.parse_tasks(args.tasks),
            "harness": harness.harness_version(), "mean_over": "every task but BoolQ (reported alone)",
            "headline_metric": {n: harness.HEADLINE[n] for n in harness.parse_tasks(args.tasks)},
            "ppl": {"file": WIKITEXT2_TEST, "seq_len": args.seq_len, "tokens_cap": args.ppl_tokens or None},
            "calibration": {"source": WIKITEXT2_VALID, "windows": int(calib.shape[0]),
                            "seq_len": int(calib.shape[1]), "used_by": "taylor importance"},
            "rows": rows}
        path = write_json(name, payload)
    print()
    print_table(rows, COLUMNS)
    print(f"results in {path} ({environment()['device']})")


if __name__ == "__main__":
    main()
