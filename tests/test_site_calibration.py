"""Site calibration: fitted by `xbmd evaluate` (estimate -> site DXA), applied by a small library
function that `xbmd estimate --site-calibration` calls."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.errors import InputError
from xbmd.estimation.site import (
    CALIBRATED_ESTIMATE,
    SiteCalibration,
    load_site_calibration,
)
from xbmd.evaluation.evaluate import Samples, evaluate
from xbmd.evaluation.site_fit import MIN_HIPS, fit_site_calibration


def _samples(n_hips: int, images_per_hip: int = 2, seed: int = 0) -> Samples:
    """DXA = 0.03 + 1.10 x the estimate (+ 1 % noise per hip); each hip imaged several times
    with its own estimate noise."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.55, 1.05, n_hips)
    dxa = 0.03 + 1.10 * truth * (1 + rng.normal(0, 0.01, n_hips))
    rows, est, ref = [], [], []
    for h in range(n_hips):
        for i in range(images_per_hip):
            rows.append({"sample_id": f"s{h}_{i}", "patient_id": f"p{h}", "side": "left",
                         "hip": f"p{h}/left", "sex": "F", "age_years": ""})  # fmt: skip
            est.append(truth[h] + rng.normal(0, 0.02))
            ref.append(dxa[h])
    return Samples(
        rows,
        {CALIBRATED_ESTIMATE: np.array(est)},
        {"dxa_total_hip_g_cm2": np.array(ref)},
        {CALIBRATED_ESTIMATE: "g/cm2", "dxa_total_hip_g_cm2": "g/cm2"},
    )


@pytest.mark.parametrize("method", ["passing-bablok", "deming"])
def test_the_fit_recovers_the_line_per_hip(method):
    cal, section, reason = fit_site_calibration(_samples(80), method=method)
    assert reason == "" and section["n_hips"] == 80 and section["level"] == "hip"
    # 80 hips, estimate noise 0.02/sqrt(2) per hip: the slope within 0.06 of 1.10 (measured
    # errors 0.01-0.02 for the two methods)
    assert cal.slope == pytest.approx(1.10, abs=0.06)
    assert cal.slope_ci95[0] < cal.slope < cal.slope_ci95[1]
    assert cal.estimate == CALIBRATED_ESTIMATE and not cal.warnings  # 80 >= 40 hips
    few, _, _ = fit_site_calibration(_samples(10))
    assert "at least 40 (CLSI EP09)" in few.warnings[0]
    none, section, reason = fit_site_calibration(_samples(MIN_HIPS - 1))
    assert none is None and section is None and f"at least {MIN_HIPS} needed" in reason


def test_apply_maps_the_estimate_and_its_interval_and_says_when_it_extrapolates():
    cal = SiteCalibration(1.05, -0.02, "passing-bablok", 60, (0.5, 1.1), model={"created": "A"})
    out = cal.apply(0.8, (0.72, 0.88), model_info={"created": "A"})
    assert out.bmd_g_cm2 == pytest.approx(-0.02 + 1.05 * 0.8)
    assert out.interval_g_cm2 == pytest.approx((-0.02 + 1.05 * 0.72, -0.02 + 1.05 * 0.88))
    assert out.warnings == [] and out.record["uncalibrated_bmd_g_cm2"] == 0.8
    assert out.record["slope"] == 1.05 and out.record["extrapolated"] is False
    far = cal.apply(1.3, None, model_info={"created": "B"})
    assert far.record["extrapolated"] and "outside the 0.500-1.100" in far.warnings[0]
    assert "fitted for the model created A" in far.warnings[1] and far.interval_g_cm2 is None
    assert cal.apply(None).bmd_g_cm2 is None and cal.apply(float("nan")).bmd_g_cm2 is None


def test_files_round_trip_and_bad_files_name_the_problem(tmp_path):
    cal, _, _ = fit_site_calibration(_samples(50), model={"created": "2025-01-01", "path": "m.pt"})
    path = cal.write(tmp_path / "site.json")
    back = load_site_calibration(path)
    assert back.slope == cal.slope and back.intercept_g_cm2 == cal.intercept_g_cm2
    assert back.source == str(path) and len(back.sha256) == 64
    assert back.apply(0.9).record["file"] == str(path)
    doc = json.loads(path.read_text())
    cases = {
        "notjson.json": ("{", "not JSON"),
        "other.json": (json.dumps({"format": "xbmd-registration"}), "not an xbmd site-calib"),
        "steep.json": (json.dumps(doc | {"slope": 3.0}), "slope 3.0 is outside 0.5-2"),
        "qct.json": (json.dumps(doc | {"estimate": "qct_vbmd_mg_cm3"}), "calibrates 'qct_vbmd"),
        "short.json": (json.dumps({k: v for k, v in doc.items() if k != "slope"}), "incomplete"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message) as err:
            load_site_calibration(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))
    with pytest.raises(InputError, match="no such site-calibration file"):
        load_site_calibration(tmp_path / "missing.json")


def test_evaluate_writes_the_file_that_estimate_applies(tmp_path):
    samples = _samples(45, images_per_hip=1, seed=4)
    csv_path = tmp_path / "predictions.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "side", f"est_{CALIBRATED_ESTIMATE}",
                         "ref_dxa_total_hip_g_cm2"])  # fmt: skip
        for row, e, r in zip(samples.rows, samples.estimates[CALIBRATED_ESTIMATE],
                             samples.references["dxa_total_hip_g_cm2"], strict=True):  # fmt: skip
            writer.writerow([row["patient_id"], "left", e, r])
    result = CliRunner().invoke(
        app, ["evaluate", "--predictions", str(csv_path), "--out", str(tmp_path / "rep"),
              "--target", "dxa", "--site-fit", "deming", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "site calibration (deming, 45 hips): DXA = " in result.output
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["site_calibration"]["file"] == "site_calibration.json"
    cal = load_site_calibration(tmp_path / "rep" / "site_calibration.json")
    assert cal.method == "deming" and cal.n_hips == 45
    assert cal.slope == pytest.approx(metrics["site_calibration"]["slope"])
    assert "Site calibration" in (tmp_path / "rep" / "report.html").read_text()
    # the calibrated estimates sit on the DXA scale: their mean bias is ~0 (was ~+0.11)
    est = samples.estimates[CALIBRATED_ESTIMATE]
    dxa = samples.references["dxa_total_hip_g_cm2"]
    calibrated = np.array([cal.apply(v).bmd_g_cm2 for v in est])
    assert abs(np.mean(est - dxa)) > 0.08 and abs(np.mean(calibrated - dxa)) < 0.01
    # --site-fit none: no file
    quiet = evaluate(tmp_path / "rep2", predictions=csv_path, target="dxa", site_fit=None)
    assert (
        quiet["site_calibration"] is None
        and not (tmp_path / "rep2" / "site_calibration.json").exists()
    )
    assert quiet["not_available"]["site_calibration"] == "not requested"


def test_estimator_applies_the_site_calibration_and_records_it(
    estimator, images, monkeypatch, tmp_path
):
    """The estimator with a site calibration reports the mapped BMD (and T-score from it) and
    records the line and the uncalibrated value in result.json."""
    from estimate_helpers import HEADS, fake_heads, fixed_prediction
    from xbmd.estimation.estimator import Estimator
    from xbmd.estimation.output import write_results

    fake_heads(monkeypatch, HEADS)
    monkeypatch.setattr(
        estimator.bundle, "predict", lambda x, v, tta=False, kvp=None: fixed_prediction(7500, 0.85)
    )
    plain = estimator.estimate(images / "pelvis.dcm")
    cal = SiteCalibration(1.10, 0.03, "deming", 60, (0.5, 1.1))
    cal.write(tmp_path / "site.json")
    calibrated = Estimator(estimator.bundle, site_calibration=tmp_path / "site.json")
    results = calibrated.estimate(images / "pelvis.dcm")
    assert [r.side for r in results] == [r.side for r in plain]
    for before, after in zip(plain, results, strict=True):
        assert before.bmd_g_cm2 == pytest.approx(0.85)
        assert after.bmd_g_cm2 == pytest.approx(0.03 + 1.10 * 0.85)
        assert after.t_score > before.t_score  # the T-score is of the calibrated BMD
        assert after.site_calibration["uncalibrated_bmd_g_cm2"] == pytest.approx(0.85)
        assert before.site_calibration is None
    write_results(results, tmp_path / "out")
    saved = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("result.json")]
    assert saved and all(s["site_calibration"]["slope"] == pytest.approx(1.10) for s in saved)
    # a bad file is one clear error at start, naming it
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match=r"bad\.json"):
        Estimator(estimator.bundle, site_calibration=tmp_path / "bad.json")
