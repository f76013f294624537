"""`rap serve` (OpenAI-compatible HTTP server over an Engine) and `rap demo` (a budget trace replay)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import typer

from rap.errors import RapError


def _stage_spec(stage_host: bool, stage_levels: str | None):
    """--stage-host [--stage-levels a,b] -> Engine's stage_host_copies (False, True or a tuple of levels)."""
    if not stage_levels:
        return stage_host
    from rap.core.plan import parse_level

    if not stage_host:
        raise RapError("--stage-levels needs --stage-host")
    return tuple(parse_level(v) for v in stage_levels.split(",") if v.strip())


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str = typer.Argument(..., help="known name (rap models), HF folder or .gguf file"),
        budget: str = typer.Option("live", help="6GiB | bytes | 0.5 or 50% of the device | live | live:1GiB "
                                               "(free memory minus a reserve); change it at run time with PUT /v1/budget"),
        port: int = typer.Option(8000, help="TCP port"),
        host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
        profile: Optional[Path] = typer.Option(None, help="profile.json: block removal order for the policy"),
        policy: Optional[str] = typer.Option(None, help="policy name: precision (int8 / int4 before drops), ladder, "
                                             "greedy ... (default: rap.policy's default, else greedy)"),
        dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
        device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda if available)"),
        backend: str = typer.Option("auto", help="auto (rap's fast decoder if usable) | decoder | hf"),
        max_batch: int = typer.Option(32, help="most requests per engine batch"),
        batch_window_ms: float = typer.Option(5.0, help="wait this long after a request for others to batch with"),
        max_tokens_limit: Optional[int] = typer.Option(None, help="refuse max_tokens above this"),
        device_total: Optional[str] = typer.Option(None, help="CPU only: pretend the device has this much memory "
                                                              "(for fraction/live budgets)"),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: half the cores, at most 4: "
                                                         "the engine's one worker thread shares the machine with "
                                                         "the HTTP and tokenizer threads, and torch's default of "
                                                         "every core was 10-20x slower on a busy 2-core box)"),
        max_body_bytes: str = typer.Option("8MiB", help="larger request bodies get 413 before they are read"),
        max_prompts: int = typer.Option(4096, help="most prompts x n in one completions request (400 above)"),
        drain_s: float = typer.Option(10.0, help="SIGTERM/SIGINT: stop admitting, let in-flight requests finish for "
                                                 "this long, then cancel the rest and exit"),
        stage_host: bool = typer.Option(False, "--stage-host", help="GPU: make every block's pinned host copy at "
                                        "start (host memory = weights), so the first budget drop moves no time"),
        stage_levels: Optional[str] = typer.Option(None, "--stage-levels", help="with --stage-host: also stage "
                                                   "quantized host copies at these levels, e.g. int8,int4g64, so a "
                                                   "move down to them is one host-to-device copy"),
    ) -> None:
        """Serve MODEL over HTTP (OpenAI-compatible /v1/completions and /v1/chat/completions) inside a budget."""
        try:
            import uvicorn  # noqa: F401

            from rap.serve.server import create_app, serve as run_server
        except ImportError as e:
            raise RapError(f"`rap serve` needs the serve extra ({e.name} is missing): pip install 'rap-runtime[serve]'")
        from rap.cli import console, load_view_for_cli
        from rap.serve.engine import Engine
        from rap.core.memory import format_bytes, parse_bytes

        import os

        _set_threads(threads if threads is not None else max(1, min(4, (os.cpu_count() or 2) // 2)))
        view, tok = load_view_for_cli(model, dtype=dtype, device=device)
        engine = Engine(view, tokenizer=tok, budget=budget, policy=policy, profile=profile, backend=backend,
                        max_batch=max_batch, device_total_bytes=parse_bytes(device_total) if device_total else None,
                        stage_host_copies=_stage_spec(stage_host, stage_levels))
        info = engine.budget_info()
        console.print(f"rap serve: {view.name} on {engine.device}, backend {engine.backend.name}, budget "
                      f"{format_bytes(info['budget_bytes'])} ({info['source']['kind']}); dense weights "
                      f"{format_bytes(info['dense_param_bytes'])}; http://{host}:{port}/v1")
        app_ = create_app(engine, model_name=view.name, max_batch=max_batch, batch_window_s=batch_window_ms / 1e3,
                          max_tokens_limit=max_tokens_limit, max_body_bytes=parse_bytes(max_body_bytes),
                          max_prompts=max_prompts)
        level = logging.getLevelName(logging.getLogger().level).lower()
        run_server(app_, host=host, port=port, log_level=level if level in ("debug", "info") else "warning",
                   drain_s=drain_s)

    @app.command()
    def demo(
        model: str = typer.Option("smollm2-135m", help="model to demo (fetched and cached once; stories260k offline)"),
        trace: str = typer.Option("1.0,0.4,0.7,1.0", help="budget levels as fractions of the dense need"),
        batches: int = typer.Option(3, help="batches served at each budget level"),
        out: Path = typer.Option(Path("rap-demo"), help="folder for the JSON log and the plot"),
        profile: Optional[Path] = typer.Option(None, help="profile.json: block removal order"),
        device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda if available)"),
        threads: int = typer.Option(1, help="torch CPU threads; the demo's small batches run fastest and most "
                                            "predictably on one (multi-threaded matmuls stall when cores are busy)"),
    ) -> None:
        """Replay a memory-budget trace with a mixed request stream: live table, summary, plot."""
        started = time.perf_counter()
        from rap.cli import _quiet_transformers, console
        from rap.serve.demo import run_demo

        _quiet_transformers()
        _set_threads(threads)
        try:
            levels = [float(x) for x in trace.split(",") if x.strip()]
        except ValueError:
            raise RapError(f"--trace {trace!r}: give fractions separated by commas, e.g. 1.0,0.4,0.7,1.0") from None
        if batches < 1:
            raise RapError("--batches must be at least 1")
        run_demo(model, levels, batches, out, device=device, profile=profile, console=console,
                 live=console.is_terminal, started=started)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise RapError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
