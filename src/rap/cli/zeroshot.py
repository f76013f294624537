"""`rap zeroshot`: zero-shot accuracy through lm-eval 0.4 on rap's local task configs (rap.eval.harness)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def zeroshot(
        model: str = typer.Argument(..., help="smollm2-135m, stories260k, an HF folder or a .gguf file"),
        tasks: str = typer.Option("all", help="comma list of task names (default all)"),
        limit: Optional[int] = typer.Option(None, help="first N documents of each task"),
        batch_size: int = typer.Option(16),
        drop: Optional[str] = typer.Option(None, help="block mask: attn.3,ffn.7 | N with --profile | mask.json"),
        profile: Optional[Path] = typer.Option(None, help="profile JSON whose removal order --drop N uses"),
        dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32"),
        device: Optional[str] = typer.Option(None),
        out: Optional[Path] = typer.Option(None, help="write the result JSON here"),
    ) -> None:
        """Zero-shot accuracy of MODEL (under a mask) on the eight tasks, by lm-eval, from rap's data folders."""
        from rap.cli import console, load_view_for_cli, parse_mask
        from rap.errors import RapError

        try:
            from rap.eval.harness import METRICS, evaluate
        except ModuleNotFoundError as e:
            raise RapError(f"`rap zeroshot` runs lm-eval ({e.name} is missing): pip install 'rap-runtime[eval]'") from None

        view, tok = load_view_for_cli(model, dtype=dtype, device=device)
        mask = parse_mask(view, drop, profile)
        result = evaluate(view, tok, tasks, limit=limit, batch_size=batch_size, mask=mask)
        result = {"kind": "zeroshot", "model": view.name, "mask": mask.to_dict(),
                  "param_bytes": view.resident_param_bytes(mask), **result}
        for name, r in result["tasks"].items():
            console.print(f"{name:16s} n={r['n']:5d}  " + "  ".join(f"{m}={r[m]:.4f}" for m in METRICS[name]))
        apart = "".join(f", {n} apart: {v:.4f}" for n, v in result["apart"].items())
        console.print(f"mean headline {result['mean_headline']:.4f} over {', '.join(result['mean_over'])} "
                      f"(chance {result['mean_chance']:.4f}{apart}; {result['harness']})")
        if out is not None:
            out.write_text(json.dumps(result, indent=2))
