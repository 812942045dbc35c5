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
"""

from __future__ import annotations

import csv
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
        return row


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
    ``implants`` column only when some case has an implant."""
    path = Path(path)
    root = path.parent.resolve()
    columns = COLUMNS + ((IMPLANTS_COLUMN,) if any(c.implants for c in cases) else ())
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for case in cases:
            writer.writerow(case.to_row(root))


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
    return ManifestCase(
        case_id=get("case_id"),
        patient_id=get("patient_id"),
        ct=path_of(get("ct")),
        labels=path_of(get("labels")),
        label_map=parse_label_map(get("label_map"), where),
        calibration=method,
        calibration_line=line,
        xrays=[path_of(x.strip()) for x in get("xrays").split(";") if x.strip()],
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
    )


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
