"""`rap profile` and `rap curve`: parse, call rap.profile, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

METHODS = ("gsi", "oneshot", "shortgpt", "random", "levels")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_command)
    app.command("curve")(curve_command)


def profile_command(
    model: str = typer.Argument(..., help="known name (smollm2-135m, stories260k), HF folder or .gguf"),
    method: str = typer.Option("gsi", help="gsi | oneshot | shortgpt | random | levels (a level per block)"),
    racing: bool = typer.Option(False, "--racing", help="gsi only: racing (fast, approximate) instead of exact"),
    calib: Optional[str] = typer.Option(None, help="calibration text file (default: WikiText-2 valid)"),
    tokens: int = typer.Option(262_144, help="calibration tokens (cut into windows of --seq-len)"),
    seq_len: Optional[int] = typer.Option(None, help="window length (default: min(2048, model context))"),
    steps: Optional[int] = typer.Option(None, help="removals to compute (default: all blocks)"),
    seed: int = typer.Option(0, help="seed: random order, racing's window order"),
    out: Path = typer.Option(Path("profile.json"), help="profile JSON (gsi: checkpoint, rewritten every removal)"),
    resume: bool = typer.Option(True, help="gsi: continue a matching incomplete --out"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda if available)"),
    batch_windows: int = typer.Option(8, help="windows per block call (candidates are batched up to this)"),
    predict: int = typer.Option(2, help="gsi: snapshot slots for likely next removals (exact either way)"),
    cache_mem: Optional[str] = typer.Option(None, help="gsi: memory for cached streams, e.g. 20GiB (default: half free)"),
    racing_first: int = typer.Option(8, help="racing: windows in the first round"),
    racing_z: float = typer.Option(3.0, help="racing: confidence multiplier of the elimination bound"),
    remeasure: int = typer.Option(12, help="levels: moves re-measured per greedy step (0 = all: exact, slow)"),
    int4_group: int = typer.Option(64, help="levels: int4 group size (must divide the projections' in_features)"),
    bytes_device: Optional[str] = typer.Option(None, help="levels: rank moves by cpu | cuda bytes (default: the model's)"),
    library: bool = typer.Option(True, help="levels: then measure the plan library (rap.policy.library: every "
                                 "generator's plan at 33 budgets, measured together; what the default policy picks from)"),
    library_tokens: int = typer.Option(65_536, help="levels: the library is measured on this many calibration-source "
                                       "tokens after the profile's own (a disjoint split); 0 = on the calibration windows"),
) -> None:
    """Rank blocks by importance and write a reusable profile (removal order, PPL after each removal)."""
    from rich.markup import escape

    from rap.cli import console, load_view_for_cli
    from rap.errors import RapError
    from rap.core.memory import parse_bytes
    from rap.profile.calibration import load_calibration
    from rap.profile.gsi import Racing, gsi
    from rap.profile.oneshot import oneshot
    from rap.profile.random_order import random_order
    from rap.profile.shortgpt import shortgpt

    if method not in METHODS:
        raise RapError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if racing and method != "gsi":
        raise RapError("--racing applies to --method gsi only")
    view, tok = load_view_for_cli(model, dtype=dtype, device=device)
    seq_len = seq_len or min(2048, view.shape.max_context)
    cal = load_calibration(tok, view.config.model_type, calib, tokens, seq_len, seed)
    console.print(escape(f"{view.name}: {len(view.blocks)} blocks; calibration {cal.source}: "
                         f"{cal.num_windows} windows x {cal.seq_len} tokens ({str(view.dtype)[6:]} on {view.device})"))
    if method == "levels":
        from rap.profile.levels import level_profile

        lp = level_profile(view, cal, int4_group=int4_group, steps=steps, remeasure=remeasure or None,
                           batch_windows=batch_windows, bytes_device=bytes_device, checkpoint=out, resume=resume,
                           name=view.name)
        lp.save(out)
        if library:
            from rap.policy.library import build_library, selection_windows
            from rap.sources import bundled_profile

            gsi_path = bundled_profile(view.name, view.num_layers)
            selection = selection_windows(tok, view.config.model_type, lp, library_tokens) if library_tokens else cal
            lib = build_library(view, selection, lp,
                                json.loads(gsi_path.read_text()) if gsi_path else None,
                                batch_windows=min(batch_windows, 4), checkpoint=out)
            lp.save(out)
            where = (f"{selection.num_windows} windows after the calibration's" if library_tokens
                     else "the calibration windows")
            console.print(f"plan library: {len(lib['plans'])} plans measured on {where} ({lib['seconds']:.1f} s)")
        last = lp.steps[-1] if lp.steps else None
        console.print(escape(f"levels: dense ppl {lp.dense_ppl:.3f}; {len(lp.steps)} greedy moves"
                             + (f", last {last.block}={last.level} ppl {last.ppl:.3f}" if last else "")))
        console.print(f"{lp.seconds:.1f} s, {lp.block_forwards:,.1f} block forwards; wrote {out}")
        return
    if method == "gsi":
        prof = gsi(view, cal, steps=steps, racing=Racing(first_windows=racing_first, z=racing_z) if racing else None,
                   predict=predict, checkpoint=out, resume=resume, batch_windows=batch_windows,
                   cache_bytes=parse_bytes(cache_mem) if cache_mem else None, name=view.name)
    elif method == "oneshot":
        prof = oneshot(view, cal, steps=steps, batch_windows=batch_windows)
    elif method == "shortgpt":
        prof = shortgpt(view, cal, steps=steps, batch_windows=batch_windows)
    else:
        prof = random_order(view, cal, seed=seed, steps=steps, batch_windows=batch_windows)
    prof.save(out)
    head = ", ".join(prof.order[:8]) + (" ..." if len(prof.order) > 8 else "")
    console.print(escape(f"{prof.method}: dense ppl {prof.dense_ppl:.3f}; order {head}"))
    if prof.ppl_after:
        console.print(f"calibration ppl after {len(prof.ppl_after)} removals: {prof.ppl_after[-1]:.3f}")
    console.print(f"{prof.seconds:.1f} s, {prof.block_forwards:,.1f} block forwards (one block over the calibration set)")
    console.print(f"wrote {out}")


def curve_command(
    profiles: List[Path] = typer.Argument(..., help="profile JSON files (one line each)"),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="held-out text (default: WikiText-2 raw test)"),
    model: Optional[str] = typer.Option(None, help="model to load (default: the profiles' model)"),
    seq_len: int = typer.Option(2048, help="window length of the perplexity protocol"),
    tokens: Optional[int] = typer.Option(None, help="score only the first N tokens"),
    max_fraction: float = typer.Option(0.5, help="largest fraction of blocks removed"),
    every: int = typer.Option(1, help="evaluate every k-th block count (the 25% point always)"),
    out: Path = typer.Option(Path("curve"), help="output prefix: PREFIX.png and PREFIX.json"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
    device: Optional[str] = typer.Option(None, help="cuda | cpu"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
) -> None:
    """Held-out perplexity as blocks are removed in each profile's order: PNG + table + JSON."""
    from rich.table import Table

    from rap.cli import console, load_view_for_cli
    from rap.data import WIKITEXT2_TEST, read_text
    from rap.errors import RapError
    from rap.eval.perplexity import needs_bos, token_windows
    from rap.profile.curve import curve_counts, method_labels, plot_curves, ppl_at, removal_curves, rows
    from rap.provenance import command_line
    from rap.profile.record import environment, load_profile, now

    profs = [load_profile(p) for p in profiles]
    hashes = {p.model_hash for p in profs}
    if len(hashes) > 1:
        raise RapError("the profiles were made on different models (model_hash differs); curve one model at a time")
    view, tok = load_view_for_cli(model or profs[0].model, dtype=dtype, device=device)
    windows = token_windows(read_text(eval_file or WIKITEXT2_TEST), tok, seq_len, tokens,
                            bos=needs_bos(tok, view.config.model_type))
    counts = curve_counts(len(view.blocks), max_fraction, every)
    labels = method_labels(profs, [str(p) for p in profiles])
    points = removal_curves(view, profs, windows, counts, labels, batch_size)
    quarter = round(0.25 * len(view.blocks))
    title = (f"{view.name}: held-out PPL ({eval_file or WIKITEXT2_TEST}, {windows.shape[0]} x {seq_len} tokens) "
             f"vs block removal")
    png = plot_curves(points, out.with_suffix(".png"), title)
    versions, device_text = environment(view.device)
    payload = {"model": view.name, "model_hash": profs[0].model_hash,
               "eval": {"file": eval_file or WIKITEXT2_TEST, "seq_len": seq_len, "windows": int(windows.shape[0]),
                        "tokens": int(windows.numel()), "dtype": str(view.dtype).replace("torch.", "")},
               "profiles": {label: str(path) for label, path in zip(labels, profiles)},
               "calibration": {label: p.calibration for label, p in zip(labels, profs)},
               "x": "fraction of block parameters removed", "y": "held-out perplexity",
               "quarter_blocks": quarter, "ppl_at_25pct": ppl_at(points, quarter),
               "rows": rows(points), "versions": versions, "device": device_text, "created": now(),
               "command": command_line()}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    table = Table("blocks", "frac", *labels, title=f"{view.name}: held-out PPL by blocks removed")
    for k in counts:
        by = {pt.method: pt for pt in points if pt.blocks_removed == k}
        table.add_row(str(k), f"{k / len(view.blocks):.2f}",
                      *[f"{by[m].ppl:.2f} ({by[m].param_fraction:.2f})" if m in by else "-" for m in labels])
    console.print(table)
    console.print("(in brackets: fraction of block parameters removed)")
    console.print(f"wrote {png} and {out.with_suffix('.json')}")
