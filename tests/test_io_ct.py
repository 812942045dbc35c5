"""CT volume and label map I/O: round trips, geometry, DICOM series, and every refusal."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from xbmd.errors import InputError
from xbmd.io.ct import (
    read_ct,
    read_labels,
    read_volume,
    volume_from_sitk,
    volume_to_sitk,
    write_volume,
)
from xbmd.volume import Volume

SPACING_MM = (0.7, 0.8, 2.5)  # i, j, k
ORIGIN_MM = (-10.0, 20.0, 30.0)
SHAPE = (10, 9, 8)  # K, J, I


def oblique_direction() -> np.ndarray:
    """Columns are the world directions of i, j, k: rotated 0.3 rad about z, then 0.2 about x."""
    a, b = 0.3, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def ct_volume(data: np.ndarray | None = None) -> Volume:
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.uniform(-1000.0, 1500.0, SHAPE).astype(np.float32)
    return Volume.from_geometry(data, SPACING_MM, ORIGIN_MM, oblique_direction(), unit="HU")


def write_dicom_series(
    directory: Path,
    n_slices: int = 6,
    modality: str = "CT",
    skip: int | None = None,
    slope: float | list[float] = 0.5,
    intercept: float = -1024.0,
    shear_mm: float = 0.0,
    series_uid: str | None = None,
) -> dict:
    """A tiny oblique series (rows 9, columns 8); files named against the slice order.

    HU at (row r, column c) of slice k is 0.5 * (40 * (8 r + c) + 100 k) + intercept
    (-1024..646 HU by default), stored as (HU - intercept) / slope.
    """
    directory.mkdir(parents=True, exist_ok=True)
    d = oblique_direction()
    row_dir, col_dir, normal = d[:, 0], d[:, 1], d[:, 2]
    dz_mm = SPACING_MM[2]
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(n_slices):
        if k == skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.Modality = modality
        ds.PatientID = "P001"
        ds.Manufacturer = "ACME"
        ds.KVP = 120
        ds.InstanceNumber = k + 1
        position = np.asarray(ORIGIN_MM) + k * dz_mm * normal + k * shear_mm * row_dir
        ds.ImagePositionPatient = [f"{x:.6f}" for x in position]
        ds.ImageOrientationPatient = [f"{x:.8f}" for x in np.r_[row_dir, col_dir]]
        ds.PixelSpacing = [SPACING_MM[1], SPACING_MM[0]]  # row spacing (j), column spacing (i)
        ds.SliceThickness = dz_mm
        ds.Rows, ds.Columns = 9, 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        slope_k = slope[k] if isinstance(slope, list) else slope
        ds.RescaleSlope, ds.RescaleIntercept = slope_k, intercept
        hu = 0.5 * (40 * np.arange(9 * 8).reshape(9, 8) + 100 * k) + intercept
        stored = np.round((hu - intercept) / slope_k).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(directory / f"img{n_slices - k:04d}.dcm", enforce_file_format=True)
    return {"uid": series_uid, "intercept": intercept}


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_data_and_oblique_affine(tmp_path, suffix):
    ct = ct_volume()
    write_volume(ct, tmp_path / f"ct{suffix}")
    back = read_ct(tmp_path / f"ct{suffix}")
    assert back.data.dtype == np.float32 and back.shape == SHAPE
    np.testing.assert_array_equal(back.data, ct.data)
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-5)  # NIfTI stores float32
    assert back.unit == "HU" and back.source == str(tmp_path / f"ct{suffix}")
    assert back.meta["format"] in ("nifti", "nrrd", "metaimage")


def test_integral_hu_written_as_int16(tmp_path):
    ct = ct_volume(np.round(ct_volume().data))
    write_volume(ct, tmp_path / "ct.nrrd")
    assert sitk.ReadImage(str(tmp_path / "ct.nrrd")).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nrrd").data, ct.data)


def test_index_to_world_matches_simpleitk(tmp_path):
    write_volume(ct_volume(), tmp_path / "ct.nii.gz")
    ct = read_ct(tmp_path / "ct.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    for ijk in np.random.default_rng(1).uniform(-1, 10, (5, 3)):
        expected = image.TransformContinuousIndexToPhysicalPoint(ijk.tolist())
        np.testing.assert_allclose(ct.index_to_world(ijk), expected, atol=1e-6)
    # data[k, j, i] is the voxel SimpleITK calls (i, j, k)
    assert ct.data[7, 2, 5] == image[5, 2, 7]


def test_sitk_helpers_round_trip():
    ct = ct_volume()
    back = volume_from_sitk(volume_to_sitk(ct), "HU", source="mem")
    np.testing.assert_array_equal(back.data, ct.data)
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-12)


def test_written_unit_is_recorded(tmp_path):
    bmd = ct_volume().with_data(np.full(SHAPE, 150.5, np.float32), unit="mg/cm3")
    write_volume(bmd, tmp_path / "bmd.nii.gz")
    with pytest.raises(InputError, match="mg/cm3, not HU"):
        read_ct(tmp_path / "bmd.nii.gz")
    back = read_volume(tmp_path / "bmd.nii.gz")
    assert back.unit == "mg/cm3" and back.data.dtype == np.float32


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_labels_round_trip_as_stored_integers(tmp_path, dtype, suffix):
    ct = ct_volume()
    labels = ct.with_data((np.arange(np.prod(SHAPE)) % 4).reshape(SHAPE).astype(dtype), "label")
    write_volume(labels, tmp_path / f"lab{suffix}")
    back = read_labels(tmp_path / f"lab{suffix}", reference=ct)
    assert back.unit == "label" and back.data.dtype == dtype
    np.testing.assert_array_equal(back.data, labels.data)


def test_float_stored_integral_labels_become_integers(tmp_path):
    image = volume_to_sitk(ct_volume(np.full(SHAPE, 2.0, np.float32)))
    sitk.WriteImage(image, str(tmp_path / "lab.nii.gz"))
    assert read_labels(tmp_path / "lab.nii.gz").data.dtype == np.uint8


def test_non_integer_labels_refused(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    data[3, 4, 5] = 1.5
    sitk.WriteImage(volume_to_sitk(ct_volume(data)), str(tmp_path / "lab.nii.gz"))
    with pytest.raises(InputError, match=r"lab\.nii\.gz.*non-integer.*1\.5.*\(5, 4, 3\)"):
        read_labels(tmp_path / "lab.nii.gz")


def test_label_shape_mismatch_names_both_files(tmp_path):
    ct = ct_volume()
    ct.source = "ct.nii.gz"
    small = Volume.from_geometry(np.zeros((10, 9, 7), np.uint8), SPACING_MM, unit="label")
    write_volume(small, tmp_path / "lab.nrrd")
    with pytest.raises(InputError, match=r"lab\.nrrd.*\(10, 9, 7\).*ct\.nii\.gz \(10, 9, 8\)"):
        read_labels(tmp_path / "lab.nrrd", reference=ct)


def test_label_affine_mismatch_reports_mm(tmp_path):
    ct = ct_volume()
    ct.source = "ct.nii.gz"
    shifted = ct.with_data(np.zeros(SHAPE, np.uint8), "label")
    shifted.affine[:3, 3] += (0.0, 0.5, 0.0)
    write_volume(shifted, tmp_path / "lab.mha")
    with pytest.raises(InputError, match=r"lab\.mha.*ct\.nii\.gz by up to 0\.5 mm"):
        read_labels(tmp_path / "lab.mha", reference=ct)


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_hu_spacing_orientation(tmp_path):
    info = write_dicom_series(tmp_path / "series")
    ct = read_ct(tmp_path / "series")
    expected = ct_volume(np.zeros((6, 9, 8), np.float32))
    np.testing.assert_allclose(ct.affine, expected.affine, atol=1e-5)
    stored = 40 * np.arange(72).reshape(9, 8)[None] + 100 * np.arange(6)[:, None, None]
    np.testing.assert_allclose(ct.data, 0.5 * stored + info["intercept"])
    assert ct.data.dtype == np.float32 and ct.unit == "HU"
    assert ct.meta["format"] == "dicom" and ct.meta["series_uid"] == info["uid"]
    assert ct.meta["kvp"] == 120.0 and ct.meta["manufacturer"] == "ACME"
    assert ct.meta["patient_id"] == "P001" and ct.meta["n_slices"] == 6
    assert "note" not in ct.meta


def test_dicom_rescale_slope_may_differ_between_slices(tmp_path):
    write_dicom_series(tmp_path / "a", slope=0.5)
    write_dicom_series(tmp_path / "b", slope=[0.5, 0.25, 1.0, 0.5, 0.125, 0.5])
    np.testing.assert_array_equal(read_ct(tmp_path / "b").data, read_ct(tmp_path / "a").data)


def test_dicom_single_file_reads_its_whole_series(tmp_path):
    write_dicom_series(tmp_path / "series")
    one_file = sorted((tmp_path / "series").iterdir())[2]
    ct = read_ct(one_file)
    assert ct.shape == (6, 9, 8)
    np.testing.assert_array_equal(ct.data, read_ct(tmp_path / "series").data)


def test_dicom_directory_with_two_series_reads_the_largest(tmp_path):
    big = write_dicom_series(tmp_path / "d" / "a", n_slices=6)
    write_dicom_series(tmp_path / "d" / "b", n_slices=3)
    for f in [*(tmp_path / "d" / "a").iterdir(), *(tmp_path / "d" / "b").iterdir()]:
        f.rename(tmp_path / "d" / f"{f.parent.name}_{f.name}")
    ct = read_ct(tmp_path / "d")
    assert ct.shape[0] == 6 and ct.meta["series_uid"] == big["uid"]
    assert "2 series" in ct.meta["note"] and "3 slices" in ct.meta["note"]


def test_mr_series_refused(tmp_path):
    write_dicom_series(tmp_path / "mr", modality="MR")
    with pytest.raises(InputError, match=r"mr: is an MR series, not CT"):
        read_ct(tmp_path / "mr")


def test_missing_slice_refused(tmp_path):
    write_dicom_series(tmp_path / "gap", skip=3)
    with pytest.raises(InputError, match=r"gap.*slice spacing.*2\.5 mm \(x3\), 5 mm \(x1\)"):
        read_ct(tmp_path / "gap")


def test_gantry_tilt_refused(tmp_path):
    write_dicom_series(tmp_path / "tilt", shear_mm=0.4)
    with pytest.raises(InputError, match="gantry tilt"):
        read_ct(tmp_path / "tilt")


def test_empty_dicom_directory_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM images"):
        read_ct(tmp_path)


# --------------------------------------------------------------------------- bad files


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(np.random.default_rng(2).bytes(4000))
    with pytest.raises(InputError, match=r"broken\.nii\.gz.*cannot be read"):
        read_ct(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_refused(tmp_path, suffix):
    write_volume(ct_volume(), tmp_path / f"ct{suffix}")
    raw = (tmp_path / f"ct{suffix}").read_bytes()
    (tmp_path / f"ct{suffix}").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        read_ct(tmp_path / f"ct{suffix}")


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: file not found"):
        read_ct(tmp_path / "nothere.nii.gz")
    (tmp_path / "ct.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match=r"ct\.png: unsupported.*\.nii\.gz.*\.nrrd.*\.mha"):
        read_ct(tmp_path / "ct.png")
    with pytest.raises(InputError, match="cannot write"):
        write_volume(ct_volume(), tmp_path / "ct.png")


def test_2d_image_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match=r"flat\.nrrd: is a 2D image of size 8 x 9"):
        read_ct(tmp_path / "flat.nrrd")


def test_vector_image_refused_and_single_time_point_accepted(tmp_path):
    sitk.WriteImage(sitk.Image([8, 9, 10], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="3 values per voxel"):
        read_ct(tmp_path / "rgb.mha")
    image = sitk.JoinSeries(volume_to_sitk(ct_volume()))  # 4D, one time point
    sitk.WriteImage(image, str(tmp_path / "t.nrrd"))
    ct = read_ct(tmp_path / "t.nrrd")
    assert ct.shape == SHAPE
    np.testing.assert_allclose(ct.affine, ct_volume().affine, atol=1e-9)


def test_uncompressed_nifti_named_gz_is_read(tmp_path):
    write_volume(ct_volume(), tmp_path / "ct.nii")
    (tmp_path / "ct.nii").rename(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nii.gz").data, ct_volume().data)


def test_zero_nifti_spacing_refused(tmp_path):
    write_volume(ct_volume(), tmp_path / "ct.nii")
    raw = bytearray((tmp_path / "ct.nii").read_bytes())
    struct.pack_into("<f", raw, 80, 0.0)  # pixdim[1]; ITK would silently read 1 mm
    (tmp_path / "ct.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"ct\.nii: voxel spacing pixdim\[1\] is 0"):
        read_ct(tmp_path / "ct.nii")


def test_nifti_without_orientation_refused(tmp_path):
    write_volume(ct_volume(), tmp_path / "ct.nii")
    raw = bytearray((tmp_path / "ct.nii").read_bytes())
    struct.pack_into("<hh", raw, 252, 0, 0)  # qform_code, sform_code
    (tmp_path / "ct.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="qform_code and sform_code are both 0"):
        read_ct(tmp_path / "ct.nii")


def test_nrrd_without_spacing_refused(tmp_path):
    path = tmp_path / "ct.nrrd"
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 8 9 10\nencoding: raw\nendian: little\n\n"
    path.write_bytes(header.encode() + ct_volume().data.astype("<i2").tobytes())
    with pytest.raises(InputError, match="space directions"):
        read_ct(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full(SHAPE, 40.0), "same value"),
        (np.full(SHAPE, -1000.0) + np.arange(10)[:, None, None], "no tissue"),
        (np.linspace(-1000.0, 1e6, np.prod(SHAPE)).reshape(SHAPE), "far outside"),
    ],
)
def test_absurd_hu_refused(tmp_path, values, message):
    write_volume(ct_volume(values.astype(np.float32)), tmp_path / "ct.mha")
    with pytest.raises(InputError, match=message):
        read_ct(tmp_path / "ct.mha")


@pytest.mark.parametrize("padding_hu", [-3024.0, -33792.0])
def test_real_ct_padding_values_accepted(tmp_path, padding_hu):
    data = ct_volume().data.copy()
    data[:, :, 0] = padding_hu  # outside the reconstruction circle
    write_volume(ct_volume(data), tmp_path / "ct.mha")
    assert read_ct(tmp_path / "ct.mha").data.min() == padding_hu


def test_no_air_or_fat_warns(tmp_path):
    data = np.linspace(0.0, 4095.0, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)
    write_volume(ct_volume(data), tmp_path / "raw.mha")
    with pytest.warns(UserWarning, match="no air or fat"):
        read_ct(tmp_path / "raw.mha")
