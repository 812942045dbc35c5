"""`xbmd prepare` on a tiny virtual cohort: crops, DRRs, labels, mirroring, resuming, failures."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.landmarks import read_landmarks
from xbmd.dataset.format import INDEX_COLUMNS, load_sample
from xbmd.dataset.hip import CROP_PIXEL_MM, CROP_SIZE_PX, HEAD_POSITION, hip_crop
from xbmd.dataset.manifest import read_manifest, write_manifest
from xbmd.dataset.prepare import prepare_dataset
from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry
from xbmd.registration.optimise import RegistrationSettings
from xbmd.synth.cohort import SynthSettings

#: Coarse enough for seconds per case; the same code paths as the 1 mm default.
TINY = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0.0)
HEAD_PX = (HEAD_POSITION[0] * CROP_SIZE_PX, HEAD_POSITION[1] * CROP_SIZE_PX)


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    return tiny_cohort


@pytest.fixture(scope="module")
def dataset(cohort, tmp_path_factory):
    """A dataset these tests may add to (resuming): prepared here, not the shared one."""
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    summary = prepare_dataset(cohort / "manifest.csv", out, use_known_poses=True, progress=False)
    return out, summary


def _index(out):
    return list(csv.DictReader((out / "index.csv").open()))


def _truth(cohort, case_id):
    return json.loads((cohort / "cases" / case_id / "truth.json").read_text())


# ------------------------------------------------------------------------------------------------
# The hip crop alone


@pytest.mark.parametrize("side", ["right", "left"])
def test_crop_pixels_lie_on_the_radiograph_detector(side):
    """Rays are exact: a room point projects to the same detector spot in crop and radiograph."""
    image = PerspectiveGeometry(1150, 980, (700, 900), (0.3, 0.25), principal_point_px=(330, 470))
    crop = hip_crop(image, (300.5, 200.25), side)
    assert crop.mirrored == (side == "left")
    np.testing.assert_allclose(crop.from_image([300.5, 200.25]), HEAD_PX, atol=1e-9)
    points = np.random.default_rng(0).uniform(-120, 120, (20, 3))
    rc = crop.geometry.project(points)
    if crop.mirrored:
        rc[:, 1] = CROP_SIZE_PX - 1 - rc[:, 1]
    np.testing.assert_allclose(rc, crop.from_image(image.project(points)), atol=1e-9)
    np.testing.assert_allclose(crop.to_image(crop.from_image([[5.0, 7.0]])), [[5.0, 7.0]])
    assert crop.geometry.pixel_spacing_mm == (CROP_PIXEL_MM, CROP_PIXEL_MM)


def test_crop_resampling_is_bilinear_mirrored_and_masked():
    image = PerspectiveGeometry(1100, 950, (200, 300), 0.75)  # crop pixel = image pixel
    rows, cols = np.mgrid[0:200, 0:300].astype(np.float32)
    pixels = rows + 1000 * cols  # linear: bilinear sampling is exact
    for side in ("right", "left"):
        crop = hip_crop(image, (60.3, 40.7), side)
        values, valid = crop.resample(pixels)
        assert values.dtype == np.float32 and values.shape == (CROP_SIZE_PX, CROP_SIZE_PX)
        grid = np.stack(np.mgrid[0:CROP_SIZE_PX, 0:CROP_SIZE_PX], axis=-1)
        r, c = np.moveaxis(crop.to_image(grid), -1, 0)
        inside = (r >= 0) & (r <= 199) & (c >= 0) & (c <= 299)
        core = valid & (r > 3) & (r < 196) & (c > 3) & (c < 296)  # away from the field margin
        np.testing.assert_allclose(values[core], (r + 1000 * c)[core], rtol=1e-5)
        assert not valid[~inside].any() and np.all(values[~valid] == 0)
        # the hip's lateral side is on the crop's left (col < head) in both orientations
        lateral_col = 20 if side == "right" else 100
        assert crop.from_image([60.3, lateral_col])[1] < HEAD_PX[1]


# ------------------------------------------------------------------------------------------------
# A dataset from known poses


def test_samples_hold_the_crop_and_its_drrs(dataset):
    out, summary = dataset
    assert summary["samples_written"] == 6 and summary["samples_failed"] == 0
    for row in _index(out):
        sample = load_sample(out / row["file"])
        arrays, meta = sample.arrays, sample.meta
        assert set(arrays) == {"xray", "valid", "bone_drr_g_cm2", "pf_drr_g_cm2", "pf_mask"}
        for name in ("xray", "bone_drr_g_cm2", "pf_drr_g_cm2"):
            assert arrays[name].dtype == np.float32
            assert arrays[name].shape == (CROP_SIZE_PX, CROP_SIZE_PX)
        bone, pf, mask = arrays["bone_drr_g_cm2"], arrays["pf_drr_g_cm2"], arrays["pf_mask"]
        # bone = hemipelvis + whole femur; the rest of the femur's fatty marrow reads a little
        # below 0 mg/cm3 (docs/bmd-definitions.md), so "bone >= PF" holds to a few mg/cm2
        assert np.all(bone >= pf - 0.01)
        assert np.all(pf[~mask] == 0) and 2000 < mask.sum() < 0.5 * mask.size
        assert float(row["bmd_drr_g_cm2"]) == pytest.approx(pf[mask].mean(), rel=1e-5)
        assert 0.3 < float(row["bmd_drr_g_cm2"]) < 2.0
        assert arrays["valid"][mask].mean() == pytest.approx(
            float(row["pf_valid_fraction"]), abs=1e-4
        )
        assert np.all(arrays["xray"][~arrays["valid"]] == 0)
        assert meta["crop"]["geometry"]["size_px"] == [CROP_SIZE_PX, CROP_SIZE_PX]


def test_left_hips_are_mirrored_and_map_back_to_the_radiograph(dataset, cohort):
    out, _ = dataset
    rows = _index(out)
    assert sorted(r["side"] for r in rows) == ["left"] * 3 + ["right"] * 3
    for row in rows:
        meta = load_sample(out / row["file"]).meta
        side = row["side"]
        assert row["mirrored"] == str(side == "left") and meta["mirrored"] == (side == "left")
        lm = meta["landmarks_px"]
        np.testing.assert_allclose(lm["head_center_px"], HEAD_PX, atol=1e-3)
        # canonical orientation: the greater trochanter lateral (left), the lesser one below
        assert lm["greater_trochanter_px"][1] < HEAD_PX[1] - 10
        assert lm["lesser_trochanter_px"][0] > HEAD_PX[0] + 20
        # crop -> radiograph mapping: the truth's projected landmarks
        truth = _truth(cohort, row["case_id"])["xrays"][0]["projected_landmarks"][side]
        to_image = np.asarray(meta["crop"]["crop_to_image"])
        for name in ("head_center_px", "greater_trochanter_px", "neck_center_px"):
            image_rc = to_image @ [*lm[name], 1.0]
            np.testing.assert_allclose(image_rc, truth[name], atol=0.01)


def test_labels_are_the_truth(dataset, cohort):
    out, _ = dataset
    for case in read_manifest(cohort / "manifest.csv"):
        truth = _truth(cohort, case.case_id)["sides"]
        rows = [r for r in _index(out) if r["case_id"] == case.case_id]
        for row in rows:
            ref = truth[row["side"]]
            # the truth uses the scanner's true line; prepare recalibrates from the phantom
            for name in ("ct_abmd_g_cm2", "neck_abmd_g_cm2", "qct_vbmd_mg_cm3"):
                assert float(row[name]) == pytest.approx(ref[name], rel=0.01)
            dxa = case.dxa_g_cm2[f"dxa_total_hip_{row['side']}_g_cm2"]
            assert float(row["dxa_total_hip_g_cm2"]) == pytest.approx(dxa)
            assert row["patient_id"] == case.patient_id and row["sex"] == case.sex
            assert row["pose_source"] == "known" and row["registration_quality"] == "known"


def test_index_summary_and_logs(dataset):
    out, _ = dataset
    rows = _index(out)
    assert tuple(rows[0]) == INDEX_COLUMNS and len(rows) == 6
    assert all((out / r["file"]).exists() for r in rows)
    assert rows[0]["xray"] == "cases/case_VQ0001/xray_01.dcm"  # as written in the manifest
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["samples_in_index"] == 6 and meta["xbmd_version"]
    assert meta["dataset_settings"]["pose_source"] == "known"
    assert list(csv.DictReader((out / "failures.csv").open())) == []
    log = (out / "logs" / "case_VQ0001.log").read_text()
    assert "calibrated" in log and "sample written" in log


def test_a_second_run_resumes(dataset, cohort):
    out, _ = dataset
    index = (out / "index.csv").read_text()
    again = prepare_dataset(cohort / "manifest.csv", out, use_known_poses=True, progress=False)
    assert again["samples_written"] == 0 and again["samples_skipped"] == 6
    assert (out / "index.csv").read_text() == index
    with pytest.raises(InputError, match="other settings"):
        prepare_dataset(cohort / "manifest.csv", out, use_known_poses=False, progress=False)


# ------------------------------------------------------------------------------------------------
# Failures


def test_broken_cases_are_reported_and_the_rest_written(cohort, tmp_path):
    good, other, *_ = read_manifest(cohort / "manifest.csv")
    corrupt = tmp_path / "corrupt_ct.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file" * 100)
    copies = [tmp_path / f"copy_{x.name}" for x in good.xrays]  # one radiograph, one case
    for x, copy in zip(good.xrays, copies, strict=True):
        shutil.copy(x, copy)
    bad_ct = replace(good, case_id="bad_ct", ct=corrupt, xrays=copies)
    missing = tmp_path / "missing.dcm"
    bad_xray = replace(other, case_id="bad_xray", xrays=[missing])
    no_landmarks = replace(other, case_id="no_lm", landmarks=None)
    write_manifest([good, bad_ct, bad_xray, no_landmarks], tmp_path / "manifest.csv")
    out = tmp_path / "dataset"
    result = CliRunner().invoke(
        app,
        ["prepare", str(tmp_path / "manifest.csv"), "--out", str(out), "--known-poses",
         "--workers", "2", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "4 samples written" in result.output and "FAILED bad_ct" in result.output
    failures = {f["case_id"]: f for f in csv.DictReader((out / "failures.csv").open())}
    assert set(failures) == {"bad_ct", "bad_xray"}
    assert (
        failures["bad_ct"]["stage"] == "ct" and "corrupt_ct.nii.gz" in failures["bad_ct"]["error"]
    )
    assert failures["bad_xray"]["stage"] == "xray"
    assert "missing.dcm" in failures["bad_xray"]["error"]
    # without a landmarks file, the landmarks are found from the femur labels, kept, shown
    assert {r["case_id"] for r in _index(out)} == {good.case_id, "no_lm"}
    assert set(read_landmarks(out / "landmarks" / "no_lm.json")) == {"left", "right"}
    assert (out / "qc" / "no_lm_femur_left_landmarks.png").exists()
    assert "landmarks found automatically" in (out / "logs" / "no_lm.log").read_text()
    assert "FAILED" in (out / "logs" / "bad_ct.log").read_text()
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["cases_with_failures"] == 2 and meta["run_settings"]["workers"] == 2
    assert not list(out.rglob("*.partial"))


def test_missing_manifest_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["prepare", str(tmp_path / "nope.csv"), "--out", "x"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'nope.csv'}: no such manifest"


# ------------------------------------------------------------------------------------------------
# Registration instead of known poses


def test_flagged_registrations_fail_unless_kept(cohort, tmp_path):
    """A saved registration (here the truth, with the left femur marked flagged) is reused; its
    flagged hip is an 'untrustworthy registration' failure, written with --keep-flagged."""
    case = read_manifest(cohort / "manifest.csv")[1]
    write_manifest([case], tmp_path / "manifest.csv")
    truth = _truth(cohort, case.case_id)["xrays"][0]
    poses = {n: p | {"similarity": 0.8, "quality": "good"} for n, p in truth["poses"].items()}
    poses["femur_left"] |= {"similarity": 0.2, "quality": "flagged", "reasons": ["too low"]}
    saved = tmp_path / "dataset" / "registrations" / case.case_id / "xray_01.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"geometry": truth["geometry"], "poses": poses}))
    first = prepare_dataset(tmp_path / "manifest.csv", tmp_path / "dataset", progress=False)
    assert first["registrations_reused"] == 1 and first["registrations_run"] == 0
    assert first["samples_written"] == 1 and first["samples_failed"] == 1
    (failure,) = first["failures"]
    assert failure["side"] == "left" and failure["stage"] == "registration"
    assert failure["error"] == "untrustworthy registration: femur_left: too low"
    kept = prepare_dataset(
        tmp_path / "manifest.csv", tmp_path / "dataset", keep_flagged=True, progress=False
    )
    assert kept["samples_written"] == 1 and kept["samples_skipped"] == 1
    quality = {
        r["side"]: (r["registration_quality"], r["similarity"])
        for r in _index(tmp_path / "dataset")
    }
    assert quality == {"right": ("good", "0.8"), "left": ("flagged", "0.2")}


@pytest.mark.slow
def test_registered_poses_are_saved_and_reused(cohort, tmp_path):
    """One radiograph registered through prepare_dataset; a flagged hip is a reported failure,
    the registration JSON is kept and reused, and --keep-flagged then writes every hip."""
    case = read_manifest(cohort / "manifest.csv")[1]  # both hips inside the field
    manifest = tmp_path / "manifest.csv"
    write_manifest([case], manifest)
    out = tmp_path / "dataset"
    # a shorter search than the default (fewer levels and generations) to keep the test short;
    # the quality checks that flag a registration are the default ones
    settings = RegistrationSettings(level_pixels_mm=(3.2, 1.6), cma_starts=1, cma_generations=10)
    first = prepare_dataset(manifest, out, settings=settings, progress=False)
    assert first["registrations_run"] == 1
    saved = json.loads((out / "registrations" / case.case_id / "xray_01.json").read_text())
    assert set(saved["poses"]) == {"pelvis", "femur_right", "femur_left"}
    for failure in first["failures"]:  # flagged by registration.py's own checks
        assert failure["stage"] == "registration"
        assert failure["error"].startswith("untrustworthy registration: ")
    assert first["samples_written"] + first["samples_failed"] == 2
    for row in _index(out):
        assert row["pose_source"] == "registered" and row["registration_quality"] == "good"
        assert float(row["similarity"]) > settings.min_similarity
    again = prepare_dataset(manifest, out, settings=settings, keep_flagged=True, progress=False)
    assert again["registrations_run"] == 0 and again["registrations_reused"] == (
        1 if first["samples_failed"] else 0
    )
    assert len(_index(out)) == 2 and again["samples_failed"] == 0


# ------------------------------------------------------------------------------------------------
# What a corrected manifest changes


def test_another_patients_radiograph_is_refused(cohort, tmp_path):
    own, other, *_ = read_manifest(cohort / "manifest.csv")
    wrong = replace(own, xrays=other.xrays)  # the other patient's radiograph (DICOM Patient ID)
    write_manifest([wrong], tmp_path / "manifest.csv")
    out = tmp_path / "dataset"
    summary = prepare_dataset(tmp_path / "manifest.csv", out, use_known_poses=True, progress=False)
    (failure,) = summary["failures"]
    assert failure["stage"] == "xray" and "Patient ID" in failure["error"]
    assert other.patient_id in failure["error"] and summary["samples_in_index"] == 0


def test_changed_inputs_are_made_again_and_removed_radiographs_leave(cohort, tmp_path):
    own, other, *_ = read_manifest(cohort / "manifest.csv")
    case_dir = tmp_path / "case"
    shutil.copytree(own.ct.parent, case_dir)
    mine = replace(
        own,
        ct=case_dir / own.ct.name,
        labels=case_dir / own.labels.name,
        landmarks=case_dir / own.landmarks.name,
        xrays=[case_dir / x.name for x in own.xrays],
    )
    write_manifest([mine, other], tmp_path / "manifest.csv")
    out = tmp_path / "dataset"
    first = prepare_dataset(tmp_path / "manifest.csv", out, use_known_poses=True, progress=False)
    assert first["samples_written"] == 4
    sidecar = json.loads(next((out / "samples" / mine.case_id).glob("*_left.json")).read_text())
    assert set(sidecar["inputs"]) == {"case", "xray"} and sidecar["patient_check"] == "same"
    # the CT's landmarks file is corrected: that case's samples are made again, not kept
    landmarks = json.loads(mine.landmarks.read_text())
    mine.landmarks.write_text(json.dumps(landmarks, indent=2))  # same content, other bytes
    again = prepare_dataset(tmp_path / "manifest.csv", out, use_known_poses=True, progress=False)
    assert again["samples_written"] == 2 and again["samples_skipped"] == 2
    # the other case leaves the manifest: its samples leave the index and the disk
    write_manifest([mine], tmp_path / "manifest.csv")
    last = prepare_dataset(tmp_path / "manifest.csv", out, use_known_poses=True, progress=False)
    assert last["samples_removed"] == 2 and last["samples_in_index"] == 2
    assert {r["case_id"] for r in _index(out)} == {mine.case_id}
    assert not (out / "samples" / other.case_id).exists()
    assert not (out / "radiographs" / other.case_id).exists()


def test_a_radiograph_listed_twice_is_reported_once(cohort, tmp_path):
    own, other, *_ = read_manifest(cohort / "manifest.csv")
    twice = replace(other, xrays=[*own.xrays])  # own's radiograph again, in another case
    write_manifest([own, twice], tmp_path / "manifest.csv")
    summary = prepare_dataset(
        tmp_path / "manifest.csv", tmp_path / "dataset", use_known_poses=True, progress=False
    )
    (failure,) = summary["failures"]
    assert failure["stage"] == "manifest" and "listed twice" in failure["error"]
    assert summary["samples_in_index"] == 2
