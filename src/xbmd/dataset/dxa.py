"""DXA results as a DXA archive exports them, into the case manifest: ``xbmd dxa import``.

A DXA archive (the scanner's database, a hospital's reporting system) exports a *long* sheet: one
row per patient, exam date, side and region, with the BMD and the scanner's maker. The manifest
wants per case one value per side and region (``dxa_total_hip_left_g_cm2``, ...) from one exam
close in time to the case's CT and radiographs. This module:

1. reads the sheet (CSV, or Excel ``.xlsx`` with openpyxl), finding its columns by name
   (``SHEET_COLUMNS``; other names through ``columns=``), and checks every row: a bad row is
   listed and the rest go on;
2. converts each value to the scale asked for (``SCALES``): the maker's own (``measured``), the
   ICSBM standardised BMD (``sbmd``), or the Hologic scale (``hologic``, through sBMD), with the
   published total-hip and femoral-neck formulas (``xbmd/data/reference/sbmd.json``);
3. per case and side, picks the exam closest in time to the case's CT and radiographs (dates from
   the manifest's ``ct_date`` and ``xray_dates``, else from the DICOM files) and checks the
   longest interval between any two of CT, radiographs and that DXA against a maximum: beyond
   it the side is refused (or, with ``on_interval='warn'``, kept with a warning);
4. writes the values, the exam dates, the makers and the scale into the manifest (or, without a
   manifest, a wide table: one row per patient and exam).

docs/data-format.md ("DXA sheets") describes the accepted sheets; the formulas' sources are in
the JSON file and in the docs.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path

from xbmd.dataset.manifest import (
    DXA_COLUMNS,
    IMPLANT_SIDES,
    ManifestCase,
    read_manifest,
    write_manifest,
)
from xbmd.errors import InputError

#: Sheet columns (xbmd's name -> accepted header names, compared without case, spaces, '_', '-').
SHEET_COLUMNS = {
    "patient_id": ("patient_id", "patient", "patientid", "mrn", "pid", "id", "subject"),
    "exam_date": ("exam_date", "date", "scan_date", "study_date", "examdate", "scandate",
                  "acquisition_date", "visit_date"),
    "side": ("side", "laterality", "hip_side"),
    "region": ("region", "roi", "site", "region_of_interest"),
    "bmd": ("bmd", "bmd_g_cm2", "bmd_g/cm2", "bmd(g/cm2)", "bmd_g_per_cm2", "bmd_gcm2",
            "value"),
    "vendor": ("vendor", "manufacturer", "maker", "device_manufacturer", "scanner"),
}  # fmt: skip
REQUIRED_SHEET_COLUMNS = ("patient_id", "exam_date", "side", "region", "bmd")
#: Regions imported, with the sheet spellings recognised (normalised: lower case, no spaces).
REGIONS = {
    "total_hip": ("totalhip", "total", "hiptotal", "totalfemur", "femurtotal", "tot", "th",
                  "totalproximalfemur"),
    "neck": ("neck", "femoralneck", "femurneck", "fn", "hipneck"),
}  # fmt: skip
#: Manifest columns of each region.
REGION_COLUMN = {"total_hip": "dxa_total_hip_{side}_g_cm2", "neck": "dxa_neck_{side}_g_cm2"}
SIDE_WORDS = {"left": ("left", "l", "lt", "links", "gauche"), "right": ("right", "r", "rt")}
VENDOR_WORDS = {
    "hologic": ("hologic",),
    "lunar": ("lunar", "ge", "gelunar", "gehealthcare", "gelunarcorp", "lunarcorp"),
    "norland": ("norland", "norlandcoopersurgical", "coopersurgical"),
}
SCALES = ("measured", "sbmd", "hologic")
ON_INTERVAL = ("refuse", "warn")
#: Plausible areal BMD of a hip region, g/cm2 (as the manifest's DXA columns).
BMD_LIMITS_G_CM2 = (0.05, 3.0)
#: Default largest interval between any two of CT, radiographs and the DXA exam.
DEFAULT_MAX_INTERVAL_DAYS = 365
TABLE_COLUMNS = ("patient_id", "exam_date", "vendor", "scale", *DXA_COLUMNS)


def _norm(text: object) -> str:
    return re.sub(r"[\s_\-]+", "", str(text or "").strip().lower())


@cache
def sbmd_table() -> dict:
    """The bundled sBMD coefficients (``xbmd/data/reference/sbmd.json``)."""
    resource = resources.files("xbmd") / "data" / "reference" / "sbmd.json"
    return json.loads(resource.read_text(encoding="utf-8"))


def convert_bmd(bmd_g_cm2: float, vendor: str, region: str, scale: str) -> float:
    """One DXA value on ``scale``: 'measured' (unchanged), 'sbmd' (ICSBM standardised BMD,
    g/cm2) or 'hologic' (the Hologic value with the same sBMD).

    >>> round(convert_bmd(0.800, "lunar", "total_hip", "sbmd"), 4)  # 0.979 x 0.8 - 0.031
    0.7522
    >>> round(convert_bmd(0.800, "lunar", "total_hip", "hologic"), 4)  # (0.7522 - 0.006) / 1.008
    0.7403
    """
    if scale == "measured":
        return float(bmd_g_cm2)
    if scale not in SCALES:
        raise InputError(f"unknown DXA scale {scale!r}; choose from {', '.join(SCALES)}")
    coefficients = sbmd_table()["regions"][region]["coefficients"]
    if vendor not in coefficients:
        raise InputError(
            f"no published {region} standardisation for DXA maker {vendor!r} "
            f"(known: {', '.join(coefficients)})"
        )
    c = coefficients[vendor]
    sbmd = c["a"] + c["b"] * float(bmd_g_cm2)
    if scale == "sbmd":
        return sbmd
    h = coefficients["hologic"]
    return (sbmd - h["a"]) / h["b"]


# ------------------------------------------------------------------------------------------------
# The sheet


@dataclass(frozen=True)
class DxaValue:
    """One BMD of one region of one side in one exam, as read (``bmd_g_cm2`` as measured)."""

    patient_id: str
    exam_date: datetime.date
    side: str
    region: str
    bmd_g_cm2: float
    vendor: str
    row: int


@dataclass
class Sheet:
    """A DXA sheet read and checked: the values of the regions xbmd imports, the rows left out
    (other regions) and the rows refused (with why)."""

    path: Path
    values: list[DxaValue]
    rows: int
    other_regions: dict[str, int] = field(default_factory=dict)  # region as written -> rows
    problems: list[str] = field(default_factory=list)


def _cells_csv(path: Path) -> list[list[object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not a UTF-8 CSV (save the sheet as UTF-8, or as .xlsx)"
        ) from None
    sample = text[:4096]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [row for row in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in row)]


def _cells_xlsx(path: Path, sheet: str | None) -> list[list[object]]:
    try:
        import openpyxl
    except ImportError:
        raise InputError(
            f"{path}: reading Excel needs the openpyxl package (pip install openpyxl), or save "
            "the sheet as CSV"
        ) from None
    from zipfile import BadZipFile

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (BadZipFile, OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .xlsx workbook ({exc})") from None
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise InputError(f"{path}: no sheet {sheet!r} (sheets: {', '.join(book.sheetnames)})")
        ws = book[sheet] if sheet is not None else book.worksheets[0]
        rows = [list(r) for r in ws.iter_rows(values_only=True)]
    finally:
        book.close()
    return [r for r in rows if any(c not in (None, "") for c in r)]


def _header_map(header: list[object], path: Path, columns: dict[str, str] | None) -> dict:
    """xbmd column -> index in the sheet's header row."""
    found = {_norm(h): i for i, h in enumerate(header) if _norm(h)}
    out = {}
    for name, aliases in SHEET_COLUMNS.items():
        if columns and name in columns:
            key = _norm(columns[name])
            if key not in found:
                raise InputError(
                    f"{path}: no column {columns[name]!r} (given for {name}); the header has "
                    f"{', '.join(str(h) for h in header)}"
                )
            out[name] = found[key]
            continue
        for alias in aliases:
            if _norm(alias) in found:
                out[name] = found[_norm(alias)]
                break
    missing = [c for c in REQUIRED_SHEET_COLUMNS if c not in out]
    if missing:
        raise InputError(
            f"{path}: the DXA sheet lacks column(s) {', '.join(missing)} (header: "
            f"{', '.join(str(h) for h in header)}); name them with --column NAME=HEADER"
        )
    return out


def _date(value: object, date_format: str | None) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    text = str(value or "").strip()
    formats = [date_format] if date_format else ["%Y-%m-%d", "%Y%m%d", "%Y-%m-%d %H:%M:%S"]
    for fmt in formats:
        try:
            return datetime.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    hint = f"format {date_format!r}" if date_format else "YYYY-MM-DD (else give --date-format)"
    raise ValueError(f"exam date {text!r} is not a date of {hint}")


def _word(value: object, words: dict[str, tuple[str, ...]], what: str) -> str:
    key = _norm(value)
    for name, spellings in words.items():
        if key in spellings:
            return name
    raise ValueError(f"{what} {value!r} not recognised ({', '.join(words)})")


def read_dxa_sheet(
    path: str | Path,
    *,
    columns: dict[str, str] | None = None,
    bmd_unit: str = "g/cm2",
    date_format: str | None = None,
    vendor: str | None = None,
    sheet: str | None = None,
) -> Sheet:
    """Read a long DXA sheet (CSV or .xlsx).

    Parameters
    ----------
    columns : {xbmd name: header}, for headers ``SHEET_COLUMNS`` does not recognise.
    bmd_unit : 'g/cm2' or 'mg/cm2' (values divided by 1000).
    date_format : strptime format of the exam dates (default: YYYY-MM-DD or YYYYMMDD; Excel
        dates are read as dates).
    vendor : the maker of rows whose vendor cell is empty or missing (default 'unknown').
    sheet : the Excel sheet (default the first).

    Rows of other regions (spine, trochanter, ...) are counted in ``other_regions``; a row that
    cannot be read is listed in ``problems`` with its row number, and the others are kept. Two
    different values for the same patient, date, side and region are both refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such DXA sheet")
    if bmd_unit not in ("g/cm2", "mg/cm2"):
        raise InputError(f"bmd_unit must be g/cm2 or mg/cm2, not {bmd_unit!r}")
    if vendor is not None and vendor not in (*VENDOR_WORDS, "unknown"):
        raise InputError(f"vendor must be one of {', '.join(VENDOR_WORDS)}, unknown")
    is_excel = path.suffix.lower() in (".xlsx", ".xlsm")
    if path.suffix.lower() == ".xls":
        raise InputError(f"{path}: old .xls workbooks are not read; save it as .xlsx or CSV")
    cells = _cells_xlsx(path, sheet) if is_excel else _cells_csv(path)
    if not cells:
        raise InputError(f"{path}: the DXA sheet is empty")
    index = _header_map(cells[0], path, columns)
    scale = 1000.0 if bmd_unit == "mg/cm2" else 1.0
    values: list[DxaValue] = []
    others: dict[str, int] = {}
    problems: list[str] = []
    for n, row in enumerate(cells[1:], start=2):

        def cell(name: str, row=row) -> object:
            i = index.get(name)
            return row[i] if i is not None and i < len(row) else None

        region_text = str(cell("region") or "").strip()
        region = next((r for r, words in REGIONS.items() if _norm(region_text) in words), None)
        if region is None:
            others[region_text or "(empty)"] = others.get(region_text or "(empty)", 0) + 1
            continue
        try:
            patient = str(cell("patient_id") or "").strip()
            if not patient:
                raise ValueError("no patient id")
            if isinstance(patient, str) and re.fullmatch(r"\d+\.0", patient):
                patient = patient[:-2]  # an Excel number cell holding an id
            side = _word(cell("side"), SIDE_WORDS, "side")
            raw = cell("bmd")
            try:
                bmd = float(raw) / scale
            except (TypeError, ValueError):
                bmd = math.nan
            lo, hi = BMD_LIMITS_G_CM2
            if not (math.isfinite(bmd) and lo <= bmd <= hi):
                raise ValueError(f"BMD {raw!r} {bmd_unit} is not a hip BMD ({lo:g}-{hi:g} g/cm2)")
            maker = cell("vendor")
            maker = (
                _word(maker, VENDOR_WORDS, "vendor")
                if str(maker or "").strip()
                else (vendor or "unknown")
            )
            values.append(
                DxaValue(
                    patient, _date(cell("exam_date"), date_format), side, region, bmd, maker, n
                )
            )
        except (ValueError, TypeError) as exc:
            problems.append(f"{path}, row {n}: {exc}")
    values, duplicates = _without_conflicts(values, path)
    return Sheet(path, values, len(cells) - 1, others, problems + duplicates)


def _without_conflicts(values: list[DxaValue], path: Path) -> tuple[list[DxaValue], list[str]]:
    groups: dict[tuple, list[DxaValue]] = {}
    for v in values:
        groups.setdefault((v.patient_id, v.exam_date, v.side, v.region), []).append(v)
    keep, problems = [], []
    for key, group in groups.items():
        if len({(v.bmd_g_cm2, v.vendor) for v in group}) > 1:
            rows = ", ".join(str(v.row) for v in group)
            problems.append(
                f"{path}, rows {rows}: patient {key[0]} {key[1]} {key[2]} {key[3]} has "
                "different values; none of them is used"
            )
            continue
        keep.append(group[0])
    return keep, problems


# ------------------------------------------------------------------------------------------------
# Dates of a case's CT and radiographs


def _dicom_date(path: Path) -> datetime.date | None:
    """Study (else Series, Acquisition, Content) Date of a DICOM file, or of the first DICOM file
    of a folder; None when there is none."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files[:50]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError):
            continue
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            value = str(ds.get(keyword, "") or "").strip()
            if re.fullmatch(r"\d{8}", value):
                try:
                    return datetime.datetime.strptime(value, "%Y%m%d").date()
                except ValueError:
                    continue
        return None
    return None


def case_dates(case: ManifestCase) -> dict[str, datetime.date | None]:
    """{'ct': date, '<radiograph file name>': date, ...}: the manifest's, else the DICOM's."""
    out: dict[str, datetime.date | None] = {
        "CT": case.ct_date or (_dicom_date(case.ct) if case.ct.exists() else None)
    }
    for x in case.xrays:
        given = case.radiograph(x).date
        out[x.name] = given or (_dicom_date(x) if x.is_file() else None)
    return out


# ------------------------------------------------------------------------------------------------
# Into the manifest


@dataclass
class ImportReport:
    """What ``import_dxa`` did: per case and side the exam used, failures and warnings."""

    sheet: Sheet
    scale: str
    max_interval_days: int | None
    on_interval: str
    filled: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cases_without_dxa: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "sheet": str(self.sheet.path),
            "rows": self.sheet.rows,
            "values_read": len(self.sheet.values),
            "other_regions": self.sheet.other_regions,
            "row_problems": self.sheet.problems,
            "scale": self.scale,
            "max_interval_days": self.max_interval_days,
            "on_interval": self.on_interval,
            "filled": self.filled,
            "failures": self.failures,
            "warnings": self.warnings,
            "cases_without_dxa": self.cases_without_dxa,
        }


def _worst_interval(dates: dict[str, datetime.date]) -> tuple[int, str, str]:
    """The longest interval (days) between any two dated items, and which two."""
    items = sorted(dates.items(), key=lambda kv: kv[1])
    (first, d0), (last, d1) = items[0], items[-1]
    return (d1 - d0).days, first, last


def _check_vendors(values: list[DxaValue], scale: str, where: str) -> None:
    vendors = sorted({v.vendor for v in values})
    if scale == "measured" and len(vendors) > 1:
        raise InputError(
            f"{where}: the sheet mixes DXA makers ({', '.join(vendors)}), whose BMD scales differ "
            "by several per cent; convert with --scale sbmd or --scale hologic"
        )
    if scale != "measured" and "unknown" in vendors:
        raise InputError(
            f"{where}: some rows name no DXA maker; standardisation needs it (give --vendor for "
            "rows without one)"
        )


def import_dxa(
    sheet: Sheet,
    cases: list[ManifestCase],
    *,
    scale: str = "measured",
    max_interval_days: int | None = DEFAULT_MAX_INTERVAL_DAYS,
    on_interval: str = "refuse",
) -> tuple[list[ManifestCase], ImportReport]:
    """Fill the cases' DXA columns from a sheet; returns the new cases and a report.

    Per case and side: among the patient's exams with a total hip or neck value of that side,
    the one with the shortest longest-interval to the case's CT and radiographs (the latest
    when no date of the case is known); its values, converted to ``scale``, replace the side's
    DXA columns, with the exam date and the maker. When the longest interval between any two of
    CT, radiographs and the exam exceeds ``max_interval_days`` the side gets no DXA values
    (``on_interval='refuse'``, a failure) or keeps them with a warning (``'warn'``). A case whose
    dates are unknown cannot be checked: refused (or warned) alike. Cases of patients without a
    row are left as they were. ``max_interval_days=None`` checks nothing.
    """
    if scale not in SCALES:
        raise InputError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if on_interval not in ON_INTERVAL:
        raise InputError(f"on_interval must be refuse or warn, not {on_interval!r}")
    if max_interval_days is not None and max_interval_days < 0:
        raise InputError(f"the maximum interval must be >= 0 days, not {max_interval_days}")
    _check_vendors(sheet.values, scale, str(sheet.path))
    report = ImportReport(sheet, scale, max_interval_days, on_interval)
    by_patient: dict[str, list[DxaValue]] = {}
    for v in sheet.values:
        by_patient.setdefault(v.patient_id, []).append(v)
    out = []
    for case in cases:
        values = by_patient.get(str(case.patient_id).strip(), [])
        if not values:
            report.cases_without_dxa.append(case.case_id)
            out.append(case)
            continue
        dates = {k: d for k, d in case_dates(case).items() if d is not None}
        dxa = dict(case.dxa_g_cm2)
        exam_dates, vendors = dict(case.dxa_dates), dict(case.dxa_vendors)
        for side in IMPLANT_SIDES:
            mine = [v for v in values if v.side == side]
            if not mine:
                continue
            chosen, problem = _choose_exam(mine, dates, max_interval_days)
            where = f"case {case.case_id} {side}"
            if problem and on_interval == "refuse":
                report.failures.append(f"{where}: {problem}; no DXA values used")
                for region in REGION_COLUMN.values():
                    dxa.pop(region.format(side=side), None)
                exam_dates.pop(side, None)
                vendors.pop(side, None)
                continue
            if problem:
                report.warnings.append(f"{where}: {problem}; used anyway (--on-interval warn)")
            exam = [v for v in mine if v.exam_date == chosen]
            for region, column in REGION_COLUMN.items():
                dxa.pop(column.format(side=side), None)
                for v in exam:
                    if v.region == region:
                        value = convert_bmd(v.bmd_g_cm2, v.vendor, region, scale)
                        dxa[column.format(side=side)] = round(value, 4)
            exam_dates[side] = chosen
            vendors[side] = exam[0].vendor
            report.filled.append(
                {
                    "case_id": case.case_id,
                    "side": side,
                    "exam_date": chosen.isoformat(),
                    "vendor": exam[0].vendor,
                    "regions": sorted({v.region for v in exam}),
                    "interval_days": _worst_interval({**dates, "DXA": chosen})[0]
                    if dates
                    else None,
                }
            )
        out.append(
            replace(
                case,
                dxa_g_cm2=dxa,
                dxa_dates=exam_dates,
                dxa_vendors=vendors,
                dxa_scale=scale if exam_dates else case.dxa_scale,
                ct_date=case.ct_date or dates.get("CT"),
                radiographs=_with_dates(case, dates),
            )
        )
    return out, report


def _with_dates(case: ManifestCase, dates: dict[str, datetime.date]) -> dict:
    """The case's radiograph entries with the dates found in the DICOM files recorded."""
    from xbmd.dataset.manifest import RadiographInfo

    out = dict(case.radiographs)
    for x in case.xrays:
        info = out.get(str(x), RadiographInfo())
        if info.date is None and dates.get(x.name) is not None:
            out[str(x)] = replace(info, date=dates[x.name])
    return out


def _choose_exam(
    values: list[DxaValue], dates: dict[str, datetime.date], max_days: int | None
) -> tuple[datetime.date, str | None]:
    """(exam date, problem or None) for one side."""
    exams = sorted({v.exam_date for v in values})
    if not dates:
        problem = None
        if max_days is not None:
            problem = (
                "no date of the CT or the radiographs is known (manifest ct_date, xray_dates, or "
                "DICOM Study Date), so the interval to the DXA cannot be checked"
            )
        return exams[-1], problem
    best = min(exams, key=lambda d: (_worst_interval({**dates, "DXA": d})[0], -d.toordinal()))
    days, first, last = _worst_interval({**dates, "DXA": best})
    if max_days is not None and days > max_days:
        shown = {**dates, "DXA": best}
        return best, (
            f"{days} days between the {first} of {shown[first].isoformat()} and the {last} of "
            f"{shown[last].isoformat()} (maximum {max_days}, --max-interval-days)"
        )
    return best, None


def dxa_table(sheet: Sheet, scale: str = "measured") -> list[dict]:
    """The sheet as a wide table: one row per patient and exam date (``TABLE_COLUMNS``)."""
    _check_vendors(sheet.values, scale, str(sheet.path))
    rows: dict[tuple, dict] = {}
    for v in sorted(sheet.values, key=lambda v: (v.patient_id, v.exam_date)):
        key = (v.patient_id, v.exam_date)
        row = rows.setdefault(
            key,
            {"patient_id": v.patient_id, "exam_date": v.exam_date.isoformat(),
             "vendor": v.vendor, "scale": scale},
        )  # fmt: skip
        if row["vendor"] != v.vendor:
            row["vendor"] = "mixed"
        value = convert_bmd(v.bmd_g_cm2, v.vendor, v.region, scale)
        row[REGION_COLUMN[v.region].format(side=v.side)] = round(value, 4)
    return list(rows.values())


def is_manifest(path: Path) -> bool:
    """True when ``path`` is a CSV whose header has the manifest's case_id and xrays columns."""
    try:
        with path.open(encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "case_id" in header and "xrays" in header


def import_to_file(
    sheet_path: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    scale: str = "measured",
    max_interval_days: int | None = DEFAULT_MAX_INTERVAL_DAYS,
    on_interval: str = "refuse",
    **read_options,
) -> dict:
    """``xbmd dxa import``: the sheet into a manifest, or into a wide table.

    ``manifest`` given: its cases are filled and written to ``out``. Else when ``out`` is an
    existing manifest it is filled in place; otherwise ``out`` becomes the wide table
    (``dxa_table``). Returns the summary (``ImportReport.summary``, plus ``mode`` and ``out``).
    """
    from xbmd.stages import write_atomic

    sheet = read_dxa_sheet(sheet_path, **read_options)
    out = Path(out)
    source = Path(manifest) if manifest is not None else (out if is_manifest(out) else None)
    if source is None:
        if out.exists():
            raise InputError(
                f"{out}: exists and is not a case manifest; give a new file for the DXA table, "
                "or the manifest to fill"
            )
        rows = dxa_table(sheet, scale)
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        write_atomic(out, write)
        return {
            "mode": "table",
            "out": str(out),
            "sheet": str(sheet.path),
            "rows": sheet.rows,
            "values_read": len(sheet.values),
            "exams": len(rows),
            "other_regions": sheet.other_regions,
            "row_problems": sheet.problems,
            "scale": scale,
            "failures": [],
            "warnings": [],
        }
    cases = read_manifest(source)
    new, report = import_dxa(
        sheet, cases, scale=scale, max_interval_days=max_interval_days, on_interval=on_interval
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: write_manifest(new, tmp))
    return {"mode": "manifest", "out": str(out), **report.summary()}
