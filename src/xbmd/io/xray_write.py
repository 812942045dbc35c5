"""Radiographs out: a Digital X-Ray (DX) DICOM writer and a 16-bit PNG writer (the virtual cohort
writes its radiographs with them; docs/data-format.md, "X-ray images")."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xbmd.errors import InputError
from xbmd.io.xray import (
    _AGE_UNIT_YEARS,
    BODY_PART_CODES,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    parse_spacing_mm,
)


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
    spacing = parse_spacing_mm(pixel_spacing_mm)
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
