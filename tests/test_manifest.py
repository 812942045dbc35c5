"""The case manifest (xbmd.dataset.manifest): round trip and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xbmd.dataset.manifest import COLUMNS, ManifestCase, read_manifest, write_manifest
from xbmd.errors import InputError

LABEL_MAP = {"pelvis_right": 1, "pelvis_left": 2, "femur_right": 3, "femur_left": 4}


def case(root: Path, case_id: str = "c1", **kw) -> ManifestCase:
    fields = {
        "case_id": case_id,
        "patient_id": "p1",
        "ct": root / "cases" / case_id / "ct.nii.gz",
        "labels": root / "cases" / case_id / "labels.nii.gz",
        "label_map": dict(LABEL_MAP),
        "calibration": "phantom",
        "phantom": str(root / "cases" / case_id / "phantom.json"),
        "xrays": [root / "cases" / case_id / "a.dcm", root / "cases" / case_id / "b.dcm"],
        "kvp": 120.0,
        "age_years": 71.5,
        "sex": "F",
        "dxa_g_cm2": {"dxa_total_hip_left_g_cm2": 0.81},
    }
    return ManifestCase(**(fields | kw))


def test_round_trip_with_relative_paths(tmp_path):
    cases = [
        case(tmp_path),
        case(tmp_path, "c2", calibration="line", calibration_line=(0.8, -3.5), phantom="bmas200"),
        case(tmp_path, "c3", calibration="phantomless", phantom=None, dxa_g_cm2={}),
    ]
    write_manifest(cases, tmp_path / "manifest.csv")
    text = (tmp_path / "manifest.csv").read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert str(tmp_path) not in text  # paths written relative to the manifest
    back = read_manifest(tmp_path / "manifest.csv")
    assert [c.case_id for c in back] == ["c1", "c2", "c3"]
    assert back[0].ct == cases[0].ct.resolve() and back[0].xrays == cases[0].xrays
    assert back[0].phantom == cases[0].phantom and back[0].label_map == LABEL_MAP
    assert back[1].calibration == "line" and back[1].calibration_line == (0.8, -3.5)
    assert back[1].phantom == "bmas200"
    assert back[2].calibration == "phantomless" and back[2].dxa_g_cm2 == {}
    assert back[0].dxa_g_cm2 == {"dxa_total_hip_left_g_cm2": 0.81}
    assert back[0].age_years == 71.5 and back[0].sex == "F" and back[0].kvp == 120.0


def _write(tmp_path: Path, header: str, row: str) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + row + "\n")
    return path


HEADER = "case_id,patient_id,ct,labels,label_map,calibration,phantom,xrays,sex,kvp"
GOOD = "c1,p1,ct.nii.gz,l.nii.gz,femur_left=4;pelvis_left=2,phantom,bmas200,a.dcm,F,120"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (GOOD.replace("phantom,bmas200", "phantom,"), "needs the 'phantom' column"),
        (GOOD.replace("phantom,bmas200", '"line:abc,1",'), "line:SLOPE,INTERCEPT"),
        (GOOD.replace("phantom,bmas200", '"line:-1,0",'), "slope > 0"),
        (GOOD.replace("femur_left=4", "femur=4"), "label_map entries"),
        (GOOD.replace("femur_left=4;pelvis_left=2", "femur_left=4;pelvis_left=4"), "same id"),
        (GOOD.replace(",F,", ",X,"), "sex must be"),
        (GOOD.replace(",120", ",9000"), "kvp = 9000"),
        (GOOD.replace("c1,p1", "c1,"), "'patient_id' is empty"),
    ],
)
def test_bad_rows_name_the_line_and_problem(tmp_path, row, message):
    path = _write(tmp_path, HEADER, row)
    with pytest.raises(InputError, match="line 2") as err:
        read_manifest(path)
    assert message in str(err.value)


def test_missing_columns_duplicates_and_empty(tmp_path):
    with pytest.raises(InputError, match="lacks required column"):
        read_manifest(_write(tmp_path, "case_id,ct", "c1,ct.nii.gz"))
    dup = tmp_path / "dup.csv"
    dup.write_text(HEADER + "\n" + GOOD + "\n" + GOOD + "\n")
    with pytest.raises(InputError, match="appears twice"):
        read_manifest(dup)
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER + "\n")
    with pytest.raises(InputError, match="no cases"):
        read_manifest(empty)
    with pytest.raises(InputError, match="no such manifest"):
        read_manifest(tmp_path / "nope.csv")


def test_implants_column_round_trips_and_is_written_only_when_needed(tmp_path):
    plain = [case(tmp_path), case(tmp_path, "c2")]
    write_manifest(plain, tmp_path / "plain.csv")
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [c.implants for c in read_manifest(tmp_path / "plain.csv")] == [{}, {}]
    mixed = [case(tmp_path), case(tmp_path, "c2", implants={"right": "screws", "left": "nail"})]
    write_manifest(mixed, tmp_path / "mixed.csv")
    lines = (tmp_path / "mixed.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) + ",implants"
    assert lines[2].endswith(",left:nail;right:screws") and lines[1].endswith(",")
    back = read_manifest(tmp_path / "mixed.csv")
    assert back[0].implants == {} and back[1].implants == {"left": "nail", "right": "screws"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("middle:hip_replacement", "implants entries look like left:hip_replacement"),
        ("left:", "implants entries look like"),
        ("left:Hip Replacement", "implants entries look like"),
        ("left:nail;left:screws", "names the left hip twice"),
    ],
)
def test_bad_implants_name_the_line(tmp_path, value, message):
    path = _write(tmp_path, HEADER + ",implants", GOOD + "," + value)
    with pytest.raises(InputError, match="line 2") as err:
        read_manifest(path)
    assert message in str(err.value)


def test_radiograph_geometry_dates_and_dxa_provenance_round_trip(tmp_path):
    import datetime

    from xbmd.dataset.manifest import RadiographInfo

    xrays = [tmp_path / "cases" / "c1" / "a.png", tmp_path / "cases" / "c1" / "b.png"]
    infos = {
        str(xrays[0]): RadiographInfo((0.15, 0.15), 1100.0, 950.0, datetime.date(2024, 3, 1)),
        str(xrays[1]): RadiographInfo((0.2, 0.25), 1150.0, None, datetime.date(2024, 3, 2)),
    }
    full = case(
        tmp_path,
        xrays=xrays,
        radiographs=infos,
        ct_date=datetime.date(2024, 2, 20),
        dxa_dates={"left": datetime.date(2024, 1, 5)},
        dxa_vendors={"left": "lunar"},
        dxa_scale="hologic",
    )
    write_manifest([full, case(tmp_path, "c2")], tmp_path / "m.csv")
    header, first, second = (tmp_path / "m.csv").read_text().splitlines()
    extra = ["xray_pixel_spacing_mm", "xray_sdd_mm", "xray_sod_mm", "xray_dates", "ct_date",
             "dxa_date_left", "dxa_vendor_left", "dxa_scale"]  # fmt: skip
    assert header == ",".join([*COLUMNS, *extra])
    assert ",0.15;0.2x0.25,1100;1150,950;,2024-03-01;2024-03-02,2024-02-20," in first
    assert second.endswith(",,,,,,,,")
    back = read_manifest(tmp_path / "m.csv")
    assert back[0].radiograph(back[0].xrays[0]) == infos[str(xrays[0])]
    assert back[0].radiograph(back[0].xrays[1]) == infos[str(xrays[1])]
    assert back[0].ct_date == datetime.date(2024, 2, 20) and back[0].dxa_scale == "hologic"
    assert back[0].dxa_dates == {"left": datetime.date(2024, 1, 5)}
    assert back[0].dxa_vendors == {"left": "lunar"}
    assert back[1].radiograph(back[1].xrays[0]) == RadiographInfo() and back[1].ct_date is None
    # one value for all of a case's radiographs
    one = _write(tmp_path, HEADER + ",xray_pixel_spacing_mm", GOOD.replace("a.dcm", "a.png;b.png")
                 + ",0.139")  # fmt: skip
    (c,) = read_manifest(one)
    assert [c.radiograph(x).pixel_spacing_mm for x in c.xrays] == [(0.139, 0.139)] * 2


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("xray_pixel_spacing_mm", "0", "xray_pixel_spacing_mm must be a spacing"),
        ("xray_pixel_spacing_mm", "0.1x0.1x0.1", "ROWxCOL"),
        ("xray_pixel_spacing_mm", "0.1;0.2", "2 values for 1 radiographs"),
        ("xray_sdd_mm", "11", "xray_sdd_mm = 11 is outside 300-3000"),
        ("xray_dates", "31/12/2023", "xray_dates must be a date YYYY-MM-DD"),
        ("ct_date", "yesterday", "ct_date must be a date"),
        ("dxa_vendor_left", "acme", "dxa_vendor_left must be one of hologic"),
        ("dxa_scale", "tscore", "dxa_scale must be one of measured"),
    ],
)
def test_bad_geometry_and_date_columns_name_the_line(tmp_path, column, value, message):
    path = _write(tmp_path, HEADER + "," + column, GOOD + "," + value)
    with pytest.raises(InputError, match="line 2") as err:
        read_manifest(path)
    assert message in str(err.value)


def test_sod_beyond_sdd_is_refused(tmp_path):
    path = _write(tmp_path, HEADER + ",xray_sdd_mm,xray_sod_mm", GOOD + ",1000,1100")
    with pytest.raises(InputError, match="xray_sod_mm 1100 must be below xray_sdd_mm 1000"):
        read_manifest(path)
