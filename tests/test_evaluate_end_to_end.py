"""`xbmd evaluate` end to end: hips matched to index rows, failures listed, the delivered file's
perturbations, reproducibility by session, interval and gate metrics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEGBaseline8Bit
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.dataset.format import read_index
from xbmd.estimation.estimator import Estimator
from xbmd.evaluation.end_to_end import find_originals, match_hips
from xbmd.evaluation.evaluate import evaluate
from xbmd.evaluation.gate import gate_section, interval_section, reason_key
from xbmd.evaluation.sessions import session_reproducibility
from xbmd.evaluation.whole_file import change_row, export_8bit, jpeg_target, write_variant
from xbmd.io.xray import WARN_LOSSY, read_xray
from xbmd.io.xray_write import write_xray_dicom

runner = CliRunner()


def _sd(values) -> float:
    return float(np.std(values, ddof=1))


# ------------------------------------------------------------------------------------------------
# Matching hips to index rows


def _rows(xray: str, sides=("right", "left")) -> list[dict]:
    return [
        {
            "sample_id": f"c/{xray}_{side}",
            "patient_id": "P1",
            "side": side,
            "xray": xray,
            "ct_abmd_g_cm2": "0.8" if side == "right" else "0.7",
            "implant": "hip_replacement" if side == "left" else "",
        }
        for side in sides
    ]


def test_hips_are_matched_to_their_rows_and_the_unreported_are_failures():
    rows = _rows("a.dcm")
    both = [{"side": "left", "bmd_g_cm2": 0.71}, {"side": "right", "bmd_g_cm2": 0.83}]
    records, failures, unmatched = match_hips(rows, both)
    assert [r["result"]["bmd_g_cm2"] for r in records] == [0.83, 0.71]  # by side, not order
    assert [r["references"]["ct_abmd_g_cm2"] for r in records] == [0.8, 0.7]
    assert [r["implant"] for r in records] == ["", "hip_replacement"]
    assert failures == [] and unmatched == []

    records, failures, _ = match_hips(rows, both[:1])  # the right head was not found
    assert records[0]["result"] is None and records[1]["result"]["bmd_g_cm2"] == 0.71
    assert failures == [
        {
            "sample_id": "c/a.dcm_right",
            "xray": "a.dcm",
            "side": "right",
            "implant": "",
            "stage": "estimate",
            "error": "the estimator reported no right hip (hips found: left)",
        }
    ]

    refusal = "a.dcm: no femoral head found (is this a hip or pelvis X-ray?)"
    records, failures, unmatched = match_hips(rows, refusal)
    assert all(r["result"] is None for r in records) and unmatched == []
    assert [(f["side"], f["error"]) for f in failures] == [("right", refusal), ("left", refusal)]
    _, failures, _ = match_hips(rows, "a.dcm: no such file", stage="read")
    assert {f["stage"] for f in failures} == {"read"}

    _, failures, unmatched = match_hips(rows[:1], both)  # prepare made no left sample
    assert failures == []
    assert [(u["side"], u["bmd_g_cm2"]) for u in unmatched] == [("left", 0.71)]


def test_originals_are_found_through_the_manifest(tiny_dataset, tiny_cohort, tmp_path):
    rows = read_index(tiny_dataset)
    found = find_originals(tiny_dataset, rows)
    assert found.all_found and found.root == tiny_cohort
    assert set(found.paths) == {r["xray"] for r in rows}
    assert all(path.is_file() for path in found.paths.values())
    assert find_originals(tiny_dataset, rows, root=tiny_cohort).paths == found.paths
    elsewhere = find_originals(tiny_dataset, rows, root=tmp_path)
    assert not elsewhere.all_found and len(elsewhere.missing) == 3
    assert "3 of 3 original radiographs not found" in elsewhere.reason


# ------------------------------------------------------------------------------------------------
# Sessions


def test_sessions_group_images_by_hip_and_study():
    data = [
        ("A", "s1", 1.00), ("A", "s1", 1.10), ("A", "s2", 1.20), ("A", "s2", 1.30),
        ("B", "t1", 0.80), ("B", "t1", 0.82), ("B", "t1", 0.84), ("B", "t2", 0.90),
        ("B", "", 5.00),  # no study UID: in "all images" only
    ]  # fmt: skip
    rows = [{"hip": hip, "study_uid": study} for hip, study, _ in data]
    out = session_reproducibility([v for *_, v in data], rows)
    assert (out["hips"], out["sessions"], out["images_without_study"]) == (2, 4, 1)
    # same session: (A, s1), (A, s2), (B, t1); (B, t2) has one image
    cvs = [_sd([1.0, 1.1]) / 1.05, _sd([1.2, 1.3]) / 1.25, _sd([0.8, 0.82, 0.84]) / 0.82]
    assert out["same_session"]["groups"] == 3
    assert out["same_session"]["rms_cv_pct"] == pytest.approx(
        100 * np.sqrt(np.mean(np.square(cvs)))
    )
    # across sessions: the session means A (1.05, 1.25) and B (0.82, 0.90)
    sds = [_sd([1.05, 1.25]), _sd([0.82, 0.90])]
    cvs = [sds[0] / 1.15, sds[1] / 0.86]
    assert out["cross_device"]["groups"] == 2
    assert out["cross_device"]["rms_cv_pct"] == pytest.approx(
        100 * np.sqrt(np.mean(np.square(cvs)))
    )
    assert out["cross_device"]["lsc"] == pytest.approx(2.77 * np.sqrt(np.mean(np.square(sds))))
    assert out["all_images"]["groups"] == 2
    assert out["all_images"]["rms_sd"] > out["cross_device"]["rms_sd"]  # the 5.0 is in it
    assert session_reproducibility([1.0, 1.1], [{"hip": "A", "study_uid": ""}] * 2) is None


# ------------------------------------------------------------------------------------------------
# Interval and gate on hand-made results


def _record(ref, result, implant="", maker="M1") -> dict:
    return {
        "implant": implant,
        "manufacturer": maker,
        "references": {"ct_abmd_g_cm2": ref},
        "result": result,
    }


def _result(interval=None, confident=True, gate=(), ood=None) -> dict:
    t = None if interval is None else [(v - 0.942) / 0.122 for v in interval]
    return {
        "bmd_g_cm2": 0.8,
        "bmd_interval_g_cm2": interval,
        "t_score_interval": t,
        "confident": confident,
        "gate": list(gate),
        "ood_score": ood,
        "ood_threshold": None if ood is None else 1.0,
    }


def test_interval_coverage_and_width():
    records = [_record(0.8, _result([0.7, 0.9])) for _ in range(8)]
    records.append(_record(0.8, _result([0.85, 0.95])))  # reference below the interval
    records.append(_record(0.8, _result([0.60, 0.75], confident=False)))  # above it
    records.append(_record(0.8, _result([1.0, 1.1]), implant="nail"))  # left out
    records.append(_record(0.8, None))  # not reported: left out
    out, reason = interval_section(records)
    assert reason == "" and (out["hips"], out["with_interval"], out["compared"]) == (10, 10, 10)
    assert (out["coverage"], out["below"], out["above"]) == pytest.approx((0.8, 0.1, 0.1))
    assert out["median_width_g_cm2"] == pytest.approx(0.2)
    assert out["median_width_t"] == pytest.approx(0.2 / 0.122)
    assert out["confident_coverage"] == pytest.approx(8 / 9) and out["met"] is False
    none, reason = interval_section([_record(0.8, _result())])
    assert none is None and "no interval" in reason


def test_gate_shares_and_reasons():
    flagged = ["JPEG quality 40 is below the safe 55", "JPEG quality 30 is below the safe 55"]
    records = [_record(0.8, _result(ood=0.5)) for _ in range(97)]
    records += [
        _record(0.8, _result(confident=False, gate=[g], ood=0.5), maker="M2") for g in flagged
    ]
    records.append(_record(0.8, _result(ood=2.0), maker="M2"))  # unfamiliar, yet confident
    records += [
        _record(
            0.8, _result(confident=False, gate=["implant in the hip"], ood=3.0), "hip_replacement"
        ),
        _record(0.8, _result(confident=False, gate=["implant in the hip"]), "screws"),
        _record(0.8, None, "nail"),  # refused
    ]
    out, _ = gate_section(records)
    implant, clean = out["implant"], out["clean"]
    assert (implant["hips"], implant["flagged"], implant["refused"]) == (3, 2, 1)
    assert implant["share_flagged_or_refused"] == 1.0 and implant["met"] is True
    assert (clean["reported"], clean["flagged"], clean["share_flagged"]) == (100, 2, 0.02)
    assert clean["met"] is True  # 2 % is the limit
    assert out["ood"]["hips_scored"] == 101 and out["ood"]["above_threshold"] == 2
    assert out["ood"]["clean"]["share_above"] == pytest.approx(1 / 100)
    assert out["ood"]["implant"] == {"hips_scored": 1, "share_above": 1.0}
    assert out["reasons"][0] == {
        "reason": "JPEG quality # is below the safe #",
        "hips": 2,
        "example": flagged[0],
    }
    assert out["reasons"][1]["reason"] == "implant in the hip" and out["reasons"][1]["hips"] == 2
    by_maker = {m["manufacturer"]: m for m in out["by_manufacturer"]}
    assert by_maker["M2"]["hips"] == 3 and by_maker["M2"]["share_flagged"] == pytest.approx(2 / 3)
    assert by_maker["M2"]["share_ood"] == pytest.approx(1 / 3)
    records[-3]["result"]["confident"] = True  # an implant hip reported as confident
    records[0]["result"].update(confident=False)  # a clean hip flagged without a reason
    out, _ = gate_section(records)
    assert out["implant"]["met"] is False and out["clean"]["met"] is False
    assert out["not_confident_without_reason"] == 1
    assert reason_key("spacing 0.15 mm, 12 % off") == "spacing # mm, # % off"
    none, _ = gate_section([_record(0.8, {"confident": True})])
    assert none["ood"] is None and none["implant"] is None


# ------------------------------------------------------------------------------------------------
# The delivered file


@pytest.fixture(scope="module")
def dicom(tiny_cohort):
    return tiny_cohort / "cases" / "case_VQ0001" / "xray_01.dcm"


def test_jpeg_files_are_lossy_and_their_references_lossless(dicom, tmp_path):
    xray = read_xray(dicom)
    image8 = export_8bit(xray.pixels)
    assert image8.dtype == np.uint8 and (image8.min(), image8.max()) == (0, 255)
    png, given = write_variant("png8", 8, dicom, image8, xray.pixel_spacing_mm, tmp_path)
    assert given == xray.pixel_spacing_mm  # a PNG has no spacing: given as a user would
    np.testing.assert_array_equal(read_xray(png).pixels, image8)
    dicom8, given = write_variant("dicom8", 8, dicom, image8, xray.pixel_spacing_mm, tmp_path)
    x8 = read_xray(dicom8)
    assert given is None and x8.pixel_spacing_mm == xray.pixel_spacing_mm
    assert x8.meta["sdd_mm"] == xray.meta["sdd_mm"] and WARN_LOSSY not in x8.warnings
    assert x8.meta["study_instance_uid"] == xray.meta["study_instance_uid"]
    np.testing.assert_array_equal(x8.pixels, image8)  # the identity window on 0-255
    errors = {}
    for kind in ("jpeg", "dicom_jpeg"):
        for quality in (95, 50):
            path, _ = write_variant(kind, quality, dicom, image8, xray.pixel_spacing_mm, tmp_path)
            lossy = read_xray(path)
            assert WARN_LOSSY in lossy.warnings
            errors[kind, quality] = float(np.abs(lossy.pixels - image8).mean())
            if kind == "dicom_jpeg":
                assert lossy.meta["transfer_syntax"] == JPEGBaseline8Bit
                assert lossy.pixel_spacing_mm == xray.pixel_spacing_mm
    # measured mean |error| 0.53 (q95) and 1.48 (q50) grey levels: thresholds at half of that
    assert errors["jpeg", 95] > 0.25 and errors["jpeg", 50] > 0.7
    assert errors["jpeg", 50] > errors["jpeg", 95]
    # the same JPEG in both containers (decoders differ by at most one grey level)
    assert errors["dicom_jpeg", 50] == pytest.approx(errors["jpeg", 50], abs=0.05)


def test_spacing_and_resizing_change_what_the_estimator_sees(dicom, tmp_path):
    xray = read_xray(dicom)
    image8 = export_8bit(xray.pixels)
    wide, _ = write_variant("spacing", 10, dicom, image8, None, tmp_path)
    wrong = read_xray(wide)
    np.testing.assert_array_equal(wrong.pixels, xray.pixels)  # same pixels
    assert wrong.pixel_spacing_mm == pytest.approx([1.1 * s for s in xray.pixel_spacing_mm])
    estimator = Estimator(None)
    base = {r.side: r for r in estimator.estimate(dicom)}
    moved = {r.side: r for r in estimator.estimate(wide)}
    assert set(moved) == set(base) == {"right", "left"}
    for side, result in moved.items():
        assert result.pixel_spacing_mm == pytest.approx(wrong.pixel_spacing_mm)
        # a crop pixel (0.75 detector mm) now spans 1/1.1 as many image pixels
        scale = np.abs(np.diag(result.crop.crop_to_image[:, :2]))
        scale0 = np.abs(np.diag(base[side].crop.crop_to_image[:, :2]))
        np.testing.assert_allclose(scale / scale0, 1 / 1.1, rtol=1e-6)
    small, _ = write_variant("resize", 0.5, dicom, image8, None, tmp_path)
    half = read_xray(small)
    rows, cols = xray.pixels.shape
    assert half.pixels.shape == (round(rows / 2), round(cols / 2))
    field_mm = np.multiply(half.pixels.shape, half.pixel_spacing_mm)
    np.testing.assert_allclose(field_mm, np.multiply(xray.pixels.shape, xray.pixel_spacing_mm))


def test_change_row_counts_against_the_reference_variant():
    def brief(bmd, confident=True, category="normal"):
        return {"bmd_g_cm2": bmd, "confident": confident, "who_category": category}

    hips = [
        {"variants": {("png8", 8): brief(1.0), ("jpeg", 50): brief(1.02, False, "osteopenia")}},
        {"variants": {("png8", 8): brief(0.8), ("jpeg", 50): brief(0.79)}},
        {"variants": {("png8", 8): brief(0.9), ("jpeg", 50): None}},  # not reported
        {"variants": {("png8", 8): None, ("jpeg", 50): brief(0.9)}},  # no reference: left out
    ]
    row = change_row("jpeg", 50, hips)
    assert row["reference"] == "8-bit PNG" and row["n"] == 2 and row["not_reported"] == 1
    assert row["mean_abs_change_pct"] == pytest.approx(1.625)
    assert row["mean_change_pct"] == pytest.approx(0.375)
    assert (row["turned_not_confident"], row["reference_confident"]) == (2, 3)
    assert row["category_changed"] == 1 and row["share_not_confident"] == 0.5
    assert jpeg_target([row])["met"] is False and row["target_met_by"] is None
    row.update(share_not_confident=1.0)  # every result flagged: the target counts as met
    assert jpeg_target([row])["met"] is True and row["target_met_by"] == "flag"


# ------------------------------------------------------------------------------------------------
# The command on a prepared dataset


@pytest.fixture(scope="module")
def damaged(tiny_dataset, tmp_path_factory):
    """A copy of the tiny dataset with an implant hip, a radiograph with no hip in it (two rows)
    and a radiograph whose file is gone (one row)."""
    root = tmp_path_factory.mktemp("damaged")
    dataset = root / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    blank = root / "elsewhere" / "blank.dcm"
    rng = np.random.default_rng(0)
    write_xray_dicom(
        rng.integers(20000, 21000, (220, 268)).astype(np.uint16),
        blank,
        pixel_spacing_mm=1.6,
        sdd_mm=1100,
        sod_mm=950,
    )
    rows = read_index(dataset)
    rows[2]["implant"] = "hip_replacement"  # case_VQ0002 left
    extra = [
        {**rows[0], "sample_id": f"case_X/{name}_{side}", "xray": xray, "side": side,
         "file": f"samples/case_X/{name}_{side}.npz"}
        for name, xray, side in (("blank", str(blank), "right"), ("blank", str(blank), "left"),
                                 ("gone", "cases/case_X/gone.dcm", "right"))
    ]  # fmt: skip
    with (dataset / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    out = root / "report"
    result = runner.invoke(
        app,
        [
            "evaluate", "--dataset", str(dataset), "--out", str(out), "--end-to-end",
            "--robustness", "pose", "--file-robustness", "dicom-jpeg", "--robustness-images",
            "1", "--no-progress",
        ],
    )  # fmt: skip
    return out, result


def test_end_to_end_lists_failures_and_leaves_implants_out(damaged):
    out, result = damaged
    assert result.exit_code == 2, result.output  # an original radiograph is missing
    assert "original radiographs could not be read" in result.output
    m = json.loads((out / "metrics.json").read_text())
    e2e = m["end_to_end"]
    assert not Path(e2e["radiographs_root"]).is_absolute()  # no path of the machine in reports
    assert e2e["counts"] == {
        "radiographs": 5, "hips_expected": 9, "hips_reported": 6, "implant_hips": 1,
        "images": 5, "hips": 5, "patients": 3, "failed": 3, "unmatched": 0,
    }  # fmt: skip
    stages = sorted((f["sample_id"], f["stage"]) for f in e2e["failures"])
    assert stages == [
        ("case_X/blank_left", "estimate"),
        ("case_X/blank_right", "estimate"),
        ("case_X/gone_right", "read"),
    ]
    blank = next(f for f in e2e["failures"] if f["sample_id"] == "case_X/blank_left")
    assert "no femoral head found" in blank["error"]
    assert e2e["localisation"]["n"] == 6 and e2e["localisation"]["max_mm"] < 10.0
    head = {(r["mode"], r["level"]): r for r in m["headline"]["rows"]}
    assert head["end_to_end", "image"]["n"] == 5  # the implant hip is left out
    assert (
        head["end_to_end", "image"]["expected"] == 8
        and head["end_to_end", "image"]["failures"] == 3
    )
    assert head["true_crops", "image"]["n"] == 5 and m["counts"]["implant_samples_left_out"] == 1
    assert m["counts"]["failed"] == 3  # the extra rows have no sample files
    gate = m["gate"]["implant"]
    assert (gate["hips"], gate["reported"]) == (1, 1)
    assert gate["met"] == (gate["share_flagged_or_refused"] >= 1.0)
    if m["interval"] is None:  # the bundled model has no calibrated interval yet
        assert "no interval" in m["not_available"]["interval"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.index("Headline") < page.index("Part 1") < page.index("Part 2: true crops")
    assert "no femoral head found" in page and "original radiograph not found" in page


def test_whole_file_rows_and_the_end_to_end_csv(damaged, tmp_path):
    out, _ = damaged
    m = json.loads((out / "metrics.json").read_text())
    whole = m["whole_file_robustness"]
    assert (whole["radiographs"], whole["radiographs_available"], whole["hips"]) == (1, 3, 2)
    assert [(r["kind"], r["level"]) for r in whole["rows"]] == [
        ("dicom_jpeg", q) for q in (95, 85, 75, 50)
    ]
    assert all(r["n"] == 2 and r["reference"] == "8-bit DICOM" for r in whole["rows"])
    assert whole["rows"][-1]["mean_abs_change_pct"] > 0  # quality 50 moves the estimate
    assert whole["jpeg_target"]["met"] in (True, False)
    assert m["sessions"]["modes"]["end_to_end"]["sessions"] == 5  # (hip, study) pairs
    with (out / "predictions_end_to_end.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and sum(bool(r["error"]) for r in rows) == 3
    assert sum(bool(r["implant"]) for r in rows) == 1
    again = evaluate(tmp_path / "again", predictions=out / "predictions_end_to_end.csv")
    first = next(a for a in m["end_to_end"]["agreement"] if a["level"] == "image")
    second = next(a for a in again["agreement"] if a["level"] == "image")
    assert second["n"] == first["n"] == 5
    assert second["pearson_r"] == pytest.approx(first["pearson_r"], abs=1e-9)


def test_end_to_end_is_the_default_when_the_originals_are_found(tiny_dataset, tmp_path):
    m = evaluate(tmp_path / "auto", dataset=tiny_dataset, robustness=[], file_robustness=[])
    assert m["end_to_end"]["counts"]["hips_reported"] == 6 and m["end_to_end"]["failures"] == []
    assert [r["mode"] for r in m["headline"]["rows"]][:2] == ["end_to_end", "end_to_end"]
    assert m["not_available"]["whole_file_robustness"] == "not requested"
    off = evaluate(tmp_path / "off", dataset=tiny_dataset, robustness=[], end_to_end=False)
    assert off["end_to_end"] is None and "--no-end-to-end" in off["not_available"]["end_to_end"]
    assert {r["mode"] for r in off["headline"]["rows"]} == {"true_crops"}
