"""TotalSegmentator outputs and DICOM SEG as label maps; the totalsegmentator preset."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from xbmd.dataset.manifest import parse_label_map
from xbmd.errors import InputError
from xbmd.io.ct import read_ct, read_labels, write_volume
from xbmd.io.totalseg import TOTALSEGMENTATOR_LABEL_MAP, is_segmentation_source
from xbmd.registration.scene import build_scene
from xbmd.volume import Volume

SHAPE = (6, 16, 20)  # (K, J, I)


def _ct_series(folder) -> list[pydicom.Dataset]:
    """A 6-slice CT series (1.0 x 1.5 x 2.0 mm voxels) written to ``folder``."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(SHAPE[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientSex = "CT", "Test^T", "P1", "F"
        ds.PatientBirthDate = ds.ReferringPhysicianName = ds.AccessionNumber = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, k + 1, "test"
        ds.ImagePositionPatient = [-10.0, -12.0, 5.0 + 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.5, 1.0], 2.0
        ds.Rows, ds.Columns = SHAPE[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full(SHAPE[1:], -1000 + 300 * k, np.int16).tobytes()
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
        out.append(pydicom.dcmread(folder / f"s{k}.dcm"))
    return out


def _masks() -> dict[str, np.ndarray]:
    a, b = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    a[1:4, 2:6, 3:9] = 1
    b[2:5, 8:12, 10:15] = 1
    return {"femur_left": a, "Hip Left": b}


def _write_seg(slices, masks, path) -> None:
    import highdicom as hd

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(
                "91723000", "SCT", "Anatomical Structure"
            ),
            segmented_property_type=hd.sr.CodedConcept("272673000", "SCT", "Bone"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="test", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual")
            ),
        )
        for n, name in enumerate(masks, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=slices,
        pixel_array=np.stack(list(masks.values()), axis=-1),
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )  # empty frames (slices 0 and 5) are omitted: the SEG's grid is smaller than the CT's
    seg.save_as(path)


def test_dicom_seg_is_read_onto_the_ct_grid_with_totalsegmentator_ids(tmp_path):
    slices = _ct_series(tmp_path / "ct")
    _write_seg(slices, _masks(), tmp_path / "seg.dcm")
    ct = read_ct(tmp_path / "ct")
    assert is_segmentation_source(tmp_path / "seg.dcm")
    labels = read_labels(tmp_path / "seg.dcm", reference=ct)
    assert labels.same_grid(ct) and labels.unit == "label"
    masks = _masks()
    np.testing.assert_array_equal(labels.data == 75, masks["femur_left"] == 1)
    np.testing.assert_array_equal(labels.data == 77, masks["Hip Left"] == 1)  # case, spaces
    (tmp_path / "segdir").mkdir()
    (tmp_path / "segdir" / "seg.dcm").write_bytes((tmp_path / "seg.dcm").read_bytes())
    again = read_labels(tmp_path / "segdir", reference=ct)  # a folder holding the SEG
    np.testing.assert_array_equal(again.data, labels.data)


def test_a_seg_of_unknown_structures_is_refused(tmp_path):
    slices = _ct_series(tmp_path / "ct")
    _write_seg(slices, {"liver tumour": _masks()["femur_left"]}, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match=r"none of the SEG's segments \['liver tumour'\]"):
        read_labels(tmp_path / "seg.dcm")


def _volume(data, unit="label") -> Volume:
    return Volume.from_geometry(data, (1.0, 1.5, 2.0), (-10.0, -12.0, 5.0), unit=unit)


def test_totalsegmentator_folder_is_one_label_map(tmp_path):
    ct = _volume(np.full(SHAPE, 40.0, np.float32), unit="HU")
    out = tmp_path / "seg"
    out.mkdir()
    masks = {
        "femur_left": (slice(1, 4), slice(2, 6), slice(3, 9)),
        "sacrum": (slice(0, 2), slice(0, 3), slice(0, 3)),
        "gluteus_maximus_right": (slice(4, 6), slice(10, 14), slice(12, 18)),
        "skeletal_muscle": (slice(3, 6), slice(8, 16), slice(10, 20)),  # tissue_types task
        "liver": (slice(0, 6), slice(14, 16), slice(0, 20)),  # known to TS, not read by xbmd
    }
    for name, box in masks.items():
        data = np.zeros(SHAPE, np.uint8)
        data[box] = 1
        write_volume(_volume(data), out / f"{name}.nii.gz")
    (out / "notes.txt").write_text("not a mask")
    labels = read_labels(out, reference=ct)
    assert labels.same_grid(ct)
    values = set(np.unique(labels.data).tolist())
    assert values == {0, 75, 25, 81, 253}
    assert (labels.data[4:6, 10:14, 12:18] == 81).all()  # the muscle's own id wins over 253
    assert labels.meta["format"] == "totalsegmentator-folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_volume(_volume(np.zeros(SHAPE, np.uint8)), empty / "kidney.nii.gz")
    with pytest.raises(InputError, match="no mask of a known structure"):
        read_labels(empty)
    other = _volume(np.zeros((6, 16, 21), np.uint8))
    write_volume(other, out / "femur_right.nii.gz")
    with pytest.raises(InputError, match=r"femur_right\.nii\.gz: label grid shape"):
        read_labels(out, reference=ct)


def test_preset_names_the_bones_and_the_sacrum_joins_the_pelvis():
    label_map = parse_label_map("totalsegmentator")
    assert label_map == TOTALSEGMENTATOR_LABEL_MAP
    assert label_map["femur_left"] == 75 and label_map["pelvis_right"] == 78
    assert parse_label_map("pelvis_left=2;sacrum=5") == {"pelvis_left": 2, "sacrum": 5}
    data = np.zeros((30, 30, 40), np.uint8)  # a --ml file: TotalSegmentator ids in one map
    data[20:28, 5:25, 5:35] = 25  # sacrum
    data[10:20, 5:25, 2:15] = 78  # hip_right
    data[10:20, 5:25, 25:38] = 77  # hip_left
    data[0:10, 8:20, 3:12] = 76  # femur_right
    data[0:10, 8:20, 28:37] = 75  # femur_left
    labels = Volume.from_geometry(data, (2.0, 2.0, 2.0), unit="label")
    ct = labels.with_data(np.where(data > 0, 400.0, 0.0).astype(np.float32), unit="HU")
    scene = build_scene(ct, labels, label_map)
    assert set(scene.label_ids["pelvis"]) == {77, 78, 25}
    assert scene.label_ids["femur_left"] == (75,)
