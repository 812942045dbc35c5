"""Helpers shared by the command modules: clear errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from xbmd.errors import XbmdError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected errors (bad input, failed fit) into one line on stderr and exit code 1."""
    try:
        yield
    except XbmdError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except FileNotFoundError as exc:
        typer.echo(f"error: file not found: {exc.filename or exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        # the checks before the work should have caught it (a folder given for a file, a file
        # in the way of a folder, no permission, a full disk): one line, naming the file
        where = exc.filename if exc.filename is not None else "input/output"
        typer.echo(f"error: {where}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
