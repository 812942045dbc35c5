"""The DICOM CT series reader behind ``xbmd.io.ct``: finds the series in a folder (or the one a
file belongs to), checks every slice's header (numbers where numbers belong, a rescale slope
that is not 0, one orientation, equally spaced slices, pixel data of the announced size) and
reads it with SimpleITK; each problem is an ``InputError`` naming the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from xbmd.errors import InputError

#: Slices must be equally spaced within this fraction of the spacing or this many mm.
SLICE_SPACING_RTOL = 0.01
SLICE_SPACING_ATOL_MM = 0.01
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def sitk_reason(exc: Exception) -> str:
    """The useful last line of a SimpleITK exception (its first lines are C++ source paths)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason.removeprefix("sitk::ERROR:").strip()


def read_dicom(
    directory: Path, chosen_file: Path | None, modality: str | None
) -> tuple[sitk.Image, dict]:
    """Read one series: the one ``chosen_file`` belongs to, else the largest (of ``modality``)."""
    name = chosen_file or directory
    series = _scan_dicom_dir(directory)
    if chosen_file is not None:
        uid = _series_uid_of(chosen_file, series)
        note = None
    else:
        uid, note = _pick_series(directory, series, modality)
    headers = series[uid]
    if modality is not None:
        found = str(headers[0][1].get("Modality", "") or "unknown")
        if found != modality:
            raise InputError(f"{name}: is {_a(found)} series, not {modality}")
    files, spacing_mm = _check_series_geometry(name, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # rescale slope may differ between slices
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{name}: cannot decode DICOM pixel data: {sitk_reason(exc)}") from None
    meta = _dicom_meta(headers[0][1], len(files), spacing_mm)
    if note:
        meta["note"] = note
    return image, meta


def _scan_dicom_dir(directory: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Headers of the DICOM images directly in ``directory``, grouped by SeriesInstanceUID."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        try:
            # pixel data deferred, not read: its length and offset are kept for the checks
            ds = pydicom.dcmread(f, defer_size=256)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a thumbnail...) or unreadable
        if "Rows" not in ds:
            continue  # DICOMDIR, structured report, presentation state: not an image
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if not series:
        subdirs = any(p.is_dir() for p in directory.iterdir())
        hint = " (subdirectories are not searched)" if subdirs else ""
        raise InputError(f"{directory}: no DICOM images found{hint}")
    return series


def _series_uid_of(chosen_file: Path, series: dict) -> str:
    for uid, headers in series.items():
        if any(f == chosen_file for f, _ in headers):
            return uid
    raise InputError(f"{chosen_file}: not a readable DICOM image")


def _pick_series(directory: Path, series: dict, modality: str | None) -> tuple[str, str | None]:
    """The series with most slices (among ``modality`` ones); a note when there was a choice."""

    def describe(uid: str) -> str:
        ds = series[uid][0][1]
        desc = f", {ds.SeriesDescription}" if ds.get("SeriesDescription") else ""
        return f"{ds.get('Modality', '?')} {uid} ({len(series[uid])} slices{desc})"

    candidates = [
        u for u in series if modality is None or series[u][0][1].get("Modality") == modality
    ]
    if not candidates:
        if len(series) == 1:
            found = next(iter(series.values()))[0][1].get("Modality", "unknown")
            raise InputError(f"{directory}: is {_a(found)} series, not {modality}")
        found = "; ".join(describe(u) for u in series)
        raise InputError(f"{directory}: holds no {modality} series; found {found}")
    uid = max(sorted(candidates), key=lambda u: len(series[u]))
    if len(series) == 1:
        return uid, None
    others = "; ".join(describe(u) for u in sorted(series) if u != uid)
    return uid, (
        f"{directory} holds {len(series)} series; read the one with most slices: "
        f"{describe(uid)}; not read: {others}"
    )


def _check_series_geometry(name: Path, headers: list) -> tuple[list[Path], np.ndarray]:
    """Sort slices along their normal and check the grid is regular; return files, spacing."""
    first = headers[0][1]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        what = "a DICOM SEG" if first.get("SOPClassUID") == SEG_SOP_CLASS else "multi-frame DICOM"
        raise InputError(f"{name}: is {what}, which is not supported; convert it to NIfTI first")
    if len(headers) < 2:
        raise InputError(f"{name}: the series has a single slice; a 3D volume is needed")
    for f, ds in headers:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds or ds.get(tag) in (None, ""):
                raise InputError(f"{f}: has no {tag}, so the voxel grid is unknown")
        _check_slice_header(f, ds)
    orient = np.array([_numbers(f, ds, "ImageOrientationPatient", 6) for f, ds in headers])
    pixel = np.array([_numbers(f, ds, "PixelSpacing", 2) for f, ds in headers])
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    rows, cols = orient[0, :3], orient[0, 3:]
    if (
        abs(np.linalg.norm(rows) - 1) > 1e-2
        or abs(np.linalg.norm(cols) - 1) > 1e-2
        or (abs(rows @ cols) > 1e-2)
    ):
        raise InputError(
            f"{headers[0][0]}: ImageOrientationPatient {orient[0].tolist()} is not two "
            "perpendicular unit vectors, so the voxel grid is unknown"
        )
    if np.abs(orient - orient[0]).max() > 1e-4 or np.abs(pixel - pixel[0]).max() > 1e-4:
        raise InputError(f"{name}: slices differ in orientation or pixel spacing (a localizer?)")
    if len(shapes) > 1:
        raise InputError(f"{name}: slices differ in size: {sorted(shapes)}")
    if not (pixel[0] > 0).all():
        raise InputError(f"{name}: PixelSpacing {pixel[0].tolist()} mm must be positive")
    normal = np.cross(orient[0, :3], orient[0, 3:])
    positions = np.array([_numbers(f, ds, "ImagePositionPatient", 3) for f, ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    files = [headers[i][0] for i in order]
    steps = np.diff(positions[order], axis=0)
    dz = steps @ normal
    _check_slice_steps(name, files, dz)
    shear_mm = np.linalg.norm(steps - dz[:, None] * normal, axis=1)
    if (shear_mm > np.maximum(SLICE_SPACING_ATOL_MM, SLICE_SPACING_RTOL * dz)).any():
        raise InputError(
            f"{name}: slice positions are offset from the slice normal by up to "
            f"{shear_mm.max():.3g} mm per slice (gantry tilt?); resample it to a regular grid "
            "first (e.g. dcm2niix corrects gantry tilt)"
        )
    spacing_mm = np.array([pixel[0][1], pixel[0][0], float(np.median(dz))])
    return files, spacing_mm


def _numbers(f: Path, ds: pydicom.Dataset, keyword: str, count: int) -> list[float]:
    """``count`` finite numbers of a DICOM attribute; InputError naming the file otherwise."""
    raw = ds.get(keyword)
    values = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not np.isfinite(numbers).all():
        what = "a number" if count == 1 else f"{count} numbers"
        raise InputError(f"{f}: {keyword} {_text(raw)} is not {what}")
    return numbers


def _text(raw) -> str:
    """A DICOM value as written in the file, quoted (multiple values joined by backslashes)."""
    if isinstance(raw, MultiValue | list | tuple):
        return "'" + "\\".join(str(v) for v in raw) + "'"
    return f"'{raw}'"


def _check_slice_header(f: Path, ds: pydicom.Dataset) -> None:
    """A slice's rescale and pixel data: GDCM reads a rescale slope given as text or 0 as 1, and
    short pixel data as whatever follows, without a word."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds and ds.get(keyword) not in (None, ""):
            value = _numbers(f, ds, keyword, 1)[0]
            if keyword == "RescaleSlope" and value == 0:
                raise InputError(f"{f}: RescaleSlope is 0, so every voxel would be the intercept")
    pixels = ds.get_item(0x7FE00010, keep_deferred=True)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if pixels is None or syntax is None or syntax.is_encapsulated:
        return  # compressed: the decoder reports damage
    try:
        bits = int(ds.BitsAllocated)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{f}: Rows, Columns or BitsAllocated missing or not numbers") from None
    length = getattr(pixels, "length", None)
    if length is None:
        length = len(pixels.value or b"")
    stored = length
    tell = getattr(pixels, "value_tell", None)
    if tell is not None:
        stored = min(length, max(0, f.stat().st_size - tell))
    if stored < expected:
        raise InputError(
            f"{f}: pixel data holds {stored} bytes, {ds.Rows} x {ds.Columns} pixels of "
            f"{bits} bits need {expected} (truncated or damaged file)"
        )


def _check_slice_steps(name: Path, files: list[Path], dz: np.ndarray) -> None:
    """Slices equally spaced within 1 % or 0.01 mm: a gap means a missing slice."""
    if (dz < SLICE_SPACING_ATOL_MM).any():
        k = int(np.argmin(dz))
        raise InputError(
            f"{name}: two slices at the same position ({files[k].name}, {files[k + 1].name}): "
            "several acquisitions or time points in one series? Slice spacing must be regular"
        )
    median = float(np.median(dz))
    bad = np.abs(dz - median) > max(SLICE_SPACING_RTOL * median, SLICE_SPACING_ATOL_MM)
    if bad.any():
        counts = Counter(round(float(d), 3) for d in dz)
        found = ", ".join(f"{d:g} mm (x{n})" for d, n in sorted(counts.items()))
        k = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{name}: inconsistent slice spacing: found {found}; first irregular step between "
            f"{files[k].name} and {files[k + 1].name} (a missing slice?). Slices must be equally "
            f"spaced within {SLICE_SPACING_RTOL:.0%} or {SLICE_SPACING_ATOL_MM} mm"
        )


def _a(modality: str) -> str:
    """'an MR', 'a CT': the article follows how the modality's first letter is spoken."""
    return f"{'an' if modality[:1] in 'AEFHILMNORSX' else 'a'} {modality}"


def _dicom_meta(ds: pydicom.Dataset, n_slices: int, spacing_mm: np.ndarray) -> dict:
    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return (
            "\\".join(map(str, value))
            if isinstance(value, MultiValue | list | tuple)
            else str(value)
        )

    def number(keyword: str) -> float | None:
        value = ds.get(keyword)
        try:
            return None if value is None or value == "" else float(value)
        except (TypeError, ValueError):
            return None

    meta = {
        "format": "dicom",
        "modality": text("Modality"),
        "series_uid": text("SeriesInstanceUID"),
        "study_uid": text("StudyInstanceUID"),
        "patient_id": text("PatientID"),
        "study_date": text("StudyDate"),
        "series_description": text("SeriesDescription"),
        "manufacturer": text("Manufacturer"),
        "model": text("ManufacturerModelName"),
        "kvp": number("KVP"),
        "tube_current_ma": number("XRayTubeCurrent"),
        "convolution_kernel": text("ConvolutionKernel"),
        "slice_thickness_mm": number("SliceThickness"),
        "slice_spacing_mm": float(spacing_mm[2]),
        "rescale_slope": number("RescaleSlope"),
        "rescale_intercept": number("RescaleIntercept"),
        "n_slices": n_slices,
    }
    return {k: v for k, v in meta.items() if v is not None}
