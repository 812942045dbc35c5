"""`xbmd dxa import`: long DXA sheets (CSV, Excel) into the manifest; sBMD, dates, intervals."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.dataset.dxa import (
    convert_bmd,
    import_dxa,
    import_to_file,
    read_dxa_sheet,
)
from xbmd.dataset.manifest import ManifestCase, RadiographInfo, read_manifest, write_manifest
from xbmd.errors import InputError

D = datetime.date
SHEET = """Patient ID;Scan Date;Side;Region;BMD (g/cm2);Manufacturer
P1;2024-01-10;Left;Total Hip;0.812;Hologic
P1;2024-01-10;Left;Femoral Neck;0.701;Hologic
P1;2024-01-10;R;Total;0.799;Hologic
P1;2021-06-01;Left;Total Hip;0.850;Hologic
P1;2024-01-10;;L1-L4;1.010;Hologic
P2;20240301;right;total hip;abc;Hologic
P2;2024-03-01;right;neck;0.650;Hologic
P3;2024-02-02;left;total hip;0.700;Hologic
P3;2024-02-02;left;total hip;0.710;Hologic
"""


def _case(root: Path, case_id: str, patient: str, **kw) -> ManifestCase:
    xray = root / case_id / "a.png"
    fields = {
        "case_id": case_id,
        "patient_id": patient,
        "ct": root / case_id / "ct.nii.gz",
        "labels": root / case_id / "labels.nii.gz",
        "label_map": {"femur_left": 4, "pelvis_left": 2},
        "calibration": "phantomless",
        "xrays": [xray],
        "ct_date": D(2024, 1, 20),
        "radiographs": {str(xray): RadiographInfo((0.15, 0.15), date=D(2024, 2, 1))},
    }
    return ManifestCase(**(fields | kw))


def _sheet(tmp_path: Path, text: str = SHEET) -> Path:
    path = tmp_path / "dxa.csv"
    path.write_text(text)
    return path


def test_standardised_bmd_follows_the_published_formulas():
    # ICSBM total hip (Hanson 1997), sBMD mg/cm2 = 1000 (a + b BMD)
    assert convert_bmd(0.9, "hologic", "total_hip", "sbmd") == pytest.approx(1.008 * 0.9 + 0.006)
    assert convert_bmd(0.9, "lunar", "total_hip", "sbmd") == pytest.approx(0.979 * 0.9 - 0.031)
    assert convert_bmd(0.9, "norland", "total_hip", "sbmd") == pytest.approx(1.012 * 0.9 + 0.026)
    # femoral neck (Lu et al. 2001)
    assert convert_bmd(0.7, "lunar", "neck", "sbmd") == pytest.approx(0.939 * 0.7 - 0.023)
    # a Hologic value is its own Hologic value; a Lunar one is lower on the Hologic scale
    assert convert_bmd(0.9, "hologic", "total_hip", "hologic") == pytest.approx(0.9)
    lunar = convert_bmd(0.9, "lunar", "total_hip", "hologic")
    assert lunar == pytest.approx((0.979 * 0.9 - 0.031 - 0.006) / 1.008)
    assert 0.05 < (0.9 - lunar) / 0.9 < 0.08  # Lunar reads about 6 % higher at the hip
    assert convert_bmd(0.9, "lunar", "total_hip", "measured") == 0.9
    with pytest.raises(InputError, match="no published total_hip standardisation"):
        convert_bmd(0.9, "unknown", "total_hip", "sbmd")


def test_sheet_columns_are_found_bad_rows_listed_and_other_regions_left_out(tmp_path):
    sheet = read_dxa_sheet(_sheet(tmp_path))
    assert sheet.rows == 9 and sheet.other_regions == {"L1-L4": 1}
    assert {(v.patient_id, v.exam_date, v.side, v.region) for v in sheet.values} == {
        ("P1", D(2024, 1, 10), "left", "total_hip"),
        ("P1", D(2024, 1, 10), "left", "neck"),
        ("P1", D(2024, 1, 10), "right", "total_hip"),
        ("P1", D(2021, 6, 1), "left", "total_hip"),
        ("P2", D(2024, 3, 1), "right", "neck"),
    }
    problems = "\n".join(sheet.problems)
    assert "row 7: BMD 'abc' g/cm2 is not a hip BMD" in problems
    assert "rows 9, 10: patient P3 2024-02-02 left total_hip has different values" in problems
    one_row = "patient,date,side,region,bmd\nP9,2024-01-01,L,neck,812\n"
    mg = read_dxa_sheet(_sheet(tmp_path, one_row), bmd_unit="mg/cm2")
    assert mg.values[0].bmd_g_cm2 == pytest.approx(0.812) and mg.values[0].vendor == "unknown"
    with pytest.raises(InputError, match=r"lacks column.*exam_date.*--column"):
        read_dxa_sheet(_sheet(tmp_path, "patient,when,side,region,bmd\nP9,x,L,neck,0.8\n"))
    renamed = read_dxa_sheet(
        _sheet(tmp_path, "patient,when,side,region,bmd\nP9,01.02.2024,L,neck,0.8\n"),
        columns={"exam_date": "when"},
        date_format="%d.%m.%Y",
    )
    assert renamed.values[0].exam_date == D(2024, 2, 1)


def test_the_closest_exam_is_used_and_intervals_are_checked(tmp_path):
    sheet = read_dxa_sheet(_sheet(tmp_path))
    cases = [
        _case(tmp_path, "c1", "P1"),
        _case(tmp_path, "c2", "P2", ct_date=D(2022, 1, 1)),  # DXA 2024-03: 790 days away
        _case(tmp_path, "c3", "P4"),  # not in the sheet
    ]
    new, report = import_dxa(sheet, cases, max_interval_days=365)
    c1, c2, c3 = new
    assert c1.dxa_g_cm2 == {
        "dxa_total_hip_left_g_cm2": 0.812,  # 2024-01-10, not the 2021 exam
        "dxa_neck_left_g_cm2": 0.701,
        "dxa_total_hip_right_g_cm2": 0.799,
    }
    assert c1.dxa_dates == {"left": D(2024, 1, 10), "right": D(2024, 1, 10)}
    assert c1.dxa_vendors == {"left": "hologic", "right": "hologic"}
    assert c1.dxa_scale == "measured"
    assert c2.dxa_g_cm2 == {} and c2.dxa_dates == {}
    (failure,) = report.failures
    assert failure.startswith("case c2 right: ") and "2022-01-01" in failure
    assert "(maximum 365, --max-interval-days)" in failure
    assert c3 is cases[2] and report.cases_without_dxa == ["c3"]
    filled = {(f["case_id"], f["side"]): f["interval_days"] for f in report.filled}
    assert filled == {("c1", "left"): 22, ("c1", "right"): 22}  # 2024-01-10 .. 2024-02-01
    # warn instead of refuse; no check at all
    kept, warned = import_dxa(sheet, cases[1:2], max_interval_days=365, on_interval="warn")
    assert kept[0].dxa_g_cm2 == {"dxa_neck_right_g_cm2": 0.65} and len(warned.warnings) == 1
    unchecked, quiet = import_dxa(sheet, cases[1:2], max_interval_days=None)
    assert unchecked[0].dxa_g_cm2 == {"dxa_neck_right_g_cm2": 0.65} and not quiet.warnings


def test_a_case_without_dates_cannot_be_checked(tmp_path):
    sheet = read_dxa_sheet(_sheet(tmp_path))
    undated = _case(tmp_path, "c1", "P1", ct_date=None, radiographs={})
    new, report = import_dxa(sheet, [undated], max_interval_days=365)
    assert new[0].dxa_g_cm2 == {} and len(report.failures) == 2
    assert "no date of the CT or the radiographs is known" in report.failures[0]
    latest, _ = import_dxa(sheet, [undated], max_interval_days=None)
    assert latest[0].dxa_dates["left"] == D(2024, 1, 10)  # the latest exam


def test_mixed_makers_need_a_common_scale(tmp_path):
    text = SHEET.splitlines()[0] + "\nP1;2024-01-10;Left;Total Hip;0.900;GE Lunar\n"
    text += "P5;2024-01-10;Left;Total Hip;0.800;Hologic\n"
    sheet = read_dxa_sheet(_sheet(tmp_path, text))
    cases = [_case(tmp_path, "c1", "P1")]
    with pytest.raises(InputError, match=r"mixes DXA makers \(hologic, lunar\).*--scale"):
        import_dxa(sheet, cases)
    new, _ = import_dxa(sheet, cases, scale="hologic")
    expected = (0.979 * 0.9 - 0.031 - 0.006) / 1.008
    assert new[0].dxa_g_cm2["dxa_total_hip_left_g_cm2"] == pytest.approx(expected, abs=5e-5)
    assert new[0].dxa_vendors == {"left": "lunar"} and new[0].dxa_scale == "hologic"


def test_dicom_dates_are_read_and_recorded(tiny_cohort, tmp_path):
    case = read_manifest(tiny_cohort / "manifest.csv")[0]
    assert case.ct_date is None and case.radiograph(case.xrays[0]).date is None
    text = "patient,date,side,region,bmd,vendor\n"
    text += f"{case.patient_id},2023-12-01,left,total hip,0.75,hologic\n"
    new, report = import_dxa(read_dxa_sheet(_sheet(tmp_path, text)), [case], max_interval_days=60)
    # the radiograph's DICOM Study Date (2023-12-31); the CT is NIfTI, without a date
    assert new[0].radiograph(new[0].xrays[0]).date == D(2023, 12, 31) and new[0].ct_date is None
    assert report.filled[0]["interval_days"] == 30 and not report.failures


def test_cli_fills_a_manifest_in_place_and_reports_refusals(tmp_path):
    write_manifest([_case(tmp_path, "c1", "P1"), _case(tmp_path, "c2", "P2")], tmp_path / "m.csv")
    result = CliRunner().invoke(
        app, ["dxa", "import", str(_sheet(tmp_path)), "--out", str(tmp_path / "m.csv")]
    )
    assert result.exit_code == 2, result.output
    assert "9 rows, 5 hip values read; other regions left out: L1-L4 (1)" in result.output
    assert "REFUSED" in result.output and "row 7" in result.output
    c1, c2 = read_manifest(tmp_path / "m.csv")
    assert c1.dxa_g_cm2["dxa_total_hip_left_g_cm2"] == 0.812
    assert c1.dxa_dates["left"] == D(2024, 1, 10) and c2.dxa_g_cm2 == {"dxa_neck_right_g_cm2": 0.65}
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert "dxa_date_left" in header and "dxa_vendor_right" in header and "dxa_scale" in header


def test_without_a_manifest_the_sheet_becomes_a_wide_table(tmp_path):
    out = tmp_path / "table.csv"
    summary = import_to_file(_sheet(tmp_path), out, scale="sbmd")
    assert summary["mode"] == "table" and summary["exams"] == 3
    rows = list(csv.DictReader(out.open()))
    first = rows[0]
    assert (first["patient_id"], first["exam_date"], first["scale"]) == ("P1", "2021-06-01", "sbmd")
    assert float(rows[1]["dxa_total_hip_left_g_cm2"]) == pytest.approx(1.008 * 0.812 + 0.006, 1e-4)
    with pytest.raises(InputError, match="exists and is not a case manifest"):
        import_to_file(_sheet(tmp_path), _sheet(tmp_path))


def test_an_excel_sheet_reads_like_its_csv(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    ws = book.active
    for line in SHEET.splitlines():
        cells = line.split(";")
        if cells[1][:4].isdigit() and "-" in cells[1]:
            cells[1] = datetime.datetime.strptime(cells[1], "%Y-%m-%d")  # a real Excel date
        ws.append(cells)
    book.save(tmp_path / "dxa.xlsx")
    from_excel = read_dxa_sheet(tmp_path / "dxa.xlsx")
    from_csv = read_dxa_sheet(_sheet(tmp_path))
    assert sorted(from_excel.values, key=str) == sorted(from_csv.values, key=str)
    with pytest.raises(InputError, match="no sheet 'Results'"):
        read_dxa_sheet(tmp_path / "dxa.xlsx", sheet="Results")
    (tmp_path / "broken.xlsx").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"not a readable \.xlsx workbook"):
        read_dxa_sheet(tmp_path / "broken.xlsx")
