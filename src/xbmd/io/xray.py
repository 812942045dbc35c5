"""Plain X-ray (radiograph) I/O: DICOM DX/CR, PNG, TIFF and JPEG in; DX DICOM and PNG out.

Every reader returns an :class:`XRay` whose ``pixels`` are float32 of shape (rows, cols), with
higher values displayed brighter ("bone is bright"). For DICOM the values are the output of the
standard grayscale pipeline, kept in float and never quantised to 8 bit:

1. stored values, with the unused high bits above Bits Stored masked (or sign-extended) by pydicom;
2. Modality LUT: Rescale Slope/Intercept or Modality LUT Sequence;
3. VOI LUT: Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID) or VOI LUT Sequence;
4. MONOCHROME1 only: inversion, done here and nowhere else, as ``low + high - value`` where
   [low, high] is the nominal output range of the last stage applied (the window's output range,
   the LUT's table range, or the stored range after rescale). The nominal range, not the image's
   own min/max, so that a MONOCHROME1 file and its MONOCHROME2 twin read identically.
   Presentation LUT Shape INVERSE on a MONOCHROME1 image describes this same inversion and is not
   applied a second time.

Pixel spacing: Imager Pixel Spacing (0018,1164), at the detector, is preferred; Pixel Spacing
(0028,0030) is used only when it is the only one; the one used is recorded in
``XRay.spacing_source``. See docs/data-format.md, section "X-ray images".
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry
from xbmd.io import jpeg, orientation
from xbmd.io.formats import sniff_format

SPACING_SOURCES = ("ImagerPixelSpacing", "PixelSpacing", "user", "none")
#: XRay.meta keys of the identifiers that link a result to its DICOM study (None when not DICOM).
DICOM_ID_KEYS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "accession_number": "AccessionNumber",
}
ACCEPTED_MODALITIES = ("DX", "CR")

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
_SOP_CLASS_MODALITY = {CR_IMAGE_STORAGE: "CR", DX_FOR_PRESENTATION: "DX", DX_FOR_PROCESSING: "DX"}

WARN_NO_SPACING = "no pixel spacing: physical measurements impossible"
WARN_FOR_PRESENTATION = "for-presentation image: intensities not linear in attenuation"
WARN_NOT_DICOM = "not DICOM: intensity processing unknown, probably not linear in attenuation"
WARN_LOSSY = "lossy compression: intensities carry compression artefacts"

# Anatomic Region Sequence codes (SNOMED CT, as in DICOM CID 4031) for write_xray_dicom.
BODY_PART_CODES = {
    "PELVIS": ("816092008", "SCT", "Pelvis"),
    "HIP": ("24136001", "SCT", "Hip joint"),
}

# Always lossy; other syntaxes (e.g. JPEG 2000) are judged by Lossy Image Compression (0028,2110).
_LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError)
# Errors pydicom and its decoder plugins raise on bad or truncated files; re-raised as InputError.
_DICOM_ERRORS = (
    InvalidDicomError,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    NotImplementedError,
    RuntimeError,
)


@dataclass
class XRay:
    """A plain radiograph with its detector geometry.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols)
        float32 values after the DICOM grayscale pipeline; higher = displayed brighter (bone).
    pixel_spacing_mm : (float, float) or None
        (row, col) spacing in mm, i.e. the distance between row centres then between column
        centres. None when unknown.
    spacing_source : str
        'ImagerPixelSpacing', 'PixelSpacing', 'user' or 'none'.
    source : str, optional
        The file read, for messages.
    meta : dict
        Acquisition facts: 'format', 'modality', 'photometric', 'sdd_mm', 'sod_mm',
        'patient_age_years', 'patient_sex', 'view_position', 'laterality', 'bits_stored',
        'transfer_syntax', 'manufacturer', 'presentation_intent', ... (None when absent); the
        DICOM identifiers ``DICOM_ID_KEYS`` (None for PNG, JPEG, TIFF).
    warnings : list of str
        Why measurements on this image may be unreliable.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: str
    source: str | None = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pixels = np.asarray(self.pixels, dtype=np.float32)
        if self.pixels.ndim != 2:
            raise ValueError(f"XRay pixels must be 2D (rows, cols), got shape {self.pixels.shape}")
        if self.spacing_source not in SPACING_SOURCES:
            raise ValueError(
                f"spacing_source must be one of {SPACING_SOURCES}, not {self.spacing_source!r}"
            )
        if (self.pixel_spacing_mm is None) != (self.spacing_source == "none"):
            raise ValueError("pixel_spacing_mm is None exactly when spacing_source is 'none'")
        if self.pixel_spacing_mm is not None:
            self.pixel_spacing_mm = _positive_pair(self.pixel_spacing_mm, "pixel_spacing_mm")


#: Without DICOM geometry: a typical table bucky SDD and the hips about 15 cm above the detector.
DEFAULT_SDD_MM = 1100.0
DEFAULT_HIP_TO_DETECTOR_MM = 150.0


def xray_geometry(xray: XRay) -> tuple[PerspectiveGeometry, list[str]]:
    """The perspective geometry of a radiograph (:class:`XRay`) and warnings.

    Pixel spacing from the file (Imager Pixel Spacing); SDD and SOD from DICOM, else 1100 mm and
    SDD - 150 mm (hips 15 cm above the detector). The principal point is the detector centre.
    """
    warnings = []
    if xray.pixel_spacing_mm is None:
        raise InputError(
            f"{xray.source or 'X-ray'}: no pixel spacing; physical measurements need it "
            "(give the detector pixel spacing with --pixel-spacing MM)"
        )
    sdd = xray.meta.get("sdd_mm")
    sod = xray.meta.get("sod_mm")
    if not sdd:
        sdd = DEFAULT_SDD_MM
        warnings.append(f"no source-detector distance in the file: assumed {sdd:g} mm")
    if not sod or sod >= sdd:
        sod = sdd - DEFAULT_HIP_TO_DETECTOR_MM
        warnings.append(f"no source-patient distance in the file: assumed {sod:g} mm")
    return (
        PerspectiveGeometry(float(sdd), float(sod), xray.pixels.shape, xray.pixel_spacing_mm),
        warnings,
    )


# --------------------------------------------------------------------------------------------
# Reading


def read_xray(
    path: str | Path,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
    *,
    apply_voi: bool = True,
) -> XRay:
    """Read a radiograph from DICOM (DX, CR), PNG, TIFF or JPEG, recognised by content.

    Parameters
    ----------
    path : str or Path
        The image file.
    pixel_spacing_mm : float or (float, float), optional
        (row, col) spacing in mm, or one value for square pixels. Overrides the file's spacing;
        recorded as spacing_source 'user' (the file's own is kept in ``meta['file_spacing_mm']``).
    apply_voi : bool
        Apply the DICOM VOI LUT / window (default True, as a viewer would). False keeps the
        Modality LUT output, which is closer to linear in the detector signal.

    Returns
    -------
    XRay
        float32 pixels of shape (rows, cols), bone bright.

    Raises
    ------
    InputError
        Missing, corrupt or truncated file; a DICOM that is not a plain radiograph (CT, MR, ...),
        multi-frame or colour; a colour raster; an invalid ``pixel_spacing_mm``.

    Examples
    --------
    >>> xr = read_xray("hip.dcm")  # doctest: +SKIP
    >>> xr.pixels.shape, xr.pixel_spacing_mm, xr.spacing_source  # doctest: +SKIP
    ((2800, 2320), (0.148, 0.148), 'ImagerPixelSpacing')
    """
    path = Path(path)
    user_spacing = None if pixel_spacing_mm is None else parse_spacing_mm(pixel_spacing_mm)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    kind = _sniff_format(path)
    if kind == "dicom":
        xray = _read_dicom(path, apply_voi)
    elif kind == "tiff":
        xray = _read_tiff(path)
    else:
        xray = _read_pillow(path, kind)
    if user_spacing is not None:
        _override_spacing(xray, user_spacing)
    elif xray.pixel_spacing_mm is None:
        xray.warnings.append(WARN_NO_SPACING)
    return xray


def _sniff_format(path: Path) -> str:
    with path.open("rb") as f:
        kind = sniff_format(f.read(132))
    if kind is not None:
        return kind
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"  # DICOM without the 128-byte preamble, as some old CR systems write
    raise InputError(f"{path}: unrecognised image format; accepted: DICOM, PNG, TIFF, JPEG")


def parse_spacing_mm(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float, np.number)):
        value = (value, value)
    try:
        return _positive_pair(value, "pixel_spacing_mm")
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _positive_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(
            f"{name} must be a positive number or a (row, col) pair in mm, not {value!r}"
        )
    return pair  # type: ignore[return-value]


def _override_spacing(xray: XRay, spacing_mm: tuple[float, float]) -> None:
    file_spacing = xray.pixel_spacing_mm
    xray.meta["file_spacing_mm"] = file_spacing
    xray.meta["file_spacing_source"] = xray.spacing_source
    if file_spacing is not None and not np.allclose(file_spacing, spacing_mm, rtol=0.01):
        xray.warnings.append(
            f"user pixel spacing {spacing_mm} mm overrides {xray.spacing_source} "
            f"{file_spacing} mm from the file"
        )
    xray.pixel_spacing_mm = spacing_mm
    xray.spacing_source = "user"


# ---- DICOM


def _read_dicom(path: Path, apply_voi: bool) -> XRay:
    ds = _dcmread(path)
    modality = _check_radiograph(ds, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stored = _decode(ds, path)
        try:
            values, voi_kind = _grayscale_pipeline(stored, ds, apply_voi)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        except (TypeError, ValueError, IndexError) as exc:  # malformed LUT sequences and the like
            raise InputError(f"{path}: unusable grayscale LUT or rescale values ({exc})") from None
        photometric = str(ds.PhotometricInterpretation)
        inversion_range = None
        if photometric == "MONOCHROME1":
            inversion_range = _nominal_output_range(ds, voi_kind)
            values = inversion_range[0] + inversion_range[1] - values
    spacing, spacing_source, notes = _dicom_spacing(ds)
    notes += [f"pydicom: {w.message}" for w in caught]
    intent = str(ds.get("PresentationIntentType", "") or "")
    if intent != "FOR PROCESSING":
        notes.append(WARN_FOR_PRESENTATION)
    if str(ds.get("LossyImageCompression", "")) == "01" or _is_lossy(ds):
        notes.append(WARN_LOSSY)
    if photometric == "MONOCHROME2" and ds.get("PresentationLUTShape") == "INVERSE":
        notes.append("MONOCHROME2 with Presentation LUT Shape INVERSE: not inverted")
    meta = _dicom_meta(ds, modality, voi_kind, inversion_range)
    if _is_lossy(ds):
        meta["jpeg_quality"] = _dicom_jpeg_quality(ds)
    ops = orientation.patient_orientation_ops(ds.get("PatientOrientation"))
    values, spacing, reoriented = _standardise(values, spacing, ops, "Patient Orientation")
    meta["reoriented"] = reoriented
    notes += [reoriented] if reoriented else []
    return XRay(values, spacing, spacing_source, str(path), meta, notes)


def _standardise(values, spacing, ops, why: str):
    """Pixels and spacing in the standard AP display (``xbmd.io.orientation``), and a note."""
    if ops is None or not any(ops):
        return values, spacing, None
    values = orientation.apply_ops(np.asarray(values), ops)
    if ops[0] and spacing is not None:
        spacing = (spacing[1], spacing[0])
    return (
        values,
        spacing,
        f"re-oriented to the standard AP display by its {why} tag ({orientation.describe(ops)})",
    )


def _dicom_jpeg_quality(ds: Dataset) -> int | None:
    """The JPEG quality of a DICOM's first frame (``xbmd.io.jpeg``), None when unknown."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, TypeError, AttributeError):
        return None
    return jpeg.quality_from_bytes(bytes(frame))


def _dcmread(path: Path) -> Dataset:
    with path.open("rb") as f:
        has_preamble = f.read(132)[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, force=not has_preamble)
    except _DICOM_ERRORS as exc:
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if not has_preamble and not any(k in ds for k in ("SOPClassUID", "Modality", "PixelData")):
        # pydicom, forced, reads anything as an (almost) empty dataset
        raise InputError(
            f"{path}: not a DICOM file (no DICM marker and no DICOM image elements) and not "
            "a PNG, JPEG or TIFF either"
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit is None or not little:
            raise InputError(f"{path}: DICOM without a transfer syntax, cannot decode")
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def _check_radiograph(ds: Dataset, path: Path) -> str:
    modality = str(ds.get("Modality", "") or "")
    if not modality:
        modality = _SOP_CLASS_MODALITY.get(str(ds.get("SOPClassUID", "")), "")
    if modality not in ACCEPTED_MODALITIES:
        shown = repr(modality) if modality else "none recorded"
        raise InputError(
            f"{path}: modality {shown} is not a plain radiograph; "
            f"accepted: {', '.join(ACCEPTED_MODALITIES)}"
        )
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM has no pixel data (truncated or not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames); one radiograph expected")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{path}: colour DICOM (PhotometricInterpretation {photometric!r}, "
            f"{samples} samples per pixel); accepted: MONOCHROME1, MONOCHROME2"
        )
    return modality


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    ts = ds.file_meta.TransferSyntaxUID
    try:
        arr = ds.pixel_array  # masks/sign-extends the bits above BitsStored
    except _DICOM_ERRORS as exc:
        found = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", str(exc))
        if found:
            raise InputError(
                f"{path}: truncated file (pixel data: {found[1]} of {found[2]} bytes)"
            ) from None
        raise InputError(
            f"{path}: cannot decode pixel data ({ts.name}): {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim != 2:
        raise InputError(f"{path}: decoded pixel data has shape {arr.shape}, expected 2D")
    return arr


def _grayscale_pipeline(
    stored: np.ndarray, ds: Dataset, apply_voi: bool
) -> tuple[np.ndarray, str | None]:
    """Modality LUT then (optionally) VOI LUT, in float64. Returns (values, 'window'|'lut'|None)."""
    _check_numeric_tags(ds)
    values = apply_modality_lut(stored, ds)
    voi_kind = _voi_kind(ds) if apply_voi else None
    if voi_kind == "lut" and not np.issubdtype(values.dtype, np.integer):
        # a VOI LUT is indexed by integer modality values; rescale may have made them float
        values = np.rint(values).astype(np.int64)
    if voi_kind is not None:
        values = apply_voi_lut(values, ds)
    return np.asarray(values, dtype=np.float64), voi_kind


def _check_numeric_tags(ds: Dataset) -> None:
    """The grayscale pipeline's numbers are numbers, finite, and usable (pydicom would raise a
    TypeError or ValueError deep inside); InputError naming the tag otherwise."""
    for keyword, low in (
        ("RescaleSlope", None),
        ("RescaleIntercept", None),
        ("WindowCenter", None),
        ("WindowWidth", 1.0),
    ):
        if keyword not in ds or ds[keyword].value in (None, ""):
            continue
        value = ds[keyword].value
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise InputError(f"{keyword} {value!r} is not a number") from None
        if not all(math.isfinite(v) for v in numbers):
            raise InputError(f"{keyword} {value!r} is not finite")
        if low is not None and min(numbers) < low:
            raise InputError(f"{keyword} {value!r} must be at least {low:g}")
        if keyword == "RescaleSlope" and numbers[0] == 0:
            raise InputError("RescaleSlope is 0: every pixel would be the same")


def _voi_kind(ds: Dataset) -> str | None:
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        return "lut"  # pydicom prefers the LUT when both are present; so do we
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _nominal_output_range(ds: Dataset, voi_kind: str | None) -> tuple[float, float]:
    """Output range [low, high] of the last grayscale stage applied (see the module docstring)."""
    if voi_kind == "window":
        with np.errstate(over="ignore"):  # SIGMOID saturates: exp overflow is expected
            ends = apply_voi_lut(np.array([-1e30, 1e30]), ds)
        return float(np.min(ends)), float(np.max(ends))
    if voi_kind == "lut":
        return _lut_table_range(ds.VOILUTSequence[0], ds, apply_voi_lut)
    if ds.get("ModalityLUTSequence"):
        return _lut_table_range(ds.ModalityLUTSequence[0], ds, apply_modality_lut)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    else:
        ends = np.array([0, 2**bits - 1])
    ends = apply_modality_lut(ends, ds)
    return float(np.min(ends)), float(np.max(ends))


def _lut_table_range(item: Dataset, ds: Dataset, apply) -> tuple[float, float]:
    n_entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    table = apply(np.arange(first_mapped, first_mapped + n_entries), ds)
    return float(np.min(table)), float(np.max(table))


def _is_lossy(ds: Dataset) -> bool:
    return ds.file_meta.TransferSyntaxUID in _LOSSY_SYNTAXES


def _dicom_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str, list[str]]:
    notes = []
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword not in ds:
            continue
        try:
            return _positive_pair(ds[keyword].value, keyword), keyword, notes
        except ValueError:
            notes.append(f"ignored invalid {keyword} {ds[keyword].value!r}")
    return None, "none", notes


def _dicom_meta(
    ds: Dataset, modality: str, voi_kind: str | None, inversion_range: tuple | None
) -> dict:
    ts = ds.file_meta.TransferSyntaxUID
    return {
        "format": "dicom",
        "modality": modality,
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "photometric": str(ds.PhotometricInterpretation),
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "transfer_syntax": str(ts),
        "transfer_syntax_name": ts.name,
        "manufacturer": _text(ds, "Manufacturer"),
        "manufacturer_model": _text(ds, "ManufacturerModelName"),
        "kvp": _number(ds, "KVP"),
        "sdd_mm": _number(ds, "DistanceSourceToDetector"),
        "sod_mm": _number(ds, "DistanceSourceToPatient"),
        "magnification_factor": _number(ds, "EstimatedRadiographicMagnificationFactor"),
        "imager_pixel_spacing_mm": _pair_or_none(ds, "ImagerPixelSpacing"),
        "dicom_pixel_spacing_mm": _pair_or_none(ds, "PixelSpacing"),
        "patient_age_years": parse_patient_age(ds.get("PatientAge")),
        "patient_sex": _text(ds, "PatientSex"),
        "patient_id": _text(ds, "PatientID"),
        "view_position": _text(ds, "ViewPosition"),
        "patient_orientation": [str(v) for v in ds.get("PatientOrientation") or []] or None,
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "pixel_intensity_relationship": _text(ds, "PixelIntensityRelationship"),
        "pixel_intensity_relationship_sign": _number(ds, "PixelIntensityRelationshipSign"),
        "rescale": _rescale(ds),
        "modality_lut": _modality_lut_kind(ds),
        "voi": voi_kind,
        "window": _window(ds) if voi_kind == "window" else None,
        "inverted": inversion_range is not None,
        "inversion_range": inversion_range,
        **{key: _text(ds, keyword) for key, keyword in DICOM_ID_KEYS.items()},
    }


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value not in (None, "") else None


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _pair_or_none(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    try:
        return _positive_pair(ds[keyword].value, keyword) if keyword in ds else None
    except ValueError:
        return None


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        return None
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _modality_lut_kind(ds: Dataset) -> str | None:
    if ds.get("ModalityLUTSequence"):
        return "lut"
    return "rescale" if _rescale(ds) is not None else None


def _window(ds: Dataset) -> tuple[float, float]:
    """The first (applied) Window Center/Width pair."""

    def first(value) -> float:
        return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)

    return first(ds.WindowCenter), first(ds.WindowWidth)


_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_patient_age(value: str | None) -> float | None:
    """DICOM Patient Age ('067Y', '018M', '003W', '010D') in years; None if absent or malformed.

    A bare number ('67') is read as years, as some systems write it.

    >>> parse_patient_age("067Y"), parse_patient_age("006M")
    (67.0, 0.5)
    """
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(value).upper())
    if match is None:
        return None
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2) or "Y"]


# ---- PNG, JPEG (Pillow) and TIFF (tifffile)


def _read_pillow(path: Path, kind: str) -> XRay:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: {img.n_frames}-frame image; one radiograph expected")
            img.load()
            mode = img.mode
            quality = None
            if kind == "jpeg" and getattr(img, "quantization", None):
                quality = jpeg.quality_from_table(img.quantization[min(img.quantization)])
            exif = img.getexif().get(0x0112) if hasattr(img, "getexif") else None
            arr = _pillow_gray(img, path, lossy=kind == "jpeg")
    except (*_PILLOW_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: unreadable {kind.upper()} ({exc})") from exc
    notes = [WARN_NOT_DICOM] + ([WARN_LOSSY] if kind == "jpeg" else [])
    arr, _, reoriented = _standardise(arr, None, orientation.exif_ops(exif), "EXIF Orientation")
    notes += [reoriented] if reoriented else []
    meta = {"format": kind, "mode": mode, "dtype": str(arr.dtype), **dict.fromkeys(DICOM_ID_KEYS)}
    meta |= {"jpeg_quality": quality, "reoriented": reoriented}
    return XRay(arr, None, "none", str(path), meta, notes)


def _pillow_gray(img, path: Path, lossy: bool) -> np.ndarray:
    mode = img.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode in ("LA", "La", "PA"):
        return np.asarray(img.convert("L") if mode == "PA" else img.getchannel(0))
    if mode == "P":
        img, mode = img.convert("RGB"), "RGB"
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        rgb = np.asarray(img)[..., :3]
        return _gray_from_rgb(rgb, path, tolerance=3 if lossy else 0)
    raise InputError(f"{path}: image mode {mode!r} refused; accepted: grayscale or gray RGB")


def _gray_from_rgb(rgb: np.ndarray, path: Path, tolerance: float) -> np.ndarray:
    """Accept an RGB image whose three channels are equal (within ``tolerance``, for JPEG)."""
    channels = rgb.astype(np.float64)
    spread = np.max(channels, axis=-1) - np.min(channels, axis=-1)
    if spread.max(initial=0) > tolerance:
        raise InputError(
            f"{path}: true-colour image (channels differ by up to {spread.max():g}); "
            "a radiograph must be grayscale or RGB with equal channels"
        )
    return channels.mean(axis=-1) if tolerance else rgb[..., 0]


def _read_tiff(path: Path) -> XRay:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            arr = tif.asarray(series=0)
            photometric = page.photometric.name
            n_pages = len(tif.pages)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
        raise InputError(f"{path}: unreadable TIFF ({exc})") from exc
    if n_pages > 1 and arr.ndim > 2:
        raise InputError(f"{path}: multi-page TIFF ({n_pages} pages); one radiograph expected")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and photometric == "RGB":
        arr = _gray_from_rgb(arr[..., :3], path, tolerance=0)
    if arr.ndim != 2:
        raise InputError(f"{path}: TIFF of shape {arr.shape}; a 2D grayscale image expected")
    if photometric == "PALETTE":
        raise InputError(f"{path}: palette TIFF refused; accepted: grayscale or gray RGB")
    values = arr.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}: TIFF contains NaN or infinite values")
    if photometric == "MINISWHITE":  # TIFF's MONOCHROME1: low values display white
        low, high = _dtype_range(arr)
        values = low + high - values
    meta = {
        "format": "tiff",
        "photometric": photometric,
        "dtype": str(arr.dtype),
        **dict.fromkeys(DICOM_ID_KEYS),
    }
    return XRay(values, None, "none", str(path), meta, [WARN_NOT_DICOM])


def _dtype_range(arr: np.ndarray) -> tuple[float, float]:
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return float(info.min), float(info.max)
    return float(arr.min()), float(arr.max())
