"""HTML building blocks of the validation report (``xbmd.evaluation.report``): escaping, tables,
"not available" lines and figures embedded as base64 PNG (also written under figures/)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from xbmd.evaluation.numbers import DPI, TooFewValuesError, _finite, fmt_number

#: Lowest resolution a figure that is too large is redrawn at, dots per inch.
MIN_DPI = 50


def esc(value) -> str:
    """HTML-escaped text of anything (None -> "n/a")."""
    return "n/a" if value is None else html.escape(str(value), quote=True)


def not_available(reason: str) -> str:
    return f'<p class="na">not available: {esc(reason)}</p>'


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, classes=()
) -> str:
    """An HTML table of already escaped cells; the first ``left`` columns are left-aligned."""

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(
            f'<{tag} class="t">{c}</{tag}>' if i < left else f"<{tag}>{c}</{tag}>"
            for i, c in enumerate(row)
        )

    classes = list(classes) + [""] * (len(rows) - len(classes))
    body = "".join(
        f'<tr class="{cls}">{cells("td", row)}</tr>' if cls else f"<tr>{cells('td', row)}</tr>"
        for row, cls in zip(rows, classes, strict=True)
    )
    return f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>{body}</tbody></table>"


def png_bytes(fig: Figure, max_bytes: int | None = None) -> bytes:
    """``fig`` as PNG at :data:`DPI`, redrawn at a lower resolution if larger than ``max_bytes``."""
    dpi = DPI
    while True:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        png = buffer.getvalue()
        if max_bytes is None or len(png) <= max_bytes or dpi <= MIN_DPI:
            return png
        # PNG size goes with the pixel count, i.e. with dpi squared.
        dpi = max(MIN_DPI, int(dpi * math.sqrt(max_bytes / len(png)) * 0.95))


def embed(
    fig: Figure, figures_dir: Path, name: str, caption: str = "", max_bytes: int | None = None
) -> str:
    """Save ``fig`` as figures_dir/<name>.png and return a <figure> with the same PNG inline."""
    png = png_bytes(fig, max_bytes)
    fig.clear()
    (figures_dir / f"{name}.png").write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">{text}</figure>'


def plot_or_reason(make, figures_dir: Path, name: str, caption: str = "") -> str:
    """The embedded figure ``make()`` draws, or a "not available" line if data are too few."""
    try:
        fig = make()
    except TooFewValuesError as error:
        return not_available(f"{name}: {error}")
    return embed(fig, figures_dir, name, caption)


def pct_of_one(value) -> str:
    """A proportion (0-1) as a percentage."""
    return fmt_number(float(value) * 100, 1, "%") if _finite(value) else "n/a"
