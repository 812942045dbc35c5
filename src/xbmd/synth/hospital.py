"""A virtual cohort turned into what a hospital has: the test of "real data in, no hand work".

A hospital (or a research group) that wants to train or validate xbmd has, per patient:

- the CT as a **DICOM series** (one file per slice), with the calibration phantom in the field of
  view but **not labelled**;
- the bone segmentation as **TotalSegmentator** writes it by default: a folder with one binary
  NIfTI per structure (``femur_left.nii.gz``, ``hip_right.nii.gz``, ...);
- the hip radiographs as **DX DICOM** from the PACS, or as **PNG** exports without any geometry;
- the DXA results as the **long sheet** a DXA archive exports (one row per patient, exam date,
  side, region, BMD and maker), from more than one DXA system and with older exams;
- **no** femur landmarks, no rod labels, no poses.

:func:`hospital_cohort` writes that for every case of a virtual cohort (``xbmd synth``) with a
case manifest as a group would write it by script (paths, the ``totalsegmentator`` label map,
``phantom`` + ``bmas200``; for PNG radiographs the spacing, SDD, SOD and date columns). The
truth stays in the cohort, so every automatic step (rods, landmarks, registration, DXA import)
can be checked against it. Used by tests/test_hospital.py (the issue-17 end-to-end test) and
benchmarks/bench_hospital.py (each step's wall time).
"""

from __future__ import annotations

import csv
import datetime
import json
import shutil
from pathlib import Path

import numpy as np

from xbmd.dataset.dxa import sbmd_table
from xbmd.dataset.manifest import ManifestCase, RadiographInfo, read_manifest, write_manifest
from xbmd.volume import Volume

#: xbmd's virtual bone labels -> TotalSegmentator's structure files.
TOTALSEG_FILES = {
    "femur_left": "femur_left",
    "femur_right": "femur_right",
    "pelvis_left": "hip_left",
    "pelvis_right": "hip_right",
}
#: DXA exam: this many days after the CT; an older exam this many days before it.
DXA_AFTER_CT_DAYS = 21
OLD_EXAM_DAYS = 3 * 365
#: The CT was taken this many days before the first radiograph.
CT_BEFORE_XRAY_DAYS = 12
SHEET_COLUMNS = ("PatientID", "ExamDate", "Side", "Region", "BMD (g/cm2)", "Manufacturer")


def write_ct_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    patient_id: str,
    study_date: datetime.date,
    kvp: float | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a CT volume (HU) as a DICOM CT series, one uncompressed file per slice.

    Geometry from the volume's affine: Image Position (Patient) of each slice, Image Orientation
    (Patient) from the first two direction cosines, Pixel Spacing (row spacing, column spacing),
    Slice Thickness; HU stored as int16 with Rescale Slope 1 / Intercept 0. Files are named in
    random order (``xbmd.io.ct`` sorts slices by position, as it must for real series).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine = volume.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir, col_dir = affine[:3, 0] / spacing[0], affine[:3, 1] / spacing[1]
    hu = np.rint(np.asarray(volume.data, dtype=np.float64))
    hu = np.clip(hu, -32768, 32767).astype(np.int16)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    date = study_date.strftime("%Y%m%d")
    order = np.random.default_rng(len(patient_id)).permutation(hu.shape[0])
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, f"VIRTUAL^{patient_id}"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = date
        ds.SeriesDescription = "PELVIS 1.0 (virtual, phantom in the field, unlabelled)"
        ds.Manufacturer = "xbmd virtual scanner"
        if kvp is not None:
            ds.KVP = f"{kvp:g}"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        position = affine @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[row_dir, col_dir]]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row (j), column (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        ds.save_as(folder / f"IM{order[k]:05d}", enforce_file_format=True)
    return folder


def write_totalsegmentator_folder(labels: Volume, label_map: dict[str, int], folder: Path) -> Path:
    """One binary NIfTI per bone, named as TotalSegmentator names them (``TOTALSEG_FILES``);
    other labels (rods, implant metal) are not written."""
    from xbmd.io.ct import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    for bone, name in TOTALSEG_FILES.items():
        mask = (labels.data == label_map[bone]).astype(np.uint8)
        write_volume(Volume(mask, labels.affine, "label"), folder / f"{name}.nii.gz")
    return folder


def finer_in_plane(volume: Volume, factor: int, order: int) -> Volume:
    """The volume with its in-plane pixels ``factor`` times smaller (same extent, same slices):
    linear interpolation (``order=1``) for HU, nearest neighbour (``order=0``) for labels."""
    from scipy import ndimage

    if factor <= 1:
        return volume
    data = ndimage.zoom(
        volume.data, (1, factor, factor), order=order, grid_mode=True, mode="nearest"
    )
    affine = volume.affine.copy()
    offset = 0.5 / factor - 0.5  # the new first pixel centre, in old pixels (grid_mode)
    affine[:3, 3] += (volume.affine[:3, 0] + volume.affine[:3, 1]) * offset
    affine[:3, :2] /= factor
    return Volume(data, affine, volume.unit, volume.source, dict(volume.meta))


def _lunar_from_hologic(hologic_g_cm2: float, region: str) -> float:
    """The Lunar value with the same sBMD as a Hologic one (the inverse of ``convert_bmd``)."""
    c = sbmd_table()["regions"][region]["coefficients"]
    sbmd = c["hologic"]["a"] + c["hologic"]["b"] * hologic_g_cm2
    return (sbmd - c["lunar"]["a"]) / c["lunar"]["b"]


def hospital_cohort(
    cohort: str | Path,
    out: str | Path,
    *,
    png_every: int = 2,
    lunar_every: int = 2,
    ct_pixel_mm: float | None = 1.5,
) -> Path:
    """Write a hospital-format copy of a virtual cohort into ``out``; returns its manifest.

    ``out/ct/<patient>/`` DICOM CT series; ``out/seg/<patient>/`` TotalSegmentator folder;
    ``out/xr/`` radiographs: DX DICOM, or for every ``png_every``-th case (the 2nd, 4th, ...)
    the PNG export; ``out/dxa_export.csv`` the long DXA sheet (total hip and neck of both sides,
    an exam 21 days after the CT and one three years older with 5 % higher values, one spine
    row per exam; every ``lunar_every``-th patient on a GE-Lunar system, whose values are the
    cohort's Hologic-scale DXA converted to Lunar with the sBMD formulas); ``out/manifest.csv``
    without DXA, landmarks or poses. ``out/truth.json`` maps each case to its virtual case folder.

    ``ct_pixel_mm``: CT pixels coarser than this are made finer in-plane (by an integer factor,
    linear interpolation; the labels by nearest neighbour), slices unchanged: the tests' tiny
    cohort has 3 mm pixels, too coarse for the automatic rod detection (``xbmd.ct.rods`` tests
    each rod's edge in bands a fraction of a pixel wide at 3 mm); hospital CTs have 0.6-1 mm.
    """
    from xbmd.io.ct import read_ct, read_labels
    from xbmd.io.xray import read_xray

    cohort, out = Path(cohort), Path(out)
    cases = read_manifest(cohort / "manifest.csv")
    dxa = {(r["case_id"], r["side"]): r for r in csv.DictReader((cohort / "dxa.csv").open())}
    manifest, sheet, truth = [], [], {}
    for n, case in enumerate(cases, start=1):
        patient = case.patient_id
        case_truth = json.loads(case.known_poses.read_text())
        xray_date = _study_date(case.xrays[0])
        ct_date = xray_date - datetime.timedelta(days=CT_BEFORE_XRAY_DAYS)
        ct = read_ct(case.ct)
        labels = read_labels(case.labels, reference=ct)
        if ct_pixel_mm:
            pixel_mm = float(min(ct.spacing_mm[:2]))
            factor = round(pixel_mm / ct_pixel_mm) if pixel_mm > 1.01 * ct_pixel_mm else 1
            ct, labels = finer_in_plane(ct, factor, 1), finer_in_plane(labels, factor, 0)
        ct_dir = write_ct_dicom_series(
            ct,
            out / "ct" / patient,
            patient_id=patient,
            study_date=ct_date,
            kvp=case_truth["ct"]["scanner"]["kvp"],
        )
        seg_dir = write_totalsegmentator_folder(labels, case.label_map, out / "seg" / patient)
        png = png_every > 0 and n % png_every == 0
        xrays, infos = [], {}
        for x in case.xrays:
            if png:
                target = out / "xr" / f"{patient}_{x.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(x.with_suffix(".png"), target)
                dicom = read_xray(x)  # the geometry a group would take from the PACS record
                infos[str(target)] = RadiographInfo(
                    dicom.pixel_spacing_mm,
                    dicom.meta["sdd_mm"],
                    dicom.meta["sod_mm"],
                    _study_date(x),
                )
            else:
                target = out / "xr" / f"{patient}_{x.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(x, target)
            xrays.append(target)
        manifest.append(
            ManifestCase(
                case_id=f"H{n:03d}",
                patient_id=patient,
                ct=ct_dir,
                labels=seg_dir,
                label_map=_preset(),
                calibration="phantom",
                phantom="bmas200",
                xrays=xrays,
                age_years=case.age_years,
                sex=case.sex,
                radiographs=infos,
            )
        )
        truth[f"H{n:03d}"] = {"case": str(case.known_poses.parent), "png": png}
        vendor = "GE Lunar" if lunar_every > 0 and n % lunar_every == 0 else "Hologic"
        exam = ct_date + datetime.timedelta(days=DXA_AFTER_CT_DAYS)
        old = ct_date - datetime.timedelta(days=OLD_EXAM_DAYS)
        for side in ("left", "right"):
            row = dxa.get((case.case_id, side))
            if row is None:  # an implant: DXA does not measure that hip
                continue
            for region, column in (
                ("total_hip", "total_hip_g_cm2"),
                ("neck", "femoral_neck_g_cm2"),
            ):
                hologic = float(row[column])
                for date, factor in ((exam, 1.0), (old, 1.05)):
                    value = hologic * factor
                    if vendor == "GE Lunar":
                        value = _lunar_from_hologic(value, region)
                    sheet.append(
                        [patient, date.isoformat(), side.capitalize(),
                         "Total Hip" if region == "total_hip" else "Femoral Neck",
                         f"{value:.4f}", vendor]
                    )  # fmt: skip
        sheet.append([patient, exam.isoformat(), "", "L1-L4", "1.0123", vendor])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "dxa_export.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(SHEET_COLUMNS)
        writer.writerows(sheet)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    write_manifest(manifest, out / "manifest.csv")
    return out / "manifest.csv"


def _preset() -> dict[str, int]:
    from xbmd.dataset.manifest import parse_label_map

    return parse_label_map("totalsegmentator")


def _study_date(path: Path) -> datetime.date:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return datetime.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
