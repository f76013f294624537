"""`rap zeroshot`: zero-shot accuracy by log-likelihood, lm-eval's prompts and scoring (rap.eval.zeroshot)."""

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
        """Zero-shot accuracy of MODEL (under a mask) on the eight lm-eval tasks, from rap's data folders."""
        from rap.eval.zeroshot import TASKS, evaluate
        from rap.cli import console, load_view_for_cli, parse_mask

        view, tok = load_view_for_cli(model, dtype=dtype, device=device)
        mask = parse_mask(view, drop, profile)
        result = evaluate(view, tok, tasks, limit=limit, batch_size=batch_size, mask=mask)
        result = {"kind": "zeroshot", "model": view.name, "mask": mask.to_dict(),
                  "param_bytes": view.resident_param_bytes(mask), **result}
        for name, r in result["tasks"].items():
            console.print(f"{name:16s} n={r['n']:5d}  " + "  ".join(f"{m}={r[m]:.4f}" for m in TASKS[name].metrics))
        console.print(f"mean headline {result['mean_headline']:.4f}  (chance {result['mean_chance']:.4f})")
        if out is not None:
            out.write_text(json.dumps(result, indent=2))
