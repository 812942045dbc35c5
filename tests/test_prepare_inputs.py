"""Radiographs of every format in `xbmd prepare`: the manifest's spacing, SDD and SOD columns."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from xbmd.dataset.manifest import RadiographInfo, read_manifest, write_manifest
from xbmd.dataset.prepare import prepare_dataset
from xbmd.dataset.radiograph import read_case_xray
from xbmd.errors import InputError
from xbmd.io.xray import read_xray, xray_geometry


def _png_case(cohort, info: RadiographInfo | None):
    """The first tiny case with its PNG radiographs instead of the DICOMs."""
    case = read_manifest(cohort / "manifest.csv")[0]
    pngs = [x.with_suffix(".png") for x in case.xrays]
    infos = {str(p): info for p in pngs} if info else {}
    return replace(case, xrays=pngs, radiographs=infos)


def test_a_png_without_spacing_is_refused_with_the_column_to_fill(tiny_cohort, tmp_path):
    write_manifest([_png_case(tiny_cohort, None)], tmp_path / "manifest.csv")
    summary = prepare_dataset(
        tmp_path / "manifest.csv", tmp_path / "ds", use_known_poses=True, progress=False
    )
    (failure,) = summary["failures"]
    assert failure["stage"] == "xray" and summary["samples_in_index"] == 0
    assert (
        "xray_01.png" in failure["error"]
        and "PNG radiograph has no pixel spacing" in (failure["error"])
    )
    assert "xray_pixel_spacing_mm" in failure["error"]


def test_a_png_with_the_manifest_geometry_is_prepared(tiny_cohort, tmp_path):
    dicom = read_xray(read_manifest(tiny_cohort / "manifest.csv")[0].xrays[0])
    info = RadiographInfo(dicom.pixel_spacing_mm, dicom.meta["sdd_mm"], dicom.meta["sod_mm"])
    write_manifest([_png_case(tiny_cohort, info)], tmp_path / "manifest.csv")
    summary = prepare_dataset(
        tmp_path / "manifest.csv", tmp_path / "ds", use_known_poses=True, progress=False
    )
    assert summary["samples_failed"] == 0 and summary["samples_written"] == 2
    sidecar = json.loads(next((tmp_path / "ds" / "samples").rglob("*_left.json")).read_text())
    assert sidecar["xray"].endswith("xray_01.png") and sidecar["xray_spacing_source"] == "user"
    assert sidecar["xray_manifest"]["pixel_spacing_mm"] == list(dicom.pixel_spacing_mm)
    assert set(sidecar["inputs"]) == {"case", "xray", "xray_geometry"}
    # a changed spacing in the manifest makes the samples again
    other = replace(info, pixel_spacing_mm=(1.7, 1.7))
    write_manifest([_png_case(tiny_cohort, other)], tmp_path / "manifest.csv")
    again = prepare_dataset(
        tmp_path / "manifest.csv", tmp_path / "ds", use_known_poses=True, progress=False
    )
    assert again["samples_written"] == 2 and again["samples_skipped"] == 0


def test_the_manifest_gives_a_png_the_geometry_of_its_dicom_twin(tiny_cohort):
    case = read_manifest(tiny_cohort / "manifest.csv")[0]
    dicom = read_xray(case.xrays[0])
    info = RadiographInfo(dicom.pixel_spacing_mm, dicom.meta["sdd_mm"], dicom.meta["sod_mm"])
    png = read_case_xray(case.xrays[0].with_suffix(".png"), info)
    (geo_png, warn_png), (geo_dcm, warn_dcm) = xray_geometry(png), xray_geometry(dicom)
    assert geo_png.to_dict() == geo_dcm.to_dict() and warn_png == warn_dcm == []
    # without distances, the geometry is assumed and says so
    bare = read_case_xray(case.xrays[0].with_suffix(".png"), RadiographInfo((1.6, 1.6)))
    geometry, warnings = xray_geometry(bare)
    assert geometry.sdd_mm == 1100.0 and len(warnings) == 2


def test_manifest_distances_override_the_dicom_and_say_so(tiny_cohort):
    path = read_manifest(tiny_cohort / "manifest.csv")[0].xrays[0]
    dicom = read_xray(path)
    xray = read_case_xray(path, RadiographInfo(sdd_mm=1200.0))
    assert xray.meta["sdd_mm"] == 1200.0 and xray.meta["file_sdd_mm"] == dicom.meta["sdd_mm"]
    assert xray.meta["sod_mm"] == dicom.meta["sod_mm"]  # still below the new SDD: kept
    assert any("xray_sdd_mm 1200 mm overrides" in w for w in xray.warnings)
    assert xray.spacing_source == "ImagerPixelSpacing"  # no spacing given: the file's
    close = read_case_xray(path, RadiographInfo(sdd_mm=dicom.meta["sdd_mm"] * 1.005))
    assert not any("overrides" in w for w in close.warnings)  # within 1 %: not worth a word
    np.testing.assert_array_equal(xray.pixels, dicom.pixels)


def test_a_tiff_without_spacing_names_its_format(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "hip.tif", np.zeros((20, 30), np.uint16))
    with pytest.raises(InputError, match=r"hip.tif: this TIFF radiograph has no pixel spacing"):
        read_case_xray(tmp_path / "hip.tif")
    xray = read_case_xray(tmp_path / "hip.tif", RadiographInfo((0.2, 0.2)))
    assert xray.pixel_spacing_mm == (0.2, 0.2) and xray.spacing_source == "user"


def test_prepare_draws_each_registration_next_to_its_json(tiny_cohort, tmp_path):
    """A saved registration (here the truth) reused by prepare gets its QC overlay: each bone's
    outline in its own colour, where the truth projects it."""
    from PIL import Image

    from xbmd.registration.overlay import COLOURS

    case = read_manifest(tiny_cohort / "manifest.csv")[1]
    write_manifest([case], tmp_path / "manifest.csv")
    truth = json.loads(case.known_poses.read_text())["xrays"][0]
    poses = {n: p | {"similarity": 0.8, "quality": "good"} for n, p in truth["poses"].items()}
    saved = tmp_path / "ds" / "registrations" / case.case_id / "xray_01.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"geometry": truth["geometry"], "poses": poses}))
    summary = prepare_dataset(tmp_path / "manifest.csv", tmp_path / "ds", progress=False)
    assert summary["samples_written"] == 2
    overlay = saved.with_suffix(".png")
    rgb = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
    assert rgb.shape[:2] == tuple(truth["geometry"]["size_px"])
    rows, cols = np.indices(rgb.shape[:2])
    for side in ("left", "right"):
        colour = np.array(COLOURS[f"femur_{side}"])
        outline = np.all(rgb == colour, axis=-1) & (rows > 60)  # below the text lines
        head = np.array(truth["projected_landmarks"][side]["head_center_px"])
        near = np.hypot(rows - head[0], cols - head[1]) < 40 / 1.6  # within 40 mm of the head
        # the outline of the femur runs around its head: a good part of it lies near there
        assert (outline & near).sum() > 20, side
    sidecar = json.loads(next((tmp_path / "ds" / "samples").rglob("*_left.json")).read_text())
    assert sidecar["registration"]["overlay"] == f"registrations/{case.case_id}/xray_01.png"
    # kept on a re-run; drawn again when missing
    mtime = overlay.stat().st_mtime_ns
    prepare_dataset(tmp_path / "manifest.csv", tmp_path / "ds", progress=False)
    assert overlay.stat().st_mtime_ns == mtime
