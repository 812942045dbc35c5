"""`xbmd dxa import`: a DXA archive's long sheet into the case manifest's DXA columns."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = "DXA results: import a DXA archive's sheet into the case manifest."
IMPORT_HELP = (
    "Read the long sheet a DXA archive exports (one row per patient, exam date, side, region, "
    "BMD and maker; CSV or .xlsx) and fill the case manifest's DXA columns (total hip and "
    "femoral neck per side) with, per case and side, the exam closest in time to the case's CT "
    "and radiographs; records the exam dates and makers. --scale converts each maker's BMD to "
    "standardised BMD (sbmd) or to the Hologic scale with the published ICSBM formulas. The "
    "longest interval between CT, radiographs and DXA is checked against --max-interval-days: "
    "beyond it the side is refused (or, with --on-interval warn, kept with a warning). --out "
    "names the manifest to fill (in place), or with --manifest where the filled copy goes; "
    "without a manifest, --out gets a wide table (one row per patient and exam). Exit code 0 "
    "when everything was used, 2 when some rows or sides were refused (listed), 1 on unusable "
    "input."
)


class Scale(str, Enum):
    measured = "measured"
    sbmd = "sbmd"
    hologic = "hologic"


class OnInterval(str, Enum):
    refuse = "refuse"
    warn = "warn"


class BmdUnit(str, Enum):
    g_cm2 = "g/cm2"
    mg_cm2 = "mg/cm2"


def import_(
    sheet: Path = typer.Argument(
        ..., help="The DXA sheet: CSV (comma, semicolon or tab) or .xlsx."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="The manifest to fill in place, or where the filled manifest (with "
        "--manifest) or the wide DXA table (no manifest) goes.",
    ),
    manifest: Path | None = typer.Option(
        None, "--manifest", help="The case manifest to fill (written to --out)."
    ),
    scale: Scale = typer.Option(
        Scale.measured,
        "--scale",
        help="measured: each maker's own BMD (a sheet mixing makers is refused); sbmd: ICSBM "
        "standardised BMD; hologic: the Hologic value of the same sBMD.",
    ),
    max_interval_days: int = typer.Option(
        365,
        "--max-interval-days",
        min=0,
        help="Longest allowed interval between any two of CT, radiographs and DXA (days).",
    ),
    no_interval_check: bool = typer.Option(
        False, "--no-interval-check", help="Do not check intervals (dates still recorded)."
    ),
    on_interval: OnInterval = typer.Option(
        OnInterval.refuse,
        "--on-interval",
        help="Beyond the maximum (or with no date to check): refuse that side's DXA, or warn.",
    ),
    column: list[str] = typer.Option(
        [],
        "--column",
        help="NAME=HEADER for a column the sheet names differently; NAME is one of patient_id, "
        "exam_date, side, region, bmd, vendor. Repeat as needed.",
    ),
    bmd_unit: BmdUnit = typer.Option(BmdUnit.g_cm2, "--bmd-unit", help="Unit of the BMD column."),
    date_format: str | None = typer.Option(
        None, "--date-format", help="strptime format of the exam dates, e.g. %d.%m.%Y."
    ),
    vendor: str | None = typer.Option(
        None, "--vendor", help="Maker of rows with no vendor: hologic, lunar, norland."
    ),
    sheet_name: str | None = typer.Option(None, "--sheet", help="Excel sheet (default: first)."),
) -> None:
    with user_errors():
        from xbmd.dataset.dxa import SHEET_COLUMNS, import_to_file
        from xbmd.errors import InputError

        columns = {}
        for item in column:
            name, sep, header = item.partition("=")
            if not sep or name.strip() not in SHEET_COLUMNS or not header.strip():
                raise InputError(
                    f"--column {item!r}: give NAME=HEADER with NAME one of "
                    f"{', '.join(SHEET_COLUMNS)}"
                )
            columns[name.strip()] = header.strip()
        summary = import_to_file(
            sheet,
            out,
            manifest=manifest,
            scale=scale.value,
            max_interval_days=None if no_interval_check else max_interval_days,
            on_interval=on_interval.value,
            columns=columns or None,
            bmd_unit=bmd_unit.value,
            date_format=date_format,
            vendor=vendor,
            sheet=sheet_name,
        )
    others = ", ".join(f"{k} ({v})" for k, v in summary["other_regions"].items())
    typer.echo(
        f"{summary['sheet']}: {summary['rows']} rows, {summary['values_read']} hip values read"
        + (f"; other regions left out: {others}" if others else "")
    )
    if summary["mode"] == "table":
        typer.echo(f"{summary['exams']} exams written to {summary['out']} ({summary['scale']})")
    else:
        typer.echo(
            f"{len(summary['filled'])} case sides filled ({summary['scale']}); "
            f"{len(summary['cases_without_dxa'])} cases without DXA in the sheet; manifest: "
            f"{summary['out']}"
        )
    for line in summary["warnings"]:
        typer.echo(f"warning: {line}", err=True)
    problems = summary["row_problems"] + summary["failures"]
    for line in problems:
        typer.echo(f"REFUSED {line}", err=True)
    if problems:
        raise typer.Exit(code=2)


app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)
app.command("import", help=IMPORT_HELP)(import_)
