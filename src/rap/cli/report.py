"""`rap report`: one Markdown page (tables + plots) from benchmark result JSONs (rap.report)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(files: list[Path] = typer.Argument(..., help="result JSON files (or folders of them)"),
               out: Path = typer.Option(Path("benchmarks/results/REPORT.md"), "-o", "--out",
                                        help="Markdown page to write; plots go beside it")) -> None:
        """One Markdown page (tables + plots) from benchmark result JSONs."""
        from rap.report import build_report

        typer.echo(f"wrote {build_report(files, out)}")
