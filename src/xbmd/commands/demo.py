"""`xbmd demo` (placeholder until implemented)."""

from __future__ import annotations

import typer

HELP = "demo (not implemented yet)."


def main() -> None:
    typer.echo("not implemented yet", err=True)
    raise typer.Exit(code=2)
