"""`rap kv needle | leval | continuation`: press x budget evaluations of KV-cache compression.

Each prints a table (rows: presses, columns: budgets, plus the full-cache reference) and writes
`<out>/kv-<eval>-<model>-<date>.json` (every row, the summary, device, date, command) and a plot beside it.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(highlight=False)
kv_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="KV-cache compression (StreamingLLM, SnapKV, PyramidKV, Ada-KV): evaluations.")

PRESSES_HELP = ("comma list; --path decoder (default: what `rap serve` runs): snapkv (uniform), adakv, "
                "pyramidkv (PyramidKV's layer budgets), ada-pyramidkv [default: snapkv,adakv]; --path hf (rap.kv "
                "on transformers, a comparison): streaming, snapkv, pyramidkv, adakv (=AdaKV(SnapKV)), "
                "ada-pyramidkv [default: streaming,snapkv,pyramidkv,adakv]")
HF_PRESSES = "streaming,snapkv,pyramidkv,adakv"
DECODER_PRESSES = "snapkv,adakv"  # the decoder path's default sweep (rap.kv.decode_cache.DECODER_PRESSES: all it runs)

# Options every evaluation takes (one definition, so the three commands cannot drift apart).
PRESSES = typer.Option(None, help=PRESSES_HELP)
PATH = typer.Option("decoder", "--path", help="decoder: rap's decoder (Ada-KV / uniform SnapKV / PyramidKV, "
                                             "int8 / int4 KV), the path requests are served on; hf: rap.kv's presses on "
                                             "transformers")
KV_BITS = typer.Option(16, "--kv-bits", help="decoder path: 16 (model dtype), 8 (int8 keys and values) or 4 "
                                               "(int4, two per byte)")
BUDGETS = typer.Option("0.05,0.1,0.2,0.4", help="KV keep ratios (or percentages)")
FULL = typer.Option(True, "--full/--no-full", help="also run the full-cache reference")
DTYPE = typer.Option(None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
DEVICE = typer.Option(None, help="cuda | cpu")
OUT = typer.Option(Path("out"), help="folder for the JSON and the plot")


def register(app: typer.Typer) -> None:
    app.add_typer(kv_app, name="kv")


def _floats(text: str, what: str) -> list[float]:
    from rap.errors import RequestError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RequestError(f"cannot read {what} {text!r}: give comma-separated numbers, e.g. 0.05,0.1,0.2") from None
    if not values:
        raise RequestError(f"no {what} given")
    return values


def _budgets(text: str) -> list[float]:
    from rap.errors import RequestError

    values = [v / 100 if v > 1 else v for v in _floats(text, "budgets")]  # accept 5,10,20 as percent
    if any(not 0 < v <= 1 for v in values):
        raise RequestError(f"budgets must be in (0, 1] (or percentages), got {text!r}")
    return values


def _presses(text: str, full: bool) -> dict:
    from rap.kv import make_press

    presses = {"full": None} if full else {}
    for name in text.split(","):
        if name.strip():
            presses[name.strip().lower()] = make_press(name)
    return presses


def _decoder_settings(path: str, presses: Optional[str], budgets: list[float], kv_bits: int, full: bool,
                      agnostic: bool):
    """None for --path hf; else the decoder's settings, every press and the bits checked before any work."""
    from rap.errors import RequestError
    from rap.eval.needle_decoder import settings_for

    if path not in ("decoder", "hf"):
        raise RequestError(f"--path must be decoder or hf, got {path!r}")
    if path == "hf":
        if kv_bits != 16:
            raise RequestError(f"--kv-bits {kv_bits} runs on the decoder path only (--path decoder)")
        return None
    if agnostic:
        raise RequestError("--agnostic (compress before the question) runs on the HF path only: add --path hf")
    names = [p.strip().lower() for p in (presses or DECODER_PRESSES).split(",") if p.strip()]
    from rap.kv import PRESSES as RAP_KV_PRESSES

    from rap.kv.decode_cache import DECODER_PRESSES as ON_DECODER

    hf_only = [p for p in names if p not in ON_DECODER and p in RAP_KV_PRESSES]
    if hf_only:
        raise RequestError(f"press {hf_only[0]!r} is not in rap's decoder (it has {', '.join(ON_DECODER)}); "
                           f"add --path hf for rap.kv's HF-path presses")
    return settings_for(names, budgets, kv_bits, full)


def _press_setup(path: str, presses: Optional[str], budgets: str, kv_bits: int, full: bool, agnostic: bool):
    """(budgets, the decoder's settings or None, the HF path's presses or None), all checked before any work."""
    budget_list = _budgets(budgets)
    dec_settings = _decoder_settings(path, presses, budget_list, kv_bits, full, agnostic)
    return budget_list, dec_settings, (_presses(presses or HF_PRESSES, full) if dec_settings is None else None)


def _load(model: str, dtype: Optional[str], device: Optional[str]):
    from rap.cli import load_view_for_cli

    return load_view_for_cli(model, dtype=dtype, device=device)


def _stem(kind: str, view) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(view.name))
    return f"kv-{kind}-{safe}-{datetime.date.today().isoformat()}"


def _finish(kind: str, view, out: Path, rows: list[dict], summary: dict, metric: str, settings: dict,
            value_fmt: str, higher_is_better: bool) -> None:
    from rap.kv.report import table_text, write_result

    title = f"{kind} on {view.name}: {metric} ({'higher' if higher_is_better else 'lower'} is better)"
    console.print(table_text(summary, value_fmt, title))
    payload = {"eval": kind, "model": view.name, "metric": metric, "settings": settings, "summary": summary,
               "rows": rows}
    json_path, png_path = write_result(out, _stem(kind, view), payload, summary, metric, title)
    console.print(f"wrote {json_path} and {png_path}")


@kv_app.command()
def needle(
    model: str,
    presses: str = PRESSES,
    budgets: str = BUDGETS,
    lengths: Optional[str] = typer.Option(None, help="context lengths in tokens (default: up to the model's context)"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths in [0, 1]"),
    max_new: int = typer.Option(32, help="answer tokens"),
    agnostic: bool = typer.Option(False, "--agnostic", help="compress the haystack before the question is known"),
    full: bool = FULL,
    path: str = PATH,
    kv_bits: int = KV_BITS,
    dtype: Optional[str] = DTYPE,
    device: Optional[str] = DEVICE,
    out: Path = OUT,
) -> None:
    """Needle-in-a-haystack retrieval (Paul Graham essays) per press x budget, averaged over depths and lengths."""
    from rap.eval.needle import default_lengths, default_spec, run_needle, summarize

    budget_list, dec_settings, hf_presses = _press_setup(path, presses, budgets, kv_bits, full, agnostic)
    view, tok = _load(model, dtype, device)
    ctx = view.shape.max_context
    lens = [int(x) for x in _floats(lengths, "lengths")] if lengths else default_lengths(ctx)
    if dec_settings is None:
        rows = run_needle(view, tok, hf_presses, budget_list, lens, _floats(depths, "depths"), max_new,
                          question_aware=not agnostic)
    else:
        from rap.decode.decoder import Decoder
        from rap.eval.needle_decoder import run_needle_decoder

        rows = run_needle_decoder(Decoder(view), tok, dec_settings, lens, _floats(depths, "depths"),
                                  [default_spec()], max_new)
    settings = {"path": path, "kv_bits": kv_bits, "lengths": lens, "depths": _floats(depths, "depths"),
                "max_new_tokens": max_new, "question_aware": not agnostic, "dtype": str(view.dtype)}
    _finish("needle", view, out, rows, summarize(rows), "needle accuracy", settings, "{:.3f}", True)


@kv_app.command()
def leval(
    model: str,
    tasks: str = typer.Option("topic_retrieval_longchat,quality,tpo,coursera,sci_fi", help="L-Eval closed-ended tasks"),
    presses: str = PRESSES,
    budgets: str = BUDGETS,
    max_context: Optional[int] = typer.Option(None, help="prompt tokens (default: the model's context)"),
    max_docs: Optional[int] = typer.Option(None, help="documents per task"),
    max_questions: int = typer.Option(20, help="questions per task"),
    max_new: int = typer.Option(32, help="answer tokens"),
    agnostic: bool = typer.Option(False, "--agnostic", help="compress each document once, before its questions"),
    full: bool = FULL,
    path: str = PATH,
    kv_bits: int = KV_BITS,
    dtype: Optional[str] = DTYPE,
    device: Optional[str] = DEVICE,
    out: Path = OUT,
) -> None:
    """L-Eval long-document exact-match tasks per press x budget (mean over tasks of per-task accuracy)."""
    from rap.eval.leval import run_leval, run_leval_decoder

    budget_list, dec_settings, hf_presses = _press_setup(path, presses, budgets, kv_bits, full, agnostic)
    view, tok = _load(model, dtype, device)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    ctx = max_context or view.shape.max_context
    if dec_settings is None:
        rows = run_leval(view, tok, hf_presses, budget_list, task_list, ctx, max_docs, max_questions, max_new,
                         question_aware=not agnostic)
    else:
        from rap.decode.decoder import Decoder

        rows = run_leval_decoder(Decoder(view), tok, dec_settings, task_list, ctx, max_docs, max_questions, max_new)
    per_task: dict = {}
    for r in rows:
        per_task.setdefault(r["task"], {}).setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(
            r["score"])
    per_task = {t: {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in ps.items()} for t, ps in per_task.items()}
    summary = {p: {b: sum(per_task[t][p][b] for t in per_task) / len(per_task) for b in d}
               for p, d in next(iter(per_task.values())).items()}
    from rap.kv.report import table_text

    for task, s in per_task.items():
        console.print(table_text(s, "{:.3f}", f"{task}: accuracy"))
    settings = {"path": path, "kv_bits": kv_bits, "tasks": task_list, "max_context": ctx, "max_docs": max_docs, "max_questions": max_questions,
                "max_new_tokens": max_new, "question_aware": not agnostic, "per_task": per_task,
                "dtype": str(view.dtype)}
    _finish("leval", view, out, rows, summary, "L-Eval accuracy (mean over tasks)", settings, "{:.3f}", True)


@kv_app.command()
def continuation(
    model: str,
    file: Optional[str] = typer.Option(None, "--file", help="plain-text file (default: WikiText-2 raw test)"),
    prefix: Optional[int] = typer.Option(None, help="prefix tokens compressed (default: 3/4 of the model's context)"),
    cont: Optional[int] = typer.Option(None, "--continuation", help="tokens scored after the prefix (default: 1/4)"),
    windows: int = typer.Option(8, help="non-overlapping windows of prefix + continuation"),
    presses: str = PRESSES,
    budgets: str = BUDGETS,
    full: bool = FULL,
    dtype: Optional[str] = DTYPE,
    device: Optional[str] = DEVICE,
    out: Path = OUT,
) -> None:
    """Perplexity of the continuation after compressing a long prefix, per press x budget."""
    from rap.data import WIKITEXT2_TEST, read_text
    from rap.eval.perplexity import needs_bos, token_windows
    from rap.kv.continuation import run_continuation

    view, tok = _load(model, dtype, device)
    ctx = view.shape.max_context
    P = prefix or (3 * ctx) // 4
    C = cont or ctx // 4
    text = read_text(file or WIKITEXT2_TEST)
    wins = token_windows(text, tok, P + C, max_tokens=windows * (P + C) + P + C,
                         bos=needs_bos(tok, view.config.model_type))[:windows]
    rows = run_continuation(view, wins, P, _presses(presses or HF_PRESSES, full), _budgets(budgets))
    summary: dict = {}
    for r in rows:
        summary.setdefault(r["press"], {})[f"{r['budget']:g}"] = r["ppl"]
    settings = {"file": file or WIKITEXT2_TEST, "prefix_tokens": P, "continuation_tokens": C,
                "windows": int(wins.shape[0]), "dtype": str(view.dtype)}
    _finish("continuation", view, out, rows, summary, "continuation perplexity", settings, "{:.2f}", False)
