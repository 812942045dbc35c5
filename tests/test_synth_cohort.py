"""`xbmd synth` end to end on a tiny, coarse cohort: files, truth self-consistency, failures."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.calibration import load_phantom, phantom_calibration
from xbmd.ct.femur import measure_femur
from xbmd.ct.landmarks import read_landmarks
from xbmd.dataset.manifest import read_manifest
from xbmd.errors import InputError
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray
from xbmd.synth import anatomy as anatomy_mod
from xbmd.synth import cohort as cohort_mod
from xbmd.synth.cohort import FEMUR_LABEL, SynthSettings, generate_cohort

#: Coarse enough for seconds per case; the same code paths as the 1 mm default.
TINY = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=2, phantomless_fraction=0.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(out, cases=2, seed=11, settings=TINY, workers=1, progress=False)
    return out, summary


def test_cohort_files_and_manifest(cohort):
    out, summary = cohort
    assert summary["succeeded"] == 2 and summary["failed"] == []
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["format"] == "xbmd-virtual-cohort" and meta["status"] == "done"
    assert meta["seed"] == 11 and meta["settings"] == meta["identity"]["settings"]
    # the settings added later (sessions, implants, ...) are recorded only when not default
    assert meta["identity"] == {"seed": 11, "settings": TINY.record()}
    assert TINY.record() == {
        k: v for k, v in dataclasses.asdict(TINY).items() if k not in cohort_mod.LATER_SETTINGS
    }
    cases = read_manifest(out / "manifest.csv")
    assert len(cases) == 2
    for case in cases:
        assert case.ct.exists() and case.labels.exists() and case.landmarks.exists()
        assert case.calibration == "phantom" and len(case.xrays) == TINY.poses
        assert all(x.exists() and x.with_suffix(".png").exists() for x in case.xrays)
        assert set(case.dxa_g_cm2) == {
            "dxa_total_hip_left_g_cm2",
            "dxa_total_hip_right_g_cm2",
            "dxa_neck_left_g_cm2",
            "dxa_neck_right_g_cm2",
        }
        xray = read_xray(case.xrays[0])
        assert xray.meta["modality"] == "DX" and xray.spacing_source != "none"
        assert xray.pixel_spacing_mm == pytest.approx((TINY.xray_spacing_mm,) * 2)
    rows = list(csv.DictReader((out / "dxa.csv").open()))
    assert len(rows) == 4 and {r["side"] for r in rows} == {"left", "right"}


def test_truth_is_consistent_with_the_written_files(cohort):
    """ct_abmd recomputed from CT + labels + phantom with our own calibration: within 0.5 %."""
    out, _ = cohort
    for truth_path in sorted((out / "cases").glob("*/truth.json")):
        case_dir = truth_path.parent
        truth = json.loads(truth_path.read_text())
        ct = read_ct(case_dir / "ct.nii.gz")
        labels = read_labels(case_dir / "labels.nii.gz", ct)
        cal = phantom_calibration(ct, labels, load_phantom(case_dir / "phantom.json"))
        assert max(abs(r) for r in cal.residuals_mg_cm3.values()) < 2.0
        landmarks = read_landmarks(case_dir / "landmarks.json")
        density = cal.apply(ct)
        for side in ("left", "right"):
            bmd = measure_femur(density, labels, FEMUR_LABEL[side], landmarks[side])
            ref = truth["sides"][side]
            assert bmd.ct_abmd_g_cm2 == pytest.approx(ref["ct_abmd_g_cm2"], rel=0.005)
            # vBMD: a 2 mg/cm3 intercept error of the 3 mm test phantom is 0.5 % of it
            assert bmd.qct_vbmd_mg_cm3 == pytest.approx(ref["qct_vbmd_mg_cm3"], rel=0.01)
            # the drawn target is hit (blur and noise are in the measure)
            assert ref["ct_abmd_g_cm2"] == pytest.approx(ref["target_abmd_g_cm2"], rel=0.03)
        assert len(truth["xrays"]) == TINY.poses
        for record in truth["xrays"]:
            assert set(record["poses"]) == {"pelvis", "femur_left", "femur_right"}
            rows, cols = record["geometry"]["size_px"]
            for side in ("left", "right"):
                r, c = record["projected_landmarks"][side]["head_center_px"]
                assert 0 <= r < rows and 0 <= c < cols
            # patient's right femur on the image left
            right = record["projected_landmarks"]["right"]["head_center_px"][1]
            assert right < record["projected_landmarks"]["left"]["head_center_px"][1]


def test_same_seed_same_case(cohort, tmp_path):
    out, _ = cohort
    again = generate_cohort(tmp_path, cases=1, seed=11, settings=TINY, workers=1, progress=False)
    assert again["succeeded"] == 1
    first = sorted((out / "cases").iterdir())[0]
    second = sorted((tmp_path / "cases").iterdir())[0]
    assert first.name == second.name
    np.testing.assert_array_equal(
        read_ct(first / "ct.nii.gz").data, read_ct(second / "ct.nii.gz").data
    )
    np.testing.assert_array_equal(
        read_xray(first / "xray_02.dcm").pixels, read_xray(second / "xray_02.dcm").pixels
    )


def test_failing_case_is_reported_and_the_rest_written(tmp_path, monkeypatch):
    real = anatomy_mod.build_anatomy

    def flaky(patient, *args, **kwargs):
        if patient.patient_id == "VQ0002":
            raise RuntimeError("simulated crash")
        return real(patient, *args, **kwargs)

    monkeypatch.setattr(anatomy_mod, "build_anatomy", flaky)
    result = CliRunner().invoke(
        app,
        [
            "synth", "--out", str(tmp_path / "c"), "--cases", "2", "--seed", "11",
            "--poses", "1", "--ct-spacing", "3", "--xray-spacing", "1.6", "--workers", "1",
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "FAILED case_VQ0002: RuntimeError: simulated crash" in result.output
    assert [c.case_id for c in read_manifest(tmp_path / "c" / "manifest.csv")] == ["case_VQ0001"]
    meta = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert meta["failed"][0]["case_id"] == "case_VQ0002"
    assert not any(p.name.startswith(".") for p in (tmp_path / "c" / "cases").iterdir())


def test_refuses_a_folder_of_another_cohort(cohort):
    out, _ = cohort
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--cases", "1", "--seed", "12"])
    assert result.exit_code == 1
    assert "other settings" in result.output and len(result.output.strip().splitlines()) == 1


_REAL_RUN_CASE = cohort_mod._run_case


def _dies_on_the_second_case(patient, settings, out):
    """Stands for ``cohort._run_case`` in the worker processes: the process running VQ0002 dies
    (as when killed, or out of memory) with its temporary folder half written."""
    if patient.patient_id == "VQ0002":
        half = out / "cases" / ".case_VQ0002.partial"
        half.mkdir(parents=True)
        (half / "ct.nii.gz").write_bytes(b"half a CT")
        os._exit(9)
    return _REAL_RUN_CASE(patient, settings, out)


def test_a_dead_worker_fails_its_case_and_the_rest_is_written(tmp_path, monkeypatch):
    """Two cases on two worker processes; the one running VQ0002 dies. VQ0001, running beside
    it, is written; VQ0002 is listed as failed and leaves nothing behind."""
    monkeypatch.setattr(cohort_mod, "_run_case", _dies_on_the_second_case)
    out = tmp_path / "c"
    settings = replace(TINY, poses=1)
    summary = generate_cohort(out, cases=2, seed=11, settings=settings, workers=2, progress=False)
    assert summary["succeeded"] == 1
    assert summary["failed"] == [
        {"case_id": "case_VQ0002", "error": "its worker process died (killed, or out of memory)"}
    ]
    assert json.loads((out / "cohort.json").read_text())["failed"] == summary["failed"]
    assert [c.case_id for c in read_manifest(out / "manifest.csv")] == ["case_VQ0001"]
    assert [p.name for p in (out / "cases").iterdir()] == ["case_VQ0001"]


def test_a_cohort_made_before_the_stage_marker_resumes(cohort, tmp_path):
    """A cohort.json as written before cohort folders were claimed through xbmd.stages (seed
    and settings, no identity) resumes with the same seed and settings, and only with them."""
    out, _ = cohort
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "cohort.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("identity", "status")}
    (old / "cohort.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(InputError, match="other settings"):
        generate_cohort(old, cases=2, seed=12, settings=TINY, workers=1, progress=False)
    cts = sorted(old.glob("cases/*/ct.nii.gz"))
    written = [p.stat().st_mtime_ns for p in cts]
    summary = generate_cohort(old, cases=2, seed=11, settings=TINY, workers=1, progress=False)
    assert summary["succeeded"] == 2
    assert [p.stat().st_mtime_ns for p in cts] == written  # resumed, not made again
    assert (old / "manifest.csv").read_text() == (out / "manifest.csv").read_text()
    assert (old / "dxa.csv").read_text() == (out / "dxa.csv").read_text()
