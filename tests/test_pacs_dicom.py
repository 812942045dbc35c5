"""DICOM outputs (TID 1500 SR, Secondary Capture) and batch input of `xbmd estimate`.

The bundled model on the shipped DICOM sample; the SR and SC must pass dciodvfy (dicom3tools,
installed by `make test`) with no error and read back to the numbers of result.json.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.estimation.estimator import Estimator
from xbmd.estimation.result import HipResult
from xbmd.io.inputs import InputFilter, gather_inputs
from xbmd.io.xray_write import write_xray_dicom
from xbmd.pacs import codes
from xbmd.pacs.outputs import dicom_outputs, read_header, to_bytes
from xbmd.pacs.render import BANNER_COLOUR
from xbmd.pacs.sr import read_sr

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "hip_vq0002.dcm"
runner = CliRunner()


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (warnings are allowed)."""
    assert shutil.which("dciodvfy"), "dciodvfy missing: `make test` installs dicom3tools"
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def estimated():
    estimator = Estimator()
    return estimator.estimate(SAMPLE)


@pytest.fixture(scope="module")
def outputs(estimated):
    return dicom_outputs(read_header(SAMPLE), estimated)


def test_codes_fit_their_value_representations():
    """Code Meaning is LO (64 characters); private codes are in the declared scheme."""
    for key in codes.MEASUREMENTS:
        assert len(codes.concept(key).meaning) <= 64, key
    for code in (codes.TITLE, codes.METHOD, codes.FINDING_TYPE, codes.WHO_CATEGORY):
        assert len(code.meaning) <= 64 and code.scheme_designator == codes.SCHEME
    assert all(len(c.meaning) <= 64 for c in codes.WHO_CATEGORIES.values())


def test_sr_and_sc_pass_dciodvfy(outputs, tmp_path):
    for name, ds in (("sr", outputs.sr), ("sc", outputs.sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(to_bytes(ds))
        assert dciodvfy_errors(path) == [], name


def test_sr_reads_back_to_the_results(estimated, outputs):
    source = read_header(SAMPLE)
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(outputs.sr)))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY",
        "UNVERIFIED",
        "COMPLETE",
    )
    assert "RESEARCH USE ONLY" in sr.SeriesDescription
    assert sr.PatientID == source.PatientID
    hips = read_sr(sr)
    assert [h["side"] for h in hips] == [r.side for r in estimated]
    for hip, r in zip(hips, estimated, strict=True):
        d = r.to_dict()
        for key in ("bmd_g_cm2", "t_score", "z_score", "bmd_drr_g_cm2", "qct_vbmd_mg_cm3"):
            assert hip[key] == pytest.approx(d[key], abs=1e-9), key
        assert hip["units"]["bmd_g_cm2"] == "g/cm2" and hip["units"]["t_score"] == "1"
        assert hip["who_category"] == d["who_category"]
        assert hip["confident"] is d["confident"]
        assert hip["warnings"] == d["warnings"]
        assert d["reference"]["name"] in hip["reference"]
        assert hip["intended_use"] == codes.RESEARCH_USE_ONLY
        assert hip["source_sop_instance_uid"] == source.SOPInstanceUID
    # highdicom reads the same tree as a TID 1500 report
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(estimated)
    for group, r in zip(groups, estimated, strict=True):
        values = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values["bmd_g_cm2"] == (pytest.approx(r.to_dict()["bmd_g_cm2"]), "g/cm2")
        assert group.finding_sites[0].value.value == codes.HIP_JOINT.value
        assert group.finding_sites[0].laterality.meaning == r.side.capitalize()
        assert group.method.value == codes.METHOD.value  # not a DXA code


def test_optional_result_keys_reach_the_sr(estimated, monkeypatch):
    """Keys the estimator will gain (an interval, new *_g_cm2 numbers) are reported unchanged."""
    plain = HipResult.to_dict

    def with_interval(self):
        d = plain(self)
        d["bmd_interval_g_cm2"] = [round(d["bmd_g_cm2"] - 0.1, 4), round(d["bmd_g_cm2"] + 0.1, 4)]
        d["neck_bmd_g_cm2"] = 0.701
        d["quality_passed"] = False
        return d

    monkeypatch.setattr(HipResult, "to_dict", with_interval)
    out = dicom_outputs(read_header(SAMPLE), estimated)
    hip = read_sr(out.sr)[0]
    d = estimated[0].to_dict()
    assert hip["bmd_interval_g_cm2_lower"] == pytest.approx(d["bmd_interval_g_cm2"][0])
    assert hip["bmd_interval_g_cm2_upper"] == pytest.approx(d["bmd_interval_g_cm2"][1])
    assert (
        hip["neck_bmd_g_cm2"] == pytest.approx(0.701) and hip["units"]["neck_bmd_g_cm2"] == "g/cm2"
    )
    assert hip["quality_passed"] is False


def test_sc_is_the_overlay_with_the_banner(outputs):
    source = read_header(SAMPLE)
    sc = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(outputs.sc)))
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, outputs.sr.SeriesInstanceUID)
    assert sc.BurnedInAnnotation == "YES" and "RESEARCH USE ONLY" in sc.SeriesDescription
    pixels = sc.pixel_array
    assert pixels.shape == outputs.overlay_rgb.shape and pixels.shape[2] == 3
    np.testing.assert_array_equal(pixels, outputs.overlay_rgb)
    top = pixels[:5].reshape(-1, 3)  # the banner's first rows are its red background
    assert np.mean(np.all(top == BANNER_COLOUR, axis=1)) > 0.95
    banner = pixels[:40]
    assert (banner == 255).all(axis=2).any()  # white letters on it


def test_output_uids_are_deterministic(estimated, outputs):
    again = dicom_outputs(read_header(SAMPLE), estimated)
    assert (again.sr_uid, again.sc_uid) == (outputs.sr_uid, outputs.sc_uid)
    assert again.sr.SeriesInstanceUID == outputs.sr.SeriesInstanceUID


# ------------------------------------------------------------------------------------------------
# Batch input


def _dx(path: Path, **extra) -> Path:
    """A tiny DX file (``extra``: attributes to set, e.g. a Body Part Examined)."""
    pixels = (np.arange(64 * 80).reshape(64, 80) % 4096).astype(np.uint16)
    write_xray_dicom(pixels, path, pixel_spacing_mm=0.5, bits_stored=12, extra=extra or None)
    return path


def test_filters_give_reasons():
    f = InputFilter()
    dx = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "Modality": "DX"}
    assert f.reason(dx) is None
    assert f.reason({**dx, "BodyPartExamined": "PELVIS", "ViewPosition": "AP"}) is None
    assert "is not a hip" in f.reason({**dx, "BodyPartExamined": "CHEST"})
    assert "not a frontal view" in f.reason({**dx, "ViewPosition": "LL"})
    assert "Modality CT" in f.reason({**dx, "Modality": "CT"})
    assert "Comprehensive SR" in f.reason({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"})
    strict = InputFilter.from_dict({"allow_missing_body_part": False})
    assert strict.reason(dx) == "no Body Part Examined"
    with pytest.raises(ValueError, match="unknown filter settings: colour"):
        InputFilter.from_dict({"colour": ["red"]})


def test_folders_and_dicomdir_are_gathered_with_reasons(tmp_path):
    from pydicom.fileset import FileSet

    folder = tmp_path / "export"
    hip = _dx(folder / "a" / "hip.dcm", StudyID="1")
    _dx(folder / "a" / "chest.dcm", BodyPartExamined="CHEST", StudyID="2")
    _dx(folder / "b" / "lateral.dcm", ViewPosition="LL")
    (folder / "b" / "notes.txt").write_text("not an image")
    gathered = gather_inputs([folder])
    assert gathered.images == [hip]
    reasons = dict(gathered.skipped)
    assert "CHEST is not a hip" in reasons[str(folder / "a" / "chest.dcm")]
    assert "not a frontal view" in reasons[str(folder / "b" / "lateral.dcm")]
    assert "not an image" in reasons[str(folder / "b" / "notes.txt")]
    # a DICOMDIR stands for the files it indexes
    fileset = FileSet()
    for name in ("hip.dcm", "chest.dcm"):
        fileset.add(pydicom.dcmread(folder / "a" / name))
    media = tmp_path / "media"
    fileset.write(media)
    gathered = gather_inputs([media / "DICOMDIR"])
    assert len(gathered.images) == 1 and len(gathered.skipped) == 1
    assert pydicom.dcmread(gathered.images[0]).SOPInstanceUID == pydicom.dcmread(hip).SOPInstanceUID


def test_estimate_a_folder_with_dicom_out(tmp_path):
    """Folder in (one radiograph, one SR to skip, one text file); SR and SC out, UIDs in
    result.json and results.csv, no figures."""
    folder = tmp_path / "in"
    (folder / "x").mkdir(parents=True)
    shutil.copy(SAMPLE, folder / "x" / "hip.dcm")
    (folder / "readme.txt").write_text("hello")
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    args = ["estimate", str(folder), "--out", str(out), "--dicom-out", str(dicom), "--no-figures"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 files skipped" in result.output
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert [Path(r["file"]).name for r in skipped] == ["readme.txt"]
    source = read_header(SAMPLE)
    r = json.loads((out / "hip" / "right" / "result.json").read_text())
    assert r["study_instance_uid"] == source.StudyInstanceUID
    assert r["sop_instance_uid"] == source.SOPInstanceUID
    assert r["series_instance_uid"] == source.SeriesInstanceUID
    assert r["accession_number"] == (source.get("AccessionNumber") or None)
    assert "overlay_png" not in r and not list(out.rglob("*.png"))
    sr = pydicom.dcmread(r["dicom_sr"])
    assert sr.SOPInstanceUID == r["sr_sop_instance_uid"]
    assert read_sr(sr)[0]["bmd_g_cm2"] == pytest.approx(r["bmd_g_cm2"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["sop_instance_uid"] for row in rows} == {source.SOPInstanceUID}
    # the SR and SC written are themselves skipped when the folder is estimated again
    again = runner.invoke(app, ["estimate", str(dicom), "--out", str(tmp_path / "o2")])
    assert again.exit_code == 1, again.output
    assert "no radiographs to estimate in" in again.output and "(2 files skipped" in again.output


def test_overlay_warp_matches_the_estimators_mapping(estimated):
    """The overlay's PIL warp puts each hip's region where ``xbmd.estimation.result.warp_to_image``
    (the tested mapping of the model grid onto the radiograph) puts it."""
    from xbmd.estimation.result import warp_to_image
    from xbmd.pacs.render import OVERLAY_ALPHA, _hip_layer, radiograph_display

    grey, scale = radiograph_display(estimated[0].xray.pixels)
    for r in estimated:
        alpha = np.asarray(_hip_layer(r, scale, grey.shape))[..., 3] / (255 * OVERLAY_ALPHA)
        origin = (0.5 / scale - 0.5, 0.5 / scale - 0.5)
        region = r.pf_region.astype(np.float32)
        reference = warp_to_image(region, r.model_to_image, grey.shape, origin, 1 / scale)
        assert reference.sum() > 1000  # the region is on the display
        # measured: no pixel differs on the sample; 1 % leaves room for rounding along the edge
        assert np.mean(np.abs(alpha - reference) > 0.5) < 0.01
