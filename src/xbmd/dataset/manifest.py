"""The case manifest: one CSV row per patient case, read by ``xbmd prepare``.

The virtual cohort writes one (``xbmd synth``); for real data a hospital writes it by hand or by
script. Format (docs/data-format.md, "Case manifest"): UTF-8 CSV with a header; paths relative to
the manifest's folder (or absolute); lists separated by ``;``.

Columns (``*`` = required):
    case_id*        unique id of the case (CT + its X-rays)
    patient_id*     patient id (several cases may share one; train/validation splits use it)
    ct*             CT volume in HU (NIfTI, NRRD, MHA, or a DICOM series folder)
    labels*         label map on the CT grid
    label_map*      name=id pairs of the bones: ``pelvis_right=1;pelvis_left=2;femur_right=3;...``
                    (``sacrum=N`` optional), or the preset ``totalsegmentator``
    calibration*    ``phantom`` (rods in ``labels``, densities in ``phantom``), ``phantomless``,
                    or ``line:SLOPE,INTERCEPT`` (mg/cm3 per HU, mg/cm3)
    phantom         phantom JSON (as ``xbmd calibrate --phantom``) or a bundled name
    phantom_labels  label map of the phantom's rods (else: rods in ``labels``, else found
                    automatically for a phantom with a layout, e.g. bmas200)
    kvp             CT tube voltage, for phantom-less calibration
    xrays*          X-ray files (DICOM, PNG, ...)
    landmarks       femur landmarks JSON (xbmd.ct.landmarks), for the BMD regions; without it
                    they are found automatically from the femur labels (xbmd.ct.auto_landmarks)
    known_poses     JSON with every bone's true pose per X-ray (the virtual cohort's truth.json)
    age_years, sex  patient age and sex (F/M), optional
    dxa_total_hip_left_g_cm2, dxa_total_hip_right_g_cm2, dxa_neck_left_g_cm2,
    dxa_neck_right_g_cm2   DXA results, optional
    implants        hips with an implant: ``left:hip_replacement;right:screws``, optional
                    (written only when some case has one, so older manifests are unchanged)

Optional columns written only when some case fills them (``EXTRA_COLUMNS``):
    xray_pixel_spacing_mm  detector pixel spacing of the radiographs: ``0.15`` or ``0.15x0.16``
                    (row x column), one value for all of the case's radiographs or one per
                    radiograph (``;``); required for PNG, JPEG and TIFF radiographs
    xray_sdd_mm, xray_sod_mm  source-detector and source-patient distance (mm), same layout
    xray_dates      acquisition date of each radiograph (YYYY-MM-DD), same layout
    ct_date         the CT's date (YYYY-MM-DD)
    dxa_date_left, dxa_date_right     date of the DXA exam whose values fill the DXA columns
    dxa_vendor_left, dxa_vendor_right the DXA system's maker (hologic, lunar, norland, unknown)
    dxa_scale       what the DXA columns hold: ``measured`` (the vendor's own values), ``sbmd``
                    (standardised BMD) or ``hologic`` (converted to the Hologic scale)
"""

from __future__ import annotations

import csv
import datetime
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import InputError

COLUMNS = (
    "case_id",
    "patient_id",
    "ct",
    "labels",
    "label_map",
    "calibration",
    "phantom",
    "phantom_labels",
    "kvp",
    "xrays",
    "landmarks",
    "known_poses",
    "age_years",
    "sex",
    "dxa_total_hip_left_g_cm2",
    "dxa_total_hip_right_g_cm2",
    "dxa_neck_left_g_cm2",
    "dxa_neck_right_g_cm2",
)
REQUIRED = ("case_id", "patient_id", "ct", "labels", "label_map", "calibration", "xrays")
BONES = ("pelvis_right", "pelvis_left", "femur_right", "femur_left", "sacrum")
#: Named label maps: ``label_map`` may be one of these names instead of name=id pairs.
LABEL_MAP_PRESETS = ("totalsegmentator",)
DXA_COLUMNS = COLUMNS[-4:]
#: Optional column added later: written only when some case has an implant.
IMPLANTS_COLUMN = "implants"
IMPLANT_SIDES = ("left", "right")
#: Per-radiograph columns: one value for all of a case's radiographs, or one per radiograph.
XRAY_COLUMNS = ("xray_pixel_spacing_mm", "xray_sdd_mm", "xray_sod_mm", "xray_dates")
#: Dates and provenance of the DXA values (``xbmd dxa import`` fills them).
DXA_INFO_COLUMNS = (
    "dxa_date_left", "dxa_date_right", "dxa_vendor_left", "dxa_vendor_right", "dxa_scale",
)  # fmt: skip
#: Optional columns added later, written only when some case fills them (older manifests keep
#: the columns above).
EXTRA_COLUMNS = (IMPLANTS_COLUMN, *XRAY_COLUMNS, "ct_date", *DXA_INFO_COLUMNS)
DXA_VENDORS = ("hologic", "lunar", "norland", "unknown")
DXA_SCALES = ("measured", "sbmd", "hologic")
#: Plausible limits of the radiograph geometry columns.
XRAY_SPACING_LIMITS_MM = (0.01, 5.0)
XRAY_DISTANCE_LIMITS_MM = (300.0, 3000.0)


@dataclass(frozen=True)
class RadiographInfo:
    """What the manifest says about one radiograph (None: not given; the file's own values
    are used)."""

    pixel_spacing_mm: tuple[float, float] | None = None
    sdd_mm: float | None = None
    sod_mm: float | None = None
    date: datetime.date | None = None

    def given(self) -> dict:
        """The values given, for fingerprints and sidecars (empty when none)."""
        out = {
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "sdd_mm": self.sdd_mm,
            "sod_mm": self.sod_mm,
            "date": self.date.isoformat() if self.date else None,
        }
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class ManifestCase:
    """One case of a manifest, paths resolved against the manifest's folder."""

    case_id: str
    patient_id: str
    ct: Path
    labels: Path
    label_map: dict[str, int]
    calibration: str  # 'phantom', 'phantomless' or 'line'
    xrays: list[Path]
    calibration_line: tuple[float, float] | None = None  # (slope mg/cm3/HU, intercept mg/cm3)
    phantom: str | None = None
    phantom_labels: Path | None = None
    kvp: float | None = None
    landmarks: Path | None = None
    known_poses: Path | None = None
    age_years: float | None = None
    sex: str | None = None
    dxa_g_cm2: dict[str, float] = field(default_factory=dict)  # column name -> value
    implants: dict[str, str] = field(default_factory=dict)  # side -> implant type
    #: str(radiograph path) -> what the manifest says about it (spacing, SDD, SOD, date)
    radiographs: dict[str, RadiographInfo] = field(default_factory=dict)
    ct_date: datetime.date | None = None
    dxa_dates: dict[str, datetime.date] = field(default_factory=dict)  # side -> exam date
    dxa_vendors: dict[str, str] = field(default_factory=dict)  # side -> vendor
    dxa_scale: str | None = None

    def radiograph(self, path: Path | str) -> RadiographInfo:
        """What the manifest says about one of the case's radiographs (empty when nothing)."""
        return self.radiographs.get(str(path), RadiographInfo())

    def to_row(self, root: Path) -> dict[str, str]:
        """The CSV row, paths relative to ``root`` where possible."""

        def rel(p: Path | None) -> str:
            if p is None:
                return ""
            # resolved first: a relative path (e.g. `synth --out` relative to the working
            # folder) is relative to where the program runs, not to the manifest
            full = Path(p).resolve()
            try:
                return full.relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                return str(full)

        calibration = self.calibration
        if self.calibration_line is not None:
            calibration = f"line:{self.calibration_line[0]!r},{self.calibration_line[1]!r}"
        row = {
            "case_id": self.case_id,
            "patient_id": self.patient_id,
            "ct": rel(self.ct),
            "labels": rel(self.labels),
            "label_map": ";".join(f"{k}={v}" for k, v in self.label_map.items()),
            "calibration": calibration,
            "phantom": rel(Path(self.phantom))
            if _is_file_spec(self.phantom)
            else self.phantom or "",
            "phantom_labels": rel(self.phantom_labels),
            "kvp": _num(self.kvp),
            "xrays": ";".join(rel(x) for x in self.xrays),
            "landmarks": rel(self.landmarks),
            "known_poses": rel(self.known_poses),
            "age_years": _num(self.age_years),
            "sex": self.sex or "",
        }
        row |= {c: _num(self.dxa_g_cm2.get(c)) for c in DXA_COLUMNS}
        row[IMPLANTS_COLUMN] = format_implants(self.implants)
        infos = [self.radiograph(x) for x in self.xrays]
        row["xray_pixel_spacing_mm"] = _per_xray([_spacing_text(i.pixel_spacing_mm) for i in infos])
        row["xray_sdd_mm"] = _per_xray([_num(i.sdd_mm) for i in infos])
        row["xray_sod_mm"] = _per_xray([_num(i.sod_mm) for i in infos])
        row["xray_dates"] = _per_xray([i.date.isoformat() if i.date else "" for i in infos])
        row["ct_date"] = self.ct_date.isoformat() if self.ct_date else ""
        for side in IMPLANT_SIDES:
            date = self.dxa_dates.get(side)
            row[f"dxa_date_{side}"] = date.isoformat() if date else ""
            row[f"dxa_vendor_{side}"] = self.dxa_vendors.get(side, "")
        row["dxa_scale"] = self.dxa_scale or ""
        return row


def _spacing_text(spacing: tuple[float, float] | None) -> str:
    if spacing is None:
        return ""
    if spacing[0] == spacing[1]:
        return _num(spacing[0])
    return f"{_num(spacing[0])}x{_num(spacing[1])}"


def _per_xray(values: list[str]) -> str:
    """One value when all radiographs share it, else one per radiograph; '' when none given."""
    if not any(values):
        return ""
    if len(set(values)) == 1:
        return values[0]
    return ";".join(values)


def _is_file_spec(phantom: str | None) -> bool:
    """A phantom given as a JSON file (not a bundled name such as 'bmas200')."""
    return bool(phantom) and phantom.endswith(".json")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def format_implants(implants: dict[str, str]) -> str:
    """{side: type} -> the ``implants`` field, e.g. 'left:hip_replacement' ('' for none)."""
    return ";".join(f"{side}:{kind}" for side, kind in sorted(implants.items()))


def parse_implants(value: str, where: str = "implants") -> dict[str, str]:
    """The ``implants`` field -> {side: type}; InputError naming ``where`` on a bad entry."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in value.split(";"))):
        side, _, kind = (p.strip() for p in item.partition(":"))
        if side not in IMPLANT_SIDES or not re.fullmatch(r"[a-z][a-z0-9_-]*", kind):
            raise InputError(
                f"{where}: implants entries look like left:hip_replacement (side left or "
                f"right, a lower-case type); cannot read {item!r}"
            )
        if side in out:
            raise InputError(f"{where}: implants names the {side} hip twice ({value!r})")
        out[side] = kind
    return out


def write_manifest(cases: list[ManifestCase], path: str | Path) -> None:
    """Write ``cases`` as a manifest CSV at ``path`` (paths relative to its folder); the
    optional ``EXTRA_COLUMNS`` (implants, radiograph geometry, dates, DXA provenance) only when
    some case fills them."""
    path = Path(path)
    root = path.parent.resolve()
    rows = [case.to_row(root) for case in cases]
    columns = COLUMNS + tuple(c for c in EXTRA_COLUMNS if any(r.get(c) for r in rows))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_manifest(path: str | Path) -> list[ManifestCase]:
    """Read and check a manifest; InputError naming the file, row and column on any problem.

    Files are not opened here (a missing CT is that case's failure, reported by the stage that
    reads it), but every field is parsed and checked.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; the manifest is a CSV file (docs/data-format.md)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 CSV manifest") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: manifest lacks required column(s) {', '.join(missing)}")
    root = path.parent.resolve()
    cases, seen = [], set()
    for line, row in enumerate(reader, start=2):
        if None in row or None in row.values():
            width = len(reader.fieldnames)
            cells = width + len(row.get(None) or []) - list(row.values()).count(None)
            raise InputError(
                f"{path}, line {line}: {cells} cells, the header has {width} "
                "(a comma too many or too few? quote fields that hold commas)"
            )
        case = _parse_row(row, root, f"{path}, line {line}")
        if case.case_id in seen:
            raise InputError(f"{path}, line {line}: case_id {case.case_id!r} appears twice")
        seen.add(case.case_id)
        cases.append(case)
    if not cases:
        raise InputError(f"{path}: the manifest lists no cases")
    return cases


def _parse_row(row: dict, root: Path, where: str) -> ManifestCase:
    def get(col: str) -> str:
        return (row.get(col) or "").strip()

    for col in REQUIRED:
        if not get(col):
            raise InputError(f"{where}: column {col!r} is empty")

    def path_of(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else root / p

    def opt_path(col: str) -> Path | None:
        return path_of(get(col)) if get(col) else None

    method, line = _parse_calibration(get("calibration"), where)
    if method == "phantom" and not get("phantom"):
        raise InputError(f"{where}: calibration 'phantom' needs the 'phantom' column")
    phantom = get("phantom") or None
    if _is_file_spec(phantom):
        phantom = str(path_of(phantom))
    sex = get("sex").upper() or None
    if sex not in (None, "F", "M", "O"):
        raise InputError(f"{where}: sex must be F, M or O, not {get('sex')!r}")
    xrays = [path_of(x.strip()) for x in get("xrays").split(";") if x.strip()]
    dxa_scale = get("dxa_scale").lower() or None
    if dxa_scale not in (None, *DXA_SCALES):
        raise InputError(
            f"{where}: dxa_scale must be one of {', '.join(DXA_SCALES)}, not {get('dxa_scale')!r}"
        )
    vendors = {}
    for side in IMPLANT_SIDES:
        vendor = get(f"dxa_vendor_{side}").lower()
        if vendor and vendor not in DXA_VENDORS:
            raise InputError(
                f"{where}: dxa_vendor_{side} must be one of {', '.join(DXA_VENDORS)}, "
                f"not {vendor!r}"
            )
        if vendor:
            vendors[side] = vendor
    return ManifestCase(
        case_id=get("case_id"),
        patient_id=get("patient_id"),
        ct=path_of(get("ct")),
        labels=path_of(get("labels")),
        label_map=parse_label_map(get("label_map"), where),
        calibration=method,
        calibration_line=line,
        xrays=xrays,
        phantom=phantom,
        phantom_labels=opt_path("phantom_labels"),
        kvp=_opt_float(get("kvp"), "kvp", where, (40.0, 160.0)),
        landmarks=opt_path("landmarks"),
        known_poses=opt_path("known_poses"),
        age_years=_opt_float(get("age_years"), "age_years", where, (0.0, 130.0)),
        sex=sex,
        dxa_g_cm2={
            c: v
            for c in DXA_COLUMNS
            if (v := _opt_float(get(c), c, where, (0.05, 3.0))) is not None
        },
        implants=parse_implants(get(IMPLANTS_COLUMN), where),
        radiographs=_parse_radiographs(row, xrays, where),
        ct_date=parse_date(get("ct_date"), "ct_date", where),
        dxa_dates={
            side: d
            for side in IMPLANT_SIDES
            if (d := parse_date(get(f"dxa_date_{side}"), f"dxa_date_{side}", where)) is not None
        },
        dxa_vendors=vendors,
        dxa_scale=dxa_scale,
    )


def _parse_radiographs(row: dict, xrays: list[Path], where: str) -> dict[str, RadiographInfo]:
    """The per-radiograph columns: one value for all radiographs, or one per radiograph."""

    def values(col: str) -> list[str]:
        text = (row.get(col) or "").strip()
        if not text:
            return [""] * len(xrays)
        items = [v.strip() for v in text.split(";")]
        if len(items) == 1:
            return items * len(xrays)
        if len(items) != len(xrays):
            raise InputError(
                f"{where}: {col} holds {len(items)} values for {len(xrays)} radiographs; give one "
                "value for all or one per radiograph, in the order of xrays"
            )
        return items

    spacing = values("xray_pixel_spacing_mm")
    sdd, sod, dates = values("xray_sdd_mm"), values("xray_sod_mm"), values("xray_dates")
    out = {}
    for i, x in enumerate(xrays):
        info = RadiographInfo(
            pixel_spacing_mm=_parse_spacing(spacing[i], where),
            sdd_mm=_opt_float(sdd[i], "xray_sdd_mm", where, XRAY_DISTANCE_LIMITS_MM),
            sod_mm=_opt_float(sod[i], "xray_sod_mm", where, XRAY_DISTANCE_LIMITS_MM),
            date=parse_date(dates[i], "xray_dates", where),
        )
        if info.sdd_mm is not None and info.sod_mm is not None and info.sod_mm >= info.sdd_mm:
            raise InputError(
                f"{where}: xray_sod_mm {info.sod_mm:g} must be below xray_sdd_mm "
                f"{info.sdd_mm:g} (the patient lies between source and detector)"
            )
        if info.given():
            out[str(x)] = info
    return out


def _parse_spacing(value: str, where: str) -> tuple[float, float] | None:
    """``0.15`` or ``0.15x0.16`` (row x column, mm) -> (row, col); None for ''."""
    if not value:
        return None
    parts = [p.strip() for p in value.lower().split("x")]
    lo, hi = XRAY_SPACING_LIMITS_MM
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(math.isfinite(v) and lo <= v <= hi for v in numbers):
        raise InputError(
            f"{where}: xray_pixel_spacing_mm must be a spacing in mm between {lo:g} and {hi:g}, "
            f"one number or ROWxCOL (e.g. 0.15 or 0.15x0.16), not {value!r}"
        )
    return (numbers[0], numbers[-1])


def parse_date(value: str, col: str = "date", where: str = "") -> datetime.date | None:
    """A date as YYYY-MM-DD (or DICOM's YYYYMMDD); None for ''; InputError otherwise.

    >>> parse_date("2023-12-31"), parse_date("20231231")
    (datetime.date(2023, 12, 31), datetime.date(2023, 12, 31))
    """
    value = (value or "").strip()
    if not value:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    prefix = f"{where}: " if where else ""
    raise InputError(f"{prefix}{col} must be a date YYYY-MM-DD, not {value!r}")


def _parse_calibration(value: str, where: str) -> tuple[str, tuple[float, float] | None]:
    if value in ("phantom", "phantomless"):
        return value, None
    if value.startswith("line:"):
        parts = value[5:].split(",")
        try:
            slope, intercept = (float(p) for p in parts)
        except ValueError:
            slope = intercept = math.nan
        if len(parts) == 2 and math.isfinite(slope) and math.isfinite(intercept) and slope > 0:
            return "line", (slope, intercept)
    raise InputError(
        f"{where}: calibration must be 'phantom', 'phantomless' or 'line:SLOPE,INTERCEPT' "
        f"(slope > 0, mg/cm3 per HU), not {value!r}"
    )


def parse_label_map(value: str, where: str = "label_map") -> dict[str, int]:
    """``pelvis_right=1;...`` (bones from ``BONES``; ``sacrum`` joins the pelvis) or a preset
    name (``totalsegmentator``: TotalSegmentator v2 ids, femur 75/76, hip 77/78, sacrum 25)."""
    if value.strip().lower() in LABEL_MAP_PRESETS:
        from xbmd.io.totalseg import TOTALSEGMENTATOR_LABEL_MAP

        return dict(TOTALSEGMENTATOR_LABEL_MAP)
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in value.split(";"))):
        name, _, ident = item.partition("=")
        name = name.strip()
        if name not in BONES or not ident.strip().isdigit():
            raise InputError(
                f"{where}: label_map entries look like femur_left=4 with bones from "
                f"{', '.join(BONES)} (or a preset: {', '.join(LABEL_MAP_PRESETS)}); "
                f"cannot read {item!r}"
            )
        out[name] = int(ident)
    if len(set(out.values())) != len(out):
        raise InputError(f"{where}: label_map gives two bones the same id ({value!r})")
    return out


def _opt_float(value: str, col: str, where: str, limits: tuple[float, float]) -> float | None:
    if not value:
        return None
    try:
        x = float(value)
    except ValueError:
        raise InputError(f"{where}: {col} must be a number, not {value!r}") from None
    if not (math.isfinite(x) and limits[0] <= x <= limits[1]):
        raise InputError(f"{where}: {col} = {value} is outside {limits[0]:g}-{limits[1]:g}")
    return x
