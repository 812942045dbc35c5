"""Reading a predictions CSV (``xbmd evaluate --predictions``) without silent losses.

What a spreadsheet export can hold, and what happens to it:

- not UTF-8 (Latin-1, UTF-16 from Excel's "Unicode text"): refused, naming the encoding problem;
- rows with more or fewer cells than the header: refused with their line numbers (the columns of
  such a row cannot be trusted);
- ``;`` or tab as the separator: detected from the header line;
- decimal commas (``0,812``, usually with ``;`` separators): read as decimal points when the whole
  file uses them; a file mixing ``0,812`` and ``0.812`` is refused;
- a cell that is not a number (``abc``, ``n/a``) or not finite (``nan``, ``inf``): listed as a
  problem with its line and column, and counted as missing; an empty cell is simply missing;
- an empty ``patient_id``: refused (rows are grouped by patient).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import InputError

_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+$")
_DECIMAL_POINT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Table:
    """A predictions CSV read and checked: its rows (strings), numbers and problems."""

    path: Path
    rows: list[dict[str, str]]
    lines: list[int]  # each row's line number in the file
    estimates: list[str]  # the names after est_
    references: list[str]  # the names after ref_
    numbers: dict[str, list[float]] = field(default_factory=dict)  # column -> values, NaN missing
    problems: list[dict] = field(default_factory=list)  # {line, sample_id, column, value, error}
    notes: list[str] = field(default_factory=list)


def read_table(path: str | Path) -> Table:
    """Read and check a predictions CSV; InputError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a predictions CSV")
    if not path.is_file():
        raise InputError(f"{path}: no such predictions file")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path}: is UTF-16 text; save the predictions CSV as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the "
            "predictions CSV as UTF-8"
        ) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError(f"{path}: the file is empty; a predictions CSV needs a header and rows")
    delimiter = _delimiter(lines[0])
    try:
        reader = csv.reader(lines, delimiter=delimiter)
        header = [h.strip() for h in next(reader)]
        body = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    ragged = [(n, len(cells)) for n, cells in body if len(cells) != len(header)]
    if ragged:
        shown = ", ".join(f"line {n} ({k} cells)" for n, k in ragged[:5])
        more = f" and {len(ragged) - 5} more" if len(ragged) > 5 else ""
        raise InputError(
            f"{path}: {len(ragged)} row(s) do not have the header's {len(header)} cells: "
            f"{shown}{more}; its columns cannot be trusted"
        )
    est = sorted(c[4:] for c in header if c.startswith("est_") and not c.endswith("_t"))
    ref = sorted(c[4:] for c in header if c.startswith("ref_") and not c.endswith("_t"))
    if "patient_id" not in header or not est or not ref:
        raise InputError(
            f"{path}: a predictions CSV needs patient_id, est_<name> and ref_<name> columns "
            f"(found: {', '.join(header)[:200]})"
        )
    if not body:
        raise InputError(f"{path}: no rows")
    rows = [dict(zip(header, (c.strip() for c in cells), strict=True)) for _, cells in body]
    numbered = [n for n, _ in body]
    empty = [n for n, r in zip(numbered, rows, strict=True) if not r["patient_id"]]
    if empty:
        shown = ", ".join(map(str, empty[:8])) + (" ..." if len(empty) > 8 else "")
        raise InputError(
            f"{path}: patient_id is empty on {len(empty)} of {len(rows)} rows (lines {shown}); "
            "every row needs its patient's id (hip means and reproducibility group by patient)"
        )
    table = Table(path, rows, numbered, est, ref)
    columns = [f"est_{n}" for n in est] + [f"ref_{n}" for n in ref]
    comma = _decimal_comma(table, columns)
    for column in columns:
        values = []
        for line, row in zip(numbered, rows, strict=True):
            value, error = _number(row[column], comma)
            if error:
                table.problems.append(
                    {
                        "line": line,
                        "sample_id": row.get("sample_id") or f"line{line}",
                        "column": column,
                        "value": row[column],
                        "error": error,
                    }
                )
            values.append(value)
        table.numbers[column] = values
    return table


def _delimiter(header: str) -> str:
    """',' unless the header line has none and holds ';' or tabs (European spreadsheets)."""
    if "," in header:
        return ","
    if ";" in header:
        return ";"
    return "\t" if "\t" in header else ","


def _decimal_comma(table: Table, columns: list[str]) -> bool:
    """Whether the file writes decimals with commas; InputError when it mixes both."""
    comma = point = None
    for line, row in zip(table.lines, table.rows, strict=True):
        for column in columns:
            cell = row[column]
            if comma is None and _DECIMAL_COMMA.match(cell):
                comma = (line, column, cell)
            if point is None and _DECIMAL_POINT.match(cell):
                point = (line, column, cell)
    if comma and point:
        raise InputError(
            f"{table.path}: mixes decimal commas (line {comma[0]}, {comma[1]} {comma[2]!r}) and "
            f"decimal points (line {point[0]}, {point[1]} {point[2]!r}); use one"
        )
    if comma:
        table.notes.append(
            f"{table.path.name}: decimal commas read as decimal points (e.g. line {comma[0]}, "
            f"{comma[1]} {comma[2]!r})"
        )
    return comma is not None


def _number(cell: str, decimal_comma: bool) -> tuple[float, str | None]:
    """(value, problem): NaN and no problem for an empty cell."""
    if not cell:
        return math.nan, None
    text = cell.replace(",", ".") if decimal_comma and _DECIMAL_COMMA.match(cell) else cell
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"{cell!r} is not a number"
    if not math.isfinite(value):
        return math.nan, f"{cell!r} is not a finite number"
    return value, None
