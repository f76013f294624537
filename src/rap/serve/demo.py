"""`rap demo`: replay a memory-budget trace on a real model and watch the engine follow it.

The budget steps through fractions of what the dense model needs for the demo's largest batch
(default 100% -> 40% -> 70% -> 100%) while a mixed stream of requests (stories, questions, code,
chat; batches of 1 to 4; 12 to 32 new tokens) is served. Every batch shows the budget, the
decision, the resident parameter bytes, throughput and a sample output in a live table; quality
is the perplexity of a fixed passage (written for this demo, below) under each decision.
The run ends with a per-level summary, a JSON log and a plot of budget, memory and quality.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rap.serve.engine import Engine, GenerationRequest
from rap.serve.budget import FixedBudget
from rap.errors import RapError
from rap.core.mask import BlockMask
from rap.core.memory import Request, format_bytes

log = logging.getLogger(__name__)

DEFAULT_TRACE = (1.0, 0.4, 0.7, 1.0)

# (kind, text, max_new_tokens): completions and one chat turn, so batches mix lengths and shapes
REQUESTS = (
    ("story", "Once upon a time, there was a little girl named", 32),
    ("fact", "The capital of France is", 12),
    ("chat", "Write one sentence about the sea.", 24),
    ("code", "def fibonacci(n):\n    ", 24),
    ("story", "The little dog ran to the park and", 24),
    ("qa", "Q: What color is the sky on a clear day?\nA:", 12),
    ("list", "Three things to pack for a picnic:\n1.", 20),
    ("story", "Tom found a shiny red ball under the tree.", 28),
)
BATCH_SIZES = (1, 4, 2)

# Held-out passage for the quality column (written for rap; simple words so both the bundled
# TinyStories model and SmolLM2 read it in-domain).
PASSAGE = (
    "Once upon a time, there was a little boy named Sam. Sam had a small red boat. Every day he took the boat "
    "to the pond near his house. One sunny morning, Sam saw a duck on the water. The duck was sad because it "
    "had lost its way home. Sam said, \"Do not be sad, little duck. I will help you.\" He put the duck in his "
    "boat and they sailed across the pond. On the other side, they saw a big nest in the tall grass. The "
    "duck's mother was there, and she was very happy to see her baby. She said thank you to Sam. Sam smiled "
    "and waved goodbye. When he got home, he told his mom about the duck. His mom gave him a big hug and said "
    "he was a kind boy. That night, Sam dreamed of ducks, boats and the warm sun on the pond."
)


@dataclass
class DemoRow:
    step: int
    level_index: int
    elapsed_s: float
    level_ratio: float  # budget as a fraction of the dense need
    budget_bytes: int
    decision: str
    dropped_ffn: int
    dropped_attn: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    resident_bytes: int
    batch: int
    tokens: int
    seconds: float
    tokens_per_s: float
    quality_ppl: float
    sample: str
    rejected: int = 0
    levels: str = ""  # blocks per precision level of a plan, e.g. "30 dtype, 30 int8" ("" without quantization)
    level_bytes: dict = field(default_factory=dict)  # resident parameter bytes per level ("base": embeddings, norms)


@dataclass
class DemoResult:
    model: str
    note: str
    device: str
    dense_need_bytes: int
    dense_param_bytes: int
    reference_request: dict
    trace: list[float]
    rows: list[DemoRow] = field(default_factory=list)
    load_seconds: float = 0.0
    total_seconds: float = 0.0

    def levels(self) -> list[dict]:
        """Per trace level: mean throughput (vs the first dense level), quality, decisions."""
        def throughput(rows: list[DemoRow]) -> float:
            rows = [r for r in rows if r.step > 0]  # the very first batch pays one-time warm-up
            seconds = sum(r.seconds for r in rows)
            return sum(r.tokens for r in rows) / seconds if seconds else float("nan")

        by_level = [[r for r in self.rows if r.level_index == i] for i in range(len(self.trace))]
        dense_rows = [r for rows, level in zip(by_level, self.trace) if level >= 1.0 for r in rows]
        dense_tps = throughput(dense_rows) if dense_rows else float("nan")
        out = []
        for level, rows in zip(self.trace, by_level):
            if not rows:
                continue
            tps = throughput(rows)
            out.append({"level_ratio": level, "budget_bytes": rows[0].budget_bytes, "batches": len(rows),
                        "tokens_per_s": tps, "tokens_per_s_vs_dense": tps / dense_tps,
                        "max_resident_bytes": max(r.resident_bytes for r in rows),
                        "max_predicted_peak_bytes": max(r.predicted_peak_bytes for r in rows),
                        "blocks_dropped": sorted({r.dropped_ffn + r.dropped_attn for r in rows}),
                        "quality_ppl": [r.quality_ppl for r in rows], "rejected": sum(r.rejected for r in rows),
                        "level_mix": sorted({r.levels or "dense" for r in rows}),
                        "level_bytes": rows[-1].level_bytes, "sample": rows[-1].sample})
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = self.levels()
        return d


def load_demo_model(name: str, device: str | None = None, dtype=None):
    """(view, tokenizer, note): the requested model, or the bundled stories260k when a known model cannot
    be fetched (offline laptop). A model the user names by path that does not load is an error, not a
    reason to demo something else."""
    from rap.sources import KNOWN_MODELS, load_view

    try:
        view, tok = load_view(name, device=device, dtype=dtype)
        return view, tok, ""
    except (RapError, OSError) as e:
        if name == "stories260k" or name not in KNOWN_MODELS:
            raise
        note = f"could not load {name} ({e}); using the bundled stories260k instead (offline?)"
        log.warning(note)
        view, tok = load_view("stories260k", device=device, dtype=dtype)
        return view, tok, note


class QualityProbe:
    """Perplexity of PASSAGE under a mask, memoised (one forward pass per distinct mask)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        ids = engine.encode(PASSAGE)
        self.ids = torch.tensor([ids], device=engine.device)
        self.cache: dict[BlockMask, float] = {}

    @torch.inference_mode()
    def __call__(self, mask: BlockMask) -> float:
        if mask not in self.cache:
            from rap.eval.perplexity import window_nll
            from rap.core.forward import forward_for

            with self.engine._lock:  # weights of `mask` are resident after its batch
                logits = forward_for(self.engine.view).logits(self.ids, mask)
            nll = window_nll(logits, self.ids).item() / (self.ids.shape[1] - 1)
            self.cache[mask] = math.exp(nll)
        return self.cache[mask]


def demo_batches(engine: Engine, count: int, start: int) -> list[list[GenerationRequest]]:
    """`count` batches cycling through the request mix and batch sizes."""
    batches, k = [], start
    for b in range(count):
        size = BATCH_SIZES[(start + b) % len(BATCH_SIZES)]
        batch = []
        for _ in range(size):
            kind, text, new = REQUESTS[k % len(REQUESTS)]
            k += 1
            ids = engine.encode_chat([{"role": "user", "content": text}]) if kind == "chat" else engine.encode(text)
            batch.append(GenerationRequest(prompt_ids=ids, max_new_tokens=new, request_id=kind))
        batches.append(batch)
    return batches


def reference_request(engine: Engine) -> Request:
    """The largest batch the demo sends, as the backend allocates for it: 100% means it runs dense."""
    prompts = [len(engine.encode(t)) if kind != "chat" else len(engine.encode_chat([{"role": "user", "content": t}]))
               for kind, t, _ in REQUESTS]
    return engine.planning_request(Request(max(BATCH_SIZES), max(prompts), max(n for _, _, n in REQUESTS)))


def render_table(result: DemoResult, title: str, last: int | None = 14):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for col, kw in (("t (s)", {"justify": "right"}), ("budget", {"justify": "right"}), ("decision", {}),
                    ("resident", {"justify": "right"}), ("peak (model)", {"justify": "right"}),
                    ("batch", {"justify": "right"}), ("tok/s", {"justify": "right"}), ("ppl", {"justify": "right"}),
                    ("sample output", {"max_width": 44, "no_wrap": True})):
        table.add_column(col, **kw)
    for r in result.rows[-last if last else 0:]:
        budget = f"{r.level_ratio:.0%} {format_bytes(r.budget_bytes)}"
        decision = "dense" if r.decision == "dense" else ", ".join(
            x for x in (_quantized(r.levels), f"-{r.dropped_ffn} ffn" if r.dropped_ffn else "",
                        f"-{r.dropped_attn} attn" if r.dropped_attn else "") if x)
        table.add_row(f"{r.elapsed_s:.1f}", budget, decision, format_bytes(r.resident_bytes),
                      format_bytes(r.predicted_peak_bytes), str(r.batch), f"{r.tokens_per_s:.1f}",
                      _ppl(r.quality_ppl), escape(r.sample.replace("\n", " ")))
    return table


def _quantized(levels: str) -> str:
    """'30 dtype, 30 int8, 2 drop' -> '30 int8' (the quantized part of a row's level mix)."""
    return ", ".join(p for p in levels.split(", ") if p and "int" in p)


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:.2g}"


def render_levels(result: DemoResult):
    from rich.table import Table

    from rich.markup import escape

    table = Table(title="per budget level", title_justify="left")
    for col in ("level", "budget", "level mix", "blocks dropped", "max resident", "tok/s", "vs dense", "ppl"):
        table.add_column(col, justify="right")
    table.add_column("sample output", max_width=48, no_wrap=True)
    for lv in result.levels():
        dropped = lv["blocks_dropped"]
        ppl = lv["quality_ppl"]
        table.add_row(f"{lv['level_ratio']:.0%}", format_bytes(lv["budget_bytes"]), escape(" | ".join(lv["level_mix"])),
                      str(dropped[0]) if len(dropped) == 1 else f"{dropped[0]}-{dropped[-1]}",
                      format_bytes(lv["max_resident_bytes"]), f"{lv['tokens_per_s']:.1f}",
                      f"{lv['tokens_per_s_vs_dense']:.2f}x",
                      _ppl(min(ppl)) if min(ppl) == max(ppl) else f"{_ppl(min(ppl))}-{_ppl(max(ppl))}",
                      escape(lv["sample"].replace("\n", " ")))
    return table


LEVEL_COLORS = {"base": "tab:gray", "dtype": "tab:blue", "int8": "tab:orange", "int4g32": "tab:red",
                "int4g64": "tab:red", "int4g128": "tab:pink"}


def _level_mix_panel(ax, result: DemoResult, x) -> None:
    """Stacked resident parameter bytes at each precision, per batch."""
    mib = 2**20
    names = [n for n in LEVEL_COLORS if any(r.level_bytes.get(n) for r in result.rows)]
    if not names:
        ax.text(0.5, 0.5, "no level bytes recorded", ha="center", transform=ax.transAxes)
        return
    ax.stackplot(x, *[[r.level_bytes.get(n, 0) / mib for r in result.rows] for n in names],
                 labels=names, colors=[LEVEL_COLORS[n] for n in names], alpha=0.8, step="mid")
    ax.set_ylabel("parameter MiB\nby precision")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower left", ncol=len(names))


def save_plot(result: DemoResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    x = [r.step for r in result.rows]
    mib = 2**20
    fig, (ax1, ax4, ax2, ax3) = plt.subplots(4, 1, figsize=(8, 9.5), sharex=True)
    for ax in (ax1, ax4, ax2, ax3):  # shade each budget level
        for i, level in enumerate(result.trace):
            steps = [r.step for r in result.rows if r.level_index == i]
            if steps:
                ax.axvspan(min(steps) - 0.5, max(steps) + 0.5, color="gray", alpha=0.06 + 0.1 * (i % 2))
    ax1.step(x, [r.budget_bytes / mib for r in result.rows], where="mid", label="budget", color="black")
    ax1.plot(x, [r.predicted_peak_bytes / mib for r in result.rows], "o-", label="predicted peak", color="tab:orange")
    if any(r.measured_peak_bytes is not None for r in result.rows):
        ax1.plot(x, [(r.measured_peak_bytes or 0) / mib for r in result.rows], "x--", label="measured peak",
                 color="tab:red")
    ax1.plot(x, [r.resident_bytes / mib for r in result.rows], "s-", label="resident weights", color="tab:blue")
    ax1.axhline(result.dense_need_bytes / mib, ls=":", color="gray", label="dense need (largest batch)")
    ax1.set_ylabel("MiB")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7, loc="lower left")
    ax1.set_title(f"rap demo: {result.model} on {result.device}, budget "
                  + " -> ".join(f"{level:.0%}" for level in result.trace) + " of the dense need", fontsize=10)
    _level_mix_panel(ax4, result, x)
    ax2.plot(x, [r.quality_ppl for r in result.rows], "o-", color="tab:green")
    ax2.set_ylabel("passage perplexity")
    ax2.set_yscale("log")
    ax3.plot(x, [r.tokens_per_s for r in result.rows], "o-", color="tab:purple")
    ax3.set_ylabel("tokens/s (batch)")
    ax3.set_xlabel("batch (shaded: budget level)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(model: str = "smollm2-135m", trace: Sequence[float] = DEFAULT_TRACE, batches_per_level: int = 3,
             out_dir: Path = Path("rap-demo"), device: str | None = None, profile: str | Path | None = None,
             console=None, live: bool = True, started: float | None = None) -> tuple[DemoResult, Path, Path | None]:
    """Replay `trace` (fractions of the dense need) and return (result, json path, plot path)."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    if not console.is_terminal:  # a log file or CI: wide rows instead of wrapped ones
        console = Console(width=max(console.width, 150), file=console.file, force_terminal=False)
    started = time.perf_counter() if started is None else started
    if any(not 0 < level <= 1.5 for level in trace):
        raise RapError("trace levels are fractions of the dense need, in (0, 1.5], e.g. 1.0,0.4,0.7,1.0")
    view, tok, note = load_demo_model(model, device=device)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    engine = Engine(view, tokenizer=tok, profile=profile, budget=1 << 50)
    load_seconds = time.perf_counter() - started
    reference = reference_request(engine)
    dense_need = engine.dense_need_bytes(reference)
    result = DemoResult(view.name, note, str(engine.device), dense_need, view.resident_param_bytes(BlockMask.full(
        view.num_layers)), asdict(reference), list(trace), load_seconds=load_seconds)
    probe = QualityProbe(engine)
    title = (f"{view.name}: budget trace {' -> '.join(f'{x:.0%}' for x in trace)} of the dense need "
             f"({format_bytes(dense_need)} for {reference.batch} x {reference.total_tokens} tokens), "
             f"backend {engine.backend.name}")
    t0 = time.perf_counter()
    screen = Live(render_table(result, title), console=console, refresh_per_second=4) if live else None
    if not live:
        console.print(title)
    with screen or contextlib.nullcontext():
        for level_index, level in enumerate(trace):
            budget = int(level * dense_need)
            engine.set_budget(FixedBudget(budget))
            for batch in demo_batches(engine, batches_per_level, level_index * batches_per_level):
                results = engine.generate(batch)
                served = [r for r in results if r.ok]
                if not served:
                    continue
                step = served[0].step
                mask = step.decision.mask
                dropped = mask.dropped
                result.rows.append(DemoRow(
                    step=len(result.rows), level_index=level_index, elapsed_s=time.perf_counter() - t0, level_ratio=level,
                    budget_bytes=budget, decision=str(mask) if mask.is_full else f"-{len(dropped)} blocks",
                    levels=", ".join(f"{n} {lv}" for lv, n in mask.counts().items())
                    if getattr(mask, "is_quantized", False) else "",
                    level_bytes=engine.memory_model.param_bytes_by_level(mask),
                    dropped_ffn=sum(n.startswith("ffn") for n in dropped),
                    dropped_attn=sum(n.startswith("attn") for n in dropped),
                    predicted_peak_bytes=step.predicted_peak_bytes, measured_peak_bytes=step.measured_peak_bytes,
                    resident_bytes=step.resident_bytes, batch=step.batch, tokens=step.generated_tokens,
                    seconds=step.seconds, tokens_per_s=step.tokens_per_s, quality_ppl=probe(mask),
                    sample=f"[{batch[0].request_id}] {served[0].text.strip()[:60]}",
                    rejected=len(results) - len(served)))
                if screen is not None:
                    screen.update(render_table(result, title), refresh=True)
                else:
                    r = result.rows[-1]
                    console.print(f"  batch {r.step}: budget {r.level_ratio:.0%}, {r.decision}, "
                                  f"{r.tokens_per_s:.1f} tok/s", highlight=False)
    if not live:
        console.print(render_table(result, title, last=None))
    console.print(render_levels(result))
    result.total_seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"demo-{view.name}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    plot = save_plot(result, out_dir / f"{stem}.png")
    over = [r for r in result.rows if r.predicted_peak_bytes > r.budget_bytes]
    console.print(f"{len(result.rows)} batches, {sum(r.tokens for r in result.rows)} tokens; predicted peak over "
                  f"budget in {len(over)} batches; model load {load_seconds:.1f} s, total {result.total_seconds:.1f} s")
    console.print(f"wrote {json_path}" + (f" and {plot}" if plot else ""))
    return result, json_path, plot
