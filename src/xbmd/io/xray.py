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
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    generate_uid,
)

from xbmd.errors import InputError

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
    user_spacing = None if pixel_spacing_mm is None else _user_spacing(pixel_spacing_mm)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
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
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"  # DICOM without the 128-byte preamble, as some old CR systems write
    raise InputError(f"{path}: unrecognised image format; accepted: DICOM, PNG, TIFF, JPEG")


def _user_spacing(value: float | Sequence[float]) -> tuple[float, float]:
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
        values, voi_kind = _grayscale_pipeline(stored, ds, apply_voi)
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
    return XRay(values, spacing, spacing_source, str(path), meta, notes)


def _dcmread(path: Path) -> Dataset:
    with path.open("rb") as f:
        has_preamble = f.read(132)[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, force=not has_preamble)
    except _DICOM_ERRORS as exc:
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
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
    values = apply_modality_lut(stored, ds)
    voi_kind = _voi_kind(ds) if apply_voi else None
    if voi_kind == "lut" and not np.issubdtype(values.dtype, np.integer):
        # a VOI LUT is indexed by integer modality values; rescale may have made them float
        values = np.rint(values).astype(np.int64)
    if voi_kind is not None:
        values = apply_voi_lut(values, ds)
    return np.asarray(values, dtype=np.float64), voi_kind


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
        "sdd_mm": _number(ds, "DistanceSourceToDetector"),
        "sod_mm": _number(ds, "DistanceSourceToPatient"),
        "magnification_factor": _number(ds, "EstimatedRadiographicMagnificationFactor"),
        "imager_pixel_spacing_mm": _pair_or_none(ds, "ImagerPixelSpacing"),
        "dicom_pixel_spacing_mm": _pair_or_none(ds, "PixelSpacing"),
        "patient_age_years": parse_patient_age(ds.get("PatientAge")),
        "patient_sex": _text(ds, "PatientSex"),
        "view_position": _text(ds, "ViewPosition"),
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
            arr = _pillow_gray(img, path, lossy=kind == "jpeg")
    except (*_PILLOW_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: unreadable {kind.upper()} ({exc})") from exc
    notes = [WARN_NOT_DICOM] + ([WARN_LOSSY] if kind == "jpeg" else [])
    meta = {"format": kind, "mode": mode, "dtype": str(arr.dtype), **dict.fromkeys(DICOM_ID_KEYS)}
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


# --------------------------------------------------------------------------------------------
# Writing


def write_xray_dicom(
    xray_pixels_uint16: np.ndarray,
    path: str | Path,
    *,
    pixel_spacing_mm: float | tuple[float, float],
    photometric: str = "MONOCHROME2",
    sdd_mm: float | None = None,
    sod_mm: float | None = None,
    patient_age_years: float | None = None,
    patient_sex: str | None = None,
    patient_id: str = "ANONYMOUS",
    patient_name: str = "Anonymous",
    laterality: str = "B",
    view_position: str = "AP",
    body_part: str = "PELVIS",
    patient_orientation: tuple[str, str] = ("L", "F"),
    pixel_intensity_relationship: str = "LOG",
    for_presentation: bool = True,
    bits_stored: int = 16,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    extra: dict | None = None,
) -> None:
    """Write a Digital X-Ray Image (DX) DICOM file, explicit VR little endian.

    Parameters
    ----------
    xray_pixels_uint16 : ndarray of shape (rows, cols)
        Integer values in [0, 2**bits_stored - 1], bone bright (the convention of
        :class:`XRay`). For ``photometric='MONOCHROME1'`` they are stored inverted
        (``2**bits_stored - 1 - value``) so that :func:`read_xray` gives them back unchanged.
    path : str or Path
        Output file.
    pixel_spacing_mm : float or (float, float)
        (row, col) spacing at the detector in mm, written as Imager Pixel Spacing.
    sdd_mm, sod_mm : float, optional
        Source-detector and source-patient (isocentre) distances in mm; when both are given the
        magnification factor sdd/sod is written too.
    patient_age_years : float, optional
        Written as Patient Age, e.g. 67.4 -> '067Y', 0.5 -> '006M'.
    patient_sex : {'M', 'F', 'O'}, optional
    laterality : {'L', 'R', 'B', 'U'}
        Image Laterality. The default 'B' suits an AP pelvis showing both hips.
    view_position : str
        View Position, e.g. 'AP', 'PA', 'LL', 'RL'.
    body_part : {'PELVIS', 'HIP'}
        Body Part Examined and its Anatomic Region code.
    patient_orientation : (str, str)
        Patient directions of the first row and first column; ('L', 'F') for an AP view.
    pixel_intensity_relationship : {'LOG', 'LIN'}
        LOG for line-integral images (DRRs, log-converted detector signal).
    for_presentation : bool
        SOP class 'For Presentation' (with a window) or 'For Processing'.
    bits_stored : int
        8 to 16 (12 and 16 usual); Bits Allocated is 16.
    rescale : (slope, intercept), optional
        Written as Rescale Slope/Intercept. The DX IOD fixes them at (1, 0): anything else makes
        a file that readers honour but a strict validator flags.
    window : (center, width), optional
        Window Center/Width in bone-bright values (mirrored for MONOCHROME1). For presentation
        the default is the full stored range, which is the identity.
    extra : dict, optional
        Further attributes by DICOM keyword, set last (e.g. {'StudyInstanceUID': ...}).

    Examples
    --------
    >>> img = (np.arange(64 * 80).reshape(64, 80) % 4096).astype(np.uint16)
    >>> write_xray_dicom(img, "drr.dcm", pixel_spacing_mm=0.2, bits_stored=12)  # doctest: +SKIP
    """
    path = Path(path)
    max_value = _check_writer_args(xray_pixels_uint16, photometric, bits_stored, laterality)
    spacing = _user_spacing(pixel_spacing_mm)
    pixels = np.asarray(xray_pixels_uint16).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (max_value - pixels).astype(np.uint16)
    ds = _dx_dataset(for_presentation)
    _set_patient_study(ds, patient_id, patient_name, patient_age_years, patient_sex)
    _set_dx_image(ds, pixels, photometric, bits_stored, pixel_intensity_relationship, rescale)
    _set_anatomy_and_geometry(
        ds, spacing, laterality, view_position, body_part, patient_orientation, sdd_mm, sod_mm
    )
    if for_presentation or window is not None:
        _set_window(ds, window, photometric, max_value, rescale)
    for keyword, value in (extra or {}).items():
        if keyword not in pydicom.datadict.keyword_dict:
            raise InputError(f"extra: {keyword!r} is not a DICOM keyword")
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _check_writer_args(pixels: np.ndarray, photometric: str, bits_stored: int, lat: str) -> int:
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"xray_pixels_uint16 must be a non-empty 2D array, got {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"photometric must be 'MONOCHROME1' or 'MONOCHROME2', not {photometric!r}")
    if not (isinstance(bits_stored, (int, np.integer)) and 8 <= bits_stored <= 16):
        raise InputError(f"bits_stored must be an integer from 8 to 16, not {bits_stored!r}")
    if lat not in ("L", "R", "B", "U"):
        raise InputError(f"laterality must be 'L', 'R', 'B' or 'U', not {lat!r}")
    max_value = 2**bits_stored - 1
    low, high = float(arr.min()), float(arr.max())
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(arr == np.round(arr)))
    if not integral or low < 0 or high > max_value:
        raise InputError(
            f"xray_pixels_uint16 must hold integers in [0, {max_value}] for "
            f"bits_stored={bits_stored}, got {arr.dtype} in [{low:g}, {high:g}]"
        )
    return max_value


def _dx_dataset(for_presentation: bool) -> Dataset:
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = DX_FOR_PRESENTATION if for_presentation else DX_FOR_PROCESSING
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION" if for_presentation else "FOR PROCESSING"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "xbmd"
    ds.SoftwareVersions = _xbmd_version()
    ds.AcquisitionContextSequence = DicomSequence()
    return ds


def _xbmd_version() -> str:
    from xbmd import __version__

    return __version__


def _set_patient_study(
    ds: Dataset, patient_id: str, name: str, age_years: float | None, sex: str | None
) -> None:
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    if sex not in (None, "M", "F", "O"):
        raise InputError(f"patient_sex must be 'M', 'F', 'O' or None, not {sex!r}")
    ds.PatientSex = sex or ""
    if age_years is not None:
        ds.PatientAge = format_patient_age(age_years)


def format_patient_age(years: float) -> str:
    """Years as a DICOM Age String: '067Y', or months/weeks/days below one year.

    >>> format_patient_age(67.9), format_patient_age(0.5)
    ('067Y', '006M')
    """
    if not (math.isfinite(years) and 0 <= years < 1000):
        raise InputError(f"patient_age_years must be in [0, 1000), not {years!r}")
    for unit in ("Y", "M", "W", "D"):
        count = int(years / _AGE_UNIT_YEARS[unit])
        if count >= 1 or unit == "D":
            return f"{count:03d}{unit}"
    raise AssertionError("unreachable")


def _set_dx_image(
    ds: Dataset,
    pixels: np.ndarray,
    photometric: str,
    bits_stored: int,
    relationship: str,
    rescale: tuple[float, float] | None,
) -> None:
    if relationship not in ("LOG", "LIN"):
        raise InputError(
            f"pixel_intensity_relationship must be 'LOG' or 'LIN', not {relationship!r}"
        )
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    # Bone bright: MONOCHROME2 stores high values where the beam was weak (sign -1); MONOCHROME1
    # stores the inverse.
    ds.PixelIntensityRelationship = relationship
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(intercept)):
        raise InputError(f"rescale must be (slope > 0, intercept), finite, not {rescale!r}")
    ds.RescaleSlope = _ds_number(slope)
    ds.RescaleIntercept = _ds_number(intercept)
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.astype("<u2").tobytes()


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters, exact for integers."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def _set_anatomy_and_geometry(
    ds: Dataset,
    spacing: tuple[float, float],
    laterality: str,
    view_position: str,
    body_part: str,
    orientation: tuple[str, str],
    sdd_mm: float | None,
    sod_mm: float | None,
) -> None:
    if body_part not in BODY_PART_CODES:
        raise InputError(f"body_part must be one of {sorted(BODY_PART_CODES)}, not {body_part!r}")
    value, scheme, meaning = BODY_PART_CODES[body_part]
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = value, scheme, meaning
    ds.AnatomicRegionSequence = DicomSequence([region])
    ds.BodyPartExamined = body_part
    ds.ImageLaterality = laterality
    ds.ViewPosition = view_position
    ds.PositionerType = ""  # Type 2 in DX Positioning; a DRR has no positioner
    ds.PatientOrientation = list(orientation)
    ds.ImagerPixelSpacing = [_ds_number(round(s, 6)) for s in spacing]
    ds.DetectorType = ""
    if sdd_mm is not None:
        ds.DistanceSourceToDetector = _ds_number(_positive(sdd_mm, "sdd_mm"))
    if sod_mm is not None:
        ds.DistanceSourceToPatient = _ds_number(_positive(sod_mm, "sod_mm"))
    if sdd_mm is not None and sod_mm is not None:
        if sod_mm > sdd_mm:
            raise InputError(
                f"sod_mm ({sod_mm}) exceeds sdd_mm ({sdd_mm}): patient behind detector"
            )
        ds.EstimatedRadiographicMagnificationFactor = _ds_number(round(sdd_mm / sod_mm, 6))


def _positive(value: float, name: str) -> float:
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise InputError(f"{name} must be a positive distance in mm, not {value!r}")
    return float(value)


def _set_window(
    ds: Dataset,
    window: tuple[float, float] | None,
    photometric: str,
    max_value: int,
    rescale: tuple[float, float] | None,
) -> None:
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    if window is None:
        # full range: the LINEAR window (PS3.3 C.11.2.1.2) is then exactly the identity
        low, high = intercept, slope * max_value + intercept
        width = high - low + 1
        center = low + width / 2
        explanation = "FULL RANGE"
    else:
        center, width = float(window[0]), float(window[1])
        if width < 1:
            raise InputError(f"window width must be >= 1, not {width}")
        if photometric == "MONOCHROME1":
            # mirror about the stored range so the window selects the same anatomy; the +1
            # follows from the LINEAR window being centred on (center - 0.5) (PS3.3 C.11.2.1.2)
            center = slope * max_value + 2 * intercept - center + 1
        explanation = "USER"
    ds.WindowCenter = _ds_number(center)
    ds.WindowWidth = _ds_number(width)
    ds.WindowCenterWidthExplanation = explanation


# ---- PNG and display


def write_xray_png(pixels: np.ndarray, path: str | Path, bits: int = 16) -> tuple[float, float]:
    """Write a grayscale PNG of 8 or 16 bits.

    Integer pixels already in [0, 2**bits - 1] are written unchanged; anything else (float,
    negative, too large) is mapped linearly from its [min, max] to the full range.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols)
    path : str or Path
    bits : {8, 16}

    Returns
    -------
    (low, high) : (float, float)
        The input values written as 0 and as 2**bits - 1, so that
        ``value = low + png / (2**bits - 1) * (high - low)``.
    """
    from PIL import Image

    if bits not in (8, 16):
        raise InputError(f"bits must be 8 or 16, not {bits!r}")
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"pixels must be a non-empty 2D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError("pixels contain NaN or infinite values")
    full = 2**bits - 1
    low, high = float(arr.min()), float(arr.max())
    if np.issubdtype(arr.dtype, np.integer) and low >= 0 and high <= full:
        out, low, high = arr, 0.0, float(full)
    else:
        scale = full / (high - low) if high > low else 0.0
        out = np.rint((arr.astype(np.float64) - low) * scale)
    dtype = np.uint16 if bits == 16 else np.uint8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.astype(dtype)).save(path, format="PNG")
    return low, high


def to_display_uint8(
    pixels: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """An 8-bit preview: clip to the given percentiles of the finite values, then scale to 0-255.

    For looking at, never for measuring. NaN and inf become 0; a constant image becomes 0.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols)
    percentiles : (float, float)
        Lower and upper percentiles (0-100) mapped to 0 and 255.

    Returns
    -------
    ndarray of uint8, same shape
    """
    arr = np.asarray(pixels, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    low, high = np.percentile(arr[finite], percentiles)
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = np.clip((arr - low) / (high - low), 0.0, 1.0) * 255.0
    return np.where(finite, np.rint(scaled), 0).astype(np.uint8)
