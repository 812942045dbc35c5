"""Read and write CT volumes and label maps as ``Volume`` objects, with the input checked.

Formats (by suffix): NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``), and DICOM: a directory holding a series, or one file of a series (the whole
series is read; ``xbmd.io.ct_dicom``). Pixels are read by SimpleITK, which already reports
geometry in LPS (also for NIfTI, whose RAS header it converts). Every problem is raised as
``InputError`` naming the file.

Written files record their unit in the header ("xbmd unit=HU" in NIfTI ``descrip`` / NRRD and
MetaImage fields), so ``read_volume`` can read a calibrated mg/cm3 volume back with its unit and
``read_ct`` refuses a file that xbmd wrote in another unit.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from xbmd.errors import InputError
from xbmd.io.ct_dicom import read_dicom, sitk_reason
from xbmd.units import HU, LABEL, check_unit
from xbmd.volume import Volume

#: Suffix -> format name of the single-file formats read and written through SimpleITK.
FILE_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
ACCEPTED = ", ".join([*FILE_FORMATS, *DICOM_SUFFIXES]) + " or a DICOM series directory"

#: Plausible voxel spacing, mm. Outside it the header unit is wrong (m or um read as mm).
SPACING_RANGE_MM = (1e-3, 50.0)
#: A CT in HU must reach soft tissue somewhere: air is -1000 HU, fat about -100 HU.
TISSUE_MIN_HU = -500.0
#: Wider than any real CT: int16 padding (-32768) with the usual -1024 intercept gives -33792,
#: and the extended HU scale of metal-artefact CT reaches about +30700.
HU_RANGE_PLAUSIBLE = (-34000.0, 35000.0)
#: Grids are "the same" when shape matches and affine entries agree within this (mm).
GRID_TOL_MM = 1e-3

_UNIT_NOTE = re.compile(r"xbmd unit=(\S+)")


# --------------------------------------------------------------------------- public API


def read_ct(path: str | Path) -> Volume:
    """Read a CT in Hounsfield units from a NIfTI/NRRD/MetaImage file or a DICOM series.

    Parameters
    ----------
    path : str or Path
        An image file, a DICOM series directory (the CT series with most slices is read) or
        one DICOM file of a series (its whole series is read).

    Returns
    -------
    Volume
        ``data`` float32 of shape (K, J, I) in HU, ``affine`` index -> LPS mm, ``unit='HU'``,
        ``meta`` with 'format' and, for DICOM, 'series_uid', 'kvp', 'manufacturer', ... .

    Raises
    ------
    InputError
        Missing/unreadable file, unsupported suffix, not 3D, bad spacing, non-CT DICOM
        modality, unequal slice spacing, gantry tilt, or values that cannot be HU.

    Warns
    -----
    UserWarning
        When no voxel is below -200 HU (no air or fat: rescale intercept not applied?).

    Example
    -------
    >>> ct = read_ct("case01/ct.nii.gz")  # doctest: +SKIP
    >>> ct.data.shape, ct.spacing_mm  # doctest: +SKIP
    ((133, 512, 512), array([0.78, 0.78, 1.25]))
    """
    image, meta = _read_image(path, modality="CT")
    unit = meta.pop("xbmd_unit", HU)
    if unit != HU:
        raise InputError(
            f"{path}: was written by xbmd in {unit}, not HU; read it with read_volume()"
        )
    volume = volume_from_sitk(image, HU, source=str(path))
    _check_hu_range(volume.data, str(path))
    volume.meta.update(meta)
    return volume


def read_labels(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read an integer label map; optionally require it to lie on ``reference``'s voxel grid.

    Parameters
    ----------
    path : str or Path
        Same formats as ``read_ct``.
    reference : Volume, optional
        Usually the CT the labels were drawn on. Shape and affine (within 1e-3 mm) must match.

    Returns
    -------
    Volume
        ``unit='label'``; ``data`` of shape (K, J, I) keeps the stored integer type (uint8,
        int16, uint16, ...). Float-stored labels with integral values become the smallest
        integer type that holds them.

    Example
    -------
    >>> ct = read_ct("case01/ct.nii.gz")  # doctest: +SKIP
    >>> bones = read_labels("case01/bones.nii.gz", reference=ct)  # doctest: +SKIP

    A folder of per-structure masks (TotalSegmentator's default output) or a DICOM SEG is read
    by ``xbmd.io.totalseg.read_segmentation`` (TotalSegmentator's ids; a SEG is resampled onto
    ``reference``).
    """
    from xbmd.io import totalseg  # here: it reads its masks with this function

    if totalseg.is_segmentation_source(path):
        return totalseg.read_segmentation(path, reference=reference)
    image, meta = _read_image(path, modality=None)
    meta.pop("xbmd_unit", None)
    labels = volume_from_sitk(image, LABEL, source=str(path))
    labels.meta.update(meta)
    if reference is not None:
        _check_same_grid(labels, reference)
    return labels


def read_volume(path: str | Path, unit: str | None = None) -> Volume:
    """Read a volume whose unit is recorded in the file (as ``write_volume`` does) or given.

    HU volumes go through ``read_ct`` and label maps through ``read_labels``, with their checks.
    """
    if not Path(path).exists():
        raise InputError(f"{path}: file not found")
    recorded = _recorded_unit(Path(path))
    unit = unit or recorded
    if unit is None:
        raise InputError(f"{path}: its unit is not recorded in the file; pass unit=")
    if recorded is not None and recorded != unit:
        raise InputError(f"{path}: holds {recorded} (recorded in its header), not {unit}")
    try:
        check_unit(unit)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    if unit == HU:
        return read_ct(path)
    if unit == LABEL:
        return read_labels(path)
    image, meta = _read_image(path, modality=None)
    meta.pop("xbmd_unit", None)
    volume = volume_from_sitk(image, unit, source=str(path))
    if not np.isfinite(volume.data).all():
        raise InputError(f"{path}: contains NaN or infinite values")
    volume.meta.update(meta)
    return volume


def write_volume(volume: Volume, path: str | Path) -> None:
    """Write ``volume`` as NIfTI, NRRD or MetaImage (chosen by suffix), geometry preserved.

    Storage type: label maps keep their integer type (bool -> uint8; 64-bit or float -> the
    smallest integer type holding the values); HU volumes whose values are all integers within
    int16 are written as int16 (lossless, half the size); everything else as float32. The unit
    is recorded in the header. NIfTI stores geometry in float32: about 1e-5 mm comes back.

    Example
    -------
    >>> write_volume(ct, "out/ct.nrrd")  # doctest: +SKIP
    """
    path = Path(path)
    if _suffix(path) not in FILE_FORMATS:
        raise InputError(f"{path}: cannot write this format; use one of {', '.join(FILE_FORMATS)}")
    image = volume_to_sitk(volume.with_data(_storage_array(volume)))
    image.SetMetaData("ITK_FileNotes", f"xbmd unit={volume.unit}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{path}: cannot write: {sitk_reason(exc)}") from None


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """SimpleITK image with the voxels (same dtype) and geometry of ``volume``.

    SimpleITK needs orthonormal direction cosines, so a sheared affine is refused.
    """
    direction = volume.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise InputError(
            f"{volume.source or 'volume'}: its affine has non-orthogonal axes (sheared grid); "
            "SimpleITK images need orthonormal direction cosines"
        )
    data = volume.data.astype(np.uint8) if volume.data.dtype == bool else volume.data
    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=False)
    image.SetSpacing([float(s) for s in volume.spacing_mm])
    image.SetOrigin([float(o) for o in volume.origin_mm])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def volume_from_sitk(image: sitk.Image, unit: str, source: str | None = None) -> Volume:
    """``Volume`` from a 3D scalar SimpleITK image (a 4D image with one time point is accepted).

    ``data`` is float32 for intensity units and an integer type for ``unit='label'`` (see
    ``read_labels``); ``InputError`` for non-3D, multi-component, badly spaced or, for labels,
    non-integer images.
    """
    check_unit(unit)
    name = source or "image"
    image = _as_3d(image, name)
    spacing_mm = np.asarray(image.GetSpacing(), dtype=np.float64)
    _check_spacing(spacing_mm, name)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"{name}: direction cosines are degenerate: {direction.tolist()}")
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing_mm)
    affine[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image)
    data = _as_label_array(array, name) if unit == LABEL else array.astype(np.float32, copy=False)
    return Volume(data=data, affine=affine, unit=unit, source=source)


# --------------------------------------------------------------------------- dispatch


def _read_image(path: str | Path, modality: str | None) -> tuple[sitk.Image, dict]:
    """Read pixels and geometry of a file or DICOM series; return the image and its metadata."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        return read_dicom(path, None, modality)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    if _suffix(path) in FILE_FORMATS:
        return _read_file(path)
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        return read_dicom(path.parent, path, modality)
    raise InputError(f"{path}: unsupported file type; accepted: {ACCEPTED}")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


# --------------------------------------------------------------------------- single files


def _read_file(path: Path) -> tuple[sitk.Image, dict]:
    fmt = FILE_FORMATS[_suffix(path)]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"{path}: cannot be read as {fmt} (corrupt or not an image?): {sitk_reason(exc)}"
        ) from None
    header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    if fmt == "nifti":
        _check_nifti_header(path)
    else:
        _check_text_header(path, fmt)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read its voxels: {sitk_reason(exc)}") from None
    meta: dict = {"format": fmt}
    unit = _unit_from_notes(header.get("ITK_FileNotes", ""))
    if unit is not None:
        meta["xbmd_unit"] = unit
    return image, meta


def _unit_from_notes(notes: str) -> str | None:
    match = _UNIT_NOTE.search(notes)
    return match.group(1) if match else None


def _recorded_unit(path: Path) -> str | None:
    if _suffix(path) not in FILE_FORMATS:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # the full read that follows reports the problem
    if not reader.HasMetaDataKey("ITK_FileNotes"):
        return None
    return _unit_from_notes(reader.GetMetaData("ITK_FileNotes"))


def _check_nifti_header(path: Path) -> None:
    """Catch what ITK silently papers over: zero pixdim (read as 1 mm), no orientation,
    truncated voxel data (read as zeros). The raw header is parsed because ITK's copy of it
    already has zero pixdim replaced by 1."""
    hdr = _nifti_raw_header(path)
    for axis in range(1, min(hdr["dim"][0], 3) + 1):
        if not hdr["pixdim"][axis] > 0:
            raise InputError(
                f"{path}: voxel spacing pixdim[{axis}] is {hdr['pixdim'][axis]:g}; "
                "it must be positive (mm)"
            )
    if hdr["qform_code"] == 0 and hdr["sform_code"] == 0:
        raise InputError(
            f"{path}: NIfTI qform_code and sform_code are both 0, so its axes cannot be placed "
            "in patient space (left/right unknown); re-export it with an orientation"
        )
    n_voxels = int(np.prod([max(d, 1) for d in hdr["dim"][1 : hdr["dim"][0] + 1]]))
    expected = int(hdr["vox_offset"]) + n_voxels * hdr["bitpix"] // 8
    found = _nifti_stored_bytes(path, expected)
    if found < expected:
        raise InputError(
            f"{path}: file is truncated: {found} bytes (uncompressed) of the {expected} its "
            "header describes"
        )
    bad = _nifti_nonfinite_voxels(path, hdr, n_voxels)
    if bad:
        raise InputError(
            f"{path}: contains NaN or infinite values ({bad} of {n_voxels} voxels); a CT, "
            "label map or density volume must hold finite numbers"
        )


#: NIfTI datatype codes of floating-point voxels, and their numpy types.
_NIFTI_FLOAT = {16: "f4", 64: "f8"}


def _nifti_nonfinite_voxels(path: Path, hdr: dict, n_voxels: int) -> int:
    """How many voxels of a floating-point NIfTI are NaN or infinite (0 for integer types).

    ITK's NIfTI reader turns NaN and infinity into 0 without a word, so the stored values are
    counted here, in chunks (the volume is not held twice in memory)."""
    code = _NIFTI_FLOAT.get(hdr["datatype"])
    if code is None:
        return 0
    dtype = np.dtype(code).newbyteorder(hdr["endianness"])
    chunk = (1 << 22) * dtype.itemsize
    bad = 0
    left = n_voxels * dtype.itemsize
    with _open_maybe_gzip(path) as f:
        f.seek(int(hdr["vox_offset"]))
        while left > 0:
            raw = f.read(min(chunk, left))
            if not raw:
                break
            raw = raw[: len(raw) - len(raw) % dtype.itemsize]
            bad += int((~np.isfinite(np.frombuffer(raw, dtype=dtype))).sum())
            left -= len(raw)
    return bad


def _nifti_raw_header(path: Path) -> dict:
    """The NIfTI-1 or NIfTI-2 header fields checked above, parsed by nibabel from the raw bytes
    (gzip detected by content, since ITK also reads an uncompressed file named .nii.gz)."""
    with _open_maybe_gzip(path) as f:
        raw = f.read(540)
    sizes = (
        {int.from_bytes(raw[:4], order) for order in ("little", "big")} if len(raw) >= 4 else set()
    )
    kind = nibabel.Nifti1Header if 348 in sizes else nibabel.Nifti2Header if 540 in sizes else None
    if kind is None or len(raw) < kind.template_dtype.itemsize:
        raise InputError(f"{path}: not a NIfTI file (header size is neither 348 nor 540 bytes)")
    hdr = kind.from_fileobj(io.BytesIO(raw), check=False)
    fields = ("dim", "pixdim", "bitpix", "vox_offset", "qform_code", "sform_code", "datatype")
    return {name: hdr[name].tolist() for name in fields} | {"endianness": hdr.endianness}


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_maybe_gzip(path: Path):
    """By content, not suffix: ITK also reads an uncompressed file named .nii.gz."""
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


def _nifti_stored_bytes(path: Path, expected: int) -> int:
    """Uncompressed size of a NIfTI file (ITK pads a truncated one with zeros).

    For gzip, the trailer's size field (mod 2**32) matching ``expected`` settles it cheaply;
    otherwise (truncated, multi-member, trailing data) the stream is decompressed and counted.
    """
    if not _is_gzip(path):
        return path.stat().st_size
    with path.open("rb") as f:
        f.seek(-4, 2)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
            return expected
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        pass  # truncated or damaged stream: what was decoded so far is what the file holds
    return total


def _check_text_header(path: Path, fmt: str) -> None:
    """NRRD / MetaImage: ITK reads a missing spacing as 1 mm, so look for it in the header."""
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    if fmt == "nrrd":
        fields = {ln.split(":", 1)[0].strip().lower() for ln in head.split("\n\n")[0].splitlines()}
        if "space directions" not in fields:
            raise InputError(
                f"{path}: NRRD header has no 'space directions' field, so voxel spacing and "
                "orientation are unknown"
            )
    else:
        keys = {ln.split("=", 1)[0].strip() for ln in head.splitlines() if "=" in ln}
        if not keys & {"ElementSpacing", "ElementSize"}:
            raise InputError(f"{path}: MetaImage header has no ElementSpacing (voxel size unknown)")


# --------------------------------------------------------------------------- value checks


def _as_3d(image: sitk.Image, name: str) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: has {image.GetNumberOfComponentsPerPixel()} values per voxel "
            "(vector or colour image); a scalar 3D image is needed"
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        return image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(
            f"{name}: is a {image.GetDimension()}D image of size {' x '.join(map(str, size))}; "
            "a 3D volume is needed"
        )
    return image


def _check_spacing(spacing_mm: np.ndarray, name: str) -> None:
    lo, hi = SPACING_RANGE_MM
    if not (np.isfinite(spacing_mm).all() and (spacing_mm > 0).all()):
        raise InputError(f"{name}: voxel spacing {spacing_mm.tolist()} mm must be positive")
    if (spacing_mm < lo).any() or (spacing_mm > hi).any():
        raise InputError(
            f"{name}: voxel spacing {np.round(spacing_mm, 6).tolist()} mm is outside "
            f"{lo}..{hi} mm (spatial unit in the header wrong?)"
        )


def _check_hu_range(data: np.ndarray, name: str) -> None:
    """Refuse values that cannot be a CT in HU; warn when no voxel is air or fat."""
    if not np.isfinite(data).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError(f"{name}: all voxels have the same value ({lo:g}); not a CT")
    if hi < TISSUE_MIN_HU:
        raise InputError(
            f"{name}: maximum is {hi:g} HU (< {TISSUE_MIN_HU:g}): no tissue in the volume "
            "(empty scan, or not in HU?)"
        )
    plo, phi = HU_RANGE_PLAUSIBLE
    if lo < plo or hi > phi:
        raise InputError(
            f"{name}: values {lo:g}..{hi:g} are far outside the HU range of CT (about "
            "-3000..30000); not Hounsfield units (raw stored values, another unit?)"
        )
    if lo > -200:
        warnings.warn(
            f"{name}: no voxel below -200 HU (minimum {lo:g}): no air or fat in the volume; "
            "check that the values are HU (rescale intercept applied?)",
            stacklevel=3,
        )


def _as_label_array(array: np.ndarray, name: str) -> np.ndarray:
    """Integer label values: keep stored integer types, convert integral floats, refuse others."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize <= 4:
        return array
    if not np.isfinite(array).all():
        raise InputError(f"{name}: label map contains NaN or infinite values")
    fractional = array != np.round(array)
    if fractional.any():
        k, j, i = np.argwhere(fractional)[0]
        raise InputError(
            f"{name}: label map has non-integer values ({int(fractional.sum())} voxels, e.g. "
            f"{array[k, j, i]:g} at index (i, j, k) = ({i}, {j}, {k})); labels must be integers"
        )
    return array.astype(_smallest_int_dtype(float(array.min()), float(array.max())))


def _smallest_int_dtype(lo: float, hi: float) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise InputError(f"label values {lo:g}..{hi:g} do not fit in int32")


def _storage_array(volume: Volume) -> np.ndarray:
    """The array written to disk (see ``write_volume`` for the rules)."""
    data = volume.data
    if volume.unit == LABEL:
        return _as_label_array(data, volume.source or "label volume")
    if volume.unit == HU and data.size and np.isfinite(data).all():
        info = np.iinfo(np.int16)
        if info.min <= data.min() and data.max() <= info.max and (data == np.round(data)).all():
            return data.astype(np.int16)
    return data.astype(np.float32, copy=False)


def _check_same_grid(labels: Volume, reference: Volume) -> None:
    if labels.shape != reference.shape:
        raise InputError(
            f"{labels.source}: label grid shape (K, J, I) {labels.shape} differs from "
            f"{reference.source or 'reference'} {reference.shape}"
        )
    diff_mm = float(np.abs(labels.affine - reference.affine).max())
    if diff_mm > GRID_TOL_MM:
        origins = [np.round(v.origin_mm, 3).tolist() for v in (labels, reference)]
        spacings = [np.round(v.spacing_mm, 4).tolist() for v in (labels, reference)]
        raise InputError(
            f"{labels.source}: label grid affine differs from {reference.source or 'reference'} "
            f"by up to {diff_mm:.4g} mm (tolerance {GRID_TOL_MM} mm); origin {origins[0]} vs "
            f"{origins[1]}, spacing {spacings[0]} vs {spacings[1]} mm"
        )
